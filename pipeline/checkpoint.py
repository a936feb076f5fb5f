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
from pipeline.source import read_changelog
from pipeline.state import StateStore

log = logging.getLogger(__name__)

StateRecord = tuple[int, bytes, bytes | None]  # changelog partition, key, snapshot or tombstone


@dataclass
class RestoreReport:
    partitions: list[int]
    streams: int
    records: int
    seconds: float
    cold_hidden: int  # restored streams whose hidden state did not fit the model


class StateKeeper:
    """Builds changelog records from the store and refills the store from the changelog."""

    def __init__(self, settings: Settings, store: StateStore) -> None:
        self.settings = settings
        self.store = store
        self.topic = settings.changelog_topic()
        self._next_evict = time.monotonic() + settings.state.evict_interval_seconds

    def records(self, streams: Sequence[str]) -> list[StateRecord]:
        """Snapshots of ``streams`` (those a micro-batch touched) as changelog records."""
        store = self.store
        out: list[StateRecord] = []
        for stream in streams:
            slot = store.slot_of.get(stream)
            if slot is not None:
                out.append((int(store.partition[slot]), stream.encode(), store.snapshot(stream)))
        return out

    def evictions(self) -> list[StateRecord]:
        """Evict idle streams and streams over the cap; returns their tombstones (when due)."""
        now = time.monotonic()
        cfg = self.settings.state
        if now < self._next_evict or (cfg.ttl_seconds is None and cfg.max_streams is None):
            return []
        self._next_evict = now + cfg.evict_interval_seconds
        store = self.store
        victims: list[str] = []
        if cfg.ttl_seconds is not None and len(store):
            if cfg.ttl_clock == "wall":
                victims = store.idle(None, time.time() - cfg.ttl_seconds)
            else:  # event time: relative to the newest event time this instance has seen
                live = [s for s in store.slot_of.values()]
                newest = float(np.max(store.normalizer.last_ts[live]))
                victims = store.idle(newest - cfg.ttl_seconds, None)
        if cfg.max_streams is not None:
            over = len(store) - len(victims) - cfg.max_streams
            if over > 0:
                chosen = set(victims)
                victims += [s for s in store.oldest(over + len(victims)) if s not in chosen][:over]
        out: list[StateRecord] = []
        for stream in victims:
            partition = int(store.partition[store.slot_of[stream]])
            if store.evict(stream):
                out.append((partition, stream.encode(), None))
        if out:
            metrics.EVICTED.inc(len(out))
            log.info("event=streams_evicted count=%d live=%d", len(out), len(store))
        return out

    def drop(self, partitions: list[int]) -> int:
        """Forget the streams of ``partitions`` (revoked: their state lives in the changelog)."""
        streams = self.store.streams_of(partitions)
        for stream in streams:
            self.store.evict(stream)
        return len(streams)

    def restore(self, committed: dict[int, int]) -> RestoreReport:
        """Load the state of the streams of ``committed`` partitions from the changelog."""
        started = time.monotonic()
        self.drop(list(committed))
        latest, count = read_changelog(self.settings.kafka, self.topic, committed)
        restored = cold = 0
        for stream, snap in latest.items():
            if snap is None:
                continue
            if not self.store.restore(stream, snap):
                cold += 1
            restored += 1
        seconds = time.monotonic() - started
        metrics.RESTORE_SECONDS.observe(seconds)
        metrics.RESTORED.inc(restored)
        return RestoreReport(sorted(committed), restored, count, seconds, cold)
