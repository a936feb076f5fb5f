"""The engine's late and missing paths, and which streams it says it touched.

A tick either changes its stream's state (forecast) or leaves no trace at all (late, missing).
A stream gets state only from a tick that changes it: a brand-new stream whose ticks are all
late or missing must not be given a slot (the poison pill of issue 11: such a slot had no
source partition, and its changelog record crashed the daemon on every restart).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.engine import Engine
from pipeline.messages import Source, Tick
from pipeline.model import LoadedModel, load_model
from tests.model_helpers import random_model

NAN = math.nan
T0 = 1.7e9


@pytest.fixture(scope="module")
def univariate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_model(tmp_path_factory.mktemp("m") / "uni.pt")


@pytest.fixture(scope="module")
def covariate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_model(tmp_path_factory.mktemp("m") / "cov.pt", ("x", "c"))


def engine(path: Path, late_policy: str = "dead_letter") -> Engine:
    loaded: LoadedModel = load_model(path)
    return Engine(loaded, capacity=2, late_policy=late_policy)  # type: ignore[arg-type]


def tick(stream: str, ts: float, *values: float, partition: int = 0, offset: int = 0) -> Tick:
    return Tick(stream, T0 + ts, tuple(values), Source("in", partition, offset))


def test_a_new_stream_whose_only_tick_is_missing_gets_no_state(univariate: Path) -> None:
    e = engine(univariate)
    out = e.process([tick("new", 0, NAN, offset=5)])
    assert len(out) == 0 and [t.stream for t in out.missing] == ["new"]
    assert list(out.touched) == [] and "new" not in e.store and len(e.store) == 0
    # Its first real tick later starts it from scratch, seq 1.
    out = e.process([tick("new", 1, 3.0, offset=6)])
    assert out.seq.tolist() == [1] and list(out.touched) == ["new"]
    assert e.store.partition[e.store.slot_of["new"]] == 0
    assert e.store.offset[e.store.slot_of["new"]] == 6


def test_missing_then_present_in_one_batch(univariate: Path) -> None:
    e = engine(univariate)
    out = e.process([tick("s", 0, NAN, offset=1), tick("s", 1, 2.0, offset=2),
                     tick("s", 2, NAN, offset=3)])  # fmt: skip
    assert out.seq.tolist() == [1] and [t.source.offset for t in out.missing] == [1, 3]
    assert e.store.offset[e.store.slot_of["s"]] == 2  # the newest *processed* tick


def test_an_existing_stream_with_only_missing_ticks_is_not_touched(univariate: Path) -> None:
    e = engine(univariate)
    e.process([tick("s", 0, 1.0), tick("s", 1, 2.0)])
    before = e.store.snapshot("s")
    out = e.process([tick("s", 2, NAN, offset=9)])
    assert list(out.touched) == [] and e.store.snapshot("s") == before


def test_a_new_stream_whose_only_tick_is_late_cannot_exist(univariate: Path) -> None:
    # Late means older than the stream's newest processed tick, so a new stream's first tick is
    # never late, even in a batch where a later tick of it comes first.
    e = engine(univariate)
    out = e.process([tick("s", 5, 1.0, offset=0), tick("s", 4, 2.0, offset=1)])
    assert out.seq.tolist() == [1] and [t.source.offset for t in out.late] == [1]
    assert list(out.touched) == ["s"]


@pytest.mark.parametrize("policy", ["dead_letter", "drop"])
def test_late_ticks_leave_no_trace(univariate: Path, policy: str) -> None:
    e = engine(univariate, policy)
    e.process([tick("s", 0, 1.0), tick("s", 10, 2.0)])
    before = e.store.snapshot("s")
    out = e.process([tick("s", 9, 5.0, offset=7), tick("s", 3, 6.0, offset=8)])
    assert len(out) == 0 and [t.source.offset for t in out.late] == [7, 8]
    assert list(out.touched) == [] and e.store.snapshot("s") == before


def test_accepted_late_ticks_are_forecast(univariate: Path) -> None:
    e = engine(univariate, "accept")
    e.process([tick("s", 0, 1.0), tick("s", 10, 2.0)])
    out = e.process([tick("s", 9, 5.0)])
    assert out.seq.tolist() == [3] and not out.late
    assert e.store.normalizer.last_ts[e.store.slot_of["s"]] == T0 + 10  # newest stays newest


def test_duplicate_timestamps_are_not_late(univariate: Path) -> None:
    e = engine(univariate)
    out = e.process([tick("s", 1, 1.0), tick("s", 1, 2.0), tick("s", 1, 3.0)])
    assert out.seq.tolist() == [1, 2, 3] and not out.late
    assert np.isfinite(out.forecast).all()


def test_a_missing_covariate_is_carried_forward(covariate: Path) -> None:
    a, b = engine(covariate), engine(covariate)
    a.process([tick("s", 0, 1.0, 7.0), tick("s", 1, 1.5, 8.0)])
    b.process([tick("s", 0, 1.0, 7.0), tick("s", 1, 1.5, 8.0)])
    carried = a.process([tick("s", 2, 2.0, NAN)])
    explicit = b.process([tick("s", 2, 2.0, 8.0)])
    assert carried.seq.tolist() == [3] and not carried.missing
    np.testing.assert_array_equal(carried.forecast, explicit.forecast)


def test_a_covariate_with_nothing_to_carry_is_missing(covariate: Path) -> None:
    e = engine(covariate)
    out = e.process([tick("s", 0, 1.0, NAN), tick("s", 1, 2.0, 5.0), tick("s", 2, 3.0, NAN)])
    # The first tick has no previous covariate: skipped; the stream starts at the second.
    assert len(out.missing) == 1 and out.missing[0].ts == T0 + 0
    assert out.seq.tolist() == [1, 2]


def test_a_missing_target_is_never_carried(covariate: Path) -> None:
    e = engine(covariate)
    e.process([tick("s", 0, 1.0, 7.0)])
    out = e.process([tick("s", 1, NAN, 7.0)])
    assert len(out) == 0 and len(out.missing) == 1 and list(out.touched) == []


def test_touched_lists_each_changed_stream_once(univariate: Path) -> None:
    e = engine(univariate)
    e.process([tick("old", 0, 1.0), tick("old", 5, 1.0)])
    ticks = [tick("a", 0, 1.0), tick("a", 1, 2.0), tick("b", 0, NAN), tick("old", 1, 3.0),
             tick("c", 0, 1.0), tick("c", 1, NAN)]  # fmt: skip
    out = e.process(ticks)
    assert sorted(out.touched) == ["a", "c"]  # "b": missing only; "old": late only
    assert sorted(e.store.slot_of) == ["a", "c", "old"]
    # Every stream with state knows where its newest tick came from.
    live = list(e.store.slot_of.values())
    assert (e.store.partition[live] >= 0).all() and (e.store.offset[live] >= 0).all()
