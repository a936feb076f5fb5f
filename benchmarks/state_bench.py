"""State memory and restore: RSS per live stream, RSS under eviction, changelog restore time.

``python -m benchmarks.state_bench [--quick]``. Baseline: the process RSS right after the
model and an empty engine are loaded, measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import KafkaSettings
from pipeline.engine import Engine
from pipeline.messages import Source, Tick
from pipeline.model import load_model
from pipeline.state import Snapshot


def rss_bytes() -> int:
    """Current resident set size (Linux /proc), bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _feed(engine: Engine, ids: range, ts: float, rng: np.random.Generator) -> None:
    src = Source("bench", 0, 0)
    values = rng.normal(100, 5, len(ids)).tolist()
    engine.process([Tick(f"s{i}", ts, (v,), src) for i, v in zip(ids, values, strict=True)])


def live_streams(n: int, batch: int = 10_000) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    engine = Engine(load_model(None))
    gc.collect()
    base = rss_bytes()
    for start in range(0, n, batch):
        _feed(engine, range(start, min(start + batch, n)), 1.0, rng)
    gc.collect()
    used = rss_bytes() - base
    return {"streams": n, "baseline_rss_mb": base / 2**20, "rss_above_baseline_mb": used / 2**20,
            "bytes_per_stream": used / n, "state_bytes_per_stream": engine.store.state_bytes() / n,
            "target_bytes_per_stream": 2048}  # fmt: skip


def under_eviction(total: int, cap: int, batch: int = 10_000) -> dict[str, Any]:
    """``total`` distinct streams pass through; the least recently seen beyond ``cap`` go."""
    rng = np.random.default_rng(1)
    engine = Engine(load_model(None))
    gc.collect()
    base = rss_bytes()
    peak = 0
    started = time.perf_counter()
    for start in range(0, total, batch):
        _feed(engine, range(start, min(start + batch, total)), float(start), rng)
        store = engine.store
        for stream in store.oldest(len(store) - cap):
            store.evict(stream)
        peak = max(peak, rss_bytes() - base)
    return {"streams_seen": total, "cap": cap, "live_at_end": len(engine.store),
            "peak_rss_above_baseline_mb": peak / 2**20,
            "seconds": time.perf_counter() - started}  # fmt: skip


def restore_time(n: int) -> dict[str, Any]:
    """Write ``n`` snapshots to a changelog on an embedded broker, then time a full restore."""
    from kafka import KafkaProducer

    from pipeline.embedded import EmbeddedBroker
    from pipeline.kafka_admin import ensure_topics
    from pipeline.source import read_changelog

    rng = np.random.default_rng(2)
    engine = Engine(load_model(None))
    for start in range(0, n, 10_000):
        _feed(engine, range(start, min(start + 10_000, n)), 1.0, rng)
    store = engine.store
    with EmbeddedBroker() as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        ensure_topics(kafka, ["bench.state"], 1)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=20,
                                 batch_size=256 * 1024, enable_idempotence=False)  # fmt: skip
        t0 = time.perf_counter()
        for stream in list(store.slot_of):
            producer.send("bench.state", key=stream.encode(), value=store.snapshot(stream),
                          partition=0)  # fmt: skip
        producer.flush()
        write_s = time.perf_counter() - t0
        producer.close()
        t0 = time.perf_counter()
        latest, records = read_changelog(kafka, "bench.state", {0: 2**62})
        read_s = time.perf_counter() - t0
    blobs = {s: v for s, v in latest.items() if v is not None}
    # Baseline, same run: decode and install one stream at a time (the path before bulk install).
    one_by_one = Engine(load_model(None))
    t0 = time.perf_counter()
    for stream, blob in blobs.items():
        one_by_one.store.restore(stream, Snapshot.decode(blob))
    single_s = time.perf_counter() - t0
    target = Engine(load_model(None))
    t0 = time.perf_counter()
    target.store.install(blobs)
    bulk_s = time.perf_counter() - t0
    same = all(target.store.snapshot(s) == one_by_one.store.snapshot(s) for s in list(blobs)[:1000])
    snapshot_bytes = len(store.snapshot(next(iter(store.slot_of))))
    return {"streams": n, "records": records, "snapshot_bytes": snapshot_bytes,
            "write_seconds": write_s, "read_seconds": read_s, "install_seconds": bulk_s,
            "install_one_by_one_seconds": single_s, "restore_seconds": read_s + bulk_s,
            "same_state": same, "restored": len(target.store)}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.state_bench", description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path, default=Path("out/state_bench.json"))
    args = p.parse_args()
    scale = 10 if args.quick else 1
    out = {
        "live": live_streams(100_000 // scale),
        "eviction": under_eviction(1_000_000 // scale, 100_000 // scale),
        "restore": restore_time(100_000 // scale),
    }
    live, ev, rs = out["live"], out["eviction"], out["restore"]
    print(f"live streams {live['streams']:,}: {live['bytes_per_stream']:.0f} B/stream above the "
          f"baseline RSS of {live['baseline_rss_mb']:.0f} MB (target <= 2048 B; arrays alone "
          f"{live['state_bytes_per_stream']:.0f} B)")  # fmt: skip
    print(f"{ev['streams_seen']:,} streams through a cap of {ev['cap']:,}: peak "
          f"{ev['peak_rss_above_baseline_mb']:.0f} MB above baseline, {ev['live_at_end']:,} live "
          f"at the end ({ev['seconds']:.0f} s)")  # fmt: skip
    print(f"restore {rs['restored']:,} streams ({rs['snapshot_bytes']} B snapshots): read "
          f"{rs['read_seconds']:.1f} s, bulk install {rs['install_seconds']:.2f} s against "
          f"{rs['install_one_by_one_seconds']:.2f} s one stream at a time (same run, "
          f"{rs['install_one_by_one_seconds'] / rs['install_seconds']:.0f}x; same state: "
          f"{rs['same_state']}); writing them took {rs['write_seconds']:.1f} s")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
