"""The engine: decoded ticks in, forecasts out. Pure computation, no Kafka.

One :meth:`Engine.process` call handles one micro-batch. Ticks are grouped by stream, keeping
their order; the k-th tick of every stream in the batch forms wave k, and each wave is one
normalizer update and one batched model step for all its streams. A stream's forecasts therefore
depend only on its own ticks, in order, whatever else is in the batch (invariant 1).

What is served is the model's forecast combined with cheap members by their recent errors, with
interval bounds (:mod:`pipeline.combine`); the model's own forecast is kept beside it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from pipeline import gru_kernel
from pipeline.combine import CombineConfig, Combined, Combiner, Placement
from pipeline.messages import Tick
from pipeline.model import LoadedModel
from pipeline.normalize import ABS_FLOOR, F64, I64, REL_FLOOR, NormalizedRun, horizon_scale
from pipeline.state import StateStore
from pipeline.ticks import TickBatch

LatePolicy = Literal["dead_letter", "drop", "accept"]


@dataclass(frozen=True, slots=True)
class ForecastBatch:
    """Forecasts for one micro-batch: row i answers ``input`` row ``rows[i]`` (input order).

    Ticks older than their stream's newest tick are *late*: under the ``accept`` policy they are
    forecast like any other; otherwise they leave no trace in the state and are listed in
    ``late_rows`` (input order) for the caller to dead-letter or count.
    """

    input: TickBatch
    rows: I64  # (N,) input rows that have a forecast
    seq: I64  # (N,) 1-based count of ticks the stream has had processed
    forecast: F64  # (N, H) next H values of the target feature, stream units (combined)
    warm: npt.NDArray[np.bool_]  # (N,)
    lower: F64 = field(default_factory=lambda: np.zeros((0, 0)))  # (N, H) interval bounds
    upper: F64 = field(default_factory=lambda: np.zeros((0, 0)))  # (N, H)
    # (N, H) the model's own forecast, when the engine keeps it (Engine(keep_model=True)).
    model_forecast: F64 = field(default_factory=lambda: np.zeros((0, 0)))
    late_rows: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # Ticks whose target is missing (or a covariate with nothing to carry forward): no state
    # change, no forecast; the caller counts them as dropped.
    missing_rows: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # Scored one-step forecasts of warm streams: |actual - forecast| and |actual - last value|,
    # both divided by the stream's scale (scale-free, so streams of any size can be averaged).
    error: F64 = field(default_factory=lambda: np.zeros(0))
    persistence_error: F64 = field(default_factory=lambda: np.zeros(0))
    touched: Sequence[str] = ()  # distinct streams with at least one tick processed (state changed)
    waves: int = 0  # batched model steps taken, plus sequences run (hot streams)
    model_seconds: float = 0.0  # wall time inside the model steps
    resets: int = 0  # streams whose state turned non-finite and was reset
    # Sum over the forecast rows of each member's weight in the first horizon group (M,).
    weight_sum: F64 = field(default_factory=lambda: np.zeros(0))
    # Per horizon group (G,): past combined forecasts scored at this batch's ticks, and how many
    # of them had the actual inside their interval.
    interval_scored: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    interval_covered: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # Per horizon group (G,): sum over the rows of the interval width in units of scale*sqrt(h).
    width_sum: F64 = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ticks(self) -> list[Tick]:
        """The forecast rows as Tick objects (slow: tests and tools, not the daemon's path)."""
        return self.input.ticks(self.rows)

    @property
    def late(self) -> list[Tick]:
        return self.input.ticks(self.late_rows)

    @property
    def missing(self) -> list[Tick]:
        return self.input.ticks(self.missing_rows)


# A stream with more ticks than this in one batch may run as a sequence ...
HOT_MIN_TICKS = 16
# ... at most this many per batch ...
HOT_MAX_STREAMS = 32
# ... when it pays: one stream's batch of L ticks through Engine.process with and without
# sequences, 2-core machine, 1 torch thread: a one-row wave costs ~680 us; a sequence ~2.7 ms
# (normalizer run, combiner run, two compiled GRU layers) plus ~12 us per tick. See _choose_hot.
STEP_COST_IN_WAVES = 0.02
SEQUENCE_COST_IN_WAVES = 4.0


@dataclass
class _Outputs:
    """Per-row results of one :meth:`Engine.process` call, filled by waves and sequences."""

    seq: I64
    forecast: F64
    lower: F64
    upper: F64
    model_forecast: F64
    warm: npt.NDArray[np.bool_]
    late: npt.NDArray[np.bool_]
    missing: npt.NDArray[np.bool_]
    weight_sum: F64
    interval_scored: I64
    interval_covered: I64
    width_sum: F64
    scored: list[tuple[F64, F64]] = field(default_factory=list)
    model_seconds: float = 0.0
    resets: int = 0
    sequences: int = 0

    @classmethod
    def empty(
        cls, n: int, horizon: int, combiner: Combiner, keep_model: bool, bounds: bool
    ) -> _Outputs:
        z = np.zeros(n, dtype=bool)
        # np.zeros each (fresh pages, zeroed when first written), not copies of one: copying
        # ~4 MB of zeros per array cost ~1 ms per 10k-stream batch.
        f = np.zeros((n, horizon))
        kept = np.zeros((n if keep_model else 0, horizon))
        lower, upper = (np.zeros((n if bounds else 0, horizon)) for _ in range(2))
        g = np.zeros(len(combiner.reps), dtype=np.int64)
        return cls(np.zeros(n, dtype=np.int64), f, lower, upper, kept, z, z.copy(),
                   z.copy(), np.zeros(len(combiner.members)), g, g.copy(),
                   np.zeros(len(combiner.reps)))  # fmt: skip

    def placement(self, rows: I64) -> Placement | None:
        """Where the combiner writes the forecasts and bounds of ``rows`` (None: no bounds)."""
        return Placement(rows, self.forecast, self.lower, self.upper) if len(self.lower) else None

    def put(self, rows: I64, combined: Combined, model: F64) -> None:
        """The combination's results for ``rows`` (forecasts and bounds unless already placed
        there, :meth:`placement`)."""
        if combined.rows is None:
            self.forecast[rows] = combined.forecast
            if len(self.lower):
                self.lower[rows], self.upper[rows] = combined.lower, combined.upper
        if len(self.model_forecast):
            self.model_forecast[rows] = model
        self.weight_sum += combined.weights.sum(axis=0)
        self.interval_scored += combined.scored
        self.interval_covered += combined.covered
        self.width_sum += 2.0 * combined.q.sum(axis=0)


class Engine:
    """Holds the model and the per-stream state; steps many streams per torch call."""

    def __init__(
        self,
        loaded: LoadedModel,
        capacity: int = 1024,
        late_policy: LatePolicy = "accept",
        combine: CombineConfig | None = None,
        keep_model: bool = False,
        combining: bool = True,
    ) -> None:
        self.late_policy = late_policy
        # False: serve the model's forecast alone, without bounds (forecast.combine: false).
        self.combining = combining
        self.keep_model = keep_model  # also return the model's own forecast (backtests)
        self.model = loaded.model.eval()
        self.meta = loaded.meta
        self.target = loaded.meta.features.index(loaded.meta.target)
        self.horizon = loaded.model.config.horizon
        self._hscale = horizon_scale(self.horizon)  # (H,)
        self.combine = combine or CombineConfig()
        if self.model.config.cell == "gru":
            # Compile now, not in the first batch (waves) or the first hot stream (sequences).
            gru_kernel.warm(parallel=torch.get_num_threads() > 1)
        self.store = StateStore(
            loaded.model.state_sizes,
            loaded.meta.normalizer,
            len(loaded.meta.features),
            capacity,
            self.combine,
            self.horizon,
        )

    @property
    def members(self) -> tuple[str, ...]:
        """Names of the combination's members, in the order of ``ForecastBatch.weight_sum``."""
        return self.store.combiner.members

    @property
    def horizon_groups(self) -> list[str]:
        """Labels of the horizon groups (``"1"``, ``"2-4"``, ...), as in ``interval_scored``."""
        return self.store.combiner.group_labels

    @property
    def version(self) -> str:
        return self.meta.version

    def swap_model(self, loaded: LoadedModel) -> Literal["kept_state", "rewarmed"]:
        """Serve ``loaded`` from the next batch on (hot reload).

        Policy: same state shapes and normalizer settings keep every stream's state; otherwise
        hidden states restart at zero (and statistics too if the normalizer changed) while
        ``seq`` continues, and streams re-warm. A model for other features is refused
        (ValueError): it cannot read the same ticks.
        """
        new, old = loaded.meta, self.meta
        if (new.features, new.target, new.target_transform) != (
            old.features,
            old.target,
            old.target_transform,
        ):
            raise ValueError(
                f"features {new.features}/{new.target}/{new.target_transform} differ from "
                f"{old.features}/{old.target}/{old.target_transform}"
            )
        same_shapes = loaded.model.state_sizes == self.model.state_sizes
        same_norm = new.normalizer == old.normalizer
        same_horizon = loaded.model.config.horizon == self.horizon
        self.model, self.meta = loaded.model.eval(), new
        self.horizon = loaded.model.config.horizon
        self._hscale = horizon_scale(self.horizon)
        if not same_horizon:  # the combination's rings have the horizon's shape: start afresh
            store = self.store
            store.combiner = Combiner(self.combine, self.horizon, store.capacity)
        if same_shapes and same_norm:
            return "kept_state"
        store = self.store
        store.state_sizes = list(loaded.model.state_sizes)
        store.reset_hidden()
        if not same_norm:
            store.normalizer.config = new.normalizer
            live = np.fromiter(store.slot_of.values(), dtype=np.int64, count=len(store))
            store.reset(live)
        return "rewarmed"

    def process(self, ticks: TickBatch | Sequence[Tick]) -> ForecastBatch:
        """Forecast after every tick of ``ticks``; updates the streams' state in place."""
        n_features = len(self.meta.features)
        batch = ticks if isinstance(ticks, TickBatch) else TickBatch.from_ticks(ticks, n_features)
        n = len(batch)
        if n == 0:
            empty = np.zeros(0, dtype=np.int64)
            return ForecastBatch(batch, empty, empty, np.zeros((0, self.horizon)), empty > 0)
        out = _Outputs.empty(
            n, self.horizon, self.store.combiner, self.keep_model, bounds=self.combining
        )
        rank, streams, stream_index = _rank_by_stream(batch.stream)
        slot_of = self.store.slot_of
        known = np.fromiter(map(slot_of.__contains__, streams), dtype=bool, count=len(streams))
        slot_of_tick = self.store.slots_for(streams)[stream_index]  # (N,)
        values = batch.values
        if self.meta.target_transform == "log":  # the decoder rejected values <= 0; state and
            values = values.copy()  # scores live in log units
            values[:, self.target] = np.log(values[:, self.target])
        in_waves = self._run_hot_streams(batch, values, stream_index, slot_of_tick, out)
        rows_left = np.flatnonzero(in_waves) if in_waves is not None else np.arange(n)
        waves = self._run_waves(batch, values, rank, rows_left, slot_of_tick, out)
        if self.meta.target_transform == "log":
            for a in (out.forecast, out.lower, out.upper, out.model_forecast):
                np.exp(a, out=a)
        keep = ~(out.late | out.missing)
        touched = self._settle_streams(streams, known, stream_index[keep])
        stats = {
            "error": np.concatenate([e for e, _ in out.scored]) if out.scored else np.zeros(0),
            "persistence_error": (
                np.concatenate([b for _, b in out.scored]) if out.scored else np.zeros(0)
            ),
            "touched": touched,
            "waves": waves + out.sequences,
            "model_seconds": out.model_seconds,
            "resets": out.resets,
            "weight_sum": out.weight_sum,
            "interval_scored": out.interval_scored,
            "interval_covered": out.interval_covered,
            "width_sum": out.width_sum,
        }
        if keep.all():
            return ForecastBatch(
                batch, np.arange(n), out.seq, out.forecast, out.warm, out.lower, out.upper,
                out.model_forecast, **stats,  # type: ignore[arg-type]
            )  # fmt: skip
        return ForecastBatch(
            batch,
            np.flatnonzero(keep),
            out.seq[keep],
            out.forecast[keep],
            out.warm[keep],
            out.lower[keep],
            out.upper[keep],
            out.model_forecast[keep] if self.keep_model else out.model_forecast,
            np.flatnonzero(out.late),
            np.flatnonzero(out.missing),
            **stats,  # type: ignore[arg-type]
        )

    def _run_waves(
        self,
        batch: TickBatch,
        values: F64,
        rank: I64,
        rows_left: I64,
        slot_of_tick: I64,
        out: _Outputs,
    ) -> int:
        """The k-th tick of every stream in ``rows_left`` forms wave k: one normalizer update
        and one batched model step per wave. Returns the number of waves."""
        if len(rows_left) == 0:
            return 0
        any_missing = bool(np.isnan(values[rows_left]).any())
        # Wave by wave, and by slot within a wave: the gathers and scatters of the streams'
        # state (normalizer, hidden state, combiner) then walk memory forwards.
        slots = slot_of_tick[rows_left]
        order = rows_left[np.argsort(rank[rows_left] * (int(slots.max()) + 1) + slots)]
        bounds = np.searchsorted(rank[order], np.arange(int(rank[order[-1]]) + 2))
        ts = batch.ts
        for k in range(len(bounds) - 1):
            rows = order[bounds[k] : bounds[k + 1]]
            if len(rows) == 0:
                continue
            if self.late_policy != "accept":
                is_late = self._late(slot_of_tick[rows], ts[rows])
                out.late[rows[is_late]] = True
                rows = rows[~is_late]
                if len(rows) == 0:
                    continue
            vals = values[rows]
            if any_missing:
                rows, vals, skipped = self._fill_missing(rows, vals, slot_of_tick[rows])
                out.missing[skipped] = True
                if len(rows) == 0:
                    continue
            self._step_rows(batch, rows, slot_of_tick[rows], vals, out)
        return len(bounds) - 1

    def _step_rows(self, batch: TickBatch, rows: I64, slots: I64, vals: F64, out: _Outputs) -> None:
        """One wave: distinct ``slots`` each advance by the tick at ``rows``."""
        t0 = time.perf_counter()
        scale_before = self._scale(slots)
        out.scored.append(self._score(slots, vals, scale_before))
        (combined, model, warm), bad = self._wave(
            slots, vals, batch.ts[rows], scale_before, out.placement(rows)
        )
        out.model_seconds += time.perf_counter() - t0
        out.resets += bad
        out.put(rows, combined, model)
        out.warm[rows] = warm
        out.seq[rows] = self.store.seq[slots]
        self.store.mark(slots, batch.partition[rows], batch.offset[rows])

    def _run_hot_streams(
        self,
        batch: TickBatch,
        values: F64,
        stream_index: I64,
        slot_of_tick: I64,
        out: _Outputs,
    ) -> npt.NDArray[np.bool_] | None:
        """Run streams holding many of the batch's ticks as sequences (one ``lfilter`` pass
        of the normalizer and one compiled GRU pass over the run) instead of one wave per tick.
        Returns the mask of rows still to go through waves, or None if no stream was hot.

        Which streams: see :func:`_choose_hot`; a chosen stream with a missing value in its
        ticks stays in the waves (the carry-forward rules live there). Results equal those of
        the waves up to float rounding (``tests/test_engine_hot.py``).
        """
        counts = np.bincount(stream_index)
        hot = _choose_hot(counts)
        if len(hot) == 0:
            return None
        in_waves = np.ones(len(stream_index), dtype=bool)
        by_stream = np.argsort(stream_index, kind="stable")
        starts = np.searchsorted(stream_index[by_stream], hot)
        for j, start in zip(hot.tolist(), starts.tolist(), strict=True):
            rows = by_stream[start : start + counts[j]]  # input order
            if np.isnan(values[rows]).any():
                continue
            self._sequence(batch, values, rows, int(slot_of_tick[rows[0]]), out)
            in_waves[rows] = False
            out.sequences += 1
        return in_waves

    def _sequence(self, batch: TickBatch, values: F64, rows: I64, slot: int, out: _Outputs) -> None:
        """All ticks of one stream (``rows``, input order, no missing value) as one sequence.

        A stream's first two ticks are special cases, so they (and any after an overflow
        reset, which leaves the stream cold again) go one by one as in the waves. If the run's
        outputs would not be finite, the rest goes one by one too: the wave path resets the
        stream at the tick that overflows, and ticks after a reset are judged late against the
        reset state, not against the ticks before it."""
        store = self.store
        norm = store.normalizer
        start = 0
        while start < len(rows) and norm.count[slot] < 2:
            self._step_one(batch, values, int(rows[start]), slot, out)
            start += 1
        rest = rows[start:]
        if len(rest) == 0:
            return
        late = np.zeros(len(rest), dtype=bool)
        if self.late_policy != "accept":  # count >= 2 here: the stream has a newest tick
            newest = np.maximum.accumulate(np.concatenate([[norm.last_ts[slot]], batch.ts[rest]]))
            late = batch.ts[rest] < newest[:-1]  # older than the newest tick before it
        run_rows = rest[~late]
        if len(run_rows) == 0:
            out.late[rest] = True
            return
        t0 = time.perf_counter()
        x = values[run_rows]
        run = norm.run(slot, x, batch.ts[run_rows], self.target)
        state = [h[slot : slot + 1] for h in store.hidden]
        y, new_state = self.model.sequence(torch.from_numpy(run.step.inputs), state)
        scale = run.step.scale[:, None] * self._hscale
        forecast = run.step.last[:, None] + scale * y.double().numpy()  # (L, H)
        if not np.isfinite(forecast).all():
            # One by one for the rest (nothing was written for the run).
            out.model_seconds += time.perf_counter() - t0
            for r in rest.tolist():
                self._step_one(batch, values, r, slot, out)
            return
        scale_before = self._run_scale_before(slot, run)
        forecast = self._combine_run(
            slot, x[:, self.target], forecast, scale_before, run, run_rows, out
        )
        out.scored.append(self._score_run(slot, x, run, forecast, scale_before))
        norm.apply_run(slot, run)
        for h, s in zip(store.hidden, new_state, strict=True):
            h[slot] = s[0]
        seq0 = int(store.seq[slot])
        store.seq[slot] = seq0 + len(run_rows)
        store.prev_forecast[slot] = forecast[-1, 0]
        last = run_rows[-1:]
        store.mark(np.array([slot]), batch.partition[last], batch.offset[last])
        out.warm[run_rows] = run.step.warm
        out.seq[run_rows] = seq0 + 1 + np.arange(len(run_rows))
        out.late[rest[late]] = True
        out.model_seconds += time.perf_counter() - t0

    def _step_one(self, batch: TickBatch, values: F64, row: int, slot: int, out: _Outputs) -> None:
        """One tick of one stream exactly as the waves take it (late check, then a step)."""
        rows, slots = np.array([row]), np.array([slot])
        if self.late_policy != "accept" and self._late(slots, batch.ts[rows])[0]:
            out.late[row] = True
            return
        self._step_rows(batch, rows, slots, values[rows], out)

    def _combine_run(
        self, slot: int, target: F64, model: F64, scale_before: F64, run: NormalizedRun,
        rows: I64, out: _Outputs,
    ) -> F64:  # fmt: skip
        """The combination over a hot stream's run: at once when the stream is old enough
        (:meth:`Combiner.run`), else tick by tick. Returns the combined forecasts (L, H)."""
        combiner, scale = self.store.combiner, run.step.scale
        if not self.combining:
            out.put(rows, self._model_only(model), model)
            return model
        if combiner.can_run(slot):
            combined = combiner.run(slot, target, model, scale_before, scale)
            if combined is not None:
                out.put(rows, combined, model)
                return combined.forecast
        forecast = np.empty_like(model)
        slots = np.array([slot])
        for i in range(len(rows)):  # sequential: weights depend on the previous ticks
            c = combiner.step(slots, target[i : i + 1], model[i : i + 1],
                              scale_before[i : i + 1], scale[i : i + 1])  # fmt: skip
            out.put(rows[i : i + 1], c, model[i : i + 1])
            forecast[i] = c.forecast[0]
        return forecast

    def _model_only(self, forecast: F64) -> Combined:
        """The model's forecast as the served one: no bounds, no weights, nothing judged."""
        combiner = self.store.combiner
        zero = np.zeros(len(combiner.reps), dtype=np.int64)
        return Combined(
            forecast, forecast[:0], forecast[:0],
            np.zeros((len(forecast), len(combiner.members)), dtype=np.float32), zero, zero,
            np.zeros((len(forecast), len(combiner.reps))),
        )  # fmt: skip

    def _run_scale_before(self, slot: int, run: NormalizedRun) -> F64:
        """(L,) :meth:`_scale` before each tick of a run."""
        norm, target = self.store.normalizer, self.target
        dsq_before = np.concatenate([[norm.dsq[slot, target]], run.dsq[:-1, target]])
        mean_before = run.prev_mean[:, target]
        scale: F64 = np.sqrt(dsq_before) + ABS_FLOOR + REL_FLOOR * np.abs(mean_before)
        return scale

    def _score_run(
        self, slot: int, x: F64, run: NormalizedRun, forecast: F64, scale: F64
    ) -> tuple[F64, F64]:
        """:meth:`_score` for every tick of a run: the previous one-step forecast (the stored
        one for the first tick) against the tick, in the scale before the tick."""
        norm, target = self.store.normalizer, self.target
        prev = np.concatenate([[self.store.prev_forecast[slot]], forecast[:-1, 0]])
        count_before = run.step.count - 1
        ok = ~np.isnan(prev) & (count_before >= norm.config.warmup)
        if not ok.any():
            return np.zeros(0), np.zeros(0)
        actual = x[:, target]
        error = np.abs(actual - prev) / scale
        base = np.abs(actual - run.prev_last[:, target]) / scale
        return error[ok], base[ok]

    def _settle_streams(
        self, streams: list[str], known: npt.NDArray[np.bool_], processed: I64
    ) -> list[str]:
        """The streams whose state the batch changed (at least one tick processed). A stream
        that was new to the store and had every tick late or missing gets its slot back: state
        is only kept for streams that have some (a first tick with a null target is not one)."""
        hits = np.bincount(processed, minlength=len(streams))
        for j in np.flatnonzero((hits == 0) & ~known).tolist():
            self.store.evict(streams[j])
        if hits.all():
            return streams
        return [streams[j] for j in np.flatnonzero(hits).tolist()]

    def _fill_missing(self, rows: I64, vals: F64, slots: I64) -> tuple[I64, F64, I64]:
        """Carry missing covariates forward from each stream's previous tick; split off the rows
        that still lack a value (target missing, or a covariate the stream never had).

        Returns the rows to process, their completed values, and the skipped rows.
        """
        gaps = np.isnan(vals)
        if not gaps.any():
            return rows, vals, rows[:0]
        norm = self.store.normalizer
        carry = gaps & (norm.count[slots] > 0)[:, None]
        carry[:, self.target] = False
        vals = vals.copy()
        vals[carry] = norm.last[slots][carry]
        skip = np.isnan(vals).any(axis=1)
        return rows[~skip], vals[~skip], rows[skip]

    def _scale(self, slots: I64) -> F64:
        """(N,) the target's typical one-step move of ``slots`` (stream units), as it stands."""
        norm, target = self.store.normalizer, self.target
        scale: F64 = (
            np.sqrt(norm.dsq[slots, target])
            + ABS_FLOOR
            + REL_FLOOR * np.abs(norm.mean[slots, target])
        )
        return scale

    def _score(self, slots: I64, values: F64, scale: F64) -> tuple[F64, F64]:
        """Scaled errors of the previous one-step forecasts of warm streams, before the update
        (``scale``: :meth:`_scale` of ``slots`` before it)."""
        store, target = self.store, self.target
        norm = store.normalizer
        prev = store.prev_forecast[slots]
        ok = ~np.isnan(prev) & (norm.count[slots] >= norm.config.warmup)
        if not ok.any():
            return np.zeros(0), np.zeros(0)
        s = slots[ok]
        actual = values[ok, target]
        unit = scale[ok]
        return np.abs(actual - prev[ok]) / unit, np.abs(actual - norm.last[s, target]) / unit

    def _late(self, slots: I64, ts: F64) -> npt.NDArray[np.bool_]:
        """Which ticks are older than their stream's newest processed tick."""
        norm = self.store.normalizer
        late: npt.NDArray[np.bool_] = (norm.count[slots] > 0) & (ts < norm.last_ts[slots])
        return late

    def _wave(
        self, slots: I64, values: F64, ts: F64, scale_before: F64, into: Placement | None = None
    ) -> tuple[tuple[Combined, F64, npt.NDArray[np.bool_]], int]:
        store = self.store
        norm = store.normalizer.step(slots, values, ts, self.target)
        index = torch.from_numpy(slots)
        state = [h.index_select(0, index) for h in store.hidden]  # [(B, S_l)]
        y, new_state = self.model.step(torch.from_numpy(norm.inputs), state)  # y (B, H)
        for h, s in zip(store.hidden, new_state, strict=True):
            h.index_copy_(0, index, s)
        store.seq[slots] += 1
        scale = norm.scale[:, None] * self._hscale  # (B, H)
        forecast = norm.last[:, None] + scale * y.double().numpy()  # (B, H)
        # Non-finite hidden state or statistics (e.g. values near 1e308 overflow a square) reach
        # the forecast, so one reduction over it guards everything.
        bad = 0
        if not math.isfinite(float(forecast.sum())):
            rows = ~np.isfinite(forecast).all(axis=1)
            store.reset(slots[rows])  # cold start: zero hidden state and statistics, keep seq
            forecast[rows] = norm.last[rows, None]  # persistence for this tick
            bad = int(rows.sum())
        scale = norm.scale
        if bad:
            scale = np.where(np.isfinite(scale), scale, 0.0)
            scale_before = np.where(np.isfinite(scale_before), scale_before, 0.0)
        if self.combining:
            target = values[:, self.target]
            combined = store.combiner.step(slots, target, forecast, scale_before, scale, into)
        else:
            combined = self._model_only(forecast)
        store.prev_forecast[slots] = combined.step_one()
        return (combined, forecast, norm.warm), bad


def _choose_hot(counts: I64) -> I64:
    """Streams (indices into ``counts``, ticks per stream in the batch) to run as sequences.

    Taking the k longest streams out of the waves saves ``c[0] - c[k]`` waves (the waves left
    are as many as the longest remaining stream's ticks) and costs k sequence calls plus their
    ticks as sequential steps. The k with the largest net saving wins, if positive: one hot
    symbol among quiet ones goes to a sequence; a batch where every stream has ~the same number
    of ticks stays in waves (moving a stream there would save no wave).
    """
    top = np.argsort(-counts, kind="stable")[: HOT_MAX_STREAMS + 1]
    c = counts[top].astype(np.float64)
    k_max = int(np.sum(c[:HOT_MAX_STREAMS] > HOT_MIN_TICKS))
    if k_max == 0:
        return top[:0]
    k = np.arange(1, k_max + 1)
    remaining = np.append(c, 0.0)[k]  # waves left after moving the k longest out
    cost = np.cumsum(SEQUENCE_COST_IN_WAVES + STEP_COST_IN_WAVES * c[:k_max])
    net = (c[0] - remaining) - cost
    best = int(np.argmax(net))
    return top[: best + 1] if net[best] > 0 else top[:0]


def _rank_by_stream(streams: Sequence[str]) -> tuple[I64, list[str], I64]:
    """Per tick: its position within its stream; the distinct streams (first-seen order); each
    tick's index into them."""
    distinct = list(dict.fromkeys(streams))  # C-level: no Python frame per tick
    index_of = dict(zip(distinct, range(len(distinct)), strict=True))
    codes = np.fromiter(map(index_of.__getitem__, streams), dtype=np.int64, count=len(streams))
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(codes)]))
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - first
    return rank, distinct, codes
