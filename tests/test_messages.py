"""The decoder contract of :func:`pipeline.messages.decode` and the forecast record encoding."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.messages import (
    ForecastEncoder,
    Reason,
    Rejection,
    Source,
    Tick,
    decode,
    encode_forecast,
    encode_tick,
)

SRC = Source("ticks", 3, 12345, timestamp_ms=1_700_000_000_000)
TS = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()  # 1704164645.0
AB = ("a", "b")


def doc(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def tick(value: bytes, key: bytes | None = b"s1", **kw: Any) -> Tick:
    out = decode(key, value, SRC, **kw)
    assert isinstance(out, Tick), out
    return out


def reject(value: bytes | None, key: bytes | None = b"s1", **kw: Any) -> Rejection:
    out = decode(key, value, SRC, **kw)
    assert isinstance(out, Rejection), out
    # The original bytes and the source are kept for the dead-letter topic.
    assert out.key is key
    assert out.value is value
    assert out.source == SRC
    assert isinstance(out.reason, Reason)
    assert out.detail
    return out


# ---------------------------------------------------------------- valid ticks


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (1_700_000_000.25, 1_700_000_000.25),  # epoch seconds, float
        (1_700_000_000, 1_700_000_000.0),  # epoch seconds, int
        (0, 0.0),  # the epoch itself is valid
        (1_700_000_000_123, 1_700_000_000.123),  # epoch milliseconds (int > 1e11)
        (100_000_000_001, 100_000_000.001),  # just above the ms threshold
        ("2024-01-02T03:04:05Z", TS),
        ("2024-01-02T03:04:05.500Z", TS + 0.5),
        ("2024-01-02T05:04:05+02:00", TS),  # offset east
        ("2024-01-01T22:04:05-05:00", TS),  # offset west
        ("2024-01-02T03:04:05", TS),  # naive ISO = UTC
        (" 2024-01-02T03:04:05Z ", TS),  # surrounding whitespace
    ],
)
def test_valid_timestamps(ts: float | int | str, expected: float) -> None:
    out = tick(doc(ts=ts, value=1.5))
    assert out.ts == pytest.approx(expected, abs=1e-6)
    assert isinstance(out.ts, float)
    assert out.values == (1.5,)
    assert out.stream == "s1"
    assert out.source == SRC


def test_value_int_becomes_float() -> None:
    out = tick(doc(ts=1_700_000_000, value=-3))
    assert out.values == (-3.0,)
    assert all(isinstance(v, float) for v in out.values)


def test_values_with_features_follow_feature_order() -> None:
    out = tick(doc(ts=1_700_000_000, values={"b": 2.5, "a": -1}), features=AB)
    assert out.values == (-1.0, 2.5)


def test_values_with_single_feature() -> None:
    assert tick(doc(ts=1_700_000_000, values={"value": 7})).values == (7.0,)


def test_key_is_stream_id() -> None:
    out = tick(doc(ts=1_700_000_000, value=1), key="grüße/1".encode())
    assert out.stream == "grüße/1"


def test_encode_tick_decodes() -> None:
    assert tick(encode_tick(1_700_000_000.5, 2.0)).values == (2.0,)
    multi = tick(encode_tick(1_700_000_000.5, values={"a": 1.0, "b": 2.0}), features=AB)
    assert multi.values == (1.0, 2.0)
    assert multi.ts == 1_700_000_000.5


# ---------------------------------------------------------------- rejections


@pytest.mark.parametrize("value", [None, b"", b"{not json", b'{"ts": 1,', b"\xff\xfe\x00garbage"])
def test_invalid_json(value: bytes | None) -> None:
    assert reject(value).reason is Reason.INVALID_JSON


def test_deeply_nested_json_is_invalid_json_not_recursion() -> None:
    value = b"[" * 100_000 + b"]" * 100_000
    out = reject(value, max_bytes=10**6)
    assert out.reason in (Reason.INVALID_JSON, Reason.NOT_AN_OBJECT)


@pytest.mark.parametrize("value", [b"[1, 2]", b"3", b'"text"', b"null", b"true"])
def test_not_an_object(value: bytes) -> None:
    assert reject(value).reason is Reason.NOT_AN_OBJECT


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (None, doc(ts=1_700_000_000, value=1)),
        (b"", doc(ts=1_700_000_000, value=1)),
        (None, doc(ts=1_700_000_000, value=1, stream="")),
        (None, doc(ts=1_700_000_000, value=1, stream=123)),
        (None, doc(ts=1_700_000_000, value=1, stream=None)),
        (b"\xff\xfe", doc(ts=1_700_000_000, value=1)),  # key not UTF-8
    ],
)
def test_missing_stream(key: bytes | None, value: bytes) -> None:
    assert reject(value, key=key).reason is Reason.MISSING_STREAM


@pytest.mark.parametrize(
    ("value", "features"),
    [
        (doc(value=1), ("value",)),  # no ts
        (doc(ts=1_700_000_000), ("value",)),  # neither value nor values
        (doc(ts=1_700_000_000, value=1), AB),  # single value but two features
        (doc(ts=1_700_000_000, values={"a": 1}), AB),  # a feature is missing
        (doc(ts=1_700_000_000, values={}), ("value",)),
    ],
)
def test_missing_field(value: bytes, features: tuple[str, ...]) -> None:
    assert reject(value, features=features).reason is Reason.MISSING_FIELD


@pytest.mark.parametrize(
    ("value", "features"),
    [
        (doc(ts=1_700_000_000, value="1.5"), ("value",)),  # string number
        (doc(ts=1_700_000_000, value="NaN"), ("value",)),
        (doc(ts=1_700_000_000, value=True), ("value",)),  # bool is not a number
        (doc(ts=1_700_000_000, value=False), ("value",)),
        (doc(ts=1_700_000_000, value=[1.0]), ("value",)),
        (doc(ts=1_700_000_000, value={"x": 1}), ("value",)),
        (doc(ts=1_700_000_000, values=[1, 2]), AB),  # values must be an object
        (doc(ts=1_700_000_000, values="1,2"), AB),
        (doc(ts=1_700_000_000, values={"a": 1, "b": "2"}), AB),
        (doc(ts=1_700_000_000, values={"a": True, "b": 2}), AB),
    ],
)
def test_bad_type(value: bytes, features: tuple[str, ...]) -> None:
    assert reject(value, features=features).reason is Reason.BAD_TYPE


@pytest.mark.parametrize(
    ("value", "features"),
    [
        (b'{"ts": 1700000000, "value": NaN}', ("value",)),
        (b'{"ts": 1700000000, "value": Infinity}', ("value",)),
        (b'{"ts": 1700000000, "value": -Infinity}', ("value",)),
        (b'{"ts": 1700000000, "value": 1e999}', ("value",)),  # overflows to inf
        (b'{"ts": 1700000000, "values": {"a": 1, "b": NaN}}', AB),
    ],
)
def test_non_finite(value: bytes, features: tuple[str, ...]) -> None:
    assert reject(value, features=features).reason is Reason.NON_FINITE


@pytest.mark.parametrize(
    "value",
    [
        doc(ts=True, value=1),
        doc(ts=None, value=1),
        doc(ts=[1_700_000_000], value=1),
        doc(ts={"s": 1}, value=1),
        doc(ts="yesterday", value=1),
        doc(ts="", value=1),
        doc(ts="2024-13-01T00:00:00Z", value=1),
        doc(ts=-1, value=1),  # before 1970
        doc(ts="1969-12-31T23:59:59Z", value=1),
        doc(ts=10**11, value=1),  # not above the ms threshold: seconds, year 5138
        doc(ts=8e9, value=1),  # after 2200
        doc(ts="2300-01-01T00:00:00Z", value=1),
        b'{"ts": NaN, "value": 1}',
        b'{"ts": Infinity, "value": 1}',
        b'{"ts": -Infinity, "value": 1}',
    ],
)
def test_bad_timestamp(value: bytes) -> None:
    assert reject(value).reason is Reason.BAD_TIMESTAMP


def test_too_large() -> None:
    small = doc(ts=1_700_000_000, value=1)
    assert isinstance(decode(b"s1", small, SRC, max_bytes=len(small)), Tick)  # limit inclusive
    out = reject(small, max_bytes=len(small) - 1)
    assert out.reason is Reason.TOO_LARGE
    big = doc(ts=1_700_000_000, value=1, pad="x" * 70_000)
    assert reject(big).reason is Reason.TOO_LARGE  # default limit is 64 KiB


def test_too_large_is_checked_before_parsing() -> None:
    assert reject(b"{" * 100, max_bytes=64).reason is Reason.TOO_LARGE


def test_unknown_feature() -> None:
    value = doc(ts=1_700_000_000, values={"a": 1, "b": 2, "c": 3})
    out = reject(value, features=AB)
    assert out.reason is Reason.UNKNOWN_FEATURE
    assert "c" in out.detail


@pytest.mark.parametrize("missing", [None, "NA"])
def test_null_and_na_are_missing_values(missing: Any) -> None:
    assert math.isnan(tick(doc(ts=TS, value=missing)).values[0])
    got = tick(doc(ts=TS, values={"a": 1, "b": missing}), features=AB).values
    assert got[0] == 1.0 and math.isnan(got[1])
    assert reject(doc(ts=TS, value="na")).reason is Reason.BAD_TYPE  # only these two spellings
    assert reject(b'{"ts": 1700000000, "value": NaN}').reason is Reason.NON_FINITE


@pytest.mark.parametrize("price", [0, -1.5, 0.0])
def test_log_target_needs_a_positive_value(price: float) -> None:
    rej = reject(doc(ts=TS, values={"close": price, "volume": 3}), features=("close", "volume"),
                 positive=0)  # fmt: skip
    assert rej.reason is Reason.OUT_OF_DOMAIN and "close" in rej.detail
    assert tick(doc(ts=TS, value=1e-300), positive=0).values == (1e-300,)
    assert tick(doc(ts=TS, values={"close": 5, "volume": 0}), features=("close", "volume"),
                positive=0).values == (5.0, 0.0)  # fmt: skip


def test_a_stream_field_never_replaces_the_key() -> None:
    # Keyless ticks that name their stream would reach whichever partition the producer picked:
    # one stream on several partitions, two owners after a rebalance (decision 18).
    rej = reject(doc(ts=TS, value=1, stream="s1"), key=None)
    assert rej.reason is Reason.MISSING_KEY and "key" in rej.detail and "s1" in rej.detail
    assert reject(doc(ts=TS, value=1, stream="bad\ud800"), key=b"").reason is Reason.MISSING_KEY


@pytest.mark.parametrize("named", ["s2", "", 1, ["s1"], True])
def test_a_stream_field_that_differs_from_the_key_is_rejected(named: Any) -> None:
    rej = reject(doc(ts=TS, value=1, stream=named), key=b"s1")
    assert rej.reason is Reason.KEY_MISMATCH and "s1" in rej.detail


@pytest.mark.parametrize("named", ["s1", None])
def test_a_stream_field_equal_to_the_key_or_null_is_accepted(named: Any) -> None:
    assert tick(doc(ts=TS, value=1, stream=named), key=b"s1").stream == "s1"


_TS_TOO_BIG = {Reason.BAD_TIMESTAMP}
_VALUE_TOO_BIG = {Reason.NON_FINITE, Reason.BAD_TYPE}


@pytest.mark.parametrize(
    ("value", "allowed"),
    [
        (b'{"ts": 1' + b"0" * 400 + b', "value": 1}', _TS_TOO_BIG),
        (b'{"ts": -1' + b"0" * 400 + b', "value": 1}', _TS_TOO_BIG),
        (b'{"ts": 1700000000, "value": 1' + b"0" * 400 + b"}", _VALUE_TOO_BIG),
        (b'{"ts": 1700000000, "values": {"value": -1' + b"0" * 400 + b"}}", _VALUE_TOO_BIG),
    ],
    ids=["ts", "negative-ts", "value", "values"],
)
def test_huge_integers_are_rejected_not_raised(value: bytes, allowed: set[Reason]) -> None:
    # JSON integers are unbounded; from 2**1024 on, float(int) raises OverflowError.
    out = decode(b"s1", value, SRC)
    assert isinstance(out, Rejection)
    assert out.reason in allowed


def test_rejection_headers() -> None:
    out = reject(doc(ts="nope", value=1))
    headers = out.headers()
    assert [name for name, _ in headers] == [
        "error",
        "error.detail",
        "source.topic",
        "source.partition",
        "source.offset",
    ]
    assert all(isinstance(v, bytes) for _, v in headers)
    h = dict(headers)
    assert h["error"] == b"bad_timestamp"
    assert h["error.detail"] == out.detail.encode()
    assert h["source.topic"] == b"ticks"
    assert h["source.partition"] == b"3"
    assert h["source.offset"] == b"12345"


def test_rejection_headers_detail_is_bounded_bytes() -> None:
    rej = Rejection(Reason.BAD_TYPE, "é" * 5000 + "\ud800", b"k", b"v", SRC)
    detail = dict(rej.headers())["error.detail"]
    assert isinstance(detail, bytes)
    assert len(detail) <= 1000


# ---------------------------------------------------------------- property tests


def _check(out: Tick | Rejection, key: bytes | None, value: bytes, n_features: int) -> None:
    if isinstance(out, Tick):
        assert isinstance(out.stream, str) and out.stream
        assert key is not None and out.stream == key.decode()  # the key alone names the stream
        out.stream.encode("utf-8")  # the forecast record's Kafka key (sink.py)
        assert isinstance(out.ts, float) and math.isfinite(out.ts)
        assert 0.0 <= out.ts <= 7_258_118_400.0
        assert len(out.values) == n_features
        # NaN only where the document said null or "NA" (missing); the NaN token is non_finite
        assert all(isinstance(v, float) and not math.isinf(v) for v in out.values)
        assert out.source == SRC
    else:
        assert isinstance(out, Rejection)
        assert isinstance(out.reason, Reason)
        assert out.reason.value in {r.value for r in Reason}
        assert out.key is key and out.value is value and out.source == SRC
        assert all(isinstance(v, bytes) for _, v in out.headers())


@settings(max_examples=5000, derandomize=True, database=None, deadline=None)
@given(
    key=st.sampled_from([None, b"", b"s1", b"\xff"]),
    value=st.binary(max_size=256),
    features=st.sampled_from([("value",), AB]),
)
def test_arbitrary_bytes_never_raise(
    key: bytes | None, value: bytes, features: tuple[str, ...]
) -> None:
    out = decode(key, value, SRC, features=features, max_bytes=200)
    _check(out, key, value, len(features))


# Near-miss documents. Each key's value is drawn from a pool of the mistakes producers make
# (every JSON kind: numbers, special floats, large ints, bools, null, strings, ISO-ish strings,
# lists, nested objects) or left out; one wildcard number (any float incl. nan/inf/subnormals, or
# an integer up to 10^400) then lands in a random place. sampled_from keeps Hypothesis' per-example
# cost low: 10,000 examples have to run in seconds.
_MISSING = object()  # the key is left out of the document
_LEAVES: list[Any] = [
    0,
    1,
    -1,
    1.5,
    -2.5e-300,
    1_700_000_000,
    1_700_000_000.5,
    1_700_000_000_123,
    10**11,
    10**11 + 1,
    7_258_118_400,
    7_258_118_401,
    2**53 + 1,
    2**1023,
    2**1024,  # the first integer that no longer fits a float
    10**400,
    -(10**400),
    1e308,
    -1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    True,
    False,
    None,
    "",
    " ",
    "1.5",
    "NaN",
    "Infinity",
    "value",
    "s1",
    "é\ud800",  # a lone surrogate (JSON allows the escape)
    "\x00",
    "2024-01-02T03:04:05Z",
    "2024-01-02T03:04:05.123456+05:30",
    "2024-01-02T03:04:05",
    "2024-01-02",
    "2024-01-02T03:04:05ZZ",
    "2024-02-30T00:00:00Z",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "1970-01-01T00:00:00+00:01",
    "+002024-01-02",
    [],
    {},
    [1.0],
    [1_700_000_000],
    [[None]],
    {"value": 1},
    {"a": float("nan")},
    {"a": {"b": {"c": [1, {"d": None}]}}},
]
_VALUES_OBJECTS: list[Any] = [
    {},
    {"value": 1.5},
    {"value": None},
    {"value": "1"},
    {"value": 10**400},
    {"value": float("inf")},
    {"a": 1, "b": 2},
    {"a": 1},
    {"b": -2.5},
    {"a": 1, "b": 2, "c": 3},
    {"a": "1", "b": 2},
    {"a": float("nan"), "b": 1},
    {"a": True, "b": 2},
    {"a": {"x": 1}, "b": [1]},
    {"a": 1e308, "b": -1e308},
    {"value": 1, "a": 1, "b": 2},
]
_STREAMS: list[Any] = ["s", "", " ", "é\ud800", "\x00", 1, None, True, ["s"], {"s": 1}]
_WILDCARD = st.one_of(st.floats(), st.integers(min_value=-(10**400), max_value=10**400))
_PLACES = ["ts", "value", "values.a", "values.b", "values.value", "stream", "nowhere"]


def _assemble(parts: tuple[Any, ...]) -> dict[str, Any]:
    ts, value, values, stream, place, wildcard = parts
    document = {
        k: v
        for k, v in (("ts", ts), ("value", value), ("values", values), ("stream", stream))
        if v is not _MISSING
    }
    if place.startswith("values."):
        inner = document.get("values")
        inner = dict(inner) if isinstance(inner, dict) else {}
        inner[place.removeprefix("values.")] = wildcard
        document["values"] = inner
    elif place != "nowhere":
        document[place] = wildcard
    return document


# Repeated entries weight the pools towards almost-valid documents, so that Ticks are common.
_GOOD_TS: list[Any] = [1_700_000_000, 1_700_000_000.5, 1_700_000_000_123, "2024-01-02T03:04:05Z"]
_GOOD_NUMBERS: list[Any] = [0, -1, 1.5, 1e-300, 1e300]
_near_miss = st.tuples(
    st.sampled_from([*(_GOOD_TS * 20), *_LEAVES, _MISSING]),
    st.sampled_from([*(_GOOD_NUMBERS * 12), *_LEAVES, _MISSING]),
    st.sampled_from([*(_MISSING,) * 20, *_VALUES_OBJECTS, *_LEAVES]),
    st.sampled_from([*(_MISSING,) * 5, *(["s"] * 10), *_STREAMS]),
    st.sampled_from(_PLACES),
    _WILDCARD,
).map(_assemble)


@settings(
    max_examples=5000,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    key=st.sampled_from([*([b"s1"] * 6), None, b"", b"\xff"]),
    document=_near_miss,
    features=st.sampled_from([("value",), AB]),
)
def test_near_miss_documents_never_raise(
    key: bytes | None, document: dict[str, Any], features: tuple[str, ...]
) -> None:
    value = json.dumps(document).encode()  # NaN/Infinity floats become JSON tokens
    out = decode(key, value, SRC, features=features)
    _check(out, key, value, len(features))


# ---------------------------------------------------------------- forecast records


def test_encode_forecast_round_trips() -> None:
    raw = encode_forecast("s/é", 1_700_000_000.5, 42, [1.0, 2, -3.5e-7], "forecaster-abc", True)
    assert isinstance(raw, bytes)
    out = json.loads(raw)
    assert out == {
        "stream": "s/é",
        "ts": 1_700_000_000.5,
        "seq": 42,
        "forecast": [1.0, 2.0, -3.5e-7],
        "model": "forecaster-abc",
        "warm": True,
    }
    assert all(isinstance(v, float) for v in out["forecast"])


def test_encode_forecast_accepts_numpy() -> None:
    raw = encode_forecast("s", 1.0, 1, np.array([0.1, 0.2]), "m", False)
    out = json.loads(raw)
    assert out["forecast"] == [0.1, 0.2]
    assert out["warm"] is False


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@given(
    rows=st.lists(
        st.tuples(
            st.text(max_size=8),  # stream names, escapes and non-ASCII included
            finite,
            st.integers(0, 2**53),
            st.lists(finite, min_size=3, max_size=3),
            st.booleans(),
        ),
        min_size=1,
        max_size=20,
    ),
    bounds=st.booleans(),
)
def test_batch_encoder_writes_what_the_reference_encoder_writes(
    rows: list[tuple[str, float, int, list[float], bool]], bounds: bool
) -> None:
    """ForecastEncoder (orjson straight from numpy arrays) against encode_forecast (repr per
    float): the same documents, every float bit for bit, at magnitudes 1e-308..1e308."""
    streams = [r[0] for r in rows]
    ts = np.array([r[1] for r in rows])
    seq = np.array([r[2] for r in rows])
    forecast = np.array([r[3] for r in rows])
    warm = [r[4] for r in rows]
    lower, upper = forecast - 1.0, forecast + 1.0
    got = ForecastEncoder().encode(
        streams, ts, seq, forecast, "m-1", warm, (lower, upper) if bounds else None
    )
    for i, raw in enumerate(got):
        ref = encode_forecast(
            streams[i], float(ts[i]), int(seq[i]), forecast[i], "m-1", warm[i],
            (lower[i], upper[i]) if bounds else None,
        )  # fmt: skip
        assert json.loads(raw) == json.loads(ref)
