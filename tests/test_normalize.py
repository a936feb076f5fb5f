"""The online normalizer against River's own EWMean/EWVar, plus its invariances and plumbing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from river import stats

from pipeline.normalize import NormalizedStep, Normalizer, NormalizerConfig

F = 2  # features per tick in most tests: the model-input layout is (N, 2F + 1)


@dataclass
class RiverStream:
    """Reference statistics for one stream, computed by River one tick at a time."""

    cfg: NormalizerConfig
    n_features: int
    mean: list[stats.EWMean] = field(init=False)
    var: list[stats.EWVar] = field(init=False)
    dsq: list[stats.EWMean] = field(init=False)
    dt: stats.EWMean = field(init=False)
    last: np.ndarray | None = None
    last_ts: float | None = None
    count: int = 0

    def __post_init__(self) -> None:
        self.mean = [
            stats.EWMean(fading_factor=self.cfg.level_alpha) for _ in range(self.n_features)
        ]
        self.var = [stats.EWVar(fading_factor=self.cfg.level_alpha) for _ in range(self.n_features)]
        self.dsq = [
            stats.EWMean(fading_factor=self.cfg.scale_alpha) for _ in range(self.n_features)
        ]
        self.dt = stats.EWMean(fading_factor=self.cfg.dt_alpha)

    def update(self, x: np.ndarray, ts: float) -> None:
        for f in range(self.n_features):
            xf = float(x[f])
            self.mean[f].update(xf)
            self.var[f].update(xf)
            if self.last is not None:
                self.dsq[f].update((xf - float(self.last[f])) ** 2)
        if self.last_ts is not None:
            self.dt.update(ts - self.last_ts)
        self.last, self.last_ts = x.copy(), ts
        self.count += 1


def make_series(
    rng: np.random.Generator, n: int
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """name -> (x (n, F), ts (n,), level scale). Very different scales; ts strictly increasing."""
    t = np.arange(n)
    out = {}
    for name, amp, dt in [("milli", 1e-3, 1.0), ("huge", 1e5, 60.0), ("walk", 1.0, 0.01)]:
        if name == "walk":
            x = np.cumsum(rng.standard_normal((n, F)), axis=0)  # crosses zero
            level = float(np.abs(x).max())
        else:
            phase = rng.uniform(0, 6, size=F)
            x = amp * (
                1 + 0.3 * np.sin(t[:, None] / 7 + phase) + 0.05 * rng.standard_normal((n, F))
            )
            level = amp
        ts = 1.7e9 + rng.uniform(0, 1000) + np.cumsum(rng.exponential(dt, size=n))
        out[name] = (x, ts, level)
    return out


def check_inputs(step: NormalizedStep, n: int, cfg: NormalizerConfig, n_features: int = F) -> None:
    assert step.inputs.dtype == np.float32
    assert step.inputs.shape == (n, 2 * n_features + 1)
    assert np.isfinite(step.inputs).all()
    assert (np.abs(step.inputs) <= cfg.clip).all()
    assert np.isfinite(step.scale).all() and (step.scale > 0).all()


@pytest.mark.parametrize(
    "cfg",
    [
        NormalizerConfig(),
        NormalizerConfig(level_alpha=0.2, scale_alpha=0.07, dt_alpha=0.3, clip=3.0, warmup=5),
    ],
    ids=["default", "fast"],
)
def test_matches_river(cfg: NormalizerConfig) -> None:
    rng = np.random.default_rng(7)
    n_ticks = 250
    series = make_series(rng, n_ticks)
    names = list(series)
    slot_of = {"milli": 5, "huge": 0, "walk": 2}  # distinct, non-contiguous slots
    norm = Normalizer(cfg, F, capacity=8)
    ref = {name: RiverStream(cfg, F) for name in names}
    pos = dict.fromkeys(names, 0)
    calls = 0
    while any(pos[s] < n_ticks for s in names):
        live = [s for s in names if pos[s] < n_ticks]
        k = int(rng.integers(1, len(live) + 1))
        wave = list(rng.choice(live, size=k, replace=False))  # several streams, shuffled order
        slots = np.array([slot_of[s] for s in wave], dtype=np.int64)
        x = np.stack([series[s][0][pos[s]] for s in wave])
        ts = np.array([series[s][1][pos[s]] for s in wave])
        out = norm.step(slots, x, ts, target=1)
        calls += 1
        check_inputs(out, len(wave), cfg)
        for i, s in enumerate(wave):
            r = ref[s]
            first = r.count == 0
            r.update(x[i], float(ts[i]))
            pos[s] += 1
            slot, level = slot_of[s], series[s][2]
            assert out.count[i] == r.count
            assert out.warm[i] == (r.count >= cfg.warmup)
            assert out.last[i] == x[i, 1]  # the target feature, stream units
            if first:  # a new stream starts at mean = x, zero change, no dt information
                assert (out.inputs[i] == 0).all()
            for f in range(F):
                np.testing.assert_allclose(
                    norm.mean[slot, f], r.mean[f].get(), rtol=1e-9, atol=1e-12 * level
                )
                # River computes the variance as E[x²] - E[x]²; allow its cancellation error.
                np.testing.assert_allclose(
                    norm.var[slot, f], r.var[f].get(), rtol=1e-9, atol=1e-12 * level**2
                )
                if r.count >= 2:
                    np.testing.assert_allclose(
                        norm.dsq[slot, f], r.dsq[f].get(), rtol=1e-9, atol=1e-15 * level**2
                    )
                else:
                    assert norm.dsq[slot, f] == 0
            if r.count >= 2:
                np.testing.assert_allclose(norm.dt_mean[slot], r.dt.get(), rtol=1e-9)
                # scale = sqrt(dsq) of the target feature (plus a negligible floor)
                np.testing.assert_allclose(out.scale[i], np.sqrt(r.dsq[1].get()), rtol=1e-6)
            assert norm.last_ts[slot] == ts[i]
    assert calls < 3 * n_ticks  # many calls carried several streams at once
    # The streams really are on different scales (the test would be vacuous otherwise).
    assert norm.mean[slot_of["huge"], 0] / norm.mean[slot_of["milli"], 0] > 1e7


def test_dt_mean_ignores_late_ticks_as_zero_gaps() -> None:
    cfg = NormalizerConfig(dt_alpha=0.5)
    norm = Normalizer(cfg, 1, capacity=1)
    slot = np.array([0])
    for ts in (100.0, 110.0, 105.0):  # the third tick is late
        out = norm.step(slot, np.array([[1.0]]), np.array([ts]))
        check_inputs(out, 1, cfg, n_features=1)
    assert norm.dt_mean[0] == pytest.approx(0.5 * 10.0 + 0.5 * 0.0)
    assert norm.last_ts[0] == 110.0  # the clock does not go back


def test_constant_stream_gives_finite_inputs() -> None:
    cfg = NormalizerConfig()
    norm = Normalizer(cfg, F, capacity=4)
    slots = np.array([0, 1, 3])
    x = np.array([[42.0, -7.5], [0.0, 0.0], [1e-300, 1e150]])
    for i in range(60):
        out = norm.step(slots, x, np.full(3, 1.7e9 + i))
        check_inputs(out, 3, cfg)
        assert (out.inputs[:, : 2 * F] == 0).all()  # no deviation, no change
        assert (out.inputs[:, -1] == 0).all()  # perfectly regular ticks
    # Same timestamp again (dt = 0): still finite.
    out = norm.step(slots, x, np.full(3, 1.7e9 + 59))
    check_inputs(out, 3, cfg)


@pytest.mark.parametrize("factor", [1e6, 1e-6])
def test_scale_invariance(factor: float) -> None:
    cfg = NormalizerConfig()
    rng = np.random.default_rng(3)
    n = 300
    base = 5.0 + np.cumsum(rng.standard_normal((n, F)), axis=0) * 0.1
    base[:, 1] += np.sin(np.arange(n) / 5)
    ts = 1.7e9 + np.cumsum(rng.exponential(2.0, size=n))
    norm = Normalizer(cfg, F, capacity=2)
    slots = np.array([1, 0])
    for t in range(n):
        x = np.stack([base[t], base[t] * factor])
        out = norm.step(slots, x, np.array([ts[t], ts[t]]))
        np.testing.assert_allclose(out.scale[1], out.scale[0] * factor, rtol=1e-9)
        np.testing.assert_allclose(out.last[1], out.last[0] * factor, rtol=1e-12)
        np.testing.assert_allclose(out.inputs[1], out.inputs[0], rtol=0, atol=1e-5)
    assert np.abs(out.inputs).max() > 0.1  # inputs are informative, not all zero


def feed(norm: Normalizer, slots: np.ndarray, x: np.ndarray, ts: np.ndarray) -> NormalizedStep:
    return norm.step(slots, x, ts, target=0)


def assert_same_step(a: NormalizedStep, b: NormalizedStep) -> None:
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.last, b.last)
    np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_array_equal(a.count, b.count)
    np.testing.assert_array_equal(a.warm, b.warm)


def ticks(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = 100 + np.cumsum(rng.standard_normal((n, F)), axis=0)
    ts = 1.7e9 + np.cumsum(rng.exponential(1.0, size=n))
    return x, ts


def test_snapshot_restore_round_trip() -> None:
    cfg = NormalizerConfig()
    rng = np.random.default_rng(11)
    x, ts = ticks(rng, 60)
    a = Normalizer(cfg, F, capacity=4)
    for t in range(50):
        feed(a, np.array([3]), x[t : t + 1], ts[t : t + 1])
    snap = a.snapshot(3)
    assert len(snap) == 4 * F + 3
    assert all(isinstance(v, float) for v in snap)
    b = Normalizer(cfg, F, capacity=8)
    b.restore(6, json.loads(json.dumps(snap)))  # survives a JSON round trip
    assert b.count[6] == 50
    for t in range(50, 60):
        assert_same_step(
            feed(a, np.array([3]), x[t : t + 1], ts[t : t + 1]),
            feed(b, np.array([6]), x[t : t + 1], ts[t : t + 1]),
        )
    with pytest.raises(ValueError):
        b.restore(0, snap[:-1])


def test_grow_keeps_existing_state() -> None:
    cfg = NormalizerConfig()
    rng = np.random.default_rng(5)
    x, ts = ticks(rng, 40)
    a = Normalizer(cfg, F, capacity=4)
    twin = Normalizer(cfg, F, capacity=16)
    slots = np.array([0, 1, 2, 3])
    for t in range(30):
        xs = x[t] + np.arange(4)[:, None]
        feed(a, slots, xs, np.full(4, ts[t]))
        feed(twin, slots, xs, np.full(4, ts[t]))
    before = {name: getattr(a, name).copy() for name in Normalizer.FIELDS}
    a.grow(16)
    assert a.capacity == 16
    for name in Normalizer.FIELDS:
        arr = getattr(a, name)
        assert arr.shape[0] == 16
        assert arr.dtype == before[name].dtype
        np.testing.assert_array_equal(arr[:4], before[name])
        assert (arr[4:] == 0).all()
    a.grow(8)  # never shrinks
    assert a.capacity == 16
    slots = np.array([2, 15, 0, 3, 1])
    for t in range(30, 40):
        xs = x[t] + np.arange(5)[:, None]
        assert_same_step(
            feed(a, slots, xs, np.full(5, ts[t])), feed(twin, slots, xs, np.full(5, ts[t]))
        )


def test_reset_makes_a_slot_new() -> None:
    cfg = NormalizerConfig()
    rng = np.random.default_rng(9)
    x, ts = ticks(rng, 40)
    a = Normalizer(cfg, F, capacity=2)
    twin = Normalizer(cfg, F, capacity=2)
    both = np.array([0, 1])
    for t in range(30):
        feed(a, both, np.stack([x[t], -x[t]]), np.full(2, ts[t]))
        feed(twin, np.array([1]), -x[t : t + 1], ts[t : t + 1])
    a.reset(np.array([0]))
    assert a.count[0] == 0
    fresh = Normalizer(cfg, F, capacity=1)
    for t in range(30, 40):
        out = feed(a, both, np.stack([x[t], -x[t]]), np.full(2, ts[t]))
        new = feed(fresh, np.array([0]), x[t : t + 1], ts[t : t + 1])
        other = feed(twin, np.array([1]), -x[t : t + 1], ts[t : t + 1])
        np.testing.assert_array_equal(out.inputs[0], new.inputs[0])
        np.testing.assert_array_equal(out.scale[0], new.scale[0])
        assert out.count[0] == new.count[0] == t - 29
        np.testing.assert_array_equal(out.inputs[1], other.inputs[0])  # untouched neighbour
        assert out.count[1] == t + 1


def test_calendar_inputs_encode_time_of_day_and_day_of_week() -> None:
    norm = Normalizer(NormalizerConfig(calendar=True), n_features=1, capacity=2)
    assert norm.n_inputs == 7
    monday_6am = 1_704_067_200.0 + 6 * 3600  # 2024-01-01 was a Monday (UTC)
    thursday_noon = 1_704_067_200.0 + 3 * 86_400 + 12 * 3600
    out = norm.step(
        np.array([0, 1]), np.array([[1.0], [2.0]]), np.array([monday_6am, thursday_noon])
    )
    day_sin, day_cos, week_sin, week_cos = out.inputs[:, 3:].T
    np.testing.assert_allclose([day_sin[0], day_cos[0]], [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose([day_sin[1], day_cos[1]], [0.0, -1.0], atol=1e-6)
    phase = 2 * np.pi * (6 / 24) / 7  # a quarter day into the week
    np.testing.assert_allclose(
        [week_sin[0], week_cos[0]], [np.sin(phase), np.cos(phase)], atol=1e-6
    )
    phase = 2 * np.pi * 3.5 / 7
    np.testing.assert_allclose(
        [week_sin[1], week_cos[1]], [np.sin(phase), np.cos(phase)], atol=1e-6
    )
    plain = Normalizer(NormalizerConfig(), n_features=1, capacity=1)
    assert plain.n_inputs == 3  # models saved before the option read the same inputs
