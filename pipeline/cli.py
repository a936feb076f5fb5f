"""The ``pipeline`` console script: run, simulate, tail, train, backtest.

Errors the user can fix print one line naming the setting or file and exit non-zero;
``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import Settings, load_settings
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML settings file (see config/pipeline.yaml)")
    p.add_argument("--bootstrap-servers", help="Kafka HOST:PORT[,...]; unset: embedded broker")
    p.add_argument("--debug", action="store_true", help="show tracebacks and DEBUG logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the forecasting daemon")
    _add_common(run)
    run.add_argument("--input-topic")
    run.add_argument("--output-topic")
    run.add_argument("--dlq-topic")
    run.add_argument("--group-id")
    run.add_argument("--partitions", type=int, help="partitions of topics the daemon creates")
    run.add_argument("--metrics-port", type=int, help="Prometheus port (0 disables)")
    run.add_argument("--model", type=Path, help="model .pt file (default: the shipped model)")
    feed = run.add_mutually_exclusive_group()
    feed.add_argument(
        "--sample-feed",
        dest="sample_feed",
        action="store_true",
        default=None,
        help="also produce synthetic ticks (default: on with the embedded broker)",
    )
    feed.add_argument("--no-sample-feed", dest="sample_feed", action="store_false")

    sim = sub.add_parser("simulate", help="produce ticks from a CSV or synthetic streams")
    _add_common(sim)
    sim.add_argument("--topic", default=None, help="target topic (default: kafka.input_topic)")
    src = sim.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", type=Path, help="CSV (or .csv.gz) file to replay")
    src.add_argument("--synthetic", type=int, metavar="N", help="N seeded synthetic streams")
    sim.add_argument("--format", choices=["wide", "long"], default="wide")
    sim.add_argument(
        "--time-col", help="time column (wide default: first; long default: timestamp)"
    )
    sim.add_argument("--stream-col", default="symbol", help="long format: stream id column")
    sim.add_argument("--value-col", default="close", help="long format: value column")
    sim.add_argument("--columns", help="wide format: comma-separated columns to replay")
    pace = sim.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, help="ticks per second (all streams together)")
    pace.add_argument("--speedup", type=float, help="replay event time this many times faster")
    sim.add_argument("--limit", type=int, help="stop after this many ticks")
    sim.add_argument("--seed", type=int, default=0)

    tail = sub.add_parser("tail", help="print forecasts from the output topic")
    _add_common(tail)
    tail.add_argument("--topic", default=None, help="forecast topic (default: kafka.output_topic)")
    tail.add_argument("--from-beginning", action="store_true")
    tail.add_argument("--json", action="store_true", help="print raw JSON lines")
    tail.add_argument("--limit", type=int)

    from pipeline.train import add_train_arguments

    add_train_arguments(sub.add_parser("train", help="train a model on CSV history"))
    from pipeline.backtest import add_backtest_arguments

    add_backtest_arguments(
        sub.add_parser("backtest", help="replay CSV history through the engine, score vs baselines")
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    def get(name: str) -> Any:
        return getattr(args, name, None)

    return {
        "kafka": {
            "bootstrap_servers": get("bootstrap_servers"),
            "input_topic": get("input_topic"),
            "output_topic": get("output_topic"),
            "dlq_topic": get("dlq_topic"),
            "group_id": get("group_id"),
            "partitions": get("partitions"),
        },
        "metrics": {"port": get("metrics_port")},
        "model": {"path": get("model")},
        "sample_feed": {"enabled": get("sample_feed")},
    }


def setup_logging(level: str, debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else getattr(logging, level),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kafka").setLevel(logging.WARNING if not debug else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        settings = load_settings(getattr(args, "config", None), _overrides(args))
        setup_logging(settings.log_level, debug)
        if args.command == "run":
            from pipeline.runner import run_daemon

            return run_daemon(settings)
        if args.command == "simulate":
            return _simulate(settings, args)
        if args.command == "tail":
            return _tail(settings, args)
        if args.command == "train":
            from pipeline.train import train_main

            return train_main(args, list(argv) if argv is not None else sys.argv[1:])
        if args.command == "backtest":
            from pipeline.backtest import backtest_main

            return backtest_main(args)
    except PipelineError as exc:
        if debug:
            raise
        print(f"pipeline {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 2


def _require_servers(settings: Settings, command: str) -> str:
    servers = settings.kafka.bootstrap_servers
    if not servers:
        from pipeline.errors import ConfigError

        raise ConfigError(
            f"{command} needs a broker: pass --bootstrap-servers HOST:PORT (the address "
            "`pipeline run` printed) or set PIPELINE_KAFKA__BOOTSTRAP_SERVERS",
            field="kafka.bootstrap_servers",
        )
    return servers


def _simulate(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline import simulate as sim

    servers = _require_servers(settings, "simulate")
    topic = args.topic or settings.kafka.input_topic
    ticks: Any
    if args.synthetic:
        ticks = sim.synthetic_ticks(args.synthetic, seed=args.seed)
        if not (args.rate or args.limit):
            args.rate = 1000.0
    elif args.format == "wide":
        cols = args.columns.split(",") if args.columns else None
        ticks = sim.wide_csv_ticks(args.csv, time_col=args.time_col, columns=cols)
    else:
        ticks = sim.long_csv_ticks(
            args.csv,
            stream_col=args.stream_col,
            time_col=args.time_col or "timestamp",
            value_col=args.value_col,
        )
    from pipeline.kafka_admin import ensure_topics

    ensure_topics(settings.kafka, [topic])
    sent = sim.produce(
        servers, topic, ticks, rate=args.rate, speedup=args.speedup, limit=args.limit
    )
    log.info("event=simulate_done topic=%s sent=%d", topic, sent)
    return 0


def _tail(settings: Settings, args: argparse.Namespace) -> int:
    from pipeline.tail import tail

    _require_servers(settings, "tail")
    kafka = settings.kafka
    if args.topic:
        kafka = kafka.model_copy(update={"output_topic": args.topic})
    stop = threading.Event()
    try:
        tail(
            kafka,
            from_beginning=args.from_beginning,
            as_json=args.json,
            limit=args.limit,
            stop=stop,
        )
    except KeyboardInterrupt:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
