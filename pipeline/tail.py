"""``pipeline tail``: read the forecast topic and print forecasts, dropping repeats by ``seq``."""

from __future__ import annotations

import json
import sys
import threading
from typing import TextIO

from pipeline.config import KafkaSettings
from pipeline.kafka_admin import client_options


def format_forecast(doc: dict[str, object]) -> str:
    """One readable line: stream, seq, event time, the forecast values and the warm flag."""
    values = doc.get("forecast") or []
    shown = ", ".join(f"{v:.6g}" for v in values[:6]) if isinstance(values, list) else "?"
    more = " …" if isinstance(values, list) and len(values) > 6 else ""
    warm = "" if doc.get("warm") else "  (warming up)"
    return (
        f"{doc.get('stream')}  seq={doc.get('seq')}  ts={doc.get('ts')}  next=[{shown}{more}]{warm}"
    )


def tail(
    kafka: KafkaSettings,
    *,
    from_beginning: bool = False,
    as_json: bool = False,
    limit: int | None = None,
    out: TextIO = sys.stdout,
    stop: threading.Event | None = None,
) -> int:
    """Print forecasts until ``limit`` are printed or ``stop`` is set; returns the count printed."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        kafka.output_topic,
        **client_options(kafka),
        group_id=None,
        auto_offset_reset="earliest" if from_beginning else "latest",
        isolation_level="read_committed",
        enable_auto_commit=False,
    )
    last_seq: dict[str, int] = {}
    printed = 0
    try:
        while (limit is None or printed < limit) and not (stop and stop.is_set()):
            for records in consumer.poll(timeout_ms=500).values():
                for rec in records:
                    doc = json.loads(rec.value)
                    stream, seq = str(doc.get("stream")), int(doc.get("seq", 0))
                    if seq <= last_seq.get(stream, 0):
                        continue  # a repeat after an at-least-once redelivery
                    last_seq[stream] = seq
                    print(rec.value.decode() if as_json else format_forecast(doc), file=out)
                    printed += 1
            out.flush()
    finally:
        consumer.close()
    return printed
