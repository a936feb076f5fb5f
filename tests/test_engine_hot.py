"""Hot streams run as sequences give what the waves give (one stream holding most of a batch)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import engine as engine_module
from pipeline.engine import Engine, ForecastBatch
from pipeline.messages import Source, Tick
from pipeline.model import load_model
from tests.model_helpers import random_model

T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hot")
    return {
        "uni": random_model(base / "uni.pt", seed=1),
        "cov": random_model(base / "cov.pt", ("value", "load"), seed=2),
    }


def _engines(path: Path, policy: str) -> tuple[Engine, Engine]:
    loaded = load_model(path)
    return Engine(loaded, late_policy=policy), Engine(load_model(path), late_policy=policy)  # type: ignore[arg-type]


def _waves_only(
    engine: Engine, ticks: list[Tick], monkeypatch: pytest.MonkeyPatch
) -> ForecastBatch:
    with monkeypatch.context() as m:
        m.setattr(engine_module, "HOT_MIN_TICKS", 10**9)
        return engine.process(ticks)


def _same(a: ForecastBatch, b: ForecastBatch) -> None:
    assert a.rows.tolist() == b.rows.tolist()
    assert a.late_rows.tolist() == b.late_rows.tolist()
    assert a.missing_rows.tolist() == b.missing_rows.tolist()
    assert a.seq.tolist() == b.seq.tolist() and a.warm.tolist() == b.warm.tolist()
    # Float32 GRU outputs of the two paths differ by ~1e-7; the mix's weights follow those
    # forecasts, so a step's forecast may differ by rounding of the row's largest numbers (a
    # mix of members far apart can cancel to a much smaller value).
    row = np.abs(b.forecast).max(axis=1, keepdims=True) if b.forecast.size else 0.0
    np.testing.assert_array_less(
        np.abs(a.forecast - b.forecast), 1e-5 * (np.abs(b.forecast) + row) + 1e-9
    )
    # Scale-free errors (O(1)); float32 GRU outputs of the two paths differ by ~1e-7.
    np.testing.assert_allclose(np.sort(a.error), np.sort(b.error), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.sort(a.persistence_error), np.sort(b.persistence_error), rtol=1e-9, atol=1e-12
    )
    assert sorted(a.touched) == sorted(b.touched)


def _stores_agree(a: Engine, b: Engine) -> None:
    sa, sb = a.store, b.store
    assert sa.slot_of.keys() == sb.slot_of.keys()
    for stream in sa.slot_of:
        i, j = sa.slot_of[stream], sb.slot_of[stream]
        assert (sa.seq[i], sa.offset[i], sa.partition[i]) == (
            sb.seq[j],
            sb.offset[j],
            sb.partition[j],
        )
        for name in ("mean", "var", "last", "dsq", "dt_mean", "last_ts", "count"):
            np.testing.assert_allclose(
                getattr(sa.normalizer, name)[i], getattr(sb.normalizer, name)[j], rtol=1e-9
            )
        for ha, hb in zip(sa.hidden, sb.hidden, strict=True):
            np.testing.assert_allclose(ha[i].numpy(), hb[j].numpy(), rtol=1e-4, atol=1e-5)


@st.composite
def hot_batches(draw: st.DrawFn, n_features: int) -> list[list[Tick]]:
    """1-3 batches; in each, one or two hot streams with 17-120 ticks among a few cold ones,
    event times that mostly rise but sometimes stand still or step back (late ticks), values
    on scales from 1e-3 to 1e6 with, now and then, one near the float limits (the stream
    overflows and is reset where the waves reset it, and the late ticks after it are judged
    against the reset state), streams interleaved at random (each keeps its own order)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batches = []
    offset = 0
    clock: dict[str, float] = {}
    scale = {s: 10.0 ** rng.integers(-3, 7) for s in ("h0", "h1", *[f"c{k}" for k in range(5)])}
    for _ in range(draw(st.integers(1, 3))):
        hot = ["h0", "h1"][: draw(st.integers(1, 2))]
        spec = [(s, draw(st.integers(17, 120))) for s in hot]
        spec += [(f"c{k}", draw(st.integers(1, 3))) for k in range(draw(st.integers(0, 5)))]
        per_stream: dict[str, list[Tick]] = {}
        for stream, count in spec:
            steps = rng.choice([1.0, 1.0, 1.0, 2.5, 0.0, -3.0], size=count)
            times = clock.get(stream, 0.0) + np.cumsum(steps)
            clock[stream] = float(times[-1])
            level = scale[stream] * (1 + 0.1 * np.sin(times) + rng.uniform(-0.05, 0.05, count))
            if draw(st.booleans()):
                odd = rng.integers(0, count, size=rng.integers(1, 3))
                level[odd] = rng.choice([1e300, -1e300, 1.7e308, 5e-324], size=len(odd))
            cov = rng.uniform(-5, 5, count)
            per_stream[stream] = [
                Tick(stream, T0 + float(times[i]),
                     (float(level[i]),) if n_features == 1 else (float(level[i]), float(cov[i])),
                     Source("in", 0, 0))
                for i in range(count)
            ]  # fmt: skip
        labels = [s for s, n in spec for _ in range(n)]
        rng.shuffle(labels)
        merged = []
        for stream in labels:
            t = per_stream[stream].pop(0)
            merged.append(Tick(t.stream, t.ts, t.values, Source("in", 0, offset)))
            offset += 1
        batches.append(merged)
    return batches


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
@pytest.mark.parametrize("policy", ["dead_letter", "accept"])
@pytest.mark.parametrize("kind", ["uni", "cov"])
def test_hot_streams_as_sequences_equal_waves(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, kind: str, policy: str,
    data: st.DataObject,
) -> None:  # fmt: skip
    batches = data.draw(hot_batches(2 if kind == "cov" else 1))
    hot_engine, wave_engine = _engines(models[kind], policy)
    for ticks in batches:
        got = hot_engine.process(ticks)
        want = _waves_only(wave_engine, ticks, monkeypatch)
        assert got.waves < want.waves  # the hot streams did run as sequences
        _same(got, want)
    _stores_agree(hot_engine, wave_engine)


def test_a_hot_stream_with_a_missing_value_stays_in_the_waves(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = [Tick("h", T0 + t, (1.0 + t % 7,), Source("in", 0, t)) for t in range(60)]
    ticks[30] = Tick("h", T0 + 30, (math.nan,), Source("in", 0, 30))
    hot_engine, wave_engine = _engines(models["uni"], "dead_letter")
    got = hot_engine.process(ticks)
    want = _waves_only(wave_engine, ticks, monkeypatch)
    assert got.waves == want.waves == 60
    _same(got, want)


def test_a_new_hot_stream_takes_its_first_ticks_as_waves(models: dict[str, Path]) -> None:
    engine = Engine(load_model(models["uni"]))
    ticks = [Tick("h", T0 + t, (5.0 + math.sin(t),), Source("in", 0, t)) for t in range(200)]
    out = engine.process(ticks)
    assert out.waves == 1 and out.seq.tolist() == list(range(1, 201))
    assert engine.store.offset[engine.store.slot_of["h"]] == 199


def test_only_streams_whose_move_saves_waves_become_sequences() -> None:
    from pipeline.engine import _choose_hot

    assert _choose_hot(np.array([1] * 9_999 + [10_001])).tolist() == [9_999]  # one hot symbol
    assert _choose_hot(np.array([30, 29, 28, 25] * 40)).tolist() == []  # even: waves anyway
    assert _choose_hot(np.array([200])).tolist() == [0]  # alone in its batch
    assert _choose_hot(np.array([18, 17, 3])).tolist() == [0, 1]  # two hot ones
    assert _choose_hot(np.array([16, 1, 1])).tolist() == []  # too short to bother


def test_the_engine_compiles_the_sequence_kernel_up_front() -> None:
    """A daemon's first hot stream must not wait seconds for numba: the engine warms it. In a
    fresh interpreter, where nothing else has run the kernel yet."""
    code = (
        "from pipeline import gru_kernel\n"
        "from pipeline.engine import Engine\n"
        "from pipeline.model import load_model\n"
        "assert gru_kernel.AVAILABLE\n"
        "assert not gru_kernel.recurrence.signatures\n"
        "Engine(load_model())\n"
        "assert gru_kernel.recurrence.signatures and gru_kernel.cell.signatures\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("odd", [1e300, -1e300, 5e-324, 1.7e308])
def test_a_hot_stream_with_values_near_the_float_limits_matches_the_waves(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, odd: float
) -> None:
    """Values near the float limits inside a hot stream's run (the compiled GRU must let the
    overflow show, so the stream is reset where the waves reset it), then an ordinary batch."""
    hot_engine, wave_engine = _engines(models["uni"], "dead_letter")
    for k in range(3):
        ticks = [Tick("h", T0 + 100 * k + i, (50.0 + math.sin(i),), Source("in", 0, 100 * k + i))
                 for i in range(60)]  # fmt: skip
        ticks += [Tick(f"c{j}", T0 + 100 * k, (3.0 + j,), Source("in", 1, 10 * k + j))
                  for j in range(4)]  # fmt: skip
        if k == 1:
            ticks[30] = Tick("h", ticks[30].ts, (odd,), ticks[30].source)
            ticks[31] = Tick("h", ticks[31].ts, (-odd,), ticks[31].source)
        got = hot_engine.process(ticks)
        want = _waves_only(wave_engine, ticks, monkeypatch)
        assert got.waves < want.waves  # "h" went through the sequence path
        assert np.isfinite(got.forecast).all()
        _same(got, want)
        assert got.resets == want.resets
    _stores_agree(hot_engine, wave_engine)


@pytest.mark.parametrize("late_after", [1, 2])
def test_a_tick_older_than_an_overflow_reset_is_judged_as_the_waves_judge_it(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, late_after: int
) -> None:
    """An overflow resets a stream (its newest tick forgotten), so a tick older than the one
    that overflowed is not late any more. The CI run that found it: the aborted attempt of a
    batch took the waves, its retry the sequence path, and one input offset ended as both a
    forecast and a ``late`` dead letter."""
    ticks = [Tick("h", T0 + i, (50.0 + math.sin(i),), Source("in", 0, i)) for i in range(60)]
    ticks[30] = Tick("h", T0 + 30, (1e300,), ticks[30].source)
    ticks[30 + late_after] = Tick("h", T0 + 29.5, (50.0,), ticks[30 + late_after].source)
    hot_engine, wave_engine = _engines(models["uni"], "dead_letter")
    with np.errstate(all="ignore"):
        got = hot_engine.process(ticks)
        want = _waves_only(wave_engine, ticks, monkeypatch)
    assert got.resets == want.resets >= 1
    _same(got, want)
    _stores_agree(hot_engine, wave_engine)


def test_a_new_hot_stream_that_overflows_in_its_first_ticks_matches_the_waves(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reset during a new stream's first ticks leaves it with fewer than two ticks: the
    sequence must not start before the stream has two again."""
    ticks = [Tick("h", T0 + i, (50.0 + math.sin(i),), Source("in", 0, i)) for i in range(60)]
    ticks[0] = Tick("h", T0, (1e300,), ticks[0].source)
    hot_engine, wave_engine = _engines(models["uni"], "dead_letter")
    with np.errstate(all="ignore"):
        got = hot_engine.process(ticks)
        want = _waves_only(wave_engine, ticks, monkeypatch)
    _same(got, want)
    _stores_agree(hot_engine, wave_engine)
