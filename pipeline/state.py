"""Per-stream state: stream id → slot, and every slot's numbers in preallocated arrays.

Hidden states live in one torch tensor per layer (``(capacity, S_l)``), normalizer statistics in
numpy arrays owned by :class:`~pipeline.normalize.Normalizer`, plus each stream's ``seq`` (ticks
processed). Capacity doubles when full; freed slots are reused. Reads never create state: only
:meth:`StateStore.slots_for` (the write path) allocates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.normalize import F64, I64, Normalizer, NormalizerConfig


class StateStore:
    """Owns every stream's state; the engine reads and writes it by slot index."""

    def __init__(
        self,
        state_sizes: Sequence[int],
        normalizer: NormalizerConfig,
        n_features: int,
        capacity: int = 1024,
    ) -> None:
        self.state_sizes = list(state_sizes)
        self.hidden: list[Tensor] = [torch.zeros(capacity, s) for s in self.state_sizes]
        self.normalizer = Normalizer(normalizer, n_features, capacity)
        self.seq: I64 = np.zeros(capacity, dtype=np.int64)
        # The one-step forecast made at each stream's latest tick (NaN: none yet), scored when
        # the next tick arrives.
        self.prev_forecast: F64 = np.full(capacity, np.nan)
        self.slot_of: dict[str, int] = {}
        self.stream_at: list[str | None] = [None] * capacity
        self._free: list[int] = list(range(capacity - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return len(self.stream_at)

    def __len__(self) -> int:
        return len(self.slot_of)

    def __contains__(self, stream: object) -> bool:
        return stream in self.slot_of

    def slots_for(self, streams: Sequence[str]) -> I64:
        """Slots of ``streams`` (distinct ids), allocating fresh zeroed state for new ones."""
        out = np.empty(len(streams), dtype=np.int64)
        slot_of = self.slot_of
        for i, stream in enumerate(streams):
            slot = slot_of.get(stream)
            if slot is None:
                slot = self._allocate(stream)
            out[i] = slot
        return out

    def _allocate(self, stream: str) -> int:
        if not self._free:
            self._grow(2 * self.capacity)
        slot = self._free.pop()
        self.slot_of[stream] = slot
        self.stream_at[slot] = stream
        return slot

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        self.hidden = [torch.cat([h, torch.zeros(capacity - old, h.shape[1])]) for h in self.hidden]
        self.normalizer.grow(capacity)
        self.seq = np.concatenate([self.seq, np.zeros(capacity - old, dtype=np.int64)])
        self.prev_forecast = np.concatenate([self.prev_forecast, np.full(capacity - old, np.nan)])
        self.stream_at.extend([None] * (capacity - old))
        self._free.extend(range(capacity - 1, old - 1, -1))

    def reset(self, slots: I64) -> None:
        """Cold-start ``slots``: zero hidden state and normalizer, keep ``seq``."""
        index = torch.from_numpy(slots)
        for h in self.hidden:
            h.index_fill_(0, index, 0.0)
        self.normalizer.reset(slots)
        self.prev_forecast[slots] = np.nan

    def evict(self, stream: str) -> bool:
        """Drop a stream's state and free its slot; False if it had none."""
        slot = self.slot_of.pop(stream, None)
        if slot is None:
            return False
        slots = np.array([slot], dtype=np.int64)
        self.reset(slots)
        self.seq[slot] = 0
        self.stream_at[slot] = None
        self._free.append(slot)
        return True

    def state_bytes(self) -> int:
        """Bytes held by per-slot arrays (all capacity, not only live streams)."""
        tensors = sum(h.element_size() * h.nelement() for h in self.hidden)
        norm = sum(getattr(self.normalizer, f).nbytes for f in self.normalizer.FIELDS)
        return int(tensors + norm + self.seq.nbytes + self.prev_forecast.nbytes)
