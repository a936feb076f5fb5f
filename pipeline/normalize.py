"""Online per-stream normalization, shared by training, backtesting and serving.

Each stream keeps, per feature, River's exponentially weighted statistics (the same update
rules as ``river.stats.EWMean`` and ``river.stats.EWVar``; ``tests/test_normalize.py`` checks the
numbers against River itself):

- ``mean``/``var``: EW mean and variance of the level x (``fading_factor = level_alpha``);
- ``dsq``: EW mean of the squared change (x_t - x_{t-1})^2 (``scale_alpha``), whose square root is
  the stream's *scale*: the size of a typical one-step move;
- ``dt_mean``: EW mean of the time between ticks (seconds).

The statistics live in numpy arrays indexed by slot (one row per stream) and are updated for a
whole wave of streams at once: per-stream River objects cost ~1 µs per tick each in a Python loop,
which alone would use up the engine's budget (see docs/decisions.md).

Model inputs per tick (float32, shape ``(N, 2F + 1)``): for each feature the level z-score
``(x - mean) / std`` and the change ``(x - last) / scale``, then ``log(dt / dt_mean)``; all clipped
to ``±clip``. With ``calendar``, four more: sin/cos of the time of day and of the day of week.
Targets and forecasts are changes of the target feature from its last value, in units
of ``scale * sqrt(h)`` for step h: ``forecast[h] = last + scale * sqrt(h) * y[h]``.
Statistics include the current tick.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.signal import lfilter  # type: ignore[import-untyped]

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class NormalizerConfig:
    """Settings of the online normalizer; stored in the model file (train/serve parity)."""

    level_alpha: float = 0.01  # fading factor of the level mean/variance (~100-tick memory)
    scale_alpha: float = 0.02  # fading factor of the squared one-step change (~50-tick memory)
    dt_alpha: float = 0.05  # fading factor of the inter-tick time
    clip: float = 10.0  # inputs are clipped to ±clip
    warmup: int = 20  # forecasts are marked warm from this many ticks on
    # Calendar inputs: sin/cos of the time of day and of the day of week of ``ts`` (UTC; write
    # local times as naive timestamps if local hours matter). Four extra inputs.
    calendar: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class NormalizedStep:
    """What one :meth:`Normalizer.step` returns for N ticks."""

    inputs: F32  # (N, 2F + 1) model inputs
    last: F64  # (N,) current value of the target feature, stream units
    scale: F64  # (N,) typical one-step move of the target feature, stream units
    count: I64  # (N,) ticks seen by the stream, including this one
    warm: npt.NDArray[np.bool_]  # (N,) count >= warmup


@dataclass(frozen=True, slots=True)
class NormalizedRun:
    """What :meth:`Normalizer.run` returns for L ticks of one stream: the model inputs and the
    statistics after each tick, plus what the engine needs to score the previous forecasts
    (the mean and value before each tick)."""

    step: NormalizedStep  # L rows, as L step() calls would return them
    mean: F64  # (L, F)
    var: F64  # (L, F)
    dsq: F64  # (L, F)
    dt_mean: F64  # (L,)
    last_ts: F64  # (L,) newest event time after each tick
    prev_mean: F64  # (L, F) mean before each tick
    prev_last: F64  # (L, F) value before each tick
    last_x: F64  # (F,) the last tick's values


# Relative and absolute floors keep a constant stream from dividing by zero without
# flattening streams that genuinely move by 1e-6 of their level. The absolute floor sits near
# the bottom of float64 so that a stream living at 1e-300 keeps its own units (with 1e-30, its
# forecasts came out near 1e-31). Below ~1e-154 the squares in var/dsq underflow to 0 and the
# floors take over: such a stream is forecast close to persistence, in its units.
REL_FLOOR = 1e-9
ABS_FLOOR = 1e-300


class Normalizer:
    """Per-slot normalizer state for ``n_features`` features; the owner maps streams to slots."""

    # Per-slot arrays; the snapshot format lists them in this order.
    FIELDS = ("mean", "var", "last", "dsq", "dt_mean", "last_ts", "count")

    def __init__(self, config: NormalizerConfig, n_features: int, capacity: int = 1024) -> None:
        self.config = config
        self.n_features = n_features
        self.mean: F64 = np.zeros((capacity, n_features))
        self.var: F64 = np.zeros((capacity, n_features))
        self.last: F64 = np.zeros((capacity, n_features))
        self.dsq: F64 = np.zeros((capacity, n_features))
        self.dt_mean: F64 = np.zeros(capacity)
        self.last_ts: F64 = np.zeros(capacity)
        self.count: I64 = np.zeros(capacity, dtype=np.int64)

    @property
    def capacity(self) -> int:
        return int(self.count.shape[0])

    @property
    def n_inputs(self) -> int:
        return 2 * self.n_features + 1 + (4 if self.config.calendar else 0)

    def grow(self, capacity: int) -> None:
        """Enlarge every array to ``capacity`` rows; new rows are fresh (count 0)."""
        grow_rows(self, self.FIELDS, capacity)

    def reset(self, slots: I64) -> None:
        """Forget the statistics of ``slots`` (a new stream, or one being evicted)."""
        for name in self.FIELDS:
            getattr(self, name)[slots] = 0

    def step(self, slots: I64, x: F64, ts: F64, target: int = 0) -> NormalizedStep:
        """Update the statistics of ``slots`` with one tick each and return model inputs.

        ``slots`` (N,) must be distinct; ``x`` is (N, F) in stream units; ``ts`` (N,) epoch seconds.
        """
        cfg = self.config
        n = self.count[slots] + 1  # (N,)
        first = (n == 1)[:, None]  # (N, 1)

        # Level: River EWMean/EWVar (first tick sets mean = x, var = 0).
        mean = self.mean[slots]
        diff = x - mean
        new_mean = np.where(first, x, mean + cfg.level_alpha * diff)
        new_var = np.where(
            first, 0.0, (1 - cfg.level_alpha) * (self.var[slots] + cfg.level_alpha * diff * diff)
        )

        # Scale: River EWMean of the squared change, from the second tick on.
        change = np.where(first, 0.0, x - self.last[slots])
        sq = change * change
        second = (n == 2)[:, None]
        dsq = np.where(second, sq, self.dsq[slots] + cfg.scale_alpha * (sq - self.dsq[slots]))
        dsq = np.where(first, 0.0, dsq)

        # Inter-tick time (seconds), River EWMean from the second tick on; late ticks count as 0.
        dt = np.where(n == 1, 0.0, np.maximum(ts - self.last_ts[slots], 0.0))
        dt_mean = np.where(
            n == 2, dt, self.dt_mean[slots] + cfg.dt_alpha * (dt - self.dt_mean[slots])
        )
        dt_mean = np.where(n == 1, 0.0, dt_mean)

        self.mean[slots], self.var[slots], self.last[slots] = new_mean, new_var, x
        self.dsq[slots], self.dt_mean[slots], self.count[slots] = dsq, dt_mean, n
        self.last_ts[slots] = np.where(n == 1, ts, np.maximum(ts, self.last_ts[slots]))

        ratio = np.where(n <= 2, 1.0, (dt + 1e-9) / (dt_mean + 1e-9))
        return self._inputs(x, new_mean, new_var, n, change, dsq, ratio, ts, target)

    def _inputs(
        self, x: F64, mean: F64, var: F64, n: I64, change: F64, dsq: F64, ratio: F64, ts: F64,
        target: int,
    ) -> NormalizedStep:  # fmt: skip
        """Model inputs of N ticks from their updated statistics (shared by :meth:`step` and
        :meth:`run`, so both compute the same inputs from the same numbers)."""
        cfg = self.config
        floor = ABS_FLOOR + REL_FLOOR * np.abs(mean)
        std = np.sqrt(var / _debias(cfg.level_alpha, n)[:, None]) + floor
        scale = np.sqrt(dsq) + floor
        clip = cfg.clip
        inputs = np.empty((len(n), self.n_inputs), dtype=np.float32)
        inputs[:, 0 : 2 * self.n_features : 2] = np.clip((x - mean) / std, -clip, clip)
        inputs[:, 1 : 2 * self.n_features : 2] = np.clip(change / scale, -clip, clip)
        dt_col = 2 * self.n_features
        inputs[:, dt_col] = np.clip(np.log(ratio), -clip, clip)
        if cfg.calendar:
            day = 2 * np.pi * np.mod(ts, 86_400.0) / 86_400.0
            week = 2 * np.pi * np.mod(ts + 3 * 86_400.0, 7 * 86_400.0) / (7 * 86_400.0)  # Monday 0
            inputs[:, dt_col + 1], inputs[:, dt_col + 2] = np.sin(day), np.cos(day)
            inputs[:, dt_col + 3], inputs[:, dt_col + 4] = np.sin(week), np.cos(week)
        return NormalizedStep(
            inputs=inputs,
            last=x[:, target].copy(),
            scale=scale[:, target],
            count=n,
            warm=n >= cfg.warmup,
        )

    def run(self, slot: int, x: F64, ts: F64, target: int = 0) -> NormalizedRun:
        """What ``len(x)`` successive :meth:`step` calls of one stream would return, computed
        as linear recurrences over the sequence (scipy's ``lfilter``, a C loop) instead of one
        numpy round per tick. The state is *not* written: :meth:`apply_run` does that, so a
        caller can drop a run whose model outputs turn out non-finite.

        ``x`` (L, F) stream units, ``ts`` (L,) epoch s, in arrival order. The stream must have
        two ticks already (``count[slot] >= 2``): the first two ticks are special cases that
        :meth:`step` handles.
        """
        cfg = self.config
        count0 = int(self.count[slot])
        if count0 < 2:
            raise ValueError("run() needs a stream with two ticks already; use step()")
        length = len(ts)
        mean = ew_mean(cfg.level_alpha, self.mean[slot], x)  # (L, F)
        prev_mean = np.vstack([self.mean[slot][None], mean[:-1]])
        diff = x - prev_mean
        a = 1.0 - cfg.level_alpha
        var, _ = lfilter([1.0], [1.0, -a], a * cfg.level_alpha * diff * diff, axis=0,
                         zi=(a * self.var[slot])[None])  # fmt: skip
        prev_x = np.vstack([self.last[slot][None], x[:-1]])
        change = x - prev_x
        dsq = ew_mean(cfg.scale_alpha, self.dsq[slot], change * change)
        newest = np.maximum.accumulate(np.concatenate([[self.last_ts[slot]], ts]))  # (L + 1,)
        dt = np.maximum(ts - newest[:-1], 0.0)
        dt_mean = ew_mean(cfg.dt_alpha, np.array([self.dt_mean[slot]]), dt[:, None])[:, 0]
        n = count0 + 1 + np.arange(length, dtype=np.int64)
        ratio = (dt + 1e-9) / (dt_mean + 1e-9)
        step = self._inputs(x, mean, var, n, change, dsq, ratio, ts, target)
        return NormalizedRun(
            step, mean, var, dsq, dt_mean, newest[1:], prev_mean, prev_x, x[-1].copy()
        )

    def apply_run(self, slot: int, run: NormalizedRun) -> None:
        """Write the state after the last tick of ``run`` (see :meth:`run`)."""
        self.mean[slot], self.var[slot] = run.mean[-1], run.var[-1]
        self.last[slot], self.dsq[slot] = run.last_x, run.dsq[-1]
        self.dt_mean[slot], self.last_ts[slot] = run.dt_mean[-1], run.last_ts[-1]
        self.count[slot] = run.step.count[-1]

    def snapshot(self, slot: int) -> list[float]:
        """One stream's statistics as a flat list of floats (see :meth:`restore`)."""
        out: list[float] = []
        for name in self.FIELDS:
            out.extend(np.atleast_1d(getattr(self, name)[slot]).astype(np.float64).tolist())
        return out

    @property
    def snapshot_width(self) -> int:
        """Numbers in one stream's snapshot: mean, var, last, dsq per feature; dt, ts, count."""
        return 4 * self.n_features + 3

    def restore(self, slot: int, flat: list[float]) -> None:
        """Put back what :meth:`snapshot` returned; raises ValueError on a length mismatch."""
        expected = self.snapshot_width
        if len(flat) != expected:
            raise ValueError(f"normalizer snapshot has {len(flat)} numbers, expected {expected}")
        pos = 0
        for name in self.FIELDS:
            arr = getattr(self, name)
            width = self.n_features if arr.ndim == 2 else 1
            chunk = flat[pos : pos + width]
            arr[slot] = chunk if arr.ndim == 2 else chunk[0]
            pos += width

    def restore_many(self, slots: I64, flat: F64) -> None:
        """:meth:`restore` for many slots at once: ``flat`` is (N, snapshot_width), one
        :meth:`snapshot` per row, in the order of ``slots``."""
        put_rows(self, self.FIELDS, slots, flat, "normalizer")


def grow_rows(owner: object, fields: tuple[str, ...], capacity: int) -> int:
    """Enlarge the per-slot arrays ``fields`` of ``owner`` to ``capacity`` rows of zeros;
    returns the rows added (0 if it already had as many)."""
    extra = capacity - len(getattr(owner, fields[0]))
    if extra <= 0:
        return 0
    for name in fields:
        old = getattr(owner, name)
        pad = np.zeros((extra, *old.shape[1:]), dtype=old.dtype)
        setattr(owner, name, np.concatenate([old, pad]))
    return extra


def put_rows(owner: object, fields: tuple[str, ...], slots: I64, flat: F64, what: str) -> None:
    """Scatter ``flat`` (N, total width), the ``fields`` of ``owner`` side by side per row, into
    rows ``slots`` of those arrays; ValueError naming ``what`` on a width mismatch."""
    arrays = [getattr(owner, name) for name in fields]
    width = sum(int(np.prod(a.shape[1:])) for a in arrays)
    if flat.ndim != 2 or flat.shape[1] != width:
        raise ValueError(f"{what} snapshots have shape {flat.shape}, expected (N, {width})")
    pos = 0
    for arr in arrays:
        w = int(np.prod(arr.shape[1:]))
        arr[slots] = flat[:, pos : pos + w].reshape(len(slots), *arr.shape[1:])
        pos += w


def horizon_scale(horizon: int) -> F64:
    """(H,) sqrt(h) for h = 1..H: a forecast h steps ahead is expressed in units of
    ``scale * sqrt(h)`` so every horizon step has targets of similar size (random-walk growth)."""
    return np.sqrt(np.arange(1, horizon + 1, dtype=np.float64))


def ew_mean(alpha: float, start: F64, u: F64) -> F64:
    """River's EWMean over a sequence: y_t = y_{t-1} + alpha * (u_t - y_{t-1}) from y = start;
    ``u`` (L, K), ``start`` (K,) -> (L, K)."""
    a = 1.0 - alpha
    out, _ = lfilter([alpha], [1.0, -a], u, axis=0, zi=(a * start)[None])
    result: F64 = out
    return result


def _debias(alpha: float, n: I64) -> F64:
    """Correction for an EW variance that started at 0: 1 - (1 - alpha)^(n - 1), at least alpha."""
    return np.maximum(1.0 - (1.0 - alpha) ** np.maximum(n - 1, 1), alpha)
