"""Where the daemon's time goes: drain a preloaded topic with the in-process Daemon under cProfile.

``python -m benchmarks.drain_profile [--ticks 30000] [--streams 1000] [--top 40]`` starts an
embedded Tansu broker, produces the ticks (the load generator's random walks), runs
:class:`pipeline.daemon.Daemon` in this process until every tick has an outcome, and prints the
drain rate and the functions with the most cumulative and own time. A developer tool: the figures
the README quotes come from ``python -m benchmarks e2e``, which runs the daemon as its own process.

``--rate R [--seconds S]`` profiles a paced run instead: the load generator offers R ticks/s in
its own process for S seconds while the daemon runs here; it prints the daemon's CPU seconds per
1,000 ticks (this process, all threads) beside the profile: where CPU goes at low rates.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import torch

from pipeline import metrics
from pipeline.config import load_settings
from pipeline.daemon import Daemon
from pipeline.embedded import EmbeddedBroker
from pipeline.kafka_admin import ensure_topics
from pipeline.model import load_model
from pipeline.runner import tune_gc

from . import loadgen


def _time_client_polls(client: str, started: list[float]) -> list[float]:
    """Wrap the consumer client's ``poll`` so its wall time after ``started[0]`` is set, and the
    number of polls that returned records, add up in the returned list."""
    from pipeline.clients import confluent, kafka_python

    cls = confluent.Consumer if client == "confluent-kafka" else kafka_python.Consumer
    original = cls.poll
    spent = [0.0, 0.0]  # seconds, polls that returned records

    def poll(self: object, timeout_ms: int) -> object:
        t0 = time.perf_counter()
        got = original(self, timeout_ms)  # type: ignore[arg-type]
        if started[0]:
            spent[0] += time.perf_counter() - t0
            spent[1] += bool(got)
        return got

    cls.poll = poll  # type: ignore[assignment,method-assign]
    return spent


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=30_000)
    parser.add_argument("--streams", type=int, default=1_000)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--guarantee", default="exactly_once")
    parser.add_argument("--no-profile", action="store_true", help="time only")
    parser.add_argument("--save", help="also write the cProfile stats to this file (pstats)")
    parser.add_argument("--rate", type=float, help="paced run: ticks/s offered (own process)")
    parser.add_argument("--seconds", type=float, default=20.0, help="paced run: duration")
    args = parser.parse_args(argv)
    with EmbeddedBroker() as broker:
        settings = load_settings(
            overrides={
                "kafka": {
                    "bootstrap_servers": broker.bootstrap_servers,
                    "input_topic": "in",
                    "output_topic": "out",
                    "dlq_topic": "dlq",
                    "group_id": "profile",
                    "processing_guarantee": args.guarantee,
                    "session_timeout_ms": 2000,
                    "heartbeat_interval_ms": 500,
                },
                "metrics": {"port": 0},
            }
        )
        ensure_topics(settings.kafka, ["in", "out", "dlq"], 6)
        generator = None
        if args.rate:
            generator = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.loadgen", "--bootstrap-servers",
                 broker.bootstrap_servers, "--topic", "in", "--streams", str(args.streams),
                 "--rate", str(args.rate), "--warmup", "0", "--duration", str(args.seconds)],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
        else:
            producer = loadgen.make_producer(broker.bootstrap_servers)
            loadgen.produce_count(producer, "in", args.ticks, args.streams)
            producer.close()
        torch.set_num_threads(settings.model.torch_threads)  # as pipeline run does
        daemon = Daemon(settings, load_model(None))
        tune_gc()  # likewise
        done = threading.Event()

        def watch() -> None:
            if generator is not None:
                generator.wait()
            else:
                while daemon.totals.consumed < args.ticks and not done.is_set():
                    time.sleep(0.05)
            # Per-thread CPU before shutdown ends the clients' threads.
            at_stop.update(_thread_cpu())
            at_stop["process"], at_stop["ticks"] = time.process_time(), daemon.totals.consumed
            daemon.request_stop()

        threading.Thread(target=watch, daemon=True).start()
        profiler = cProfile.Profile()
        # The clock starts at the first record consumed, not at the group join.
        started = [0.0]
        original = daemon.step

        cpu = [0.0, 0]  # CPU seconds and ticks counted from the first record on
        threads_at_start: dict[str, float] = {}
        at_stop: dict[str, float] = {}

        def step(timeout_ms: int) -> int:
            n = original(timeout_ms)
            if n and not started[0]:
                started[0] = time.perf_counter()
                cpu[:] = [time.process_time(), daemon.totals.consumed]
                threads_at_start.update(_thread_cpu())
            return n

        daemon.step = step  # type: ignore[method-assign]
        in_poll = _time_client_polls(settings.kafka.client, started)
        if not args.no_profile:
            profiler.enable()
        daemon.run()
        profiler.disable()
        done.set()
        seconds = time.perf_counter() - started[0]
        cpu_s, ticks = time.process_time() - cpu[0], daemon.totals.consumed - cpu[1]
        print(
            f"drained {daemon.totals.consumed:,} ticks in {seconds:.2f} s: "
            f"{daemon.totals.consumed / seconds:,.0f} ticks/s ({args.guarantee}, "
            f"{'profiled' if not args.no_profile else 'not profiled'}); "
            f"CPU {cpu_s / max(ticks, 1) * 1000:.3f} s per 1,000 ticks; "
            f"{daemon.totals.commits:,} commits; {in_poll[1]:,.0f} polls with records, "
            f"{in_poll[0]:.2f} s in the client's poll after the first record (waiting for "
            f"fetches, and the client's own decoding)"
        )
        window_s = at_stop.pop("process") - cpu[0]
        window_ticks = at_stop.pop("ticks") - cpu[1]
        spent = {k: v - threads_at_start.get(k, 0.0) for k, v in at_stop.items()}
        spent["ended threads"] = window_s - sum(spent.values())  # e.g. per-commit watchdogs
        print(
            "CPU s per 1,000 ticks by thread (until the stop request): "
            + ", ".join(
                f"{k} {v / max(window_ticks, 1) * 1000:.3f}"
                for k, v in sorted(spent.items(), key=lambda kv: -kv[1])
                if v > 0
            )
        )
        metrics.ACTIVE_STREAMS.set(0)
    if not args.no_profile:
        if args.save:
            profiler.dump_stats(args.save)
        stats = pstats.Stats(profiler).strip_dirs()
        stats.sort_stats("cumulative").print_stats(args.top)
        stats.sort_stats("tottime").print_stats(args.top)
    return 0


def _thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of this process's threads, by thread name (Linux /proc):
    the main thread, Python's other threads (``python``: kafka-python's IO thread, the
    watchdogs), librdkafka's (``rdk:...``). Empty where /proc is not there."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    python_names = {t.native_id: t.name for t in threading.enumerate()}
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # the thread ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if int(tid) == os.getpid():
            name = "main"
        elif int(tid) in python_names:
            name = python_names[int(tid)]
        elif name.startswith("rdk:broker"):
            name = "rdk:broker"  # one per broker connection: sum them
        out[name] = out.get(name, 0.0) + seconds
    return out


if __name__ == "__main__":
    raise SystemExit(main())
