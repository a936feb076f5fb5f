"""The columnar decoder agrees with the reference decoder on every record, generated or chosen."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.messages import Rejection, Source, Tick, decode
from pipeline.ticks import RawRecord, TickBatch, decode_records

TOPIC = "in"
T0 = 1_700_000_000


def reference(
    records: list[RawRecord], features: tuple[str, ...], positive: int | None, max_bytes: int
) -> tuple[list[Tick], list[Rejection]]:
    out = [
        decode(k, v, Source(TOPIC, p, o, t), features=features, positive=positive,
               max_bytes=max_bytes)
        for k, v, p, o, t in records
    ]  # fmt: skip
    return [r for r in out if isinstance(r, Tick)], [r for r in out if isinstance(r, Rejection)]


def same_values(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True)
    )


def check(
    records: list[RawRecord],
    features: tuple[str, ...] = ("value",),
    positive: int | None = None,
    max_bytes: int = 64 * 1024,
) -> TickBatch:
    batch, rejections = decode_records(
        TOPIC, records, features=features, positive=positive, max_bytes=max_bytes
    )
    ticks, expected_rej = reference(records, features, positive, max_bytes)
    got = batch.ticks()
    assert len(got) == len(ticks)
    for g, e in zip(got, ticks, strict=True):
        assert (g.stream, g.ts, g.source, g.raw_value) == (e.stream, e.ts, e.source, e.raw_value)
        assert same_values(g.values, e.values), (g.values, e.values)
    assert rejections == expected_rej
    assert len(batch) + len(rejections) == len(records)  # every record has one outcome
    assert batch.values.shape == (len(batch), len(features))
    return batch


FIELD_VALUES = st.one_of(
    st.none(),
    st.just("NA"),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 0.0, -0.0, 5e-324]),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)
TIMESTAMPS = st.one_of(
    st.floats(min_value=-1e20, max_value=1e20, allow_nan=False),
    st.integers(min_value=-(10**19), max_value=10**19),
    st.sampled_from([T0, T0 * 1000, 10**11, 10**11 + 1, 7_258_118_400, 7_258_118_401]),
    st.sampled_from(["2024-01-02T03:04:05Z", "2024-01-02 03:04", "not a time", ""]),
    st.booleans(),
    st.none(),
)


@st.composite
def documents(draw: st.DrawFn, features: tuple[str, ...]) -> bytes | None:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.one_of(st.none(), st.binary(max_size=40)))
    doc: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        doc["ts"] = draw(TIMESTAMPS)
    shape = draw(st.integers(0, 3))
    if shape in (0, 2):
        doc["value"] = draw(FIELD_VALUES)
    if shape in (1, 2):
        names = list(features) + draw(st.lists(st.sampled_from(["x", "y", "zz"]), max_size=1))
        chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
        if not draw(st.integers(0, 3)):
            doc["values"] = draw(FIELD_VALUES)
        else:
            doc["values"] = {n: draw(FIELD_VALUES) for n in chosen}
    if not draw(st.integers(0, 4)):
        doc["stream"] = draw(st.one_of(st.sampled_from(["s0", "s1", ""]), FIELD_VALUES))
    if not draw(st.integers(0, 5)):
        doc["extra"] = draw(FIELD_VALUES)
    text = json.dumps(doc) if draw(st.integers(0, 5)) else json.dumps([doc])
    if not draw(st.integers(0, 10)):
        text = text.replace("null", "NaN", 1)
    if not draw(st.integers(0, 15)):
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode()


@st.composite
def polls(draw: st.DrawFn, features: tuple[str, ...]) -> list[RawRecord]:
    n = draw(st.integers(0, 25))
    records = []
    for i in range(n):
        key = draw(st.sampled_from([b"s0", b"s1", b"", None, b"\xff\xfe", "é".encode()]))
        records.append((key, draw(documents(features)), i % 3, 100 + i, draw(st.integers(-1, 9))))
    return records


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(polls(("value",)))
def test_single_feature_agrees_with_reference(records: list[RawRecord]) -> None:
    check(records)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(polls(("value", "load")), st.sampled_from([None, 0, 1]))
def test_covariates_agree_with_reference(records: list[RawRecord], positive: int | None) -> None:
    check(records, ("value", "load"), positive=positive)


@settings(max_examples=100)
@given(polls(("value",)))
def test_log_target_and_size_limit_agree(records: list[RawRecord]) -> None:
    check(records, positive=0, max_bytes=30)


def test_common_records_take_the_fast_path_and_keep_input_order() -> None:
    records: list[RawRecord] = [
        (b"a", b'{"ts":1700000000.5,"value":1.5}', 0, 10, 5),
        (b"b", b'{"ts":"2024-01-02T00:00:00Z","value":2}', 1, 3, 6),  # ISO: reference path
        (b"a", b'{"ts":1700000001000,"value":null}', 0, 11, 7),  # ms, missing value
        (b"c", b'{"ts":1700000002,"value":NaN}', 0, 12, 8),  # NaN token: a dead letter
        (b"b", b'{"ts":1700000003,"value":"NA","stream":"b"}', 1, 4, 9),
    ]
    batch = check(records)
    assert batch.stream == ["a", "b", "a", "b"]
    assert batch.offset.tolist() == [10, 3, 11, 4]
    assert batch.ts[2] == 1_700_000_001.0
    assert np.isnan(batch.values[2, 0]) and np.isnan(batch.values[3, 0])


def test_from_ticks_and_take_round_trip() -> None:
    ticks = [Tick(f"s{i}", T0 + i, (float(i),), Source(TOPIC, i % 2, i, 0)) for i in range(5)]
    batch = TickBatch.from_ticks(ticks)
    again = batch.take(np.array([4, 0]))
    assert [t.stream for t in again.ticks()] == ["s4", "s0"]
    assert again.tick(0).source == Source(TOPIC, 0, 4, 0)
