"""Per-stream online combination of the model with cheap forecasters, and calibrated intervals.

Beside the network, every stream is forecast by cheap *members* (M of them, in this order):

- ``model``: the network's forecast;
- ``persistence``: the last value, for every step;
- ``damped``: ``last + c_h * (last - previous)`` with ``c_h = phi + ... + phi^h`` (``damping``);
- ``trend``: ``last + h * (last - previous)`` (linear extrapolation);
- ``seasonal``: the value ``season * ceil(h / season)`` ticks before the target (with a season);
- ``seasonal_change``: the last value plus the mean change over the same h steps ``season *
  ceil(h / season)`` ticks earlier and in the :data:`SEASONS` - 1 seasons before that (with a
  season; fewer while the history is shorter): a daily profile carried from today's level, which
  the plain seasonal rule misses when the level moves; the mean of three seasons is less noisy
  than one (decision 32).

**Weights.** The H steps fall into G horizon groups (``group_starts``); group g is judged at its
representative step r_g (the rounded geometric middle of the group). At every tick the members'
forecasts made r_g ticks earlier for step r_g are mixed with the group's current weights and the
mix is judged against the value that arrived: each member's log-weight moves against the
gradient of the mix's absolute error, ``-eta_g * sign(mix - actual) * (forecast_m - mix) /
(scale * sqrt(r_g))`` (within a tenth of that unit, :data:`HUBER`, the Huber loss's: the sign
shrinks to the scaled error; exponentiated gradient, Kivinen & Warmuth 1997; scale: the stream's
typical one-step move before this tick, so the step is unit-free; the scaled difference clipped
at :data:`MAX_SCORE`), with ``eta_g = eta / r_g^0.75``, larger by ``sqrt(WARM_UP / j)`` for the
group's j-th judgment while j < :data:`WARM_UP` (the usual 1/sqrt(t) schedule of online gradient
methods, so a new stream's weights settle within tens of ticks; eta_g after). The weights
themselves are kept (``mix_weights[g, m]``, summing to 1 over the members; each step multiplies
them by the exp of its log-step and normalizes), none below :data:`WEIGHT_FLOOR` times the
largest. Unlike weights from each member's own recent error (exponentially weighted averaging,
the first version here), the mix's own error moves them, so they learn the combination that is
best together, which can beat every member alone (decision 30). Step h of
the combined forecast mixes the members with the weights of h's group. Every tick is judged (a
first version judged every r_g-th tick to save memory, and aliased: on a series with a 12-tick
cycle the judged ticks saw two phases of it, and coverage at step 18 fell to 0.38).

**Intervals.** Bounds at step h are ``combined ± q(h) * scale * sqrt(h)``, where q(h) is q[g] at
the representative steps and interpolated between them on log h (flat before the first and after
the last): errors that grow faster or slower than sqrt(h) (a spiky series' barely grow) are then
followed step by step instead of group by group (with q[g] for the whole group, the pooled
coverage of three spiky appliance-power series was 0.68-0.71). When an interval issued for step
r_g meets its actual, ``q[g]`` is multiplied by
``exp(rate * (miss - (1 - level)))``: adaptive conformal inference in the form of online quantile
tracking on the log scale (Gibbs & Candès 2021; Angelopoulos, Candès & Tibshirani 2023), which
holds the long-run miss rate of the judged intervals at ``1 - level`` for any sequence of values,
drift included. The issued half-width is kept, so the interval judged is the one served.

**State per slot** (float64, in the stream's snapshot after the normalizer's numbers): ``ticks``
folded in; the last L target values (``history``, tick k at ``k mod L``, for the cheap members'
past forecasts and the seasonal member); for each group's last r_g ticks the model forecast,
combined forecast and half-width issued for step r_g (``rings``, (R, 3) with R = sum of r_g;
group g at ``[offset_g, offset_g + r_g)``, tick k at ``offset_g + k mod r_g``);
``mix_weights`` (G, M); ``q`` (G,). A stream's numbers depend on its own ticks only. Ring and
history reads and writes go through flat indices (``np.take``/``np.put``): with slots scattered
over the arrays, numpy's two-array fancy indexing was 10-20x slower.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from pipeline import combine_kernel
from pipeline.combine_kernel import SEASONS
from pipeline.normalize import F64, I64, grow_rows, put_rows

MEMBERS = ("model", "persistence", "damped", "trend", "seasonal", "seasonal_change")
SEASONAL = ("seasonal", "seasonal_change")  # members that need a season
# One wild tick moves a log-weight by at most eta_g * MAX_SCORE: a member 20 typical moves off is
# simply wrong, and a cap keeps the steps of a scale not yet settled (a stream that starts flat
# and then jumps scores 1e9 against a scale near 0) from deciding the weights for good.
MAX_SCORE = 20.0
# A member's weight stays above e^-15 (3e-7) of the best one's, so a member that becomes right
# after a long wrong stretch regains weight in a bounded number of ticks.
WEIGHT_FLOOR = math.exp(-15.0)
# The weights follow the mix's Huber loss rather than its absolute error: within a tenth of a
# typical move the step shrinks with the error instead of flipping with its sign, so forecasts
# that differ by float rounding (the GRU's batched and sequence paths) move the weights alike.
HUBER = 0.1
WARM_UP = 3000  # judgments per group with a larger step (see the module docstring)
# Judging starts once the stream has this many ticks (and r_g): the scale needs a few changes.
FIRST_JUDGED = 10
# A wave runs in parallel parts (on torch's threads, see pipeline.combine_kernel) when each part
# gets at least this many rows: ~0.5 ms of kernel, against ~10 us to start the parts.
ROWS_PER_PART = 1024
PRIOR_Q = 1.2816  # 80% two-sided quantile of |N(0, 1)|: a random walk's score before any data
Bools = npt.NDArray[np.bool_]
W32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class CombineConfig:
    """Settings of the combination and the intervals (``forecast`` section of the settings)."""

    members: tuple[str, ...] = MEMBERS  # which of MEMBERS take part ("model" alone: no mixing)
    season: int = 0  # ticks; 0 or 1: no seasonal member
    damping: float = 0.5  # phi of the damped member
    eta: float = 0.03  # log-weight step at step 1 (group g: eta / r_g^0.75); 0: equal weights
    level: float = 0.8  # central coverage of the intervals
    rate: float = 0.05  # step of the quantile tracker (in log units)
    group_starts: tuple[int, ...] = (1, 2, 5, 13)  # first step of each horizon group

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Combined:
    """What :meth:`Combiner.step` returns for N ticks (stream units, or log units for a log
    target: the caller maps them back)."""

    forecast: F64  # (N, H) the combined forecast
    lower: F64  # (N, H)
    upper: F64  # (N, H)
    weights: W32  # (N, M) the weights of the first horizon group
    scored: I64  # (G,) intervals judged at these ticks, per group
    covered: I64  # (G,) ... with the actual inside
    q: F64  # (N, G) half-width of the issued intervals, in units of scale * sqrt(h)
    # None: tick i's forecast and bounds are row i of the arrays above. Else they were written
    # into the caller's arrays (:class:`Placement`) and tick i's are at row ``rows[i]``.
    rows: I64 | None = None

    def step_one(self) -> F64:
        """(N,) the combined forecast of step 1, tick by tick."""
        return self.forecast[:, 0] if self.rows is None else self.forecast[self.rows, 0]


@dataclass(frozen=True, slots=True)
class Placement:
    """Where :meth:`Combiner.step` writes N ticks' forecasts and bounds: tick i's at row
    ``rows[i]`` of ``forecast``/``lower``/``upper`` (each (R, H) float64 in C order, R >= N,
    owned by the caller, e.g. the engine's per-batch outputs). Saves a copy and a scatter of
    three (N, H) arrays per wave."""

    rows: I64
    forecast: F64
    lower: F64
    upper: F64


class Combiner:
    """Per-slot combination state for a model of horizon ``horizon`` (see the module docstring);
    the owner (:class:`~pipeline.state.StateStore`) maps streams to slots."""

    FIELDS = ("ticks", "history", "rings", "mix_weights", "q")
    MODEL, COMBINED, WIDTH = 0, 1, 2  # the three numbers kept per ring position

    def __init__(self, config: CombineConfig, horizon: int, capacity: int = 1024) -> None:
        unknown = set(config.members) - set(MEMBERS)
        if unknown or not config.members:
            raise ValueError(f"members {sorted(unknown)}: choose from {', '.join(MEMBERS)}")
        self.config = config
        self.horizon = horizon
        self.members = tuple(
            m for m in MEMBERS if m in config.members and (m not in SEASONAL or config.season > 1)
        )
        starts = sorted({s for s in config.group_starts if 1 <= s <= horizon} | {1})
        ends = [*(s - 1 for s in starts[1:]), horizon]
        self._group_sizes = np.array([b - a + 1 for a, b in zip(starts, ends, strict=True)])
        self.reps: I64 = np.array(
            [round(math.sqrt(a * b)) for a, b in zip(starts, ends, strict=True)], dtype=np.int64
        )
        # "1", "2-4", ...: the groups' steps, for metric labels
        self.group_labels = [
            str(a) if a == b else f"{a}-{b}" for a, b in zip(starts, ends, strict=True)
        ]
        m, r_max = config.season, int(self.reps.max())
        self.length = max(r_max + 2, m * math.ceil(r_max / m) if m > 1 else 0, m)
        # Snapshots of versions 2 and 3 held the history of a seasonal change over one season.
        self.length_v3 = self.length
        if "seasonal_change" in self.members:  # it reaches r_max (or H) ticks further back,
            reach = max(m * math.ceil(r_max / m) + r_max, m * math.ceil(horizon / m))
            self.length_v3 = max(self.length, reach + 1)
            self.length = max(self.length, reach + (SEASONS - 1) * m + 1)  # in SEASONS seasons
        phi = config.damping
        steps = np.arange(1, horizon + 1, dtype=np.float64)
        self._steps = steps
        self._damped = phi * (1 - phi**steps) / (1 - phi) if phi != 1 else steps  # c_h, (H,)
        self._sqrt_steps = np.sqrt(steps)
        lo, hi, frac = _log_interpolation(self.reps, horizon)
        # half-width per step = (q * scale) @ this: the interpolation weights times sqrt(h)
        # (one small matmul; gathering two columns per step cost ~20x more)
        self._widen = np.zeros((len(self.reps), horizon))
        np.add.at(self._widen, (lo, np.arange(horizon)), (1.0 - frac) * self._sqrt_steps)
        np.add.at(self._widen, (hi, np.arange(horizon)), frac * self._sqrt_steps)
        self.offsets: I64 = np.concatenate([[0], np.cumsum(self.reps)[:-1]]).astype(np.int64)
        self._codes: I64 = np.array([MEMBERS.index(m) for m in self.members], dtype=np.int64)
        self._group_of_step: I64 = np.repeat(np.arange(len(self.reps)), self._group_sizes)
        self._etas: F64 = config.eta / self.reps.astype(np.float64) ** 0.75  # (G,) per group
        # The compiled step (numba) when it is installed; tests switch it off to compare.
        self.compiled = combine_kernel.AVAILABLE
        self._q_up = math.exp(config.rate * config.level)  # after a miss
        self._q_down = math.exp(-config.rate * (1.0 - config.level))  # after a hit
        g = len(self.reps)
        self.ticks: I64 = np.zeros(capacity, dtype=np.int64)
        self.history: F64 = np.zeros((capacity, self.length))
        self.rings: F64 = np.zeros((capacity, int(self.reps.sum()), 3))
        self.mix_weights: F64 = np.full((capacity, g, len(self.members)), 1 / len(self.members))
        self.q: F64 = np.full((capacity, g), PRIOR_Q)
        if self.compiled:  # compile (~3 s once per machine, then ~0.3 s from numba's cache) now,
            empty = np.zeros(0)  # not in the first wave of ticks (nor the first large one).
            # The parallel kernel only when torch may use more than one thread: starting numba's
            # OpenMP threads in a one-thread process (the daemon's default) made torch's own
            # calls spin on them (CPU per tick at 1k ticks/s: 2.4x, decision 31).
            for parts in (1, 2) if _parts(2 * ROWS_PER_PART) > 1 else (1,):
                self._step_compiled(np.zeros(0, dtype=np.int64), empty, np.zeros((0, horizon)),
                                    empty, empty, parts)  # fmt: skip

    @property
    def capacity(self) -> int:
        return int(self.ticks.shape[0])

    @property
    def snapshot_width(self) -> int:
        return sum(int(np.prod(getattr(self, f).shape[1:])) for f in self.FIELDS)

    def grow(self, capacity: int) -> None:
        extra = grow_rows(self, self.FIELDS, capacity)
        if extra:
            self.q[-extra:] = PRIOR_Q
            self.mix_weights[-extra:] = 1 / len(self.members)

    def reset(self, slots: I64) -> None:
        for name in self.FIELDS:
            getattr(self, name)[slots] = 0
        self.q[slots] = PRIOR_Q
        self.reset_weights(slots)

    def reset_weights(self, slots: I64) -> None:
        """Equal weights for ``slots`` (a new stream's, or a restored one's whose snapshot held
        something else in their place)."""
        self.mix_weights[slots] = 1 / len(self.members)

    def step(
        self, slots: I64, x: F64, model: F64, scale_before: F64, scale: F64,
        into: Placement | None = None,
    ) -> Combined:  # fmt: skip
        """Fold one tick per slot into the state and combine the forecasts made at it.

        ``slots`` (N,) distinct; ``x`` (N,) the target value; ``model`` (N, H) the model's
        forecast made at this tick; ``scale_before``/``scale`` (N,) the stream's scale before and
        after this tick (the normalizer's). All finite. Forecasts and bounds go to fresh arrays,
        or into ``into``'s (the result's ``rows`` then says where). Runs the compiled kernel
        (:mod:`pipeline.combine_kernel`) unless ``compiled`` is off or numba is missing.
        """
        if self.compiled:
            return self._step_compiled(slots, x, model, scale_before, scale, into=into)
        combined = self.step_numpy(slots, x, model, scale_before, scale)
        if into is None:
            return combined
        into.forecast[into.rows] = combined.forecast
        into.lower[into.rows], into.upper[into.rows] = combined.lower, combined.upper
        return replace(
            combined, forecast=into.forecast, lower=into.lower, upper=into.upper, rows=into.rows
        )

    def _step_compiled(
        self, slots: I64, x: F64, model: F64, scale_before: F64, scale: F64,
        parts: int | None = None, into: Placement | None = None,
    ) -> Combined:  # fmt: skip
        """:meth:`step` by the compiled kernel, in ``parts`` parallel parts (default:
        :func:`_parts`)."""
        n_rows, g, m = len(slots), len(self.reps), len(self.members)
        f64 = np.float64
        if into is None:
            rows = np.arange(n_rows, dtype=np.int64)
            out = [np.empty((n_rows, self.horizon)) for _ in range(3)]
        else:
            rows = np.ascontiguousarray(into.rows, dtype=np.int64)
            out = [into.forecast, into.lower, into.upper]
        weights0, q = np.empty((n_rows, m), dtype=np.float32), np.empty((n_rows, g))
        arguments = (
            np.ascontiguousarray(slots, dtype=np.int64), rows, np.ascontiguousarray(x, dtype=f64),
            np.ascontiguousarray(model, dtype=f64), np.ascontiguousarray(scale_before, dtype=f64),
            np.ascontiguousarray(scale, dtype=f64),
            self.ticks, self.history, self.rings, self.mix_weights, self.q,
            self.reps, self.offsets, self._codes, self._damped, self._group_of_step, self._widen,
            self.config.season, self._etas, WEIGHT_FLOOR, WARM_UP, HUBER, self._q_up, self._q_down,
            FIRST_JUDGED, MAX_SCORE, *out, weights0, q,
        )  # fmt: skip
        parts = parts or _parts(n_rows)
        if parts == 1:
            scored, covered = np.zeros(g, dtype=np.int64), np.zeros(g, dtype=np.int64)
            combine_kernel.step(*arguments, scored, covered)
        else:
            cuts = np.linspace(0, n_rows, parts + 1).astype(np.int64)
            per_part = np.zeros((2, parts, g), dtype=np.int64)
            combine_kernel.step_parts(cuts, *arguments, per_part[0], per_part[1])
            scored, covered = per_part.sum(axis=1)
        placed = None if into is None else rows
        return Combined(out[0], out[1], out[2], weights0, scored, covered, q, placed)

    def step_numpy(self, slots: I64, x: F64, model: F64, scale_before: F64, scale: F64) -> Combined:
        """:meth:`step` in numpy: the reference the compiled kernel is tested against."""
        n = self.ticks[slots]  # (N,) ticks before this one = this tick's index
        cells = self._ring_rows(slots, n)  # read r_g ticks after they were written
        scored, covered = self._score(slots, n, x, scale_before, cells)

        length = self.length
        flat_history = self.history.reshape(-1)  # a view: flat indices are the fast gathers
        row = slots * length
        np.put(flat_history, row + n % length, x)
        previous = np.where(n >= 1, np.take(flat_history, row + (n - 1) % length), x)
        weights = self.mix_weights[slots].astype(np.float32)  # (N, G, M)
        q = self.q[slots]  # (N, G)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow near the float range:
            seasonal = (lambda: self._seasonal_now(slots, n, x)) if self.config.season > 1 else None
            combined = self._mix(weights, x, x - previous, model, seasonal)  # handled below
            if not math.isfinite(float(combined.sum())):
                bad = np.asarray(~np.isfinite(combined).all(axis=1))  # mix these slowly
                combined[bad] = self._mix_rows(bad, weights, slots, n, x, previous, model)
            half = self._half_widths(q, scale)
            lower, upper = combined - half, combined + half
            finite = math.isfinite(float(half.sum() + lower.sum() + upper.sum()))
        if not finite:
            big = np.finfo(np.float64).max  # overflow: the widest finite bounds
            half = np.nan_to_num(np.minimum(half, big), nan=big)
            with np.errstate(over="ignore"):
                lower = np.maximum(combined - half, -big)
                upper = np.minimum(combined + half, big)

        at_rep = self.reps - 1
        issued = np.stack([model[:, at_rep], combined[:, at_rep], half[:, at_rep]], axis=-1)
        self.rings.reshape(-1, 3)[cells] = issued
        self.ticks[slots] = n + 1
        return Combined(combined, lower, upper, weights[:, 0, :], scored, covered, q)

    def can_run(self, slot: int) -> bool:
        """Whether :meth:`run` takes this stream: it has a full history and every group judged."""
        return int(self.ticks[slot]) > max(FIRST_JUDGED, self.length)

    def run(self, slot: int, x: F64, model: F64, scale_before: F64, scale: F64) -> Combined | None:
        """What ``len(x)`` successive :meth:`step` calls of one stream would return (up to float
        rounding), computed over the sequence: the members' past forecasts and the mix at once,
        and in compiled loops of plain floats only the weights' steps (each needs the weights
        the step before left) and the interval quantiles (each judgment needs the bound issued
        r_g ticks earlier). For the engine's hot streams. Needs :meth:`can_run`; returns None,
        changing nothing, if the outputs are not all finite (the caller then steps tick by tick).
        """
        length, reps, n0, n_ticks = self.length, self.reps, int(self.ticks[slot]), len(x)
        v = np.concatenate([self.history[slot][np.arange(n0 - length, n0) % length], x])
        j = length + np.arange(n_ticks)  # position of each tick in v
        ring = self.rings[slot]  # (R, 3)
        ring_ticks = [n0 - r + np.arange(r) for r in reps.tolist()]  # the ring's last r ticks
        kept = [
            ring[o + rt % r]
            for o, r, rt in zip(self.offsets.tolist(), reps.tolist(), ring_ticks, strict=True)
        ]
        n_groups, n_members = len(reps), len(self.members)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            past = np.empty((n_ticks, n_groups, n_members))
            fallback, denominator = np.empty((n_ticks, n_groups)), np.empty((n_ticks, n_groups))
            for g, r in enumerate(reps.tolist()):
                past_model = np.concatenate([kept[g][:, self.MODEL], model[:, r - 1]])[:n_ticks]
                v_k, v_prev = v[j - r], v[j - r - 1]
                every = {"model": past_model, "persistence": v_k,
                         "damped": v_k + self._damped[r - 1] * (v_k - v_prev),
                         "trend": v_k + r * (v_k - v_prev)}  # fmt: skip
                back = self.config.season * -(-r // max(self.config.season, 1))
                if "seasonal" in self.members:
                    every["seasonal"] = v[j - back]
                if "seasonal_change" in self.members:  # with a full history (can_run)
                    m = self.config.season
                    changes = (
                        v[j - back - i * m] - v[j - back - r - i * m] for i in range(SEASONS)
                    )
                    every["seasonal_change"] = v_k + sum(changes, np.zeros(n_ticks)) / SEASONS
                for i, name in enumerate(self.members):
                    past[:, g, i] = every[name]
                fallback[:, g] = v_k
                denominator[:, g] = scale_before * math.sqrt(r)
            after = np.empty_like(past)  # the weights after each tick
            etas = self._step_sizes(n0 + np.arange(n_ticks))
            combine_kernel.exp_gradient_run(
                np.ascontiguousarray(x, dtype=np.float64), past, fallback, denominator,
                self.mix_weights[slot].copy(), etas, WEIGHT_FLOOR, MAX_SCORE, HUBER, after,
            )  # fmt: skip
            weights = after.astype(np.float32)  # (L, G, M)
            m = self.config.season
            steps = np.arange(1, self.horizon + 1)
            seasonal = None
            if m > 1:
                back = m * -(-steps // m)  # (H,) with a full history (can_run)

                def seasonal() -> tuple[F64, F64]:
                    ends = j[:, None] + steps - back  # (L, H) where the first change ends
                    changes = (v[ends - i * m] - v[ends - steps - i * m] for i in range(SEASONS))
                    total = sum(changes, np.zeros(ends.shape))
                    return v[ends], x[:, None] + total / SEASONS

            combined = self._mix(weights, x, x - v[j - 1], model, seasonal)
        q_after, covered = self._track_quantiles(slot, x, combined, scale, kept)  # (L, G), (G,)
        with np.errstate(over="ignore", invalid="ignore"):
            half = self._half_widths(q_after, scale)
            lower, upper = combined - half, combined + half
            if not math.isfinite(float(combined.sum() + half.sum() + lower.sum() + upper.sum())):
                return None
        # Commit: the state after the last tick.
        self.history[slot][np.arange(n0 + n_ticks - length, n0 + n_ticks) % length] = v[-length:]
        for g, (o, r) in enumerate(zip(self.offsets.tolist(), reps.tolist(), strict=True)):
            issued = np.stack([model[:, r - 1], combined[:, r - 1], half[:, r - 1]], axis=1)
            tail = np.concatenate([kept[g], issued])[-r:]  # ticks n0 + L - r .. n0 + L - 1
            ring[o + (n0 + n_ticks - r + np.arange(r)) % r] = tail
        self.mix_weights[slot] = after[-1]
        self.q[slot] = q_after[-1]
        self.ticks[slot] = n0 + n_ticks
        scored = np.full(len(reps), n_ticks, dtype=np.int64)
        return Combined(combined, lower, upper, weights[:, 0, :], scored, covered, q_after)

    def _track_quantiles(
        self, slot: int, x: F64, combined: F64, scale: F64, kept: list[F64]
    ) -> tuple[F64, I64]:
        """The quantile tracker over a run, tick by tick (compiled when numba is installed):
        returns q after each tick's judgment (L, G) and the hits per group."""
        out = np.empty((len(self.reps), len(x)))
        hits = np.zeros(len(self.reps), dtype=np.int64)
        for g, r in enumerate(self.reps.tolist()):
            issued = np.concatenate([kept[g][:, self.COMBINED], combined[:, r - 1]])
            hits[g] = combine_kernel.track_quantiles(
                x, issued, np.ascontiguousarray(kept[g][:, self.WIDTH]), scale,
                float(self.q[slot, g]), math.sqrt(r), self._q_up, self._q_down, out[g],
            )  # fmt: skip
        return out.T, hits

    def _step_sizes(self, n: I64) -> F64:
        """(N, G) the weights' step at a tick with ``n`` (N,) ticks before it, per group: eta_g,
        times sqrt(WARM_UP / j) for the group's j-th judgment while j < WARM_UP."""
        judged = np.maximum(n[:, None] - np.maximum(self.reps, FIRST_JUDGED)[None, :] + 1, 1)
        sizes: F64 = self._etas * np.sqrt(np.maximum(WARM_UP / judged, 1.0))
        return sizes

    def _ring_rows(self, slots: I64, n: I64) -> I64:
        """(N, G) rows of ``rings`` seen as (capacity * R, 3): the position tick ``n`` writes for
        each group, which holds what tick ``n - r_g`` wrote."""
        pos = self.offsets[None, :] + n[:, None] % self.reps[None, :]  # (N, G)
        rows: I64 = slots[:, None] * self.rings.shape[1] + pos
        return rows

    def _half_widths(self, q: F64, scale: F64) -> F64:
        """(N, H) half-widths: q interpolated from the groups' representative steps to every
        step (exactly q[g] at step r_g), times scale * sqrt(h)."""
        half: F64 = (q * scale[:, None]) @ self._widen  # (N, G) @ (G, H)
        return half

    def _by_step(self, per_group: npt.NDArray[np.floating[Any]]) -> F64:
        """(N, G) -> (N, H) float64: each step takes its group's column."""
        out: F64 = np.repeat(per_group.astype(np.float64, copy=False), self._group_sizes, axis=1)
        return out

    def _mix(
        self,
        weights: W32,
        x: F64,
        change: F64,
        model: F64,
        seasonal_now: Callable[[], tuple[F64, F64]] | None,
    ) -> F64:
        """(N, H) the weighted sum of the members, without building them: persistence, damped
        and trend are ``x + c(h) * change`` for c = 0, c_h, h, so the mix is
        ``x + w_model (model - x) + change * (w_damped c_h + w_trend h) + w_seasonal (s - x)
        + w_seasonal_change (c - x)`` with each weight taken from h's group (``seasonal_now``:
        the two seasonal members' forecasts, (N, H) each)."""
        if self.members == ("model",):
            return model.copy()  # exactly the model's numbers, not x + 1 * (model - x)
        index = {m: j for j, m in enumerate(self.members)}
        xs = x[:, None]
        if "model" in index:
            out = model - xs
            out *= self._by_step(weights[:, :, index["model"]])
            out += xs
        else:
            out = np.repeat(xs, self.horizon, axis=1)
        slope: F64 | None = None
        if "damped" in index:
            slope = self._by_step(weights[:, :, index["damped"]])
            slope *= self._damped
        if "trend" in index:
            trend = self._by_step(weights[:, :, index["trend"]])
            trend *= self._steps
            slope = trend if slope is None else slope + trend
        if slope is not None:
            slope *= change[:, None]
            out += slope
        if seasonal_now is not None and any(name in index for name in SEASONAL):
            for name, member in zip(SEASONAL, seasonal_now(), strict=True):
                if name in index:
                    part = member - xs
                    part *= self._by_step(weights[:, :, index[name]])
                    out += part
        return out

    def _seasonal_now(self, slots: I64, n: I64, x: F64) -> tuple[F64, F64]:
        """(N, H) each the seasonal and seasonal-change members' forecasts made at tick ``n``
        (history already holds x)."""
        m, length, flat = self.config.season, self.length, self.history.reshape(-1)
        steps = np.arange(1, self.horizon + 1)
        start = n[:, None] - m * -(-steps // m)  # (N, H) the same steps, seasons earlier
        src = start + steps  # tick index of the seasonal source
        row = slots[:, None] * length
        then = np.take(flat, row + src % length)
        seasonal: F64 = np.where(src >= 0, then, x[:, None])
        if "seasonal_change" not in self.members:
            return seasonal, seasonal
        total, count = self._changes(row, n[:, None], n[:, None] - src, steps)
        change: F64 = np.where(count > 0, x[:, None] + total / np.maximum(count, 1), x[:, None])
        return seasonal, change

    def _changes(self, row: I64, n: I64, later: I64, span: I64) -> tuple[F64, I64]:
        """Sum and number of the changes over ``span`` ticks ending ``later``, ``later + m``,
        ... ticks before tick ``n`` for the last SEASONS seasons whose start is tick 0 or later
        (arrays broadcast together; ``row`` the slots' first history index): the numpy twin of
        :func:`pipeline.combine_kernel._changes`, same order of additions."""
        m, length, flat = self.config.season, self.length, self.history.reshape(-1)
        shape = np.broadcast(row, n, later, span).shape
        total, count = np.zeros(shape), np.zeros(shape, dtype=np.int64)
        for i in range(SEASONS):
            end = n - later - i * m  # tick index where the change ends
            ok = end - span >= 0
            moved = np.take(flat, row + end % length) - np.take(flat, row + (end - span) % length)
            total = total + np.where(ok, moved, 0.0)
            count = count + ok
        return total, count

    def _mix_rows(
        self, rows: Bools, weights: W32, slots: I64, n: I64, x: F64, prev: F64, model: F64
    ) -> F64:
        """The mix of ``rows`` member by member, a member that overflows counting as
        persistence (the slow path for values near the float range)."""
        x, prev, model, n, slots = x[rows], prev[rows], model[rows], n[rows], slots[rows]
        change = (x - prev)[:, None]
        xs = np.broadcast_to(x[:, None], model.shape)
        with np.errstate(over="ignore", invalid="ignore"):
            every = {
                "model": model,
                "persistence": xs,
                "damped": x[:, None] + self._damped * change,
                "trend": x[:, None] + self._steps * change,
            }
            if any(name in self.members for name in SEASONAL):
                every["seasonal"], every["seasonal_change"] = self._seasonal_now(slots, n, x)
            out = np.zeros(model.shape)
            for j, name in enumerate(self.members):
                member = np.where(np.isfinite(every[name]), every[name], xs)
                out += self._by_step(weights[rows][:, :, j]) * member
        result: F64 = np.where(np.isfinite(out), out, xs)
        return result

    def _score(self, slots: I64, n: I64, x: F64, scale_before: F64, cells: I64) -> tuple[I64, I64]:
        """Judge the forecasts issued r_g ticks ago for this tick (before it enters the
        history); update ``mix_weights`` and ``q``. Returns per group how many were judged and
        covered. A group is judged once the stream has r_g ticks behind it (and 2, for a
        scale)."""
        reps = self.reps
        k = n[:, None] - reps[None, :]  # (N, G) tick the judged forecasts were made at
        valid = (k >= 0) & (n[:, None] >= FIRST_JUDGED)
        if not valid.any():
            zero = np.zeros(len(reps), dtype=np.int64)
            return zero, zero.copy()
        issued = np.take(self.rings.reshape(-1, 3), cells, axis=0)  # (N, G, 3)
        weights, q = self.mix_weights[slots], self.q[slots]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # clipped below
            past, v_k = self._past_members(slots, n, k, issued[:, :, self.MODEL])  # (N, G, M)
            denominator = scale_before[:, None] * np.sqrt(reps)
            updated = _exp_gradient(weights, past, v_k, x, denominator, self._step_sizes(n))
            error = np.abs(x[:, None] - issued[:, :, self.COMBINED])
        miss = ~(error <= issued[:, :, self.WIDTH])  # (N, G); NaN counts as a miss
        self.mix_weights[slots] = np.where(valid[:, :, None], updated, weights)
        self.q[slots] = np.where(valid, q * np.where(miss, self._q_up, self._q_down), q)
        return valid.sum(axis=0), (valid & ~miss).sum(axis=0)

    def _past_members(self, slots: I64, n: I64, k: I64, model: F64) -> tuple[F64, F64]:
        """(N, G, M) each member's forecast made at tick ``k`` (N, G) for step r_g, recomputed
        from the history (the model's was kept: ``model``, (N, G)); and (N, G) the value at k."""
        length, reps, flat = self.length, self.reps, self.history.reshape(-1)
        row = slots[:, None] * length
        v_k = np.take(flat, row + k % length)
        change = v_k - np.where(k >= 1, np.take(flat, row + (k - 1) % length), v_k)
        every = {"model": model, "persistence": v_k}
        if "damped" in self.members:
            every["damped"] = v_k + self._damped[reps - 1] * change
        if "trend" in self.members:
            every["trend"] = v_k + reps * change
        if any(name in self.members for name in SEASONAL):
            m = self.config.season
            back = m * -(-reps // m)  # (G,)
            src = n[:, None] - back
            then = np.take(flat, row + src % length)
            every["seasonal"] = np.where(src >= 0, then, v_k)
            total, count = self._changes(row, n[:, None], back, reps)  # same r_g steps earlier
            moved = v_k + total / np.maximum(count, 1)
            every["seasonal_change"] = np.where(count > 0, moved, v_k)
        return np.stack([every[name] for name in self.members], axis=2), v_k

    # -- snapshots ----------------------------------------------------------------------------

    def snapshot_rows(self, slots: I64) -> F64:
        """(N, snapshot_width) the numbers of ``slots``, in FIELDS order."""
        parts = [getattr(self, f)[slots].reshape(len(slots), -1) for f in self.FIELDS]
        return np.concatenate([p.astype(np.float64) for p in parts], axis=1)

    def restore_rows(self, slots: I64, flat: F64) -> None:
        """Put back what :meth:`snapshot_rows` returned (ValueError on a width mismatch)."""
        put_rows(self, self.FIELDS, slots, flat, "combiner")

    @property
    def snapshot_width_v3(self) -> int:
        """:attr:`snapshot_width` of snapshot versions 2 and 3 (a shorter history with a
        season, see :attr:`length_v3`)."""
        return self.snapshot_width - self.length + self.length_v3

    def restore_rows_v3(self, slots: I64, flat: F64) -> None:
        """:meth:`restore_rows` for rows of snapshot versions 2 and 3, whose history held
        ``length_v3`` values. The ticks it did not keep are filled from the same phase of the
        oldest season it kept, so the seasonal-change member's mean over seasons starts as the
        older version's single season and takes in real seasons as they arrive."""
        old, new = self.length_v3, self.length
        if old == new:
            self.restore_rows(slots, flat)
            return
        flat = np.asarray(flat, dtype=np.float64)
        ticks = flat[:, 0].astype(np.int64)[:, None]  # (N, 1) ticks folded in
        t = ticks - new + np.arange(new)  # (N, L) the ticks the new history holds
        first_kept, m = ticks - old, self.config.season
        source = np.where(t >= first_kept, t, t + m * -(-(first_kept - t) // m))
        values = np.take_along_axis(flat[:, 1 : 1 + old], source % old, axis=1)
        history = np.zeros((len(flat), new))
        np.put_along_axis(history, t % new, np.where(t >= 0, values, 0.0), axis=1)
        self.restore_rows(slots, np.concatenate([flat[:, :1], history, flat[:, 1 + old :]], axis=1))


def _parts(n_rows: int) -> int:
    """How many parallel parts a wave of ``n_rows`` runs in: as many as torch's threads (the
    engine's CPU budget; ``torch.set_num_threads(1)`` keeps everything on one core), each with
    at least :data:`ROWS_PER_PART` rows."""
    if not combine_kernel.PARALLEL:
        return 1
    return max(1, min(torch.get_num_threads(), n_rows // ROWS_PER_PART))


def _log_interpolation(reps: I64, horizon: int) -> tuple[I64, I64, F64]:
    """Per step h = 1..H: the groups whose representative steps bracket h and the weight of the
    upper one, linear in log h (h before the first or after the last: that group alone)."""
    log_r, log_h = np.log(reps.astype(np.float64)), np.log(np.arange(1, horizon + 1.0))
    hi = np.clip(np.searchsorted(log_r, log_h, side="right"), 1, len(reps) - 1)
    lo = hi - 1
    if len(reps) == 1:
        zero = np.zeros(horizon, dtype=np.int64)
        return zero, zero, np.zeros(horizon)
    frac = np.clip((log_h - log_r[lo]) / (log_r[hi] - log_r[lo]), 0.0, 1.0)
    return lo.astype(np.int64), hi.astype(np.int64), frac


def _exp_gradient(
    weights: F64, past: F64, fallback: F64, x: F64, denominator: F64, etas: F64
) -> F64:
    """(N, G, M) the weights after one exponentiated-gradient step per row and group: the numpy
    twin of :func:`pipeline.combine_kernel._exp_gradient` (``past`` (N, G, M), ``fallback``,
    ``denominator`` and ``etas`` (N, G), ``x`` (N,))."""
    finite = np.isfinite(past)
    mix = (weights * np.where(finite, past, fallback[:, :, None])).sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.clip((mix - x[:, None]) / (HUBER * denominator), -1.0, 1.0)
    slope = np.where(np.isnan(slope), 0.0, slope)
    step = slope[:, :, None] * (past - mix[:, :, None]) / denominator[:, :, None]
    step = np.where(np.isnan(step), 0.0, np.clip(step, -MAX_SCORE, MAX_SCORE))
    exponent = -etas[:, :, None] * np.where(finite, step, MAX_SCORE)
    out = weights * np.exp(exponent - exponent.max(axis=2, keepdims=True))
    out = np.maximum(out, WEIGHT_FLOOR * out.max(axis=2, keepdims=True))
    result: F64 = out / out.sum(axis=2, keepdims=True)
    return result
