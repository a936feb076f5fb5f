"""The baseline system: a bare passthrough with the daemon's client settings, per client.

Consumer group → ``json.loads`` each value → ``json.dumps`` a small dict echoing ``ts`` →
``producer.send``; per poll batch: flush, then commit (at-least-once), like the daemon's loop.
``--client confluent-kafka`` runs the same loop on librdkafka.
Run as ``python -m benchmarks.passthrough --bootstrap-servers B --input-topic I --output-topic O
--group-id G``; SIGTERM/SIGINT finish the batch in hand, flush, commit and exit 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

# The daemon's Source/Sink settings (pipeline.config.KafkaSettings defaults), plus the short
# group timings the benchmark also gives the daemon through its environment.
CONSUMER_SETTINGS: dict[str, object] = {
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "session_timeout_ms": 2000,
    "heartbeat_interval_ms": 500,
    "max_poll_interval_ms": 300_000,
    "fetch_max_wait_ms": 100,
    "max_poll_records": 5000,
    "isolation_level": "read_committed",
}
PRODUCER_SETTINGS: dict[str, object] = {
    "acks": "all",
    "linger_ms": 5,
    "enable_idempotence": False,
    "max_in_flight_requests_per_connection": 1,
    "retries": 5,
}


def run(bootstrap: str, input_topic: str, output_topic: str, group: str) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    servers = bootstrap.split(",")
    producer = KafkaProducer(
        bootstrap_servers=servers, client_id="passthrough", **PRODUCER_SETTINGS
    )
    consumer = KafkaConsumer(
        bootstrap_servers=servers, client_id="passthrough", group_id=group, **CONSUMER_SETTINGS
    )
    consumer.subscribe([input_topic])
    loads, dumps, send = json.loads, json.dumps, producer.send
    handled = 0
    try:
        while not stop.is_set():
            batches = consumer.poll(timeout_ms=200)
            if not batches:
                continue
            offsets: dict[TopicPartition, OffsetAndMetadata] = {}
            for tp, records in batches.items():
                for rec in records:
                    doc = loads(rec.value)
                    out = {"stream": rec.key.decode(), "ts": doc["ts"], "value": doc["value"]}
                    send(output_topic, key=rec.key, value=dumps(out).encode())
                if records:
                    offsets[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
                    handled += len(records)
            producer.flush(timeout=30)
            consumer.commit(offsets)
    finally:
        producer.flush(timeout=10)
        consumer.close(autocommit=False)
        producer.close(timeout=10)
        print(f"passthrough: handled={handled}", file=sys.stderr, flush=True)
    return 0


def run_confluent(bootstrap: str, input_topic: str, output_topic: str, group: str) -> int:
    """The same loop on confluent-kafka (librdkafka), with the daemon's settings for that client
    (pipeline.clients.confluent): poll for the first record, then take what is fetched."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    common = {"bootstrap.servers": bootstrap, "client.id": "passthrough"}
    producer = Producer({**common, "acks": "all", "linger.ms": 5, "enable.idempotence": False,
                         "max.in.flight.requests.per.connection": 1, "batch.size": 256 * 1024,
                         "delivery.report.only.error": True})  # fmt: skip
    consumer = Consumer({**common, "group.id": group, "enable.auto.commit": False,
                         "auto.offset.reset": "earliest", "session.timeout.ms": 2000,
                         "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 100,
                         "isolation.level": "read_committed"})  # fmt: skip
    consumer.subscribe([input_topic])
    loads, dumps, produce = json.loads, json.dumps, producer.produce
    max_records = int(CONSUMER_SETTINGS["max_poll_records"])  # type: ignore[call-overload]
    handled = 0
    try:
        while not stop.is_set():
            first = consumer.poll(0.2)
            if first is None:
                continue
            messages = [first, *consumer.consume(max_records - 1, 0)]
            offsets: dict[int, int] = {}
            for m in messages:
                if m.error() is not None:
                    continue
                key = m.key() or b""
                doc = loads(m.value() or b"null")
                out = {"stream": key.decode(), "ts": doc["ts"], "value": doc["value"]}
                produce(output_topic, dumps(out).encode(), key)
                offsets[m.partition() or 0] = (m.offset() or 0) + 1
                handled += 1
            producer.flush(30)
            if offsets:
                positions = [TopicPartition(input_topic, p, o) for p, o in offsets.items()]
                consumer.commit(offsets=positions, asynchronous=False)
    finally:
        producer.flush(10)
        consumer.close()
        print(f"passthrough: handled={handled}", file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.passthrough", description=__doc__)
    p.add_argument("--bootstrap-servers", required=True)
    p.add_argument("--input-topic", required=True)
    p.add_argument("--output-topic", required=True)
    p.add_argument("--group-id", required=True)
    p.add_argument("--client", choices=("kafka-python", "confluent-kafka"), default="kafka-python")
    a = p.parse_args(argv)
    loop = run_confluent if a.client == "confluent-kafka" else run
    return loop(a.bootstrap_servers, a.input_topic, a.output_topic, a.group_id)


if __name__ == "__main__":
    sys.exit(main())
