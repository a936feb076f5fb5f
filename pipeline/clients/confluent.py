"""confluent-kafka (librdkafka) behind the client protocols: ``kafka.client: confluent-kafka``.

An optional extra (``pip install 'pipeline[librdkafka]'``): librdkafka moves ~5x more records
per core than kafka-python (../shared/notes/broker.md). What differs from kafka-python and is
absorbed here:

- ``consume(n, timeout)`` waits the whole timeout to fill ``n``; :meth:`Consumer.poll` blocks
  for the first record only, then takes what is already fetched, as kafka-python's poll does.
- Rebalance callbacks run inside the poll, on the caller's thread. The adapter assigns the
  partitions itself before calling ``on_assigned``, so pausing them there holds; a lost
  assignment is reported as revoked; ``close()`` would call ``on_revoke`` again, so callbacks
  are muted while closing (kafka-python calls none there).
- ``produce()`` raises BufferError when the local queue is full: serve delivery reports and
  try again. Only failed deliveries call back (``delivery.report.only.error``).
- Transactional calls take their own timeouts (a little under the sink's watchdog); a fenced
  producer reports ``_FENCED``/``PRODUCER_FENCED``. There is no ``close()``: flush, then purge
  what is left so a discarded producer sends nothing more.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition
from confluent_kafka import Consumer as RdConsumer
from confluent_kafka import Producer as RdProducer

from pipeline.clients import ClientError, OutRecord, PartitionsCallback, ReadRecord, StateRecord
from pipeline.config import KafkaSettings
from pipeline.errors import BrokerError
from pipeline.ticks import RawRecord

log = logging.getLogger(__name__)

FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
UNSUPPORTED = {KafkaError._UNSUPPORTED_FEATURE, KafkaError.UNSUPPORTED_VERSION}
# ConsumerClient.committed reports a partition without a committed offset as 0; librdkafka's
# sentinels for it (OFFSET_INVALID and friends) are negative, so max() with this maps them.
NONE_COMMITTED = 0


def _common(kafka: KafkaSettings) -> dict[str, object]:
    """librdkafka settings shared by consumers and producers."""
    conf: dict[str, object] = {
        "bootstrap.servers": kafka.bootstrap_servers or "",
        "client.id": kafka.client_id,
        "security.protocol": kafka.security_protocol,
        "logger": logging.getLogger("confluent_kafka"),
        "error_cb": _log_error,
    }
    if kafka.sasl_mechanism:
        conf["sasl.mechanism"] = kafka.sasl_mechanism
        conf["sasl.username"] = kafka.sasl_username or ""
        conf["sasl.password"] = (
            kafka.sasl_password.get_secret_value() if kafka.sasl_password else ""
        )
    return conf


def _log_error(err: KafkaError) -> None:
    """Client-wide errors (all brokers down, ...): librdkafka retries them itself."""
    log.warning("event=client_error error=%s fatal=%s", err, err.fatal())


class Consumer:
    """:class:`~pipeline.clients.ConsumerClient` on a librdkafka group consumer."""

    def __init__(
        self, kafka: KafkaSettings, on_assigned: PartitionsCallback, on_revoked: PartitionsCallback
    ) -> None:
        self.topic = kafka.input_topic
        self.max_records = kafka.max_poll_records
        self.on_assigned, self.on_revoked = on_assigned, on_revoked
        self._closing = False
        self.cooperative = kafka.assignor == "cooperative-sticky"
        conf = {
            **_common(kafka),
            "group.id": kafka.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": kafka.auto_offset_reset,
            "session.timeout.ms": kafka.session_timeout_ms,
            "heartbeat.interval.ms": kafka.heartbeat_interval_ms,
            "max.poll.interval.ms": max(kafka.max_poll_interval_ms, kafka.session_timeout_ms),
            "fetch.wait.max.ms": kafka.fetch_max_wait_ms,
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
            "partition.assignment.strategy": kafka.assignor,
        }
        try:
            self.consumer = RdConsumer(conf)
            self.consumer.subscribe(
                [self.topic], on_assign=self._assigned, on_revoke=self._revoked,
                on_lost=self._revoked,
            )  # fmt: skip
        except KafkaException as exc:
            raise BrokerError(f"cannot join group at {kafka.bootstrap_servers}: {exc}") from exc

    def _assigned(self, consumer: RdConsumer, partitions: list[TopicPartition]) -> None:
        if self.cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if not self._closing:
            self.on_assigned(sorted(tp.partition for tp in partitions))

    def _revoked(self, consumer: RdConsumer, partitions: list[TopicPartition]) -> None:
        if not self._closing:
            self.on_revoked(sorted(tp.partition for tp in partitions))

    def _tp(self, partition: int, offset: int | None = None) -> TopicPartition:
        if offset is None:
            return TopicPartition(self.topic, partition)
        return TopicPartition(self.topic, partition, offset)

    def poll(self, timeout_ms: int) -> dict[int, list[RawRecord]]:
        first = self.consumer.poll(timeout_ms / 1000)
        if first is None:
            return {}
        messages = [first]
        if self.max_records > 1:
            messages.extend(self.consumer.consume(self.max_records - 1, 0))
        out: dict[int, list[RawRecord]] = {}
        for m in messages:
            err = m.error()
            if err is not None:
                log.warning("event=consumer_error error=%s", err)
                if err.fatal():
                    raise BrokerError(f"the consumer failed for good: {err}")
                continue
            p: int = m.partition()  # type: ignore[assignment]  # set on every record
            records = out.get(p)
            if records is None:
                records = out[p] = []
            offset: int = m.offset()  # type: ignore[assignment]
            records.append((m.key(), m.value(), p, offset, m.timestamp()[1]))
        return out

    def highwater(self, partition: int) -> int | None:
        try:
            _, high = self.consumer.get_watermark_offsets(self._tp(partition), cached=True)
        except KafkaException:
            return None
        return None if high is None or high < 0 else int(high)

    def lag(self) -> dict[int, int]:
        out: dict[int, int] = {}
        assigned = self.consumer.assignment()
        if not assigned:
            return out
        for tp in self.consumer.position(assigned):
            high = self.highwater(tp.partition)
            if high is not None and tp.offset >= 0:
                out[tp.partition] = max(high - tp.offset, 0)
        return out

    def commit(self, offsets: dict[int, int]) -> None:
        try:
            done = self.consumer.commit(
                offsets=[self._tp(p, o) for p, o in offsets.items()], asynchronous=False
            )
        except KafkaException as exc:
            raise ClientError(str(exc.args[0])) from exc
        failed = [tp for tp in done or () if tp.error is not None]
        if failed:
            raise ClientError(f"partition {failed[0].partition}: {failed[0].error}")

    def committed(self, partitions: list[int]) -> dict[int, int]:
        try:
            got = self.consumer.committed([self._tp(p) for p in partitions], timeout=10)
        except KafkaException as exc:
            raise ClientError(str(exc.args[0])) from exc
        for tp in got:
            if tp.error is not None:
                raise ClientError(f"partition {tp.partition}: {tp.error}")
        return {tp.partition: max(tp.offset, NONE_COMMITTED) for tp in got}

    def seek(self, partition: int, offset: int) -> None:
        try:
            self.consumer.seek(self._tp(partition, offset))
        except KafkaException as exc:
            raise ClientError(f"cannot seek partition {partition}: {exc.args[0]}") from exc

    def pause(self, partitions: list[int]) -> None:
        self.consumer.pause([self._tp(p) for p in partitions])

    def resume(self, partitions: list[int]) -> None:
        self.consumer.resume([self._tp(p) for p in partitions])

    def assignment(self) -> list[int]:
        return sorted(tp.partition for tp in self.consumer.assignment())

    def group_metadata(self) -> object:
        return self.consumer.consumer_group_metadata()

    def topics(self) -> set[str] | None:
        try:
            return set(self.consumer.list_topics(timeout=5).topics)
        except KafkaException:
            return None

    def close(self) -> None:
        self._closing = True
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError):
            log.warning("event=consumer_close_failed", exc_info=True)


class Producer:
    """:class:`~pipeline.clients.ProducerClient` on a librdkafka producer."""

    def __init__(self, kafka: KafkaSettings, transactional_id: str | None) -> None:
        # Under the sink's watchdog (transaction_timeout_ms), so librdkafka answers first.
        self.call_timeout_s = 0.9 * kafka.transaction_timeout_ms / 1000
        conf: dict[str, object] = {
            **_common(kafka),
            "acks": "all",
            "linger.ms": kafka.linger_ms,
            "batch.size": kafka.batch_size,
            "compression.type": kafka.compression_type,
            "message.timeout.ms": kafka.transaction_timeout_ms,
            "delivery.report.only.error": True,
            "on_delivery": self._delivered,
            "error_cb": self._client_error,
        }
        if transactional_id is None:
            conf["enable.idempotence"] = False
            conf["max.in.flight.requests.per.connection"] = 1
        else:
            conf["transactional.id"] = transactional_id
            conf["transaction.timeout.ms"] = kafka.transaction_timeout_ms
        try:
            self.producer = RdProducer(conf)
        except KafkaException as exc:
            raise BrokerError(
                f"cannot create a producer for {kafka.bootstrap_servers}: {exc}"
            ) from exc
        self._failure: str | None = None
        self._fenced = False

    def _client_error(self, err: KafkaError) -> None:
        """A fatal error reaches only this callback with its cause (calls fail with _FATAL)."""
        if err.code() in FENCED:
            self._fenced = True
        _log_error(err)

    def _delivered(self, err: KafkaError | None, msg: object) -> None:
        if err is None:
            return
        if err.code() in FENCED:
            self._fenced = True
        if self._failure is None:
            self._failure = str(err)

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        partition: int = -1,
    ) -> None:
        """One record, waiting for room in the local queue if it is full."""
        while True:
            try:
                self.producer.produce(topic, value, key, partition, headers=headers)  # type: ignore[arg-type]
                return
            except BufferError:
                self._serve(0.05)
            except KafkaException as exc:
                raise self._error(exc) from exc

    def send(self, records: Sequence[OutRecord]) -> None:
        produce = self.producer.produce
        try:
            for topic, key, value, headers in records:
                try:
                    produce(topic, value, key, headers=headers)  # type: ignore[arg-type]
                except BufferError:
                    self._produce(topic, key, value, headers)
        except KafkaException as exc:
            raise self._error(exc) from exc
        self._serve()

    def send_state(self, topic: str, records: Sequence[StateRecord]) -> None:
        for partition, key, value, headers in records:
            self._produce(topic, key, value, headers, partition)
        self._serve()

    def flush(self, timeout_s: float) -> str | None:
        try:
            left = self.producer.flush(timeout_s)
        except KafkaException as exc:  # a fatal state
            self._failure = None
            return str(self._error(exc))
        failure, self._failure = self._failure, None
        if failure is not None:
            return failure
        return f"timed out with {left} records unacknowledged" if left else None

    def forget(self) -> None:
        self._failure = None

    def fenced(self) -> bool:
        if not self._fenced:
            # A pending fatal-error callback; what it says lands in self._fenced.
            with contextlib.suppress(ClientError):
                self._serve()
        return self._fenced

    def _serve(self, timeout_s: float = 0.0) -> None:
        """Run pending callbacks. A producer in a fatal state raises its fatal error here."""
        try:
            self.producer.poll(timeout_s)
        except KafkaException as exc:
            raise self._error(exc) from exc

    def _error(self, exc: KafkaException) -> ClientError:
        err = exc.args[0]
        code = err.code() if isinstance(err, KafkaError) else None
        if code in FENCED:
            self._fenced = True
        return ClientError(str(err), fenced=self._fenced, unsupported=code in UNSUPPORTED)

    def _call(self, name: str, *args: object) -> None:
        try:
            getattr(self.producer, name)(*args)
        except KafkaException as exc:
            raise self._error(exc) from exc

    def init_transactions(self) -> None:
        self._call("init_transactions", self.call_timeout_s)

    def begin_transaction(self) -> None:
        self._call("begin_transaction")

    def send_offsets_to_transaction(
        self, offsets: dict[str, dict[int, int]], group_metadata: object
    ) -> None:
        positions = [
            TopicPartition(topic, p, o)
            for topic, parts in offsets.items()
            for p, o in parts.items()
        ]
        self._call("send_offsets_to_transaction", positions, group_metadata, self.call_timeout_s)

    def commit_transaction(self) -> None:
        self._call("commit_transaction", self.call_timeout_s)

    def abort_transaction(self) -> None:
        self._call("abort_transaction", self.call_timeout_s)

    def close(self, timeout_s: float) -> None:
        """Flush for up to ``timeout_s``, then purge what is left, so a discarded producer sends
        nothing later. A fenced producer is only purged: its flush fails inside librdkafka's
        delivery reports (SystemError from the binding)."""
        left = 1
        if not self._fenced:
            try:
                left = self.producer.flush(timeout_s)
            except Exception:  # a producer in a fatal state can fail here in several ways
                log.debug("event=producer_flush_failed", exc_info=True)
        if left:
            self.producer.purge()


def read_from_start(
    kafka: KafkaSettings, topic: str, partitions: list[int], timeout_s: float
) -> Iterator[ReadRecord]:
    """:func:`pipeline.clients.read_from_start` on librdkafka: a partition is read once it
    reports end of partition (``enable.partition.eof``), which for a read_committed reader is
    the last stable offset, not a record at high watermark - 1 (usually a control marker)."""
    try:
        reader = RdConsumer(
            {
                **_common(kafka),
                "group.id": f"{kafka.group_id}.restore",  # required; never joins or commits
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 100,
                "enable.partition.eof": True,
            }
        )
    except KafkaException as exc:
        raise ClientError(str(exc.args[0])) from exc
    try:
        meta = reader.list_topics(topic, timeout=10).topics.get(topic)
        existing = set(meta.partitions) if meta is not None and meta.error is None else set()
        pending = {p for p in partitions if p in existing}
        if not pending:
            return
        reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(pending)])
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise BrokerError(f"{topic} not read to its end within {timeout_s:.0f}s")
            for m in reader.consume(10_000, 0.2):
                err = m.error()
                p: int = m.partition()  # type: ignore[assignment]  # set on every message
                if err is None:
                    offset: int = m.offset()  # type: ignore[assignment]
                    yield p, offset, m.key(), m.value(), list(m.headers() or ())  # type: ignore[arg-type]
                elif err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(p)
                else:
                    raise ClientError(str(err))
    except KafkaException as exc:
        raise ClientError(str(exc.args[0])) from exc
    finally:
        reader.close()
