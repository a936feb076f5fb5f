"""Keeping per-stream state durable: changelog records, restore on assignment, eviction.

The changelog topic has one partition per input partition; the state of a stream whose ticks
arrive on input partition p is written to changelog partition p, so a new owner of p restores
exactly its streams from there. Records carry the input offset they reflect (see
:mod:`pipeline.state`); restore keeps only those below the committed offset.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline import metrics
from pipeline.config import Settings
from pipeline.source import TOMBSTONE_OFFSET_HEADER, read_changelog
from pipeline.state import StateStore

log = logging.getLogger(__name__)

# changelog partition, stream key, snapshot (None: tombstone), headers
StateRecord = tuple[int, bytes, bytes | None, list[tuple[str, bytes]]]


@dataclass
class RestoreReport:
    partitions: list[int]
    streams: int
    records: int
    seconds: float
    cold_hidden: int  # restored streams whose hidden state did not fit the model
    unusable: int = 0  # changelog values that could not be installed (those streams start cold)


class StateKeeper:
    """Builds changelog records from the store and refills the store from the changelog.

    Evictions are part of a micro-batch: they only take streams of partitions the batch read
    from, and their tombstones carry that batch's last offset there, so that an aborted
    eviction is told from a committed one by the committed offset, as snapshots are. Streams
    whose eviction was rolled back are evicted again by the next batch that reads their
    partition (:meth:`batch_aborted`), so a committed batch past an aborted tombstone always
    agrees with it.
    """

    def __init__(self, settings: Settings, store: StateStore) -> None:
        self.settings = settings
        self.store = store
        self.topic = settings.changelog_topic()
        self._next_evict = time.monotonic() + settings.state.evict_interval_seconds
        self._victims: dict[str, int] = {}  # evicted by the batch in flight: stream -> partition
        self._owed: dict[str, int] = {}  # evictions rolled back, to redo: stream -> partition

    def records(self, streams: Sequence[str]) -> list[StateRecord]:
        """Snapshots of ``streams`` (those a transaction touched) as changelog records, built
        in one pass over the store's arrays; streams no longer held (evicted) are skipped."""
        store = self.store
        held = [s for s in streams if s in store.slot_of]
        slots = np.fromiter((store.slot_of[s] for s in held), dtype=np.int64, count=len(held))
        partitions = store.partition[slots].tolist()
        if any(p < 0 for p in partitions):  # cannot happen: a touched stream has a source
            bad = [s for s, p in zip(held, partitions, strict=True) if p < 0]
            log.error("event=state_without_partition streams=%d first=%r action=skip_snapshot",
                      len(bad), bad[0])  # fmt: skip
            keep = [i for i, p in enumerate(partitions) if p >= 0]
            held, partitions = [held[i] for i in keep], [partitions[i] for i in keep]
        values = store.snapshots(held)
        return [(p, s.encode(), v, []) for p, s, v in zip(partitions, held, values, strict=True)]

    def evictions(self, last_offsets: dict[int, int]) -> list[StateRecord]:
        """Evict idle streams and streams over the cap among the streams of the partitions this
        batch read (``partition -> last offset read``); returns their tombstones."""
        now = time.monotonic()
        cfg = self.settings.state
        owed = [s for s, p in self._owed.items() if p in last_offsets and s in self.store]
        policy = cfg.ttl_seconds is not None or cfg.max_streams is not None
        due = policy and now >= self._next_evict
        if not due and not owed:
            return []
        victims = list(owed)
        if due:
            self._next_evict = now + cfg.evict_interval_seconds
            chosen = set(owed)
            victims += [s for s in self._choose(last_offsets) if s not in chosen]
        store = self.store
        out: list[StateRecord] = []
        for stream in victims:
            partition = int(store.partition[store.slot_of[stream]])
            if store.evict(stream):
                self._owed.pop(stream, None)
                self._victims[stream] = partition
                offset = str(last_offsets.get(partition, -1)).encode()
                out.append((partition, stream.encode(), None, [(TOMBSTONE_OFFSET_HEADER, offset)]))
        if out:
            metrics.EVICTED.inc(len(out))
            log.info("event=streams_evicted count=%d live=%d", len(out), len(store))
        return out

    def _choose(self, last_offsets: dict[int, int]) -> list[str]:
        cfg = self.settings.state
        store = self.store
        parts = list(last_offsets)
        victims: list[str] = []
        if cfg.ttl_seconds is not None and len(store):
            if cfg.ttl_clock == "wall":
                victims = store.idle(None, time.time() - cfg.ttl_seconds, parts)
            else:  # event time: relative to the newest event time this instance has seen
                live = list(store.slot_of.values())
                newest = float(np.max(store.normalizer.last_ts[live]))
                victims = store.idle(newest - cfg.ttl_seconds, None, parts)
        if cfg.max_streams is not None:
            over = len(store) - len(victims) - cfg.max_streams
            if over > 0:
                chosen = set(victims)
                oldest = store.oldest(over + len(victims), parts)
                victims += [s for s in oldest if s not in chosen][:over]
        return victims

    def batch_committed(self) -> None:
        """The batch's transaction committed: its evictions are final."""
        self._victims.clear()

    def batch_aborted(self) -> None:
        """The batch was rolled back (the store put its victims back): owe their evictions."""
        self._owed.update(self._victims)
        self._victims.clear()

    def drop(self, partitions: list[int]) -> int:
        """Forget the streams of ``partitions`` (revoked: their state lives in the changelog)."""
        wanted = set(partitions)
        self._owed = {s: p for s, p in self._owed.items() if p not in wanted}
        streams = self.store.streams_of(partitions)
        for stream in streams:
            self.store.evict(stream)
        return len(streams)

    def restore(self, committed: dict[int, int]) -> RestoreReport:
        """Load the state of the streams of ``committed`` partitions from the changelog, in bulk."""
        started = time.monotonic()
        self.drop(list(committed))
        latest, count = read_changelog(self.settings.kafka, self.topic, committed)
        installed = self.store.install({s: v for s, v in latest.items() if v is not None})
        seconds = time.monotonic() - started
        metrics.RESTORE_SECONDS.observe(seconds)
        metrics.RESTORED.inc(installed.installed)
        return RestoreReport(
            sorted(committed),
            installed.installed,
            count,
            seconds,
            installed.cold_hidden,
            len(installed.unusable),
        )
