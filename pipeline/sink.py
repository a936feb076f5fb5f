"""Writing results: forecasts to the output topic, rejections to the dead-letter topic.

Sends are asynchronous; :meth:`Sink.flush` waits for every acknowledgement and raises if any send
failed, so the daemon commits input offsets only for outputs that the broker holds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kafka import KafkaProducer
from kafka.producer.future import FutureRecordMetadata

from pipeline.config import KafkaSettings
from pipeline.engine import ForecastBatch
from pipeline.errors import BrokerError
from pipeline.kafka_admin import client_options
from pipeline.messages import Rejection, encode_forecast

log = logging.getLogger(__name__)


class Sink:
    """Producer for forecasts and dead letters (at-least-once)."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.output_topic = kafka.output_topic
        self.dlq_topic = kafka.dlq_topic
        self.producer = KafkaProducer(
            **client_options(kafka),
            acks="all",
            linger_ms=kafka.linger_ms,
            compression_type=None if kafka.compression_type == "none" else kafka.compression_type,
            # Idempotence breaks for good on a broker restart with Tansu; ordering is kept by
            # allowing one in-flight request per connection instead.
            enable_idempotence=False,
            max_in_flight_requests_per_connection=1,
            retries=5,
        )
        self._pending: list[FutureRecordMetadata] = []

    def send_forecasts(self, batch: ForecastBatch, model_version: str) -> None:
        """Queue one forecast record per row of ``batch``, keyed by stream."""
        send, topic, pending = self.producer.send, self.output_topic, self._pending
        seqs, warm, rows = batch.seq.tolist(), batch.warm.tolist(), batch.forecast.tolist()
        for i, tick in enumerate(batch.ticks):
            value = encode_forecast(tick.stream, tick.ts, seqs[i], rows[i], model_version, warm[i])
            src = tick.source
            headers = [
                ("source.partition", str(src.partition).encode()),
                ("source.offset", str(src.offset).encode()),
            ]
            pending.append(send(topic, key=tick.stream.encode(), value=value, headers=headers))

    def send_dead_letters(self, rejections: Sequence[Rejection]) -> None:
        """Queue each rejection with its original key and value bytes and reason headers."""
        for rej in rejections:
            self._pending.append(
                self.producer.send(
                    self.dlq_topic, key=rej.key, value=rej.value, headers=rej.headers()
                )
            )

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until every queued record is acknowledged; raise BrokerError on any failure."""
        pending, self._pending = self._pending, []
        self.producer.flush(timeout=timeout_s)
        failed = [f for f in pending if not f.is_done or f.failed()]
        if failed:
            first = failed[0]
            cause = first.exception if first.is_done else "timed out"
            raise BrokerError(f"{len(failed)} of {len(pending)} sends failed (first: {cause})")

    def close(self) -> None:
        self.producer.close(timeout=10)
