"""The combiner's per-tick step as one compiled loop over rows (numba), for the engine's waves.

:meth:`pipeline.combine.Combiner.step` in numpy makes ~40 passes over (N, H) and (N, G, M)
arrays per wave; at 10k rows that was ~12 ms, a third of the engine's time. This kernel does the
same arithmetic row by row in one pass, with each row's numbers in registers and cache: judge the
forecasts issued r_g ticks ago (the weights' exponentiated-gradient step, the quantile tracker),
write the value into the history, weights, the mix in closed form, half-widths, bounds, and the
ring write. Same formulas and order of operations as the numpy code, including the slow paths
near the float range (a row whose closed-form mix is not finite is mixed member by member, a
member that overflows counting as persistence; half-widths that overflow become the widest finite
ones). The numpy step stays as the reference (tests compare the two) and as the path when numba
is absent.

A large wave's rows are split into parts run in parallel (:func:`step_parts`, a ``prange`` over
the parts, each running the one-pass loop on its rows). Numba's OpenMP threading layer runs them on
the same libgomp thread pool as torch's CPU kernels: threads of a pool of our own lost the second
core to torch's threads, which spin-wait after each torch call (measured: no gain at all, against
1.65x with the shared pool). Rows are distinct slots, so the parts touch disjoint state.

Results agree with the numpy step to float rounding, not bit for bit: numpy's float32 ``exp`` and
the BLAS dot of the half-widths may round differently. A stream's numbers come from one path in
one process (serving, backtest, crash recovery all use this one), so replays are still exact.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np
import numpy.typing as npt

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install usable
    numba = None  # type: ignore[assignment]

AVAILABLE = numba is not None


def _threadsafe_layer() -> bool:
    """Whether numba has a threading layer that may be entered from several Python threads at
    once (OpenMP or TBB); its fallback, the workqueue, aborts the process when two engines in
    one process step at the same time, so then the parts run one after another."""
    for pool in ("omppool", "tbbpool"):  # each needs its native library (libgomp, libtbb)
        try:
            importlib.import_module(f"numba.np.ufunc.{pool}")
        except ImportError:
            continue
        return True
    return False


PARALLEL = AVAILABLE and _threadsafe_layer()
Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Singles = npt.NDArray[np.float32]

# The seasonal-change member averages the change over this many past seasons (decision 32).
SEASONS = 3
# member codes, in pipeline.combine.MEMBERS order
MODEL, PERSISTENCE, DAMPED, TREND, SEASONAL, SEASONAL_CHANGE = 0, 1, 2, 3, 4, 5


def _step(
    slots: Ints, rows: Ints, x: Floats, model: Floats, scale_before: Floats, scale: Floats,
    ticks: Ints, history: Floats, rings: Floats, mix_weights: Floats, q: Floats,
    reps: Ints, offsets: Ints, codes: Ints, damped: Floats, group_of_step: Ints, widen: Floats,
    season: int, etas: Floats, floor: float, warm_up: int, huber: float, q_up: float,
    q_down: float,
    first_judged: int, max_score: float,
    combined: Floats, lower: Floats, upper: Floats, weights0: Singles, q_out: Floats,
    scored: Ints, covered: Ints,
) -> None:  # fmt: skip
    """One tick for each of N rows; the arguments as in :meth:`Combiner.step`, its state arrays
    (updated in place), its constants, then the outputs (written; ``scored``/``covered`` (G,)
    must start at zero). Row i's forecast and bounds are written at row ``rows[i]`` of
    ``combined``/``lower``/``upper`` (the caller's output arrays: no copy and no scatter after),
    its weights and quantiles at row i of ``weights0``/``q_out``."""
    n_rows, horizon = model.shape
    length = history.shape[1]
    n_groups, n_members = mix_weights.shape[1], mix_weights.shape[2]
    big = np.finfo(np.float64).max
    w = np.empty((n_groups, n_members), dtype=np.float32)
    every = np.empty(n_members)
    cells = np.empty(n_groups, dtype=np.int64)
    season_back = np.zeros(n_groups, dtype=np.int64)
    step_back = np.zeros(horizon, dtype=np.int64)  # ticks before n of step h's seasonal source
    if season > 1:
        for g in range(n_groups):
            season_back[g] = season * ((reps[g] + season - 1) // season)
        for h in range(horizon):
            step_back[h] = season * ((h + season) // season) - (h + 1)
    unit, halves = np.empty(n_groups), np.empty(horizon)
    group_end = np.zeros(n_groups, dtype=np.int64)  # group g: steps [end[g - 1], end[g])
    for h in range(horizon):
        group_end[group_of_step[h]] = h + 1
    for g in range(1, n_groups):  # a group without steps (a short horizon) ends where g-1 does
        group_end[g] = max(group_end[g], group_end[g - 1])
    i_model, i_damped, i_trend, i_seasonal, i_change = -1, -1, -1, -1, -1  # -1: absent
    for j in range(n_members):
        if codes[j] == MODEL:
            i_model = j
        elif codes[j] == DAMPED:
            i_damped = j
        elif codes[j] == TREND:
            i_trend = j
        elif codes[j] == SEASONAL:
            i_seasonal = j
        elif codes[j] == SEASONAL_CHANGE:
            i_change = j
    for i in range(n_rows):
        slot, o, xi, sb = slots[i], rows[i], x[i], scale_before[i]
        n = ticks[slot]
        # Ring and history positions, with one division each: integer division in the inner
        # loops (~25 cycles each, dozens per row) cost more than the arithmetic.
        base = n % length
        for g in range(n_groups):
            cells[g] = offsets[g] + n % reps[g]
        # -- judge what was issued r_g ticks ago, before x enters the history
        for g in range(n_groups):
            r = reps[g]
            k = n - r
            if k < 0 or n < first_judged:
                continue
            cell = cells[g]
            at_k = _wrap(base - r, length)
            v_k = history[slot, at_k]
            change = v_k - history[slot, _wrap(at_k - 1, length)] if k >= 1 else 0.0
            denominator = sb * math.sqrt(r)
            judged = n - max(r, first_judged) + 1  # this judgment's number in the group
            eta = etas[g] * math.sqrt(warm_up / judged) if judged < warm_up else etas[g]
            for j in range(n_members):
                c = codes[j]
                if c == MODEL:
                    f = rings[slot, cell, 0]
                elif c == PERSISTENCE:
                    f = v_k
                elif c == DAMPED:
                    f = v_k + damped[r - 1] * change
                elif c == TREND:
                    f = v_k + r * change
                elif c == SEASONAL:
                    back = season_back[g]  # season * ceil(r / season) <= length
                    f = history[slot, _wrap(base - back, length)] if n >= back else v_k
                else:  # v_k plus the mean change over the same r steps, seasons earlier
                    total, count = _changes(history, slot, n, base, season_back[g], r, length,
                                            season)  # fmt: skip
                    f = v_k + total / count if count else v_k
                every[j] = f
            group_weights = mix_weights[slot, g]
            _exp_gradient(every, xi, v_k, denominator, group_weights, eta, floor, max_score, huber)
            miss = not abs(xi - rings[slot, cell, 1]) <= rings[slot, cell, 2]
            q[slot, g] *= q_up if miss else q_down
            scored[g] += 1
            if not miss:
                covered[g] += 1
        # -- the value enters the history
        history[slot, base] = xi
        previous = history[slot, _wrap(base - 1, length)] if n >= 1 else xi
        change = xi - previous
        # -- weights, in float32 like numpy's
        for g in range(n_groups):
            for j in range(n_members):
                w[g, j] = np.float32(mix_weights[slot, g, j])
        for j in range(n_members):
            weights0[i, j] = w[0, j]
        # -- the mix, closed form (the rules are affine in x and change): per group, the weight
        # of the model's departure from x, of the last change (per step), of the seasonal one.
        # Loops over a group's steps with its weights hoisted, and a branch-free finiteness
        # check (v - v is 0 for a finite v, NaN otherwise), so that they vectorize.
        model_alone = n_members == 1 and i_model == 0
        check = 0.0
        first_h = 0
        for g in range(n_groups):
            w_model = np.float64(w[g, i_model]) if i_model >= 0 else 0.0
            w_damped = np.float64(w[g, i_damped]) if i_damped >= 0 else 0.0
            w_trend = np.float64(w[g, i_trend]) if i_trend >= 0 else 0.0
            w_seasonal = np.float64(w[g, i_seasonal]) if i_seasonal >= 0 else 0.0
            w_change = np.float64(w[g, i_change]) if i_change >= 0 else 0.0
            for h in range(first_h, group_end[g]):
                if model_alone:  # the model alone: its numbers exactly, as numpy's path
                    out = model[i, h]
                else:
                    out = (model[i, h] - xi) * w_model + xi if i_model >= 0 else xi
                    if i_damped >= 0 and i_trend >= 0:
                        out = out + (w_damped * damped[h] + w_trend * (h + 1.0)) * change
                    elif i_damped >= 0:
                        out = out + (w_damped * damped[h]) * change
                    elif i_trend >= 0:
                        out = out + (w_trend * (h + 1.0)) * change
                    if i_seasonal >= 0:
                        s_h = _seasonal(history, slot, n, base, step_back[h], length, xi)
                        out = out + (s_h - xi) * w_seasonal
                    if i_change >= 0:
                        c_h = _seasonal_change(history, slot, n, base, step_back[h], h, length,
                                               xi, season)  # fmt: skip
                        out = out + (c_h - xi) * w_change
                combined[o, h] = out
                check += out - out
            first_h = group_end[g]
        if check != 0.0:  # NaN: member by member; a member that overflows counts as persistence
            for h in range(horizon):
                g = group_of_step[h]
                for j in range(n_members):
                    c = codes[j]
                    if c == MODEL:
                        every[j] = model[i, h]
                    elif c == PERSISTENCE:
                        every[j] = xi
                    elif c == DAMPED:
                        every[j] = xi + damped[h] * change
                    elif c == TREND:
                        every[j] = xi + (h + 1.0) * change
                    elif c == SEASONAL:
                        every[j] = _seasonal(history, slot, n, base, step_back[h], length, xi)
                    else:
                        every[j] = _seasonal_change(
                            history, slot, n, base, step_back[h], h, length, xi, season
                        )
                out = 0.0
                for j in range(n_members):
                    member = every[j] if math.isfinite(every[j]) else xi
                    out += np.float64(w[g, j]) * member
                combined[o, h] = out if math.isfinite(out) else xi
        # -- bounds: q interpolated on log h, times scale * sqrt(h)
        for g in range(n_groups):
            q_out[i, g] = q[slot, g]
            unit[g] = q[slot, g] * scale[i]
        for h in range(horizon):
            halves[h] = 0.0
        for g in range(n_groups):
            u = unit[g]
            for h in range(horizon):
                halves[h] += u * widen[g, h]
        check = 0.0
        for h in range(horizon):
            c_h, half = combined[o, h], halves[h]
            lo, up = c_h - half, c_h + half
            lower[o, h], upper[o, h] = lo, up
            check += (half - half) + (lo - lo) + (up - up)
        if check != 0.0:  # overflow: the widest finite bounds
            for h in range(horizon):
                c_h, half = combined[o, h], halves[h]
                lo, up = c_h - half, c_h + half
                if not (math.isfinite(half) and math.isfinite(lo) and math.isfinite(up)):
                    half = min(half, big) if not math.isnan(half) else big
                    lo = max(c_h - half, -big)
                    up = min(c_h + half, big)
                lower[o, h], upper[o, h], halves[h] = lo, up, half
        for g in range(n_groups):  # the ring keeps what was issued for step r_g
            r = reps[g]
            cell = cells[g]
            rings[slot, cell, 0] = model[i, r - 1]
            rings[slot, cell, 1] = combined[o, r - 1]
            rings[slot, cell, 2] = halves[r - 1]
        ticks[slot] = n + 1


def _step_parts(
    cuts: Ints,
    slots: Ints, rows: Ints, x: Floats, model: Floats, scale_before: Floats, scale: Floats,
    ticks: Ints, history: Floats, rings: Floats, mix_weights: Floats, q: Floats,
    reps: Ints, offsets: Ints, codes: Ints, damped: Floats, group_of_step: Ints, widen: Floats,
    season: int, etas: Floats, floor: float, warm_up: int, huber: float, q_up: float,
    q_down: float,
    first_judged: int, max_score: float,
    combined: Floats, lower: Floats, upper: Floats, weights0: Singles, q_out: Floats,
    scored: Ints, covered: Ints,
) -> None:  # fmt: skip
    """:func:`_step` on the rows ``[cuts[p], cuts[p + 1])`` of every part p in parallel; the
    arguments as there, except that part p counts its judged intervals in ``scored[p]`` and
    ``covered[p]`` ((P, G), zero before)."""
    for p in _prange(len(cuts) - 1):
        a, b = cuts[p], cuts[p + 1]
        _step_rows(
            slots[a:b], rows[a:b], x[a:b], model[a:b], scale_before[a:b], scale[a:b],
            ticks, history, rings, mix_weights, q,
            reps, offsets, codes, damped, group_of_step, widen,
            season, etas, floor, warm_up, huber, q_up, q_down, first_judged, max_score,
            combined, lower, upper, weights0[a:b], q_out[a:b], scored[p], covered[p],
        )  # fmt: skip


def _exp_gradient(
    past: Floats, x: float, fallback: float, denominator: float, weights: Floats, eta: float,
    floor: float, max_score: float, huber: float,
) -> None:  # fmt: skip
    """One exponentiated-gradient step of one horizon group's ``weights`` ((M,), summing to 1),
    in place: the members' forecasts ``past`` (M,) made r ticks ago for this tick are mixed with
    the current weights, and each weight is multiplied by ``exp(-eta * slope * (past_m - mix) /
    denominator)``, slope = ``(mix - x) / (huber * denominator)`` clipped to [-1, 1] (the
    gradient of the mix's Huber loss: its absolute error beyond ``huber`` typical moves; the
    scaled difference clipped at ``max_score``). A member whose forecast is not finite counts
    as ``fallback`` (persistence) in the mix, as in the served mix, and is pushed down by
    ``eta * max_score``. Then no weight is below ``floor`` times the largest, and they sum to 1
    again. The weights are kept rather than their logarithms so that neither this step nor the
    mix needs a softmax. ``past`` is used as scratch."""
    n_members = len(weights)
    mix = 0.0
    for j in range(n_members):
        mix += weights[j] * (past[j] if math.isfinite(past[j]) else fallback)
    slope = (mix - x) / (huber * denominator)
    slope = min(max(slope, -1.0), 1.0) if slope == slope else 0.0
    slope /= denominator  # one division, not one per member
    best = -math.inf  # the largest exponent: factors relative to it cannot all underflow
    for j in range(n_members):
        if math.isfinite(past[j]):
            g = slope * (past[j] - mix)
            g = min(max(g, -max_score), max_score) if g == g else 0.0  # NaN: no move
        else:
            g = max_score
        past[j] = -eta * g  # the exponent (past is scratch from here on)
        best = max(best, past[j])
    top = 0.0
    for j in range(n_members):
        weights[j] *= math.exp(past[j] - best)
        top = max(top, weights[j])
    total = 0.0
    for j in range(n_members):
        weights[j] = max(weights[j], floor * top)
        total += weights[j]
    total = 1.0 / total
    for j in range(n_members):
        weights[j] *= total


def _seasonal(
    history: Floats, slot: int, n: int, base: int, back: int, length: int, xi: float
) -> float:
    """The seasonal member's forecast made at tick n (at ``base`` = n mod length in the
    history, which holds x already) for the step whose source is ``back`` ticks before n."""
    return history[slot, _wrap(base - back, length)] if n >= back else xi


def _seasonal_change(
    history: Floats, slot: int, n: int, base: int, back: int, h: int, length: int, xi: float,
    season: int,
) -> float:  # fmt: skip
    """The seasonal-change member's forecast made at tick n for step h + 1 (0-based ``h``):
    x_n plus the mean change over the same h + 1 steps in the last :data:`SEASONS` seasons
    (the first from ``back + h + 1`` to ``back`` ticks before n); x_n while the history holds
    none of them."""
    total, count = _changes(history, slot, n, base, back, h + 1, length, season)
    return xi + total / count if count else xi


def _changes(
    history: Floats, slot: int, n: int, base: int, later: int, span: int, length: int,
    season: int,
) -> tuple[float, int]:  # fmt: skip
    """Sum and number of the changes over ``span`` ticks ending ``later``, ``later + season``,
    ... ticks before tick n (at ``base`` in the history), for the last :data:`SEASONS` seasons
    whose start is tick 0 or later (the most recent first: a short history has the first k)."""
    total, count = 0.0, 0
    for i in range(SEASONS):
        end = later + i * season
        if n < end + span:
            break
        total += (
            history[slot, _wrap(base - end, length)]
            - history[slot, _wrap(base - end - span, length)]
        )
        count += 1
    return total, count


def _wrap(position: int, length: int) -> int:
    """``position mod length`` for position in [-length, length)."""
    return position + length if position < 0 else position


def _track_quantiles(
    x: Floats, combined: Floats, width: Floats, scale: Floats, q: float, root: float,
    up: float, down: float, out: Floats,
) -> int:  # fmt: skip
    """One horizon group's quantile tracker over a hot stream's run of L ticks (r_g = r):
    ``combined`` (r + L,) the forecasts for step r issued from r ticks before the run on,
    ``width`` (r,) the half-widths issued with the first r of them (the run issues the rest:
    ``q * scale * root`` after each tick), ``q`` the tracker before the run. Writes q after each
    tick into ``out`` (L,); returns how many ticks fell inside their interval."""
    r = len(width)
    hits = 0
    for i in range(len(x)):
        w = width[i] if i < r else out[i - r] * scale[i - r] * root
        inside = abs(x[i] - combined[i]) <= w
        q *= down if inside else up
        hits += inside
        out[i] = q
    return hits


def _exp_gradient_run(
    x: Floats, past: Floats, fallback: Floats, denominator: Floats, weights: Floats, etas: Floats,
    floor: float, max_score: float, huber: float, out: Floats,
) -> None:  # fmt: skip
    """The weights over a hot stream's run of L ticks: ``past`` (L, G, M) the members'
    forecasts judged at each tick, ``fallback``, ``denominator`` and the steps ``etas`` (L, G)
    as in :func:`_exp_gradient` (``past`` is overwritten), ``weights`` (G, M) before the run
    (updated in place); writes the weights after each tick into ``out`` (L, G, M)."""
    n_ticks, n_groups = past.shape[0], past.shape[1]
    for i in range(n_ticks):
        for g in range(n_groups):
            _exp_gradient(past[i, g], x[i], fallback[i, g], denominator[i, g], weights[g],
                          etas[i, g], floor, max_score, huber)  # fmt: skip
            out[i, g] = weights[g]


track_quantiles: Any = _track_quantiles
exp_gradient_run: Any = _exp_gradient_run
step: Any = None
step_parts: Any = None
_step_rows: Any = _step
_prange: Any = range
if numba is not None:
    track_quantiles = numba.njit(cache=True, nogil=True)(_track_quantiles)
    _wrap = numba.njit(cache=True, inline="always")(_wrap)
    _seasonal = numba.njit(cache=True, inline="always")(_seasonal)
    _changes = numba.njit(cache=True, inline="always")(_changes)
    _seasonal_change = numba.njit(cache=True, inline="always")(_seasonal_change)
    _exp_gradient = numba.njit(cache=True, inline="always")(_exp_gradient)
    exp_gradient_run = numba.njit(cache=True, nogil=True)(_exp_gradient_run)
    step = _step_rows = numba.njit(cache=True, nogil=True)(_step)
    _prange = numba.prange
    step_parts = numba.njit(cache=True, nogil=True, parallel=PARALLEL)(_step_parts)
