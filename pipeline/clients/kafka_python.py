"""kafka-python behind the client protocols (the default client: pure Python, no native library).

Measured quirks this adapter absorbs (../shared/notes/broker.md): ``highwater()`` instead of
``end_offsets()`` (wrong on Tansu); a transactional producer reports fencing on a send's future
or as its transaction manager's last error; ``send()`` raises ValueError for a partition its
metadata does not know yet (a changelog recreated after a broker restart). A library bug it
patches: a group join that finishes between two polls was thrown away
(:mod:`pipeline.clients.kafka_python_join`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.errors import KafkaError, ProducerFencedError, UnsupportedVersionError
from kafka.partitioner.default import murmur2
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata

from pipeline.clients import ClientError, OutRecord, PartitionsCallback, ReadRecord, StateRecord
from pipeline.clients.kafka_python_join import keep_finished_joins
from pipeline.config import KafkaSettings
from pipeline.errors import BrokerError
from pipeline.kafka_admin import client_options
from pipeline.ticks import RawRecord

log = logging.getLogger(__name__)
keep_finished_joins()  # a join finished between two polls would otherwise be thrown away

# What producer.send() raises for a record it cannot queue (see the module docstring).
SEND_ERRORS = (KafkaError, ValueError)
ASSIGNORS = {
    "range": RangePartitionAssignor,
    "roundrobin": RoundRobinPartitionAssignor,
    "cooperative-sticky": CooperativeStickyAssignor,
}


class _KeyPartitions:
    """The partition kafka-python's default partitioner picks for a keyed record, remembered
    per key. The library hashes every keyed record in pure Python (murmur2 over the key and a
    sorted copy of the topic's partitions, ~20 µs a record: 10-16% of a send), while a daemon's
    keys are its streams, which repeat. Same choice as the library's (Java-compatible murmur2
    over all partitions, sorted); a topic's memo is dropped when its partitions change
    (:meth:`refresh`, once per batch) or when it holds :data:`MAX_KEYS` keys."""

    MAX_KEYS = 1 << 16

    def __init__(self, producer: KafkaProducer) -> None:
        self._producer = producer
        self._topics: dict[str, tuple[list[int], dict[bytes, int]]] = {}

    def refresh(self) -> None:
        """Forget the topics whose partitions changed since they were memoised."""
        for topic, (partitions, _) in list(self._topics.items()):
            if sorted(self._producer.partitions_for(topic)) != partitions:
                del self._topics[topic]

    def __call__(self, topic: str, key: bytes) -> int:
        """The partition of ``key`` in ``topic`` (may wait for the topic's metadata, as a send
        does: KafkaTimeoutError after ``max_block_ms``)."""
        entry = self._topics.get(topic)
        if entry is None:
            entry = self._topics[topic] = (sorted(self._producer.partitions_for(topic)), {})
        partitions, memo = entry
        partition = memo.get(key)
        if partition is None:
            if len(memo) >= self.MAX_KEYS:
                memo.clear()
            partition = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
            memo[key] = partition
        return partition


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_assigned: PartitionsCallback, on_revoked: PartitionsCallback) -> None:
        self.on_assigned, self.on_revoked = on_assigned, on_revoked

    def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self.on_revoked(sorted(tp.partition for tp in revoked))

    def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self.on_assigned(sorted(tp.partition for tp in assigned))


class Consumer:
    """:class:`~pipeline.clients.ConsumerClient` on a kafka-python ``KafkaConsumer``."""

    def __init__(
        self, kafka: KafkaSettings, on_assigned: PartitionsCallback, on_revoked: PartitionsCallback
    ) -> None:
        self.topic = kafka.input_topic
        try:
            self.consumer = KafkaConsumer(
                **client_options(kafka),
                group_id=kafka.group_id,
                enable_auto_commit=False,
                auto_offset_reset=kafka.auto_offset_reset,
                session_timeout_ms=kafka.session_timeout_ms,
                heartbeat_interval_ms=kafka.heartbeat_interval_ms,
                max_poll_interval_ms=kafka.max_poll_interval_ms,
                fetch_max_wait_ms=kafka.fetch_max_wait_ms,
                max_poll_records=kafka.max_poll_records,
                isolation_level="read_committed",
                partition_assignment_strategy=(ASSIGNORS[kafka.assignor],),
            )
        except KafkaError as exc:
            raise BrokerError(f"cannot join group at {kafka.bootstrap_servers}: {exc}") from exc
        self.consumer.subscribe([self.topic], listener=_Listener(on_assigned, on_revoked))

    def _tp(self, partition: int) -> TopicPartition:
        return TopicPartition(self.topic, partition)

    def poll(self, timeout_ms: int) -> dict[int, list[RawRecord]]:
        out: dict[int, list[RawRecord]] = {}
        for tp, records in self.consumer.poll(timeout_ms=timeout_ms).items():
            if records:
                p = tp.partition
                out[p] = [(r.key, r.value, p, r.offset, r.timestamp) for r in records]
        return out

    def highwater(self, partition: int) -> int | None:
        high = self.consumer.highwater(self._tp(partition))
        return None if high is None else int(high)

    def lag(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                out[tp.partition] = max(high - self.consumer.position(tp), 0)
        return out

    def commit(self, offsets: dict[int, int]) -> None:
        try:
            self.consumer.commit(
                {self._tp(p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()}
            )
        except KafkaError as exc:
            raise ClientError(repr(exc)) from exc

    def committed(self, partitions: list[int]) -> dict[int, int]:
        out = {}
        try:
            for p in partitions:
                offset = self.consumer.committed(self._tp(p))
                out[p] = int(offset) if offset is not None else 0
        except KafkaError as exc:
            raise ClientError(repr(exc)) from exc
        return out

    def seek(self, partition: int, offset: int) -> None:
        self.consumer.seek(self._tp(partition), offset)

    def pause(self, partitions: list[int]) -> None:
        self.consumer.pause(*[self._tp(p) for p in partitions])

    def resume(self, partitions: list[int]) -> None:
        self.consumer.resume(*[self._tp(p) for p in partitions])

    def assignment(self) -> list[int]:
        return sorted(tp.partition for tp in self.consumer.assignment())

    def group_metadata(self) -> object:
        return self.consumer.group_metadata()

    def topics(self) -> set[str] | None:
        try:
            return set(self.consumer.topics())
        except KafkaError:
            return None

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        except KafkaError:
            log.warning("event=consumer_close_failed", exc_info=True)


class Producer:
    """:class:`~pipeline.clients.ProducerClient` on a kafka-python ``KafkaProducer``."""

    def __init__(self, kafka: KafkaSettings, transactional_id: str | None) -> None:
        mode: dict[str, object]
        if transactional_id is None:
            # Idempotence breaks for good on a broker restart with Tansu; ordering is kept by
            # allowing one in-flight request per connection instead.
            mode = {"enable_idempotence": False, "max_in_flight_requests_per_connection": 1}
        else:
            # The broker aborts a transaction left open this long (a crashed instance), so
            # partitions it wrote to do not stay blocked for read_committed readers.
            mode = {
                "transactional_id": transactional_id,
                "enable_idempotence": True,
                "transaction_timeout_ms": kafka.transaction_timeout_ms,
            }
        try:
            self.producer = KafkaProducer(
                **client_options(kafka),
                **mode,
                acks="all",
                linger_ms=kafka.linger_ms,
                batch_size=kafka.batch_size,
                compression_type=None
                if kafka.compression_type == "none"
                else kafka.compression_type,
                retries=5,
                max_block_ms=10_000,
            )
        except KafkaError as exc:
            raise BrokerError(
                f"cannot create a producer for {kafka.bootstrap_servers}: {exc}"
            ) from exc
        self._pending: list[FutureRecordMetadata] = []
        self._partition_of = _KeyPartitions(self.producer)

    def send(self, records: Sequence[OutRecord]) -> None:
        send, pending, partition_of = self.producer.send, self._pending, self._partition_of
        try:
            partition_of.refresh()
            for topic, key, value, headers in records:
                partition = None if key is None else partition_of(topic, key)
                pending.append(
                    send(topic, key=key, value=value, headers=headers, partition=partition)
                )
        except SEND_ERRORS as exc:
            raise ClientError(repr(exc)) from exc

    def send_state(self, topic: str, records: Sequence[StateRecord]) -> None:
        send, pending = self.producer.send, self._pending
        try:
            for partition, key, value, headers in records:
                pending.append(
                    send(topic, key=key, value=value, partition=partition, headers=headers)
                )
        except SEND_ERRORS as exc:
            raise ClientError(repr(exc)) from exc

    def flush(self, timeout_s: float) -> str | None:
        pending, self._pending = self._pending, []
        try:
            self.producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            return repr(exc)
        failed = [f for f in pending if not f.is_done or f.failed()]
        if not failed:
            return None
        first = failed[0]
        return repr(first.exception) if first.is_done else "timed out"

    def forget(self) -> None:
        self._pending = []

    def fenced(self) -> bool:
        manager = getattr(self.producer, "_transaction_manager", None)
        if isinstance(getattr(manager, "last_error", None), ProducerFencedError):
            return True
        return any(
            f.is_done and isinstance(f.exception, ProducerFencedError) for f in self._pending
        )

    def _call(self, name: str, *args: object) -> None:
        try:
            getattr(self.producer, name)(*args)
        except ProducerFencedError as exc:
            raise ClientError(repr(exc), fenced=True) from exc
        except UnsupportedVersionError as exc:
            raise ClientError(repr(exc), unsupported=True) from exc
        except KafkaError as exc:
            raise ClientError(repr(exc), fenced=self.fenced()) from exc

    def init_transactions(self) -> None:
        self._call("init_transactions")

    def begin_transaction(self) -> None:
        self._call("begin_transaction")

    def send_offsets_to_transaction(
        self, offsets: dict[str, dict[int, int]], group_metadata: object
    ) -> None:
        tp_offsets = {
            TopicPartition(topic, p): OffsetAndMetadata(o, "", -1)
            for topic, parts in offsets.items()
            for p, o in parts.items()
        }
        self._call("send_offsets_to_transaction", tp_offsets, group_metadata)

    def commit_transaction(self) -> None:
        self._call("commit_transaction")

    def abort_transaction(self) -> None:
        self._call("abort_transaction")

    def close(self, timeout_s: float) -> None:
        try:
            self.producer.close(timeout=timeout_s)
        except KafkaError:
            log.warning("event=producer_close_failed", exc_info=True)


def read_from_start(
    kafka: KafkaSettings, topic: str, partitions: list[int], timeout_s: float
) -> Iterator[ReadRecord]:
    """:func:`pipeline.clients.read_from_start` on kafka-python: the end is the high watermark
    of the fetch responses (``end_offsets()`` is wrong on Tansu)."""
    try:
        reader = KafkaConsumer(
            **client_options(kafka),
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            fetch_max_wait_ms=100,
            max_poll_records=50_000,
        )
    except KafkaError as exc:
        raise ClientError(repr(exc)) from exc
    try:
        existing = reader.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in partitions if p in existing]
        if not tps:
            return
        reader.assign(tps)
        reader.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout_s
        while not _caught_up(reader, tps):
            if time.monotonic() > deadline:
                raise BrokerError(f"{topic} not read to its end within {timeout_s:.0f}s")
            for tp, records in reader.poll(timeout_ms=200).items():
                p = tp.partition
                for r in records:
                    yield p, r.offset, r.key, r.value, list(r.headers or ())
    except KafkaError as exc:
        raise ClientError(repr(exc)) from exc
    finally:
        reader.close()


def _caught_up(reader: KafkaConsumer, tps: list[TopicPartition]) -> bool:
    # highwater() comes from fetch responses; None = no fetch yet
    for tp in tps:
        high = reader.highwater(tp)
        if high is None or reader.position(tp) < high:
            return False
    return True
