"""Per-stream state: stream id → slot, and every slot's numbers in preallocated arrays.

Hidden states live in one torch tensor per layer (``(capacity, S_l)``), normalizer statistics in
numpy arrays owned by :class:`~pipeline.normalize.Normalizer`, the combination's losses, history
and interval quantiles in arrays owned by :class:`~pipeline.combine.Combiner`, plus per slot:
``seq`` (ticks processed), the last one-step forecast (scored when the next tick comes), the input
partition and offset of the stream's newest tick, and the wall time it was seen. Capacity doubles
when full; freed slots are reused. Reads never create state: only :meth:`StateStore.slots_for`
allocates.

**Undo.** Between :meth:`StateStore.track` and :meth:`StateStore.settle` the store keeps a
before-image of every stream a micro-batch changes (and notes the streams it creates), so an
aborted transaction is rolled back in memory by :meth:`StateStore.rollback` at a cost of
O(streams touched), without reading the changelog.

:meth:`StateStore.snapshot` turns one stream's state into bytes for the changelog topic:

    header  <B i q q d H H>  format version, partition, offset, seq, prev forecast,
                             count of statistics floats, count of hidden floats
    body    float64 × n_stats (normalizer, then combiner), float32 × n_hidden (hidden states,
            layer by layer)

Version 1 (before the combiner) held the normalizer's numbers only; such a value still installs,
with the combination starting fresh. Version 2 held, where version 3 holds the members'
weights, their recent mean errors (decision 30); such a value installs with equal weights and
everything else it holds (history, rings, interval quantiles). With a season, versions 2 and 3
held a shorter history (the seasonal-change member looked one season back, now three, decision
32); it installs with the seasons it lacks filled from the oldest one it has.

``offset`` is the input offset of the newest tick folded into the state: a restore keeps a
record only if that offset is below the partition's committed offset.
:meth:`StateStore.install` puts many snapshots back at once (one gather/scatter per array).
"""

from __future__ import annotations

import itertools
import logging
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from pipeline.combine import CombineConfig, Combiner
from pipeline.normalize import F64, I64, Normalizer, NormalizerConfig

log = logging.getLogger(__name__)

SNAPSHOT_VERSION = 4
_VERSIONS = (1, 2, 3, 4)  # readable
_HEADER = struct.Struct("<BiqqdHH")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A decoded changelog value (see the module docstring)."""

    partition: int
    offset: int
    seq: int
    prev_forecast: float
    stats: list[float]  # normalizer numbers, then (version 2 on) the combiner's
    hidden: bytes  # float32, layer by layer; empty if the model's shapes changed
    version: int = SNAPSHOT_VERSION

    @staticmethod
    def decode(blob: bytes) -> Snapshot:
        """Parse a changelog value; raises ValueError on an unknown version or a short body."""
        if len(blob) < _HEADER.size or blob[0] not in _VERSIONS:
            raise ValueError(f"not a v{SNAPSHOT_VERSION} stream snapshot ({len(blob)} bytes)")
        version, partition, offset, seq, prev, n_norm, n_hidden = _HEADER.unpack_from(blob)
        body = memoryview(blob)[_HEADER.size :]
        if len(body) != 8 * n_norm + 4 * n_hidden:
            raise ValueError("stream snapshot body has the wrong length")
        stats = list(struct.unpack_from(f"<{n_norm}d", body))
        return Snapshot(partition, offset, seq, prev, stats, bytes(body[8 * n_norm :]), version)


def snapshot_offset(blob: bytes) -> int:
    """The input offset a changelog value reflects (header only; ValueError if not a snapshot)."""
    if len(blob) < _HEADER.size or blob[0] not in _VERSIONS:
        raise ValueError(f"not a v{SNAPSHOT_VERSION} stream snapshot ({len(blob)} bytes)")
    offset: int = _HEADER.unpack_from(blob)[2]
    return offset


def _snapshot_dtype(n_norm: int, n_hidden: int) -> np.dtype[np.void]:
    """A packed structured dtype matching one snapshot, for decoding many at once."""
    return np.dtype(
        [
            ("version", "u1"),
            ("partition", "<i4"),
            ("offset", "<i8"),
            ("seq", "<i8"),
            ("prev", "<f8"),
            ("n_norm", "<u2"),
            ("n_hidden", "<u2"),
            ("norm", "<f8", (n_norm,)),
            ("hidden", "<f4", (n_hidden,)),
        ]
    )


@dataclass
class InstallReport:
    """What :meth:`StateStore.install` did with a set of changelog values."""

    installed: int = 0
    cold_hidden: int = 0  # installed, but the hidden state did not fit the model: starts at zero
    unusable: list[str] = field(default_factory=list)  # not installed: bad bytes or statistics


@dataclass
class _Image:
    """Copies of some streams' per-slot numbers, taken before a batch changed them."""

    streams: list[str]
    arrays: dict[str, npt.NDArray[np.generic]]
    hidden: list[Tensor]


@dataclass
class UndoLog:
    """Before-images of the streams changed since :meth:`StateStore.track` (see the module
    docstring). Owned by the store; callers only start, settle or roll it back."""

    images: list[_Image] = field(default_factory=list)
    saved: set[str] = field(default_factory=set)  # streams with a before-image
    created: set[str] = field(default_factory=set)  # streams that had no state before


class StateStore:
    """Owns every stream's state; the engine reads and writes it by slot index."""

    def __init__(
        self,
        state_sizes: Sequence[int],
        normalizer: NormalizerConfig,
        n_features: int,
        capacity: int = 1024,
        combine: CombineConfig | None = None,
        horizon: int = 1,
    ) -> None:
        self.state_sizes = list(state_sizes)
        self.hidden: list[Tensor] = [torch.zeros(capacity, s) for s in self.state_sizes]
        self.normalizer = Normalizer(normalizer, n_features, capacity)
        self.combiner = Combiner(combine or CombineConfig(), horizon, capacity)
        self.seq: I64 = np.zeros(capacity, dtype=np.int64)
        # The one-step forecast made at each stream's latest tick (NaN: none yet), scored when
        # the next tick arrives.
        self.prev_forecast: F64 = np.full(capacity, np.nan)
        self.partition: I64 = np.full(capacity, -1, dtype=np.int64)
        self.offset: I64 = np.full(capacity, -1, dtype=np.int64)
        self.seen_at: F64 = np.zeros(capacity)  # wall time (epoch s) of the newest tick
        self.slot_of: dict[str, int] = {}
        self.stream_at: list[str | None] = [None] * capacity
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._undo: UndoLog | None = None

    _SLOT_ARRAYS = ("seq", "prev_forecast", "partition", "offset", "seen_at")
    _FILL: ClassVar[dict[str, float]] = {
        "seq": 0,
        "prev_forecast": np.nan,
        "partition": -1,
        "offset": -1,
        "seen_at": 0.0,
    }

    @property
    def capacity(self) -> int:
        return len(self.stream_at)

    def __len__(self) -> int:
        return len(self.slot_of)

    def __contains__(self, stream: object) -> bool:
        return stream in self.slot_of

    def slots_for(self, streams: Sequence[str]) -> I64:
        """Slots of ``streams`` (distinct ids), allocating fresh zeroed state for new ones.

        While an undo log is open, the existing streams' state is copied first and the new ones
        are noted, so :meth:`rollback` can put everything back.
        """
        # C-level lookups: the per-stream Python loop below runs only for new streams.
        out = np.fromiter(
            map(self.slot_of.get, streams, itertools.repeat(-1)), dtype=np.int64,
            count=len(streams),
        )  # fmt: skip
        for i in np.flatnonzero(out < 0).tolist():
            out[i] = self._allocate(streams[i])
        undo = self._undo
        if undo is not None:  # existing streams without a before-image yet (new ones: created)
            known = set(streams).difference(undo.saved, undo.created)
            if known:
                self._save(list(known))
        return out

    def _allocate(self, stream: str) -> int:
        if not self._free:
            self._grow(2 * self.capacity)
        slot = self._free.pop()
        self.slot_of[stream] = slot
        self.stream_at[slot] = stream
        if self._undo is not None:
            self._undo.created.add(stream)
        return slot

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        extra = capacity - old
        self.hidden = [torch.cat([h, torch.zeros(extra, h.shape[1])]) for h in self.hidden]
        self.normalizer.grow(capacity)
        self.combiner.grow(capacity)
        for name in self._SLOT_ARRAYS:
            arr = getattr(self, name)
            setattr(self, name, np.concatenate([arr, np.full(extra, self._FILL[name], arr.dtype)]))
        self.stream_at.extend([None] * extra)
        self._free.extend(range(capacity - 1, old - 1, -1))

    # -- undo ---------------------------------------------------------------------------------

    def track(self) -> None:
        """Open an undo log: from now on, changes can be rolled back (one transaction, which
        may span several micro-batches: only the first image of each stream is kept)."""
        self._undo = UndoLog()

    def settle(self) -> None:
        """Close the undo log: the batch's changes are final (its transaction committed)."""
        self._undo = None

    def rollback(self) -> int:
        """Put every stream back as it was at :meth:`track`: streams created since are dropped,
        changed or evicted ones get their before-image back. Returns the streams restored.
        Without an open log this does nothing."""
        undo, self._undo = self._undo, None
        if undo is None:
            return 0
        for stream in undo.created:
            self._drop(stream)
        for image in undo.images:
            slots = self.slots_for(image.streams)
            for name, values in image.arrays.items():
                self._array(name)[slots] = values
            index = torch.from_numpy(slots)
            for h, saved in zip(self.hidden, image.hidden, strict=True):
                h.index_copy_(0, index, saved)
        return len(undo.saved)

    def _array(self, name: str) -> npt.NDArray[np.generic]:
        if name in Normalizer.FIELDS:
            owner: object = self.normalizer
        elif name in Combiner.FIELDS:
            owner = self.combiner
        else:
            owner = self
        array: npt.NDArray[np.generic] = getattr(owner, name)
        return array

    def _save(self, streams: list[str]) -> None:
        """Copy the current state of ``streams`` (existing, not yet saved) into the undo log."""
        assert self._undo is not None
        slots = np.fromiter((self.slot_of[s] for s in streams), dtype=np.int64, count=len(streams))
        names = (*Normalizer.FIELDS, *Combiner.FIELDS, *self._SLOT_ARRAYS)
        arrays = {name: self._array(name)[slots].copy() for name in names}
        index = torch.from_numpy(slots)
        hidden = [h.index_select(0, index) for h in self.hidden]
        self._undo.images.append(_Image(streams, arrays, hidden))
        self._undo.saved.update(streams)

    # -- lifecycle ----------------------------------------------------------------------------

    def reset(self, slots: I64) -> None:
        """Cold-start ``slots``: zero hidden state and normalizer, keep ``seq``."""
        index = torch.from_numpy(slots)
        for h in self.hidden:
            h.index_fill_(0, index, 0.0)
        self.normalizer.reset(slots)
        self.combiner.reset(slots)
        self.prev_forecast[slots] = np.nan

    def reset_hidden(self) -> None:
        """Zero every stream's hidden state (a model with other shapes took over)."""
        self.hidden = [torch.zeros(self.capacity, s) for s in self.state_sizes]

    def evict(self, stream: str) -> bool:
        """Drop a stream's state and free its slot; False if it had none. Undoable."""
        undo = self._undo
        if undo is not None and stream in self.slot_of:
            if stream in undo.created:
                undo.created.discard(stream)  # nothing to put back: it had no state before
            elif stream not in undo.saved:
                self._save([stream])
        return self._drop(stream)

    def _drop(self, stream: str) -> bool:
        slot = self.slot_of.pop(stream, None)
        if slot is None:
            return False
        self.reset(np.array([slot], dtype=np.int64))
        for name in self._SLOT_ARRAYS:
            getattr(self, name)[slot] = self._FILL[name]
        self.stream_at[slot] = None
        self._free.append(slot)
        return True

    def mark(self, slots: I64, partitions: I64, offsets: I64) -> None:
        """Record where each stream's newest tick came from, and when it was seen."""
        self.partition[slots] = partitions
        self.offset[slots] = offsets
        self.seen_at[slots] = time.time()

    # -- queries ------------------------------------------------------------------------------

    def streams_of(self, partitions: Iterable[int]) -> list[str]:
        """Streams whose newest tick came from one of ``partitions``."""
        wanted = np.isin(self.partition, np.fromiter(partitions, dtype=np.int64))
        return [s for s in (self.stream_at[i] for i in np.flatnonzero(wanted)) if s is not None]

    def idle(
        self,
        before_event_ts: float | None,
        before_wall: float | None,
        partitions: Iterable[int] | None = None,
    ) -> list[str]:
        """Streams whose newest tick is older than the given event time or wall time
        (only those of ``partitions``, when given)."""
        live = np.array([s is not None for s in self.stream_at])
        if partitions is not None:
            live &= np.isin(self.partition, np.fromiter(partitions, dtype=np.int64))
        old = np.zeros(self.capacity, dtype=bool)
        if before_event_ts is not None:
            old |= self.normalizer.last_ts < before_event_ts
        if before_wall is not None:
            old |= self.seen_at < before_wall
        return [self.stream_at[i] or "" for i in np.flatnonzero(live & old)]

    def oldest(self, n: int, partitions: Iterable[int] | None = None) -> list[str]:
        """The ``n`` streams seen longest ago (wall time), for the stream cap (only those of
        ``partitions``, when given)."""
        slots = np.array(list(self.slot_of.values()), dtype=np.int64)
        if partitions is not None and len(slots):
            slots = slots[np.isin(self.partition[slots], np.fromiter(partitions, dtype=np.int64))]
        if n <= 0 or len(slots) == 0:
            return []
        pick = slots[np.argsort(self.seen_at[slots], kind="stable")[:n]]
        return [self.stream_at[i] or "" for i in pick]

    # -- snapshots ----------------------------------------------------------------------------

    @property
    def stats_width(self) -> int:
        """Float64 numbers in one snapshot's statistics section (normalizer, then combiner)."""
        return self.normalizer.snapshot_width + self.combiner.snapshot_width

    def snapshot(self, stream: str) -> bytes:
        """One stream's state as a changelog value (see the module docstring)."""
        slot = self.slot_of[stream]
        stats = self.normalizer.snapshot(slot)
        stats += self.combiner.snapshot_rows(np.array([slot]))[0].tolist()
        hidden = b"".join(h[slot].numpy().tobytes() for h in self.hidden)
        header = _HEADER.pack(
            SNAPSHOT_VERSION,
            int(self.partition[slot]),
            int(self.offset[slot]),
            int(self.seq[slot]),
            float(self.prev_forecast[slot]),
            len(stats),
            sum(self.state_sizes),
        )
        return header + struct.pack(f"<{len(stats)}d", *stats) + hidden

    def snapshots(self, streams: Sequence[str]) -> list[bytes]:
        """:meth:`snapshot` of many streams (all held by the store), built at once: one gather
        per array into a packed structured array (the layout of the module docstring), then
        sliced into one value per stream. Byte for byte what :meth:`snapshot` returns."""
        if not streams:
            return []
        slots = np.fromiter((self.slot_of[s] for s in streams), dtype=np.int64, count=len(streams))
        norm = self.normalizer
        n_stats, n_hidden = self.stats_width, sum(self.state_sizes)
        rows = np.zeros(len(slots), dtype=_snapshot_dtype(n_stats, n_hidden))
        rows["version"] = SNAPSHOT_VERSION
        rows["partition"] = self.partition[slots]
        rows["offset"] = self.offset[slots]
        rows["seq"] = self.seq[slots]
        rows["prev"] = self.prev_forecast[slots]
        rows["n_norm"], rows["n_hidden"] = n_stats, n_hidden
        rows["norm"] = np.concatenate(
            [getattr(norm, name)[slots].reshape(len(slots), -1) for name in Normalizer.FIELDS]
            + [self.combiner.snapshot_rows(slots)],
            axis=1,
        )
        index = torch.from_numpy(slots)
        rows["hidden"] = torch.cat([h.index_select(0, index) for h in self.hidden], dim=1).numpy()
        blob, size = rows.tobytes(), rows.dtype.itemsize
        return [blob[i : i + size] for i in range(0, len(blob), size)]

    def restore(self, stream: str, snap: Snapshot) -> bool:
        """Install a decoded snapshot as ``stream``'s state.

        Returns False if the hidden state does not fit this model (it then starts cold while
        the statistics and ``seq`` are kept). Raises ValueError if the statistics do not fit.
        """
        n_norm = self.normalizer.snapshot_width
        if len(snap.stats) != self._stats_width(snap.version):
            raise ValueError(
                f"stream snapshot has {len(snap.stats)} statistics, expected {self.stats_width}"
            )
        slot = self.slots_for([stream])[0]
        slots = np.array([slot], dtype=np.int64)
        self.normalizer.restore(slot, snap.stats[:n_norm])
        self._restore_combination(slots, np.array([snap.stats[n_norm:]]), snap.version)
        self.seq[slot], self.prev_forecast[slot] = snap.seq, snap.prev_forecast
        self.partition[slot], self.offset[slot] = snap.partition, snap.offset
        self.seen_at[slot] = time.time()
        width = sum(self.state_sizes)
        if len(snap.hidden) != 4 * width:
            for h in self.hidden:
                h[slot] = 0.0
            return False
        flat = torch.from_numpy(np.frombuffer(snap.hidden, dtype=np.float32).copy())
        for h, part in zip(self.hidden, torch.split(flat, self.state_sizes), strict=True):
            h[slot] = part
        return True

    def install(self, snapshots: dict[str, bytes]) -> InstallReport:
        """Install many changelog values (stream → snapshot bytes) at once.

        Values are grouped by length and decoded with one structured view per group; slots are
        filled with one scatter per array. A value that is not a snapshot, or whose statistics
        do not fit this model's features and combination, is left out (listed in ``unusable``:
        that stream starts cold); one whose hidden state does not fit starts with zero hidden
        state; a version-1 value (normalizer only) starts its combination fresh, a version-2
        value its weights.
        """
        report = InstallReport()
        by_size: dict[int, list[str]] = {}
        for stream, blob in snapshots.items():
            by_size.setdefault(len(blob), []).append(stream)
        for size, streams in by_size.items():
            if size < _HEADER.size:
                report.unusable += streams
                continue
            version, _, _, _, _, n_stats, n_hidden = _HEADER.unpack_from(snapshots[streams[0]])
            dtype = _snapshot_dtype(n_stats, n_hidden)
            if dtype.itemsize != size:
                report.unusable += streams
                continue
            rows = np.frombuffer(b"".join(snapshots[s] for s in streams), dtype=dtype)
            ok = (
                (rows["version"] == version)
                & (rows["n_norm"] == n_stats)
                & (rows["n_hidden"] == n_hidden)
            )
            if version not in _VERSIONS or n_stats != self._stats_width(version):
                ok[:] = False
            report.unusable += [s for s, good in zip(streams, ok.tolist(), strict=True) if not good]
            if not ok.all():
                rows = rows[ok]
                streams = [s for s, good in zip(streams, ok.tolist(), strict=True) if good]
            if not streams:
                continue
            fits = n_hidden == sum(self.state_sizes)
            self._install_rows(streams, rows, fits, version)
            report.installed += len(streams)
            report.cold_hidden += 0 if fits else len(streams)
        if report.unusable:
            log.warning("event=unusable_snapshots streams=%d action=start_cold",
                        len(report.unusable))  # fmt: skip
        return report

    def _install_rows(
        self, streams: list[str], rows: npt.NDArray[np.void], fits: bool, version: int
    ) -> None:
        slots = self.slots_for(streams)
        n_norm = self.normalizer.snapshot_width
        stats = rows["norm"]
        self.normalizer.restore_many(slots, stats[:, :n_norm])
        self._restore_combination(slots, stats[:, n_norm:], version)
        self.seq[slots] = rows["seq"]
        self.prev_forecast[slots] = rows["prev"]
        self.partition[slots] = rows["partition"]
        self.offset[slots] = rows["offset"]
        self.seen_at[slots] = time.time()
        index = torch.from_numpy(slots)
        if not fits:
            for h in self.hidden:
                h.index_fill_(0, index, 0.0)
            return
        flat = torch.from_numpy(rows["hidden"].copy())  # (n, sum S_l), aligned copy
        for h, part in zip(self.hidden, torch.split(flat, self.state_sizes, dim=1), strict=True):
            h.index_copy_(0, index, part.contiguous())

    def _stats_width(self, version: int) -> int:
        """Statistics floats in a snapshot of ``version`` for this model and combination."""
        n_norm = self.normalizer.snapshot_width
        if version == 1:
            return n_norm
        if version in (2, 3):
            return n_norm + self.combiner.snapshot_width_v3
        return self.stats_width

    def _restore_combination(self, slots: I64, rows: F64, version: int) -> None:
        """Put back the combiner's part of snapshots of ``version`` (rows (N, width), or
        (N, 0) for version 1, whose streams start the combination fresh)."""
        if version == 1:
            self.combiner.reset(slots)
            return
        if version in (2, 3):
            self.combiner.restore_rows_v3(slots, rows)
        else:
            self.combiner.restore_rows(slots, rows)
        if version == 2:  # mean errors where the weights are now: start from equal weights
            self.combiner.reset_weights(slots)

    def state_bytes(self) -> int:
        """Bytes held by per-slot arrays (all capacity, not only live streams)."""
        tensors = sum(h.element_size() * h.nelement() for h in self.hidden)
        norm = sum(getattr(self.normalizer, f).nbytes for f in self.normalizer.FIELDS)
        norm += sum(getattr(self.combiner, f).nbytes for f in self.combiner.FIELDS)
        slots = sum(getattr(self, name).nbytes for name in self._SLOT_ARRAYS)
        return int(tensors + norm + slots)
