"""Writing results: forecasts to the output topic, rejections to the dead-letter topic.

Sends are asynchronous; :meth:`Sink.flush` waits for every acknowledgement. If any send of the
micro-batch failed (a broker restart, say), the producer is rebuilt and the whole batch is sent
again until it goes through or the daemon is asked to stop: the daemon commits input offsets only
for outputs the broker holds. A resent batch can duplicate records that did get through; they
carry the same ``seq`` and readers drop them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.producer.future import FutureRecordMetadata

from pipeline import metrics
from pipeline.config import KafkaSettings
from pipeline.engine import ForecastBatch
from pipeline.errors import BrokerError
from pipeline.kafka_admin import client_options
from pipeline.messages import Rejection, encode_forecast

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
OutRecord = tuple[str, bytes | None, bytes | None, Headers]  # topic, key, value, headers

MAX_BACKOFF_S = 10.0


class Sink:
    """Producer for forecasts and dead letters (at-least-once)."""

    def __init__(self, kafka: KafkaSettings, stop: threading.Event | None = None) -> None:
        self.kafka = kafka
        self.output_topic = kafka.output_topic
        self.dlq_topic = kafka.dlq_topic
        self.stop = stop or threading.Event()
        self.producer = self._new_producer()
        self._batch: list[OutRecord] = []
        self._pending: list[FutureRecordMetadata] = []
        self._broken: str | None = None  # a send() that raised: the batch must be resent

    def _new_producer(self) -> KafkaProducer:
        kafka = self.kafka
        try:
            return KafkaProducer(
                **client_options(kafka),
                acks="all",
                linger_ms=kafka.linger_ms,
                compression_type=None
                if kafka.compression_type == "none"
                else kafka.compression_type,
                # Idempotence breaks for good on a broker restart with Tansu; ordering is kept
                # by allowing one in-flight request per connection instead.
                enable_idempotence=False,
                max_in_flight_requests_per_connection=1,
                retries=5,
                max_block_ms=10_000,
            )
        except KafkaError as exc:
            raise BrokerError(
                f"cannot create a producer for {kafka.bootstrap_servers}: {exc}"
            ) from exc

    def _dispatch(self, records: Sequence[OutRecord]) -> None:
        """Hand ``records`` to the producer; a send that raises marks the batch for resending."""
        if self._broken is not None:
            return
        send, pending = self.producer.send, self._pending
        try:
            for topic, key, value, headers in records:
                pending.append(send(topic, key=key, value=value, headers=headers))
        except KafkaError as exc:
            self._broken = repr(exc)

    def send_forecasts(self, batch: ForecastBatch, model_version: str) -> None:
        """Queue one forecast record per row of ``batch``, keyed by stream."""
        topic = self.output_topic
        seqs, warm, rows = batch.seq.tolist(), batch.warm.tolist(), batch.forecast.tolist()
        records: list[OutRecord] = []
        for i, tick in enumerate(batch.ticks):
            value = encode_forecast(tick.stream, tick.ts, seqs[i], rows[i], model_version, warm[i])
            src = tick.source
            headers = [
                ("source.partition", str(src.partition).encode()),
                ("source.offset", str(src.offset).encode()),
            ]
            records.append((topic, tick.stream.encode(), value, headers))
        self._batch.extend(records)
        self._dispatch(records)

    def send_dead_letters(self, rejections: Sequence[Rejection]) -> None:
        """Queue each rejection with its original key and value bytes and reason headers."""
        records = [(self.dlq_topic, r.key, r.value, r.headers()) for r in rejections]
        self._batch.extend(records)
        self._dispatch(records)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until every queued record is acknowledged, resending the batch on failure.

        Raises BrokerError only if the daemon is stopping before the batch got through.
        """
        attempt = 0
        while True:
            failed = self._wait(timeout_s)
            if failed is None:
                self._batch = []
                return
            attempt += 1
            metrics.SEND_RETRIES.inc()
            delay = min(0.5 * 2**attempt, MAX_BACKOFF_S)
            log.warning(
                "event=send_failed records=%d attempt=%d retry_in_s=%.1f error=%r",
                len(self._batch), attempt, delay, failed,
            )  # fmt: skip
            if self.stop.wait(delay):
                raise BrokerError(f"stopping with {len(self._batch)} unsent records ({failed})")
            self._rebuild()

    def _wait(self, timeout_s: float) -> str | None:
        pending, self._pending = self._pending, []
        if self._broken is not None:
            broken, self._broken = self._broken, None
            return broken
        try:
            self.producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            return repr(exc)
        failed = [f for f in pending if not f.is_done or f.failed()]
        if not failed:
            return None
        first = failed[0]
        return repr(first.exception) if first.is_done else "timed out"

    def _rebuild(self) -> None:
        """A fresh producer (the old one may be wedged after a broker restart), then resend."""
        try:
            self.producer.close(timeout=0)
        except Exception:  # closing a broken producer can fail in many ways; it is discarded
            log.debug("event=producer_close_failed", exc_info=True)
        try:
            self.producer = self._new_producer()
        except BrokerError as exc:
            log.warning("event=producer_rebuild_failed error=%s", exc)
            return  # the next flush attempt fails fast and backs off again
        self._dispatch(self._batch)

    def close(self) -> None:
        try:
            self.producer.close(timeout=10)
        except KafkaError:
            log.warning("event=producer_close_failed", exc_info=True)
