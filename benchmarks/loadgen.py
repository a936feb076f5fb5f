"""Load generator: ticks ``{"ts": <wall-clock send time>, "value": x}`` keyed by stream id.

``ts`` is ``time.time()`` taken just before ``send()``, so a reader can compute end-to-end latency
from the forecast's echoed ``ts``. Two modes:

- paced: ``--rate R --warmup W --duration D`` sends R ticks/s for W + D seconds; ticks whose ``ts``
  falls in the last D seconds are the measured window;
- count: ``--count N`` sends N ticks as fast as the client allows (pre-loading a backlog).

Run as ``python -m benchmarks.loadgen ...``; prints one JSON summary line on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from kafka import KafkaProducer

PRODUCER_SETTINGS: dict[str, object] = {
    "linger_ms": 5,
    "batch_size": 64 * 1024,
    "enable_idempotence": False,
}


def stream_names(n_streams: int) -> list[bytes]:
    return [f"stream-{i:05d}".encode() for i in range(n_streams)]


def values(n_streams: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Endless rounds of one value per stream: random walks at scales from 1e-3 to 1e5."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-3, 5, n_streams)
    level = scale * rng.uniform(1, 10, n_streams)
    while True:
        level = level + scale * rng.normal(0, 0.05, n_streams)
        yield level


def make_producer(bootstrap: str) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=bootstrap.split(","), **PRODUCER_SETTINGS)


def produce_count(
    producer: KafkaProducer, topic: str, count: int, n_streams: int, seed: int = 0
) -> dict[str, Any]:
    """Send ``count`` ticks round-robin over the streams as fast as possible, then flush."""
    names = stream_names(n_streams)
    rounds = values(n_streams, seed)
    send, now, dumps = producer.send, time.time, json.dumps
    started = time.perf_counter()
    sent = 0
    while sent < count:
        row = next(rounds).tolist()
        for i in range(min(n_streams, count - sent)):
            send(topic, key=names[i], value=dumps({"ts": now(), "value": row[i]}).encode())
        sent += min(n_streams, count - sent)
    producer.flush()
    seconds = time.perf_counter() - started
    return {"mode": "count", "sent": sent, "seconds": seconds, "rate": sent / seconds}


def produce_paced(
    producer: KafkaProducer,
    topic: str,
    rate: float,
    warmup: float,
    duration: float,
    n_streams: int,
    seed: int = 1,
) -> dict[str, Any]:
    """Send ``rate`` ticks/s for ``warmup + duration`` s; count those in the measured window."""
    names = stream_names(n_streams)
    rounds = values(n_streams, seed)
    send, now, dumps = producer.send, time.time, json.dumps
    row: list[float] = []
    t0 = time.monotonic()
    wall0 = time.time()
    measure_start, measure_end = wall0 + warmup, wall0 + warmup + duration
    total = warmup + duration
    sent = measured = 0
    worst_behind = 0.0
    while True:
        elapsed = time.monotonic() - t0
        if elapsed >= total:
            break
        due = int(elapsed * rate) + 1
        worst_behind = max(worst_behind, (due - sent) / rate)
        while sent < due:
            i = sent % n_streams
            if i == 0:
                row = next(rounds).tolist()
            ts = now()
            send(topic, key=names[i], value=dumps({"ts": ts, "value": row[i]}).encode())
            if measure_start <= ts < measure_end:
                measured += 1
            sent += 1
        sleep = t0 + sent / rate - time.monotonic()
        if sleep > 0.001:
            time.sleep(sleep)
    producer.flush()
    return {
        "mode": "paced",
        "offered_rate": rate,
        "sent": sent,
        "measured": measured,
        "measure_start": measure_start,
        "measure_end": measure_end,
        "achieved_rate": measured / duration,
        "worst_behind_s": worst_behind,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__)
    p.add_argument("--bootstrap-servers", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float)
    mode.add_argument("--count", type=int)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=20.0)
    a = p.parse_args(argv)
    producer = make_producer(a.bootstrap_servers)
    try:
        if a.count is not None:
            summary = produce_count(producer, a.topic, a.count, a.streams, a.seed)
        else:
            summary = produce_paced(
                producer, a.topic, a.rate, a.warmup, a.duration, a.streams, a.seed
            )
    finally:
        producer.close(timeout=10)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
