"""The engine: one forecast per tick, per-stream isolation, interleaving invariance, state store."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.engine import Engine, ForecastBatch
from pipeline.messages import Source, Tick
from pipeline.model import Forecaster, LoadedModel, ModelConfig, ModelMeta, load_model, save_model
from pipeline.normalize import NormalizerConfig

HORIZON = 3
SRC_TOPIC = "ticks"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(2024)
    model = Forecaster(ModelConfig(n_inputs=3, layers=(16, 8), horizon=HORIZON))
    with torch.no_grad():  # larger weights: outputs that clearly depend on the inputs and state
        for p in model.parameters():
            p.mul_(3.0)
    meta = ModelMeta(config=model.config, normalizer=NormalizerConfig(warmup=5), name="engine-test")
    side = save_model(model, meta, tmp_path_factory.mktemp("model") / "m.pt")
    return side.with_suffix(".pt")


@pytest.fixture
def loaded(model_path: Path) -> LoadedModel:
    return load_model(model_path)  # a fresh copy: tests may change weights


def make_ticks(
    stream: str, values: Sequence[float], ts0: float = 1.7e9, dt: float = 1.0
) -> list[Tick]:
    return [
        Tick(stream, ts0 + i * dt, (float(v),), Source(SRC_TOPIC, 0, i))
        for i, v in enumerate(values)
    ]


def series(rng: np.random.Generator, n: int, scale: float, kind: str = "sine") -> np.ndarray:
    t = np.arange(n)
    if kind == "walk":
        return scale * (10 + np.cumsum(rng.standard_normal(n)))
    period = rng.uniform(8, 30)
    return scale * (1 + 0.3 * np.sin(2 * np.pi * t / period + rng.uniform(0, 6)))


def interleave(rng: random.Random, per_stream: dict[str, list[Tick]]) -> list[Tick]:
    """A random merge of the streams' ticks that keeps each stream's own order."""
    queues = {s: list(t) for s, t in per_stream.items()}
    bag = [s for s, t in queues.items() for _ in t]
    rng.shuffle(bag)
    pos: dict[str, int] = defaultdict(int)
    out = []
    for s in bag:
        out.append(queues[s][pos[s]])
        pos[s] += 1
    return out


def random_batches(rng: random.Random, ticks: list[Tick], max_size: int) -> Iterator[list[Tick]]:
    i = 0
    while i < len(ticks):
        k = rng.randint(1, max_size)
        yield ticks[i : i + k]
        i += k


Rows = dict[str, list[tuple[int, np.ndarray, bool]]]


def run(engine: Engine, batches: Iterator[list[Tick]] | list[list[Tick]]) -> tuple[Rows, int]:
    """Process batches; per stream the (seq, forecast, warm) rows in order; total resets."""
    rows: Rows = defaultdict(list)
    resets = 0
    for batch in batches:
        out = engine.process(batch)
        assert isinstance(out, ForecastBatch)
        assert len(out) == len(batch)
        assert [(t.stream, t.ts, t.values, t.source) for t in out.ticks] == [
            (t.stream, t.ts, t.values, t.source) for t in batch
        ]
        assert out.seq.shape == (len(batch),)
        assert out.forecast.shape == (len(batch), HORIZON)
        assert out.warm.shape == (len(batch),)
        assert out.waves >= (1 if batch else 0)
        resets += out.resets
        for i, tick in enumerate(batch):
            rows[tick.stream].append((int(out.seq[i]), out.forecast[i].copy(), bool(out.warm[i])))
    return rows, resets


def forecasts(rows: Rows, stream: str) -> np.ndarray:
    return np.array([f for _, f, _ in rows[stream]])


def test_empty_batch(loaded: LoadedModel) -> None:
    out = Engine(loaded).process([])
    assert len(out) == 0 and out.waves == 0 and out.resets == 0
    assert out.forecast.shape == (0, HORIZON)


def test_many_streams_on_different_scales(loaded: LoadedModel) -> None:
    rng = np.random.default_rng(0)
    prng = random.Random(0)
    n_ticks = 40
    scale_of = {}
    per_stream = {}
    for k in range(60):
        scale = 1e-3 if k % 2 else 1e5
        name = f"{'milli' if k % 2 else 'huge'}-{k}"
        values = series(rng, n_ticks, scale) * (1 + 0.01 * rng.standard_normal(n_ticks))
        per_stream[name] = make_ticks(name, values, ts0=1.7e9 + k, dt=float(rng.uniform(0.5, 5)))
        scale_of[name] = scale
    ticks = interleave(prng, per_stream)
    engine = Engine(loaded)
    rows, resets = run(engine, random_batches(prng, ticks, 150))
    assert resets == 0
    assert sum(len(r) for r in rows.values()) == len(ticks)  # exactly one row per tick
    assert set(rows) == set(per_stream)
    assert len(engine.store) == 60
    for name, stream_rows in rows.items():
        scale = scale_of[name]
        seqs = [seq for seq, _, _ in stream_rows]
        assert seqs == list(range(1, n_ticks + 1))  # no gap, no repeat
        warm = [w for _, _, w in stream_rows]
        assert warm == [seq >= 5 for seq in seqs]
        fc = forecasts(rows, name)
        last = np.array([t.values[0] for t in per_stream[name]])
        assert np.isfinite(fc).all()
        # Forecasts are in the stream's own units: close to its last value on its own scale ...
        dev = np.abs(fc - last[:, None])
        assert dev.max() < 2 * scale
        # ... and they really move away from persistence once the stream has history.
        assert dev[5:].max() > 1e-4 * scale
        if scale < 1:
            assert np.abs(fc).max() < 1.0  # nowhere near the other group's 1e5 units
        else:
            assert np.abs(fc).min() > 1e3


def alone_one_per_batch(loaded: LoadedModel, ticks: list[Tick]) -> Rows:
    return run(Engine(loaded, capacity=4), [[t] for t in ticks])[0]


def alone_one_batch(loaded: LoadedModel, ticks: list[Tick]) -> Rows:
    return run(Engine(loaded, capacity=4), [ticks])[0]


def assert_same_rows(a: Rows, b: Rows, stream: str, scale: float) -> None:
    assert [s for s, _, _ in a[stream]] == [s for s, _, _ in b[stream]]
    assert [w for _, _, w in a[stream]] == [w for _, _, w in b[stream]]
    np.testing.assert_allclose(
        forecasts(a, stream), forecasts(b, stream), rtol=1e-5, atol=1e-5 * scale
    )


def test_interleaving_invariance(loaded: LoadedModel) -> None:
    """A stream's forecasts do not depend on what else is in the batch, nor on batch sizes."""
    rng = np.random.default_rng(1)
    prng = random.Random(1)
    per_stream: dict[str, list[Tick]] = {}
    scale_of: dict[str, float] = {}
    for k in range(101):
        scale = [1e-3, 1e5, 1.0][k % 3]
        kind = "walk" if k % 3 == 2 else "sine"
        n = int(rng.integers(30, 60))
        values = series(rng, n, scale, kind) * (1 + 0.02 * rng.standard_normal(n))
        name = f"s{k}"
        # Irregular timestamps (so the dt input varies) and one late tick.
        ts = 1.7e9 + np.cumsum(rng.exponential(2.0, size=n))
        ts[n // 2] = ts[n // 2 - 1] - 0.5
        per_stream[name] = [
            Tick(name, float(ts[i]), (float(values[i]),), Source(SRC_TOPIC, k % 6, i))
            for i in range(n)
        ]
        scale_of[name] = scale
    ticks = interleave(prng, per_stream)
    mixed, resets = run(Engine(loaded, capacity=16), random_batches(prng, ticks, 400))
    assert resets == 0
    for name in ("s0", "s1", "s2", "s50"):  # one tick per batch: a few, they are slow
        alone = alone_one_per_batch(loaded, per_stream[name])
        assert_same_rows(alone, mixed, name, scale_of[name])
    for name in list(per_stream)[::4]:  # all ticks in one batch: a quarter of the streams
        alone = alone_one_batch(loaded, per_stream[name])
        assert_same_rows(alone, mixed, name, scale_of[name])
    # The forecasts differ between streams (the comparison is not of constant outputs).
    a, b = forecasts(mixed, "s2"), forecasts(mixed, "s5")
    n = min(len(a), len(b))
    assert not np.allclose(a[:n], b[:n])


def test_interleaving_invariance_with_state_carried_across_batches(loaded: LoadedModel) -> None:
    """Same stream fed in pieces: hidden and normalizer state carry over between batches."""
    rng = np.random.default_rng(2)
    values = series(rng, 80, 1.0, "walk")
    ticks = make_ticks("x", values)
    ref = alone_one_batch(loaded, ticks)
    engine = Engine(loaded)
    pieces = [ticks[:1], ticks[1:30], ticks[30:31], ticks[31:80]]
    rows, _ = run(engine, pieces)
    assert_same_rows(ref, rows, "x", 1.0)
    # Without the carried state the continuation would differ: a fresh engine on the tail.
    cold = alone_one_batch(loaded, ticks[30:])
    assert not np.allclose(forecasts(cold, "x")[5:], forecasts(rows, "x")[35:], rtol=1e-3)


def test_capacity_grows_without_changing_earlier_streams(loaded: LoadedModel) -> None:
    rng = np.random.default_rng(3)
    early = {f"e{k}": make_ticks(f"e{k}", series(rng, 10, 1.0, "walk")) for k in range(300)}
    ref_engine = Engine(loaded, capacity=4096)
    ref, _ = run(ref_engine, [[t for s in early.values() for t in s]])

    engine = Engine(loaded, capacity=1024)
    assert engine.store.capacity == 1024
    first = [t for s in early.values() for t in s[:5]]
    late = [t for s in early.values() for t in s[5:]]
    newcomers = [Tick(f"n{k}", 1.7e9, (float(k),), Source(SRC_TOPIC, 1, k)) for k in range(2700)]
    rows_a, _ = run(engine, [first])
    rows_b, _ = run(engine, [newcomers])
    assert len(engine.store) == 3000
    assert engine.store.capacity >= 3000
    assert all(h.shape[0] == engine.store.capacity for h in engine.store.hidden)
    assert engine.store.normalizer.capacity == engine.store.capacity
    rows_c, _ = run(engine, [late])
    for name in early:
        got = forecasts(rows_a, name).tolist() + forecasts(rows_c, name).tolist()
        np.testing.assert_allclose(got, forecasts(ref, name), rtol=1e-5, atol=1e-5)
        assert [s for s, _, _ in rows_c[name]] == list(range(6, 11))
    assert all(rows_b[f"n{k}"][0][0] == 1 for k in range(2700))
    # Every live stream holds its own slot.
    slots = list(engine.store.slot_of.values())
    assert len(set(slots)) == len(slots) == 3000


def test_evict_frees_the_slot_and_restarts_cold(loaded: LoadedModel) -> None:
    rng = np.random.default_rng(4)
    a_vals = series(rng, 30, 1.0, "walk")
    b_vals = series(rng, 30, 1e-3)
    engine = Engine(loaded, capacity=2)
    run(engine, [make_ticks("a", a_vals), make_ticks("keep", b_vals)])
    store = engine.store
    assert "a" in store and len(store) == 2
    slot = store.slot_of["a"]
    assert store.evict("a") is True
    assert "a" not in store and len(store) == 1
    assert store.stream_at[slot] is None
    assert store.evict("a") is False
    assert all(float(h[slot].abs().sum()) == 0 for h in store.hidden)
    assert store.seq[slot] == 0 and store.normalizer.count[slot] == 0

    # A new stream reuses the freed slot without inheriting anything: it matches a fresh engine.
    c_ticks = make_ticks("c", series(rng, 20, 1e5))
    rows, _ = run(engine, [c_ticks])
    assert store.slot_of["c"] == slot
    assert store.capacity == 2  # reused, no growth
    assert_same_rows(alone_one_batch(loaded, c_ticks), rows, "c", 1e5)

    # "a" re-appears: seq restarts at 1, cold (not warm), same as a brand-new stream.
    again = make_ticks("a", a_vals[:10], ts0=1.8e9)
    rows, _ = run(engine, [again])
    assert [s for s, _, _ in rows["a"]] == list(range(1, 11))
    assert not rows["a"][0][2]
    assert_same_rows(alone_one_batch(loaded, again), rows, "a", 1.0)
    # The untouched stream continues where it was.
    more = make_ticks("keep", b_vals[:3], ts0=1.9e9)
    rows, _ = run(engine, [more])
    assert [s for s, _, _ in rows["keep"]] == [31, 32, 33]


def test_reads_never_create_state(loaded: LoadedModel) -> None:
    engine = Engine(loaded, capacity=2)
    run(engine, [make_ticks("a", [1.0, 2.0])])
    store = engine.store
    before = (len(store), store.capacity, dict(store.slot_of), list(store.stream_at))
    assert "ghost" not in store
    assert ("ghost" in store) is False
    assert 123 not in store
    assert len(store) == 1
    assert store.evict("ghost") is False
    assert (len(store), store.capacity, dict(store.slot_of), list(store.stream_at)) == before
    assert store.state_bytes() > 0


def test_nan_weights_reset_streams_and_keep_forecasts_finite(loaded: LoadedModel) -> None:
    rng = np.random.default_rng(5)
    per_stream = {f"s{k}": make_ticks(f"s{k}", series(rng, 12, 10.0**k)) for k in range(-2, 3)}
    ticks = interleave(random.Random(5), per_stream)

    healthy, resets = run(Engine(loaded), random_batches(random.Random(6), ticks, 7))
    assert resets == 0

    with torch.no_grad():
        loaded.model.head.bias[1] = float("nan")
    engine = Engine(loaded)
    total_resets = 0
    rows: Rows = defaultdict(list)
    for batch in random_batches(random.Random(6), ticks, 7):
        out = engine.process(batch)
        total_resets += out.resets
        assert out.resets == len(batch)  # every stream's output is non-finite, every tick
        assert np.isfinite(out.forecast).all()
        for i, tick in enumerate(batch):
            # Persistence while reset: the forecast is the last value.
            np.testing.assert_array_equal(out.forecast[i], np.full(HORIZON, tick.values[0]))
            rows[tick.stream].append((int(out.seq[i]), out.forecast[i], bool(out.warm[i])))
    assert total_resets == len(ticks)
    for name in per_stream:  # seq keeps counting through resets
        assert [s for s, _, _ in rows[name]] == list(range(1, 13))
    # The hidden state was zeroed, never stored as NaN.
    assert all(bool(torch.isfinite(h).all()) for h in engine.store.hidden)
    assert not math.isnan(float(forecasts(healthy, "s0")[-1, 1]))


def test_nan_state_is_reset_for_the_affected_stream_only(loaded: LoadedModel) -> None:
    engine = Engine(loaded, capacity=4)
    run(engine, [make_ticks("a", [1.0, 2.0, 3.0]) + make_ticks("b", [5.0, 4.0, 6.0])])
    slot = engine.store.slot_of["a"]
    engine.store.hidden[0][slot, 0] = float("nan")  # a poisoned state for stream a only
    out = engine.process(make_ticks("a", [4.0], ts0=1.8e9) + make_ticks("b", [7.0], ts0=1.8e9))
    assert out.resets == 1
    assert np.isfinite(out.forecast).all()
    np.testing.assert_array_equal(out.forecast[0], np.full(HORIZON, 4.0))
    assert not np.allclose(out.forecast[1], 7.0)  # b is forecast normally
    assert all(bool(torch.isfinite(h).all()) for h in engine.store.hidden)


def test_extreme_but_finite_value_does_not_poison_the_stream(loaded: LoadedModel) -> None:
    """decode() accepts any finite float; one outlier must not make forecasts NaN forever."""
    values = [1.0, 2.0, 1.5, 1e200, 1.0, 2.0, 1.5, *([1.0, 1.2] * 10)]
    with np.errstate(all="ignore"):
        rows, _ = run(Engine(loaded), [make_ticks("x", values)])
    fc = forecasts(rows, "x")
    assert np.isfinite(fc[:3]).all()
    assert np.isfinite(fc).all(), (
        f"non-finite forecasts at rows {np.flatnonzero(~np.isfinite(fc).all(1))}"
    )
