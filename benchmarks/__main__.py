"""``python -m benchmarks [engine] [e2e] [--quick] [--json PATH]``: run, print, save JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .report import busy_cores, load_note, machine

PARTS = ("engine", "e2e")


def _plain(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python numbers, NaN/inf (failed runs) to null."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, str | bytes):
        obj = obj.item()
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    return obj


def _run_part(
    name: str,
    run: Callable[[Any], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    cfg: Any,
) -> tuple[dict[str, Any], str]:
    """Run one benchmark part with the background load noted beside it; print and return it."""
    print(f"running {name} benchmark ...", flush=True)
    load = busy_cores()
    t0 = time.perf_counter()
    result = run(cfg)
    result["background_busy_cores"] = load
    result["seconds"] = time.perf_counter() - t0
    text = f"{load_note(load)}\n{render(result)}\n({name} part: {result['seconds']:.0f} s)"
    print("\n" + text + "\n", flush=True)
    return result, text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("parts", nargs="*", metavar="PART", help="engine and/or e2e (default: both)")
    p.add_argument("--quick", action="store_true", help="short smoke version (~1 minute)")
    p.add_argument("--json", type=Path, default=Path("out/bench.json"), help="results file")
    p.add_argument("--repeats", type=int, help="engine: repeats per measurement (default 5)")
    p.add_argument("--rate", type=float, help="e2e: offered ticks/s of the paced run")
    p.add_argument("--duration", type=float, help="e2e: measured seconds of the paced run")
    p.add_argument("--preload", type=int, help="e2e: ticks pre-loaded for the saturation run")
    p.add_argument("--sat-repeats", type=int, help="e2e: drains per system")
    p.add_argument(
        "--profile", action="store_true", help="e2e: one extra drain per system under py-spy"
    )
    p.add_argument(
        "--client",
        choices=("kafka-python", "confluent-kafka"),
        help="e2e: the Kafka client of the daemon and the passthrough (default kafka-python)",
    )
    p.add_argument(
        "--daemon-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="e2e: extra environment for the daemon, e.g. PIPELINE_MODEL__TORCH_THREADS=1",
    )
    args = p.parse_args(argv)
    unknown = [x for x in args.parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    parts = [x for x in PARTS if x in args.parts] or list(PARTS)

    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "machine": machine(),
    }
    out_text: list[str] = []
    started = time.perf_counter()
    m = results["machine"]
    header = (
        f"machine: {m['cpus']} CPUs ({m.get('cpu_model', '?')}), python {m['python']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads), kafka-python "
        f"{m.get('kafka_python', '?')}{' [--quick]' if args.quick else ''}"
    )
    print(header, flush=True)
    if "engine" in parts:
        from . import engine_bench

        ecfg = engine_bench.EngineConfig.quick() if args.quick else engine_bench.EngineConfig()
        if args.repeats:
            ecfg.repeats = args.repeats
        results["engine"], text = _run_part("engine", engine_bench.run, engine_bench.render, ecfg)
        out_text.append(text)
    if "e2e" in parts:
        from . import e2e_bench

        cfg = e2e_bench.E2EConfig.quick() if args.quick else e2e_bench.E2EConfig()
        for name, value in (
            ("rate", args.rate),
            ("duration_s", args.duration),
            ("preload", args.preload),
            ("sat_repeats", args.sat_repeats),
        ):
            if value is not None:
                setattr(cfg, name, value)
        cfg.profile = args.profile
        cfg.client = args.client or cfg.client
        for item in args.daemon_env:
            key, sep, value = item.partition("=")
            if not sep:
                p.error(f"--daemon-env wants KEY=VALUE, got {item!r}")
            cfg.daemon_env[key] = value
        results["e2e"], text = _run_part("e2e", e2e_bench.run, e2e_bench.render, cfg)
        out_text.append(text)
    results["seconds"] = time.perf_counter() - started
    results["text"] = "\n\n".join([header, *out_text])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_plain(results), indent=2, allow_nan=False) + "\n")
    print(f"total {results['seconds']:.0f} s; results written to {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
