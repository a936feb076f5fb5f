"""Reading ticks: a consumer-group member that hands out decoded records.

Each :meth:`Source.poll` returns one micro-batch: every record decoded at once into a
:class:`~pipeline.messages.Tick` or a :class:`~pipeline.messages.Rejection`, in offset order per
partition, plus the offsets to commit once the batch's outputs are safely produced.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline import clients
from pipeline.clients import ClientError, Headers, PartitionsCallback
from pipeline.config import KafkaSettings
from pipeline.errors import BrokerError
from pipeline.messages import Rejection
from pipeline.state import snapshot_offset
from pipeline.ticks import RawRecord, TickBatch, decode_records

# A tombstone carries the input offset its eviction belongs with (a snapshot carries it in its
# body): restore honours it only below the committed offset, so an aborted eviction is ignored.
TOMBSTONE_OFFSET_HEADER = "input.offset"

log = logging.getLogger(__name__)


@dataclass
class Polled:
    """One micro-batch: decoded ticks (columns), rejections, and the offsets to commit."""

    ticks: TickBatch = field(default_factory=TickBatch.empty)
    rejections: list[Rejection] = field(default_factory=list)
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> last offset + 1
    # partition -> first offset handed out in this batch: where to seek back to if the batch
    # is rolled back (only partitions with records in this batch).
    starts: dict[int, int] = field(default_factory=dict)
    skipped: int = 0  # redelivered records already processed by this instance
    # Every partition read in this poll was read up to its high watermark (as of the fetch):
    # the daemon is caught up and nothing waits to join the batch (pipeline.transaction).
    caught_up: bool = False

    def __len__(self) -> int:
        return len(self.ticks) + len(self.rejections)


class Source:
    """Consumer of the input topic; offsets are committed only by :meth:`commit`.

    The client (``kafka.client``) is behind :class:`~pipeline.clients.ConsumerClient`; this
    class holds what does not depend on it: skipping redelivered records, decoding, and turning
    client errors into the pipeline's.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        features: Sequence[str],
        max_record_bytes: int,
        positive: int | None = None,
        on_assigned: PartitionsCallback = lambda parts: None,
        on_revoked: PartitionsCallback = lambda parts: None,
    ) -> None:
        self.topic = kafka.input_topic
        self.features = tuple(features)
        self.max_record_bytes = max_record_bytes
        self.positive = positive
        # Next offset to process per partition: records below it were already handled (their
        # outputs flushed) and are skipped when a failed commit makes the broker send them again.
        self._next: dict[int, int] = {}
        # Partitions sought (rewound) since the last poll began -> where: a polled batch of
        # one of them is stale (see :meth:`stale`).
        self._sought: dict[int, int] = {}
        self.consumer = clients.consumer(kafka, on_assigned, on_revoked)

    def poll(self, timeout_ms: int) -> Polled:
        """Fetch up to ``max_poll_records`` records and decode them (pipeline.ticks)."""
        self._sought = {}
        batches = self.consumer.poll(timeout_ms)
        polled = Polled()
        raw: list[RawRecord] = []
        for p, records in batches.items():
            first = self._first_new(p, records[0][3])
            if first > records[0][3]:
                kept = [r for r in records if r[3] >= first]
                polled.skipped += len(records) - len(kept)
            else:
                kept = records
            if kept:
                polled.starts[p] = kept[0][3]
                raw.extend(kept)
            polled.offsets[p] = records[-1][3] + 1
            self._next[p] = max(first, records[-1][3] + 1)
        polled.caught_up = bool(batches) and all(map(self._read_to_end, polled.offsets.items()))
        if raw:
            polled.ticks, polled.rejections = decode_records(
                self.topic,
                raw,
                features=self.features,
                max_bytes=self.max_record_bytes,
                positive=self.positive,
            )
        return polled

    def _read_to_end(self, partition_offset: tuple[int, int]) -> bool:
        """Whether ``(partition, next offset)`` is at the partition's high watermark (False
        while the watermark is unknown)."""
        partition, offset = partition_offset
        high = self.consumer.highwater(partition)
        return high is not None and offset >= high

    def _first_new(self, partition: int, offset: int) -> int:
        """First offset of this fetch not yet processed by this instance."""
        done = self._next.get(partition)
        if done is None or offset >= done:
            return offset
        high = self.consumer.highwater(partition)
        if high is not None and high < done:
            # The log restarted below what we processed (a memory-only broker came back
            # empty): these are new records, not a redelivery.
            log.warning(
                "event=partition_log_reset partition=%d was=%d now=%d", partition, done, high
            )
            return offset
        return done

    def stale(self, polled: Polled) -> bool:
        """Whether a partition of ``polled`` was rewound after (or while) it was polled: a
        rolled-back transaction between the poll and its use. Its records come again."""
        return not self._sought.keys().isdisjoint(polled.offsets)

    def give_back(self, polled: Polled) -> None:
        """Drop a stale ``polled`` batch: seek its other partitions back to its first records
        too (the rewound ones stay where the rewind put them, before them), so that every
        record of it is read again."""
        back = {p: min(self._sought.get(p, start), start) for p, start in polled.starts.items()}
        log.info("event=stale_batch_read_again records=%d partitions=%s", len(polled), sorted(back))
        self._seek(back)

    def forget(self, partitions: list[int]) -> None:
        """Drop the processed-offset memory of revoked partitions (another member owns them)."""
        for p in partitions:
            self._next.pop(p, None)

    def commit(self, offsets: dict[int, int]) -> bool:
        """Commit ``partition -> next offset`` synchronously; False if the commit failed.

        A failed commit (rebalance, broker restart) is not fatal: the records may be delivered
        again and are then skipped, because this instance remembers what it processed.
        """
        if not offsets:
            return True
        try:
            self.consumer.commit(offsets)
        except ClientError as exc:
            log.warning("event=commit_failed partitions=%s error=%s", sorted(offsets), exc)
            return False
        return True

    def committed(self, partitions: list[int]) -> dict[int, int]:
        """Committed offset (next to process) per partition; 0 where nothing is committed."""
        try:
            return self.consumer.committed(partitions)
        except ClientError as exc:
            raise BrokerError(f"cannot read committed offsets: {exc}") from exc

    def rewind(self, partitions: list[int]) -> dict[int, int]:
        """Seek ``partitions`` back to their committed offsets (after an aborted batch)."""
        committed = self.committed(partitions)
        self._seek(committed)
        return committed

    def rewind_to(self, starts: dict[int, int]) -> None:
        """Seek back to ``partition -> offset`` (a rolled-back batch's first offsets): the next
        polls hand those records out again. Local: no broker round trip."""
        self._seek(starts)

    def _seek(self, offsets: dict[int, int]) -> None:
        try:
            for p, offset in offsets.items():
                self.consumer.seek(p, offset)
                self._sought[p] = offset
        except ClientError as exc:
            raise BrokerError(str(exc)) from exc
        finally:
            self.forget(list(offsets))

    def pause(self, partitions: list[int]) -> None:
        """Stop fetching ``partitions`` (safe inside a rebalance callback)."""
        self.consumer.pause(partitions)

    def resume(self, partitions: list[int]) -> None:
        self.consumer.resume(partitions)

    def group_metadata(self) -> object:
        return self.consumer.group_metadata()

    def topics(self) -> set[str] | None:
        """Topic names the cluster knows now (fresh metadata); None if it cannot be asked."""
        return self.consumer.topics()

    def lag(self) -> dict[int, int]:
        """Records behind the high watermark per assigned partition.

        From the fetches' high watermarks rather than ``end_offsets()``, which Tansu answers
        with the newest batch's base offset + 1.
        """
        return self.consumer.lag()

    def assignment(self) -> list[int]:
        return self.consumer.assignment()

    def close(self) -> None:
        self.consumer.close()


def read_changelog(
    kafka: KafkaSettings, topic: str, committed: dict[int, int], timeout_s: float = 120.0
) -> tuple[dict[str, bytes | None], int]:
    """The latest valid state per stream in changelog partitions ``committed.keys()``.

    A record is valid only if the input offset it reflects is below that partition's committed
    offset: later records come from a batch whose transaction aborted or never committed (the
    test broker shows them to read_committed readers). Snapshots carry that offset in their
    header, tombstones in the ``input.offset`` record header (a tombstone without one, from an
    older version, counts). Returns stream → snapshot bytes or None (a valid tombstone), and
    the number of records read.
    """
    if not committed:
        return {}, 0
    try:
        return _read_changelog(kafka, topic, committed, timeout_s)
    except ClientError as exc:
        raise BrokerError(f"cannot read changelog {topic}: {exc}") from exc


def _read_changelog(
    kafka: KafkaSettings, topic: str, committed: dict[int, int], timeout_s: float
) -> tuple[dict[str, bytes | None], int]:
    latest: dict[str, bytes | None] = {}
    count = 0
    for partition, offset, key, value, headers in clients.read_from_start(
        kafka, topic, list(committed), timeout_s
    ):
        count += 1
        reflects = _state_offset(value, headers)
        if reflects is None:
            log.warning("event=bad_changelog_record partition=%d offset=%d", partition, offset)
        elif reflects < committed[partition]:
            latest[key.decode("utf-8", "replace") if key else ""] = value
    return latest, count


def _state_offset(value: bytes | None, headers: Headers) -> int | None:
    """The input offset a changelog record reflects; -1 for a tombstone of an older version
    (always valid); None if the record is neither a snapshot nor a tombstone."""
    if value is None:
        for name, header in headers:
            if name == TOMBSTONE_OFFSET_HEADER:
                try:
                    return int(header)
                except ValueError:
                    return None
        return -1
    try:
        return snapshot_offset(value)
    except ValueError:
        return None
