"""The per-stream combination and its intervals (pipeline/combine.py), driven without a model.

The "model" member here is whatever the test hands in (a noisy oracle, or something bad), so the
weights, the scoring rings and the interval calibration are checked against series whose best
member is known. The engine-level tests (test_engine*, test_state_store) cover the same code
inside the serving path.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline import combine_kernel
from pipeline.combine import MEMBERS, SEASONS, WEIGHT_FLOOR, CombineConfig, Combiner, Placement
from pipeline.engine import Engine
from pipeline.messages import ForecastEncoder, Source, Tick
from pipeline.model import load_model

H = 24


def scale_of(x: np.ndarray) -> np.ndarray:
    """A stand-in for the normalizer's scale: EW RMS of the one-step change (before each tick)."""
    out, dsq = np.zeros(len(x)), 0.0
    for t in range(len(x)):
        out[t] = math.sqrt(dsq) + 1e-12
        if t:
            dsq += 0.02 * ((x[t] - x[t - 1]) ** 2 - dsq)
    return out


def run(
    x: np.ndarray, model: np.ndarray, config: CombineConfig, slot: int = 0, capacity: int = 1
) -> tuple[np.ndarray, ...]:
    """Step one stream through a Combiner; returns combined, lower, upper, weights (per tick)."""
    comb = Combiner(config, model.shape[1], capacity)
    sb = scale_of(x)
    sa = np.r_[sb[1:], sb[-1]]
    out = [np.zeros((len(x), model.shape[1])) for _ in range(3)]
    weights = np.zeros((len(x), len(comb.members)))
    slots = np.array([slot])
    for t in range(len(x)):
        c = comb.step(slots, x[t : t + 1], model[t : t + 1], sb[t : t + 1], sa[t : t + 1])
        out[0][t], out[1][t], out[2][t], weights[t] = c.forecast, c.lower, c.upper, c.weights
    return (*out, weights)


def mae(forecast: np.ndarray, x: np.ndarray, h: int, start: int = 200) -> float:
    t = np.arange(start, len(x) - h)
    return float(np.mean(np.abs(forecast[t, h - 1] - x[t + h])))


def coverage_at(
    lower: np.ndarray, upper: np.ndarray, x: np.ndarray, h: int, start: int = 300
) -> float:
    """Share of actuals h steps ahead inside the bounds issued for step h."""
    t = np.arange(start, len(x) - h)
    return float(np.mean((lower[t, h - 1] <= x[t + h]) & (x[t + h] <= upper[t, h - 1])))


def coverage(lower: np.ndarray, upper: np.ndarray, x: np.ndarray, start: int = 300) -> float:
    """Coverage pooled over the steps (each step weighs the same)."""
    steps = range(1, lower.shape[1] + 1)
    return float(np.mean([coverage_at(lower, upper, x, h, start) for h in steps]))


def future(x: np.ndarray, horizon: int) -> np.ndarray:
    """(n, H) the true next values (NaN-free: the last value repeats past the end)."""
    idx = np.minimum(np.arange(len(x))[:, None] + np.arange(1, horizon + 1), len(x) - 1)
    return x[idx]


def test_weights_go_to_the_member_that_is_right() -> None:
    rng = np.random.default_rng(0)
    n = 1500
    line = 3.0 * np.arange(n) + rng.normal(0, 0.01, n)  # trend member is right
    bad_model = np.repeat(line[:, None], H, axis=1) - 50.0
    *_, w = run(line, bad_model, CombineConfig())
    trend = MEMBERS.index("trend")
    assert w[-1, trend] > 0.9 and w[-1, 0] < 0.01

    walk = np.cumsum(rng.normal(0, 1, n))  # persistence (and damped) beat trend and a bad model
    *_, w = run(walk, np.repeat(walk[:, None], H, axis=1) + 5.0, CombineConfig())
    assert w[-200:, MEMBERS.index("trend")].mean() < 0.05
    assert w[-200:, 0].mean() < 0.01

    season = np.tile(rng.normal(0, 10, 24), n // 24 + 1)[:n] + rng.normal(0, 0.1, n)
    *_, w = run(season, np.zeros((n, H)), CombineConfig(season=24))
    # on a flat periodic series both seasonal members are right (the change over a season is 0)
    assert w[-1, MEMBERS.index("seasonal")] + w[-1, MEMBERS.index("seasonal_change")] > 0.9

    daily = np.tile(rng.normal(0, 10, 24), n // 24 + 1)[:n]  # the same day, at a moving level
    level = np.repeat(rng.normal(0, 100, n // 100 + 1), 100)[:n] + rng.normal(0, 0.1, n)
    *_, w = run(daily + level, np.zeros((n, H)), CombineConfig(season=24))
    assert w[-1, MEMBERS.index("seasonal_change")] > 0.9


def test_a_good_model_keeps_its_weight_and_the_mix_is_no_worse_than_it() -> None:
    rng = np.random.default_rng(1)
    n = 2000
    x = np.cumsum(rng.normal(0, 1, n)) + 5 * np.sin(np.arange(n) / 7)
    oracle = future(x, H) + rng.normal(0, 0.3, (n, H))  # a noisy look at the truth
    combined, *_, w = run(x, oracle, CombineConfig())
    assert w[-500:, 0].mean() > 0.9
    for h in (1, 6, 24):
        assert mae(combined, x, h) <= 1.02 * mae(oracle, x, h)


def test_the_weights_learn_a_mix_better_than_every_member() -> None:
    """Members wrong in opposite directions: on a noisy upward line the last value is too low
    by ``slope * h`` and this model too high by ``2 * slope * h``; one third of the model and two
    thirds of persistence are right. Weights moved by the mix's own error find that; weights
    from each member's own error (the first version) put nearly all on persistence."""
    rng = np.random.default_rng(3)
    n, slope = 3000, 0.5
    x = slope * np.arange(n) + rng.normal(0, 0.05, n)
    model = future(x, H) + 2 * slope * np.arange(1, H + 1)
    combined, *_, w = run(x, model, CombineConfig(members=("model", "persistence")))
    persistence = np.repeat(x[:, None], H, axis=1)
    for h in (1, 6, 24):
        best = min(mae(model, x, h, start=1000), mae(persistence, x, h, start=1000))
        assert mae(combined, x, h, start=1000) < 0.3 * best, h
    assert abs(w[-500:, 0].mean() - 1 / 3) < 0.05


@pytest.mark.parametrize(
    "kind", ["walk", "ar1_heavy_tails", "level_shifts", "heteroscedastic", "spikes"]
)
def test_intervals_hold_their_coverage(kind: str) -> None:
    """80% intervals cover 77-83% of actuals pooled over steps, and 70-90% at every step, on
    series of several shapes (errors that grow like sqrt(h), like h^0 and in between)."""
    rng = np.random.default_rng(2)
    n = 4000
    if kind == "walk":
        x = np.cumsum(rng.normal(0, 1, n))
    elif kind == "ar1_heavy_tails":
        e, x = rng.standard_t(3, n), np.zeros(n)
        for t in range(1, n):
            x[t] = 0.9 * x[t - 1] + e[t]
    elif kind == "level_shifts":
        x = np.repeat(rng.normal(0, 20, n // 400), 400) + rng.normal(0, 1, n)
    elif kind == "spikes":  # a level with rare large spikes: errors barely grow with h
        x = 5.0 + rng.normal(0, 0.2, n) + 10.0 * (rng.random(n) < 0.03)
    else:
        x = np.cumsum(rng.normal(0, 1, n) * (1 + 4 * (np.arange(n) // 1000 % 2)))
    model = np.repeat(x[:, None], H, axis=1)  # persistence as the "model"
    _, lower, upper, _ = run(x, model, CombineConfig())
    assert 0.77 <= coverage(lower, upper, x) <= 0.83
    for h in range(1, H + 1):
        step = coverage_at(lower, upper, x, h)
        assert 0.70 <= step <= 0.90, (h, step)
    assert (lower <= upper).all()


def test_model_alone_serves_the_model_unchanged() -> None:
    rng = np.random.default_rng(3)
    x = np.cumsum(rng.normal(0, 1, 300))
    model = rng.normal(0, 1, (300, H))
    combined, lower, upper, w = run(x, model, CombineConfig(members=("model",)))
    np.testing.assert_array_equal(combined, model)
    assert (w == 1).all() and (lower < combined).all() and (combined < upper).all()


def test_unknown_member_is_refused() -> None:
    with pytest.raises(ValueError, match="choose from"):
        Combiner(CombineConfig(members=("model", "oracle")), H)


@given(
    values=st.lists(
        st.floats(min_value=-1e308, max_value=1e308, allow_nan=False), min_size=1, max_size=60
    ),
    horizon=st.integers(1, 30),
    season=st.sampled_from([0, 1, 3, 7]),
)
def test_any_finite_values_give_finite_ordered_outputs(
    values: list[float], horizon: int, season: int
) -> None:
    """Values anywhere in float range (spikes near 1e308 included) never give NaN or inf, and
    lower <= forecast <= upper."""
    x = np.array(values)
    model = np.repeat(x[:, None], horizon, axis=1)
    comb = Combiner(CombineConfig(season=season), horizon, 2)
    sb = np.abs(x) + 1.0
    for t in range(len(x)):
        c = comb.step(np.array([1]), x[t : t + 1], model[t : t + 1], sb[t : t + 1], sb[t : t + 1])
        for a in (c.forecast, c.lower, c.upper, c.weights):
            assert np.isfinite(a).all()
        assert (c.lower <= c.forecast).all() and (c.forecast <= c.upper).all()
        assert abs(float(c.weights.sum()) - 1.0) < 1e-6  # float32 weights
    for name in Combiner.FIELDS:
        assert np.isfinite(getattr(comb, name)).all(), name
    w = comb.mix_weights[1]  # (G, M): a distribution per group, none below the floor
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-12)
    assert (w >= WEIGHT_FLOOR * w.max(axis=1, keepdims=True) * (1 - 1e-12)).all()


@given(
    lengths=st.lists(st.integers(0, 40), min_size=2, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_streams_are_combined_independently(lengths: list[int], seed: int) -> None:
    """Stepping streams in waves together equals stepping each alone, bit for bit, and the
    state moves between stores through snapshot rows."""
    rng = np.random.default_rng(seed)
    series = [np.cumsum(rng.normal(0, 1, n)) for n in lengths]
    models = [rng.normal(0, 1, (n, 6)) for n in lengths]
    config = CombineConfig(season=3)
    together = Combiner(config, 6, len(series))
    got: list[list[np.ndarray]] = [[] for _ in series]
    for t in range(max(lengths)):
        live = np.array([i for i, s in enumerate(series) if t < len(s)])
        if not len(live):
            continue
        x = np.array([series[i][t] for i in live])
        m = np.stack([models[i][t] for i in live])
        c = together.step(live, x, m, np.abs(x) + 1, np.abs(x) + 1)
        for j, i in enumerate(live.tolist()):
            got[i].append(c.forecast[j])
    for i, s in enumerate(series):
        alone = Combiner(config, 6, 1)
        for t in range(len(s)):
            one = np.array([s[t]])
            c = alone.step(
                np.array([0]), one, models[i][t : t + 1], np.abs(one) + 1, np.abs(one) + 1
            )
            np.testing.assert_array_equal(c.forecast[0], got[i][t])
        moved = Combiner(config, 6, 3)
        moved.restore_rows(np.array([2]), together.snapshot_rows(np.array([i])))
        np.testing.assert_array_equal(
            moved.snapshot_rows(np.array([2])), alone.snapshot_rows(np.array([0]))
        )


@given(
    before=st.integers(80, 120),  # can_run: more ticks than the history holds (79 with season 24)
    length=st.integers(1, 80),
    season=st.sampled_from([0, 4, 24]),
    seed=st.integers(0, 2**16),
)
def test_a_run_equals_its_steps(before: int, length: int, season: int, seed: int) -> None:
    """Combiner.run (the engine's hot streams) gives what one step per tick gives, forecasts,
    bounds, weights, judgments and the state after, up to float rounding."""
    rng = np.random.default_rng(seed)
    n = before + length
    x = np.cumsum(rng.normal(0, 1, n)) + 3 * np.sin(np.arange(n) / 3)
    model = x[:, None] + rng.normal(0, 1, (n, 8))
    sb = 0.5 + rng.random(n)
    sa = 0.5 + rng.random(n)
    config = CombineConfig(season=season)
    a, b = Combiner(config, 8, 2), Combiner(config, 8, 2)
    for c in (a, b):
        for t in range(before):
            c.step(np.array([1]), x[t : t + 1], model[t : t + 1], sb[t : t + 1], sa[t : t + 1])
    assert a.can_run(1)
    seq = slice(before, n)
    got = a.run(1, x[seq], model[seq], sb[seq], sa[seq])
    assert got is not None
    steps = [
        b.step(np.array([1]), x[t : t + 1], model[t : t + 1], sb[t : t + 1], sa[t : t + 1])
        for t in range(before, n)
    ]
    for field in ("forecast", "lower", "upper", "weights", "q"):
        want = np.concatenate([getattr(s, field) for s in steps])
        span = float(np.abs(want).max())  # float32 weights: rounding relative to the magnitude
        np.testing.assert_allclose(
            getattr(got, field), want, rtol=0, atol=1e-6 * span, err_msg=field
        )
    np.testing.assert_array_equal(got.scored, sum(s.scored for s in steps))
    np.testing.assert_array_equal(got.covered, sum(s.covered for s in steps))
    # Steps run the compiled kernel, whose float32 weights may differ from numpy's in the last
    # bit (its exp rounds differently): the served numbers kept in the rings carry that.
    after, want_after = a.snapshot_rows(np.array([1])), b.snapshot_rows(np.array([1]))
    span = float(np.abs(want_after[:, 1:]).max())  # past the tick count
    np.testing.assert_allclose(after, want_after, rtol=0, atol=1e-6 * span)


def test_combine_off_serves_the_model_alone_without_bounds() -> None:
    """forecast.combine: false: the served forecast is the model's, and records carry no
    lower/upper; on: the same ticks get bounds around a mixed forecast."""
    loaded = load_model(None)
    ticks = [
        Tick(f"s{i % 3}", 1.7e9 + t, (20.0 + math.sin(t / 5) + i,), Source("t", 0, t, 0))
        for t in range(60)
        for i in range(3)
    ]
    off = Engine(loaded, keep_model=True, combining=False).process(ticks)
    np.testing.assert_array_equal(off.forecast, off.model_forecast)
    assert off.lower.size == 0 and off.upper.size == 0
    on = Engine(loaded, keep_model=True).process(ticks)
    np.testing.assert_allclose(on.model_forecast, off.model_forecast, rtol=1e-6)
    assert on.lower.shape == on.forecast.shape and (on.lower <= on.forecast).all()
    assert not np.array_equal(on.forecast, on.model_forecast)
    record = ForecastEncoder().encode(
        ["s0"], np.array([1.0]), np.array([1]), off.forecast[:1], "m", [True]
    )
    assert b"lower" not in record[0]


@pytest.mark.parametrize("compiled", [True, False])
def test_the_seasonal_change_member_is_the_mean_change_of_the_last_seasons(compiled: bool) -> None:
    """Alone in the mix, the seasonal-change member forecasts step h as the last value plus the
    mean change over the same h steps in each of the last SEASONS seasons, fewer while the
    history is shorter (both the kernel and the numpy step)."""
    m, horizon = 4, 4
    config = CombineConfig(members=("seasonal_change",), season=m)
    comb = Combiner(config, horizon, 1)
    comb.compiled = compiled
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, 40)
    for t in range(len(x)):
        got = comb.step(np.array([0]), x[t : t + 1], x[t : t + 1, None].repeat(horizon, 1),
                        np.ones(1), np.ones(1)).forecast[0]  # fmt: skip
        for h in range(1, horizon + 1):
            ends = [t - m + h - i * m for i in range(SEASONS)]  # the change to each source tick
            changes = [x[e] - x[e - h] for e in ends if e - h >= 0]
            want = x[t] + np.mean(changes) if changes else x[t]
            assert got[h - 1] == pytest.approx(want, rel=1e-12, abs=1e-12), (t, h)


@given(
    seed=st.integers(0, 2**16),
    season=st.sampled_from([0, 3, 24]),
    members=st.sampled_from([MEMBERS, ("model",), ("persistence", "damped"), ("model", "trend")]),
    magnitude=st.sampled_from([1e-300, 1e-3, 1.0, 1e6, 1e300]),
)
def test_the_compiled_step_equals_the_numpy_reference(
    seed: int, season: int, members: tuple[str, ...], magnitude: float
) -> None:
    """The numba kernel the engine runs and the numpy step agree on every output and on the
    state after, on random waves of random streams at any magnitude (float32 weights may round
    differently: the tolerance is float32's, relative to the wave's largest value)."""
    assert combine_kernel.AVAILABLE  # numba is a dependency: the kernel must be what runs
    rng = np.random.default_rng(seed)
    config = CombineConfig(season=season, members=members)
    compiled, reference = Combiner(config, 12, 16), Combiner(config, 12, 16)
    reference.compiled = False
    x = np.zeros(16)
    for _ in range(60):
        slots = rng.choice(16, size=int(rng.integers(1, 17)), replace=False)
        x[slots] += rng.normal(0, magnitude, len(slots))
        if rng.random() < 0.05:
            with np.errstate(over="ignore"):
                x[slots] *= rng.choice([-1e10, 1e-10])  # jumps, even past the float range
            x = np.clip(x, -1.7e308, 1.7e308)
        model = x[slots, None] + rng.normal(0, magnitude, (len(slots), 12))
        model = np.clip(model, -1.7e308, 1.7e308)
        sb = np.abs(x[slots]) * 0.1 + magnitude
        sa = sb * rng.uniform(0.9, 1.1, len(slots))
        got = compiled.step(slots, x[slots], model, sb, sa)
        want = reference.step(slots, x[slots], model, sb, sa)
        for field in ("forecast", "lower", "upper", "weights", "q"):
            a, b = getattr(got, field), getattr(want, field)
            assert np.isfinite(a).all(), field
            span = float(np.abs(b).max()) if b.size else 0.0
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * span + 1e-300, err_msg=field)
        np.testing.assert_array_equal(got.scored, want.scored)
        np.testing.assert_array_equal(got.covered, want.covered)
    for name in Combiner.FIELDS:
        a, b = getattr(compiled, name), getattr(reference, name)
        span = float(np.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * span + 1e-300, err_msg=name)


@pytest.mark.parametrize("path", ["compiled", "compiled in parts", "numpy"])
def test_a_placed_step_writes_at_the_rows_what_a_fresh_step_returns(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a :class:`Placement` the step writes tick i's forecast and bounds at row
    ``rows[i]`` of the caller's arrays, bit for bit what the step returns without one, and
    touches no other row; weights, quantiles, counts and the state after are the same."""
    import torch

    import pipeline.combine as combine

    threads = torch.get_num_threads()
    if path == "compiled in parts":
        if not combine_kernel.PARALLEL:
            pytest.skip("numba has no thread-safe layer here: waves run whole")
        torch.set_num_threads(2)
        monkeypatch.setattr(combine, "ROWS_PER_PART", 16)
    try:
        rng = np.random.default_rng(11)
        fresh, placed = (
            Combiner(CombineConfig(season=4), 12, 64),
            Combiner(CombineConfig(season=4), 12, 64),
        )
        fresh.compiled = placed.compiled = path != "numpy"
        x = rng.normal(0, 1, 64)
        for _ in range(40):
            slots = rng.choice(64, size=int(rng.integers(1, 65)), replace=False)
            x[slots] += rng.normal(0, 1, len(slots))
            model = x[slots, None] + rng.normal(0, 1, (len(slots), 12))
            sb = np.abs(x[slots]) * 0.1 + 0.5
            sa = sb * rng.uniform(0.9, 1.1, len(slots))
            rows = rng.permutation(100)[: len(slots)]  # scattered rows of a larger batch
            into = Placement(rows, *(np.full((100, 12), -7.0) for _ in range(3)))
            want = fresh.step(slots, x[slots], model, sb, sa)
            got = placed.step(slots, x[slots], model, sb, sa, into)
            np.testing.assert_array_equal(got.rows, rows)
            np.testing.assert_array_equal(got.step_one(), want.step_one())
            others = np.setdiff1d(np.arange(100), rows)
            for name, array in (("forecast", into.forecast), ("lower", into.lower),
                                ("upper", into.upper)):  # fmt: skip
                np.testing.assert_array_equal(array[rows], getattr(want, name), name)
                assert (array[others] == -7.0).all(), name
            for name in ("weights", "q", "scored", "covered"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name), name)
        for name in Combiner.FIELDS:
            np.testing.assert_array_equal(getattr(placed, name), getattr(fresh, name), name)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(
    not combine_kernel.PARALLEL, reason="numba has no thread-safe layer here: waves run whole"
)
def test_a_wave_in_parallel_parts_equals_the_wave_in_one_part(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A large wave runs as parallel parts on torch's threads; every output, the judged counts
    and the state after are bit for bit those of one part (rows are independent streams)."""
    import torch

    import pipeline.combine as combine

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng = np.random.default_rng(7)
        config = CombineConfig(season=4)
        whole, parts = Combiner(config, 12, 300), Combiner(config, 12, 300)
        x = rng.normal(0, 1, 300)
        for tick in range(60):
            slots = rng.choice(300, size=int(rng.integers(200, 301)), replace=False)
            x[slots] += rng.normal(0, 1, len(slots))
            model = x[slots, None] + rng.normal(0, 1, (len(slots), 12))
            sb = np.abs(x[slots]) * 0.1 + 0.5
            sa = sb * rng.uniform(0.9, 1.1, len(slots))
            monkeypatch.setattr(combine, "ROWS_PER_PART", 10**9)
            want = whole.step(slots, x[slots], model, sb, sa)
            monkeypatch.setattr(combine, "ROWS_PER_PART", 64)
            assert combine._parts(len(slots)) == 2
            got = parts.step(slots, x[slots], model, sb, sa)
            for field in ("forecast", "lower", "upper", "weights", "q", "scored", "covered"):
                np.testing.assert_array_equal(getattr(got, field), getattr(want, field), field)
            if tick > 20:
                assert want.scored.sum() > 0  # intervals are being judged, so counts are compared
        for name in Combiner.FIELDS:
            np.testing.assert_array_equal(getattr(parts, name), getattr(whole, name), name)
    finally:
        torch.set_num_threads(threads)


def test_a_one_thread_process_never_starts_numbas_threads() -> None:
    """With torch on one thread (the daemon's default) the combiner neither compiles nor runs
    the parallel kernel: starting numba's OpenMP threads made torch's calls spin on them and
    cost 2.4x the CPU per tick at 1k ticks/s (decision 31). Checked in a fresh process."""
    script = (
        "import torch, numpy as np\n"
        "torch.set_num_threads(1)\n"
        "from numba.np.ufunc import parallel\n"
        "from pipeline.combine import CombineConfig, Combiner\n"
        "c = Combiner(CombineConfig(season=4), 24, 4096)\n"
        "n = 4096\n"
        "c.step(np.arange(n), np.ones(n), np.ones((n, 24)), np.ones(n), np.ones(n))\n"
        "assert not parallel._is_initialized, 'numba started its threads'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
