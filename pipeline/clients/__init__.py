"""The Kafka client behind the source and the sinks: kafka-python (default) or confluent-kafka.

:class:`~pipeline.source.Source` and the sinks in :mod:`pipeline.sink` hold the daemon's logic
(what to skip, what to resend, when to abort); a client adapter holds everything that depends on
the library: building the consumer or producer from :class:`~pipeline.config.KafkaSettings`,
turning its records into :data:`~pipeline.ticks.RawRecord` tuples, and its errors into
:class:`ClientError`. Each adapter lives in its own module so confluent-kafka (an optional
extra, ``pip install 'pipeline[librdkafka]'``) is imported only when chosen
(``kafka.client``).

Offsets in both protocols are "next offset to read" per partition of the one input topic; topics
other than the input appear only in :meth:`ProducerClient.send_offsets_to_transaction`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from pipeline.config import KafkaSettings
from pipeline.ticks import RawRecord

Headers = list[tuple[str, bytes]]
OutRecord = tuple[str, bytes | None, bytes | None, Headers]  # topic, key, value, headers
# changelog partition, stream key, snapshot (None: tombstone), headers
StateRecord = tuple[int, bytes, bytes | None, Headers]
PartitionsCallback = Callable[[list[int]], None]
# partition, offset, key, value, headers: a record read back from a topic
ReadRecord = tuple[int, int, bytes | None, bytes | None, Headers]


class ClientError(Exception):
    """A client call failed. ``fenced``: another producer took our transactional id;
    ``unsupported``: the broker refuses the feature (transactions). Raised by adapters only;
    the source and sinks turn it into the pipeline's own errors."""

    def __init__(self, message: str, *, fenced: bool = False, unsupported: bool = False) -> None:
        super().__init__(message)
        self.fenced = fenced
        self.unsupported = unsupported


class ConsumerClient(Protocol):
    """A consumer-group member subscribed to the input topic, auto-commit off, read_committed.

    Rebalance callbacks get sorted partition numbers; ``on_assigned`` runs once the partitions
    are assigned (so pausing them there holds). Both may run inside :meth:`poll`.
    """

    def poll(self, timeout_ms: int) -> dict[int, list[RawRecord]]:
        """Records by partition, each list in offset order (at most ``max_poll_records``)."""
        ...

    def highwater(self, partition: int) -> int | None:
        """The partition's high watermark as of the last fetch; None before any."""
        ...

    def lag(self) -> dict[int, int]:
        """Records behind the high watermark per assigned partition (those fetched once)."""
        ...

    def commit(self, offsets: dict[int, int]) -> None:
        """Commit ``partition -> next offset`` synchronously; ClientError on failure."""
        ...

    def committed(self, partitions: list[int]) -> dict[int, int]:
        """Committed next offset per partition, 0 where none; ClientError on failure."""
        ...

    def seek(self, partition: int, offset: int) -> None: ...

    def pause(self, partitions: list[int]) -> None: ...

    def resume(self, partitions: list[int]) -> None: ...

    def assignment(self) -> list[int]: ...

    def group_metadata(self) -> object:
        """What the producer's ``send_offsets_to_transaction`` takes from this consumer."""
        ...

    def topics(self) -> set[str] | None:
        """Topic names the cluster knows now; None if it cannot be asked."""
        ...

    def close(self) -> None:
        """Leave the group without committing and without calling the rebalance callbacks."""
        ...


class ProducerClient(Protocol):
    """A producer with ``acks=all``; transactional when built with a transactional id.

    Sends are asynchronous: a record that cannot be queued raises ClientError at once, a record
    the broker refuses shows up in :meth:`flush`'s answer (or fails the transaction's commit).
    """

    def send(self, records: Sequence[OutRecord]) -> None: ...

    def send_state(self, topic: str, records: Sequence[StateRecord]) -> None:
        """Changelog records, each to its explicit partition."""
        ...

    def flush(self, timeout_s: float) -> str | None:
        """Wait for every send since the last flush or :meth:`forget`; the first failure among
        them (or "timed out"), None if all were acknowledged."""
        ...

    def forget(self) -> None:
        """Stop tracking the sends so far (a committed or aborted transaction)."""
        ...

    def fenced(self) -> bool:
        """Whether a send or call reported that another producer took our transactional id."""
        ...

    def init_transactions(self) -> None: ...

    def begin_transaction(self) -> None: ...

    def send_offsets_to_transaction(
        self, offsets: dict[str, dict[int, int]], group_metadata: object
    ) -> None: ...

    def commit_transaction(self) -> None: ...

    def abort_transaction(self) -> None: ...

    def close(self, timeout_s: float) -> None: ...


def consumer(
    kafka: KafkaSettings, on_assigned: PartitionsCallback, on_revoked: PartitionsCallback
) -> ConsumerClient:
    """The configured client's group consumer of ``kafka.input_topic`` (BrokerError if the
    group cannot be joined)."""
    if kafka.client == "confluent-kafka":
        from pipeline.clients import confluent

        return confluent.Consumer(kafka, on_assigned, on_revoked)
    from pipeline.clients import kafka_python

    return kafka_python.Consumer(kafka, on_assigned, on_revoked)


def producer(kafka: KafkaSettings, transactional_id: str | None) -> ProducerClient:
    """The configured client's producer: transactional with an id, else at-least-once (no
    idempotence, one request in flight per connection, so a resend keeps the order)."""
    if kafka.client == "confluent-kafka":
        from pipeline.clients import confluent

        return confluent.Producer(kafka, transactional_id)
    from pipeline.clients import kafka_python

    return kafka_python.Producer(kafka, transactional_id)


def read_from_start(
    kafka: KafkaSettings, topic: str, partitions: list[int], timeout_s: float
) -> Iterator[ReadRecord]:
    """Every record of ``partitions`` of ``topic`` (read_committed, no group), from the start up
    to the end as of the read; partitions the topic does not have are left out. BrokerError if
    the end is not reached within ``timeout_s``; ClientError if the cluster cannot be read."""
    if kafka.client == "confluent-kafka":
        from pipeline.clients import confluent

        return confluent.read_from_start(kafka, topic, partitions, timeout_s)
    from pipeline.clients import kafka_python

    return kafka_python.read_from_start(kafka, topic, partitions, timeout_s)
