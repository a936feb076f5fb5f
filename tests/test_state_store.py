"""StateStore: snapshot bytes, bulk install, and the undo log that rolls a batch back.

The stateful test drives an engine with generated batches of odd ticks (missing targets, late
and duplicate times, magnitudes from 1e-300 to 1e300, new streams mid-batch), aborts some of
them, evicts, and moves state through snapshots; after every step it checks the invariants
the daemon relies on.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pipeline.combine import CombineConfig
from pipeline.engine import Engine
from pipeline.messages import Source, Tick
from pipeline.model import load_model
from pipeline.state import SNAPSHOT_VERSION, Snapshot, StateStore, snapshot_offset
from tests.model_helpers import random_model

T0 = 1.7e9


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_model(tmp_path_factory.mktemp("m") / "m.pt", layers=(6, 3), horizon=2)


def fed_engine(
    path: Path, streams: int = 5, ticks: int = 8, combine: CombineConfig | None = None
) -> Engine:
    engine = Engine(load_model(path), capacity=2, combine=combine)
    rng = np.random.default_rng(0)
    batch = [
        Tick(f"s{k}", T0 + t, (float(rng.normal(10.0**k, 1)),), Source("in", k % 3, 10 * t + k))
        for t in range(ticks)
        for k in range(streams)
    ]
    engine.process(batch)
    return engine


def all_snapshots(store: StateStore) -> dict[str, bytes]:
    return {s: store.snapshot(s) for s in store.slot_of}


# ---------------------------------------------------------------- snapshot bytes


def test_snapshot_decodes_to_what_was_stored(model_path: Path) -> None:
    store = fed_engine(model_path).store
    blob = store.snapshot("s2")
    snap = Snapshot.decode(blob)
    slot = store.slot_of["s2"]
    assert (snap.partition, snap.offset, snap.seq) == (2, 72, 8)
    assert snap.prev_forecast == store.prev_forecast[slot]
    width = store.normalizer.snapshot_width
    assert snap.stats[:width] == store.normalizer.snapshot(slot)
    combiner = store.combiner.snapshot_rows(np.array([slot]))[0]
    assert snap.stats[width:] == combiner.tolist()
    assert len(snap.stats) == width + store.combiner.snapshot_width
    hidden = np.frombuffer(snap.hidden, dtype=np.float32)
    np.testing.assert_array_equal(hidden, torch.cat([h[slot] for h in store.hidden]).numpy())
    assert snapshot_offset(blob) == 72


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x01",
        bytes([SNAPSHOT_VERSION + 1]) + bytes(40),  # unknown version
        struct.pack("<BiqqdHH", SNAPSHOT_VERSION, 0, 1, 1, 0.0, 3, 2) + bytes(8 * 3 + 4 * 2 - 1),
        struct.pack("<BiqqdHH", SNAPSHOT_VERSION, 0, 1, 1, 0.0, 3, 2) + bytes(8 * 3 + 4 * 2 + 4),
    ],
)
def test_snapshot_decode_refuses_what_is_not_a_snapshot(blob: bytes) -> None:
    with pytest.raises(ValueError):
        Snapshot.decode(blob)
    if len(blob) < 33 or blob[0] != SNAPSHOT_VERSION:
        with pytest.raises(ValueError):
            snapshot_offset(blob)


# ---------------------------------------------------------------- bulk install


def test_bulk_install_equals_one_by_one_restore(model_path: Path) -> None:
    source = fed_engine(model_path, streams=40, ticks=6).store
    blobs = all_snapshots(source)
    one = Engine(load_model(model_path), capacity=2).store
    for stream, blob in blobs.items():
        assert one.restore(stream, Snapshot.decode(blob))
    bulk = Engine(load_model(model_path), capacity=2).store
    report = bulk.install(blobs)
    assert (report.installed, report.cold_hidden, report.unusable) == (40, 0, [])
    assert all_snapshots(bulk) == all_snapshots(one) == blobs


def test_install_leaves_out_unusable_values_and_starts_unfit_hidden_cold(
    model_path: Path, tmp_path: Path
) -> None:
    blobs = all_snapshots(fed_engine(model_path).store)
    blobs["garbage"] = b"\x07not a snapshot at all, but long enough to have a header"
    blobs["short"] = b"\x01"
    other = random_model(tmp_path / "wide.pt", layers=(5,), horizon=2)  # other hidden sizes
    store = Engine(load_model(other), capacity=2).store
    report = store.install(blobs)
    assert sorted(report.unusable) == ["garbage", "short"]
    assert report.installed == report.cold_hidden == 5
    slot = store.slot_of["s1"]
    assert float(store.hidden[0][slot].abs().sum()) == 0.0
    assert store.seq[slot] == 8 and store.normalizer.count[slot] == 8
    two_features = random_model(tmp_path / "two.pt", ("x", "c"), layers=(6, 3), horizon=2)
    report = Engine(load_model(two_features)).store.install(blobs)
    assert report.installed == 0 and len(report.unusable) == 7  # statistics do not fit


# ---------------------------------------------------------------- undo log


def test_rollback_puts_back_changed_created_and_evicted_streams(model_path: Path) -> None:
    engine = fed_engine(model_path)
    store = engine.store
    before = all_snapshots(store)
    store.track()
    engine.process([Tick("s0", T0 + 20, (5.0,), Source("in", 0, 500)),
                    Tick("fresh", T0 + 20, (5.0,), Source("in", 1, 501))])  # fmt: skip
    store.evict("s3")
    store.evict("fresh")
    engine.process([Tick("newer", T0 + 21, (1.0,), Source("in", 2, 502))])
    assert store.rollback() == 2  # s0 changed, s3 evicted
    assert all_snapshots(store) == before
    assert store.rollback() == 0  # nothing open: nothing to do


def test_settle_makes_the_batch_final(model_path: Path) -> None:
    engine = fed_engine(model_path)
    store = engine.store
    store.track()
    engine.process([Tick("s0", T0 + 20, (5.0,), Source("in", 0, 500))])
    after = all_snapshots(store)
    store.settle()
    assert store.rollback() == 0 and all_snapshots(store) == after


def test_rollback_survives_growth_of_the_arrays(model_path: Path) -> None:
    engine = fed_engine(model_path)
    store = engine.store
    before = all_snapshots(store)
    store.track()
    engine.process([Tick(f"n{k}", T0 + 30, (1.0,), Source("in", 0, 600 + k)) for k in range(50)])
    engine.process([Tick("s4", T0 + 31, (1.0,), Source("in", 1, 700))])
    assert store.capacity >= 55
    store.rollback()
    assert all_snapshots(store) == before


# ---------------------------------------------------------------- stateful, randomized

STREAMS = [f"s{k}" for k in range(6)]
VALUES = st.one_of(
    st.floats(-1e3, 1e3, allow_nan=False),
    st.sampled_from([math.nan, 0.0, 1e-300, -1e-300, 1e300, -1e300, 1e150, 5e-324]),
)
TICK = st.tuples(st.sampled_from(STREAMS), st.integers(-3, 6), VALUES)


def _assert_same_forecasts(
    got: list[dict[str, list[tuple[int, list[float]]]]],
    want: list[dict[str, list[tuple[int, list[float]]]]],
) -> None:
    """Same streams and seqs in every batch; forecasts equal to float rounding."""
    assert len(got) == len(want)
    for got_rows, want_rows in zip(got, want, strict=True):
        assert got_rows.keys() == want_rows.keys()
        for stream, rows in want_rows.items():
            assert [seq for seq, _ in got_rows[stream]] == [seq for seq, _ in rows]
            a = np.array([f for _, f in got_rows[stream]])
            b = np.array([f for _, f in rows])
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


class EngineUnderFaults(RuleBasedStateMachine):
    """A model of what the daemon needs from engine + store, checked against the real thing."""

    path: Path

    def __init__(self) -> None:
        super().__init__()
        self.engine = Engine(load_model(self.path), capacity=2, late_policy="dead_letter")
        self.store = self.engine.store
        self.clock = 0.0  # event time moves on by the generated deltas (negative: late)
        self.offsets = [0, 0, 0]
        self.accepted: dict[str, int] = {}  # model: forecasts so far per live stream

    def _ticks(self, spec: list[tuple[str, int, float]]) -> list[Tick]:
        out = []
        for stream, dt, value in spec:
            self.clock += dt
            partition = int(stream[1:]) % 3
            source = Source("in", partition, self.offsets[partition])
            out.append(Tick(stream, T0 + self.clock, (value,), source))
            self.offsets[partition] += 1
        return out

    def _process(self, ticks: list[Tick]) -> dict[str, list[tuple[int, list[float]]]]:
        with np.errstate(all="ignore"):
            out = self.engine.process(ticks)
        assert len(out) + len(out.late) + len(out.missing) == len(ticks)  # one outcome each
        assert np.isfinite(out.forecast).all()
        rows: dict[str, list[tuple[int, list[float]]]] = {}
        for i, t in enumerate(out.ticks):
            rows.setdefault(t.stream, []).append((int(out.seq[i]), out.forecast[i].tolist()))
        assert sorted(out.touched) == sorted(rows)  # touched = streams with a forecast
        for t in out.missing:
            assert math.isnan(t.values[0])
        return rows

    def _count(self, rows: dict[str, list[tuple[int, list[float]]]]) -> None:
        for stream, got in rows.items():
            start = self.accepted.get(stream, 0)
            assert [s for s, _ in got] == list(range(start + 1, start + 1 + len(got)))
            self.accepted[stream] = start + len(got)

    @rule(spec=st.lists(TICK, max_size=25))
    def commit_a_batch(self, spec: list[tuple[str, int, float]]) -> None:
        self.store.track()
        rows = self._process(self._ticks(spec))
        self.store.settle()
        self._count(rows)

    @rule(
        specs=st.lists(st.lists(TICK, min_size=1, max_size=12), min_size=1, max_size=3),
        evicts=st.lists(st.one_of(st.none(), st.sampled_from(STREAMS)), min_size=3, max_size=3),
    )
    def abort_a_transaction_then_retry_it(
        self, specs: list[list[tuple[str, int, float]]], evicts: list[str | None]
    ) -> None:
        """One transaction of several micro-batches, with evictions between them (a stream
        created, evicted and created again inside it, say), aborted: everything is undone."""
        before = all_snapshots(self.store)
        batches = [self._ticks(spec) for spec in specs]

        def run() -> list[dict[str, list[tuple[int, list[float]]]]]:
            self.store.track()
            out = []
            for ticks, evict in zip(batches, evicts, strict=False):
                out.append(self._process(ticks))
                if evict is not None:
                    self.store.evict(evict)
            return out

        first = run()
        self.store.rollback()
        assert all_snapshots(self.store) == before
        # The same records again: the same forecasts, to float rounding (a stream created
        # again after the rollback may take another slot; waves run in slot order, and the
        # GRU's batched matmul may round a row differently at another position).
        again = run()
        self.store.settle()
        _assert_same_forecasts(again, first)
        for rows, evict in zip(again, evicts, strict=False):
            self._count(rows)
            if evict is not None:
                self.accepted.pop(evict, None)

    @precondition(lambda self: len(self.store) > 0)
    @rule(data=st.data())
    def evict_a_stream(self, data: st.DataObject) -> None:
        stream = data.draw(st.sampled_from(sorted(self.store.slot_of)))
        assert self.store.evict(stream)
        del self.accepted[stream]

    @rule()
    def move_state_through_snapshots(self) -> None:
        blobs = all_snapshots(self.store)
        fresh = Engine(load_model(self.path), capacity=2, late_policy="dead_letter")
        report = fresh.store.install(blobs)
        assert report.installed == len(blobs) and not report.unusable
        assert all_snapshots(fresh.store) == blobs
        self.engine, self.store = fresh, fresh.store

    @invariant()
    def bulk_snapshots_equal_one_by_one(self) -> None:
        streams = sorted(self.store.slot_of)
        assert self.store.snapshots(streams) == [self.store.snapshot(s) for s in streams]

    @invariant()
    def only_streams_with_forecasts_hold_state(self) -> None:
        assert sorted(self.store.slot_of) == sorted(self.accepted)
        for stream, slot in self.store.slot_of.items():
            assert self.store.seq[slot] == self.accepted[stream]
            assert self.store.partition[slot] == int(stream[1:]) % 3
            assert self.store.offset[slot] >= 0
        assert all(bool(torch.isfinite(h).all()) for h in self.store.hidden)


def test_engine_and_store_under_generated_batches_and_faults(model_path: Path) -> None:
    EngineUnderFaults.path = model_path
    run = EngineUnderFaults.TestCase
    run.settings = settings(
        max_examples=60,
        stateful_step_count=15,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    run().runTest()


def test_bulk_snapshots_of_a_covariate_model_equal_one_by_one(tmp_path: Path) -> None:
    path = random_model(tmp_path / "cov.pt", ("value", "load", "temp"), layers=(6, 3))
    engine = Engine(load_model(path))
    rng = np.random.default_rng(4)
    ticks = [
        Tick(f"s{k}", T0 + t, tuple(rng.normal(10, 2, 3).tolist()), Source("in", k % 3, 7 * t + k))
        for t in range(6)
        for k in range(9)
    ]
    engine.process(ticks)
    streams = ["s4", "s0", "s8"]
    assert engine.store.snapshots(streams) == [engine.store.snapshot(s) for s in streams]
    assert engine.store.snapshots([]) == []


def installed_both_ways(
    path: Path, stream: str, blob: bytes, combine: CombineConfig | None = None
) -> Iterator[tuple[StateStore, int]]:
    """``blob`` installed as ``stream`` into a fresh store in bulk, then into another one by
    one: each store with the stream's slot."""
    for install in ("bulk", "one"):
        target = Engine(load_model(path), capacity=2, combine=combine).store
        if install == "bulk":
            assert target.install({stream: blob}).installed == 1
        else:
            assert target.restore(stream, Snapshot.decode(blob))
        yield target, target.slot_of[stream]


def test_a_version_1_snapshot_installs_with_a_fresh_combination(model_path: Path) -> None:
    """Changelog values written before the combination existed (normalizer numbers only) still
    restore the normalizer, hidden state and seq; the combination starts from its prior."""
    source = fed_engine(model_path).store
    slot = source.slot_of["s2"]
    norm = source.normalizer.snapshot(slot)
    hidden = b"".join(h[slot].numpy().tobytes() for h in source.hidden)
    header = struct.pack("<BiqqdHH", 1, 2, 72, 8, 1.5, len(norm), sum(source.state_sizes))
    v1 = header + struct.pack(f"<{len(norm)}d", *norm) + hidden
    for target, t in installed_both_ways(model_path, "s2", v1):
        assert target.normalizer.snapshot(t) == norm and target.seq[t] == 8
        fresh = Engine(load_model(model_path), capacity=1).store.combiner.snapshot_rows(
            np.array([0])
        )
        np.testing.assert_array_equal(target.combiner.snapshot_rows(np.array([t])), fresh)
        assert Snapshot.decode(target.snapshot("s2")).stats[: len(norm)] == norm


def test_a_version_2_snapshot_installs_with_equal_weights_and_the_rest_kept(
    model_path: Path,
) -> None:
    """Version 2 held each member's recent mean error where version 3 holds weights: such a
    value installs everything but the weights, which start equal (decision 30)."""
    source = fed_engine(model_path, streams=3, ticks=30).store
    slot = source.slot_of["s2"]
    current = Snapshot.decode(source.snapshot("s2"))
    v2 = bytes([2]) + source.snapshot("s2")[1:]
    comb = source.combiner
    for target, t in installed_both_ways(model_path, "s2", v2):
        equal = 1 / len(comb.members)
        assert np.abs(comb.mix_weights[slot] - equal).max() > 0.01  # the source had learned
        assert (target.combiner.mix_weights[t] == equal).all()
        for name in ("ticks", "history", "rings", "q"):
            np.testing.assert_array_equal(getattr(target.combiner, name)[t],
                                          getattr(comb, name)[slot])  # fmt: skip
        assert target.seq[t] == current.seq
        assert Snapshot.decode(target.snapshot("s2")).version == SNAPSHOT_VERSION


def test_a_version_3_snapshot_with_a_season_installs_its_shorter_history(
    model_path: Path,
) -> None:
    """With a season, version 3 held the history of one season's change; the version-4 history
    reaches SEASONS seasons back (decision 32). Such a value installs with every kept tick in
    its place and the older ticks taken from the same phase of the oldest kept season, so the
    mean change over seasons starts as version 3's one-season change."""
    config = CombineConfig(season=4)
    source = fed_engine(model_path, streams=3, ticks=60, combine=config).store
    comb, slot = source.combiner, source.slot_of["s2"]
    old, new, m = comb.length_v3, comb.length, config.season
    assert old < new
    n = int(comb.ticks[slot])
    kept = np.arange(n - old, n)  # the ticks version 3 held, at tick mod old
    history_v3 = np.zeros(old)
    history_v3[kept % old] = comb.history[slot, kept % new]
    current = Snapshot.decode(source.snapshot("s2"))
    n_norm = source.normalizer.snapshot_width
    stats = current.stats[: n_norm + 1] + history_v3.tolist() + current.stats[n_norm + 1 + new :]
    header = struct.pack("<BiqqdHH", 3, current.partition, current.offset, current.seq,
                         current.prev_forecast, len(stats), len(current.hidden) // 4)  # fmt: skip
    v3 = header + struct.pack(f"<{len(stats)}d", *stats) + current.hidden
    for target, t in installed_both_ways(model_path, "s2", v3, config):
        got = target.combiner
        for name in ("ticks", "rings", "mix_weights", "q"):
            np.testing.assert_array_equal(getattr(got, name)[t], getattr(comb, name)[slot])
        np.testing.assert_array_equal(got.history[t, kept % new], comb.history[slot, kept % new])
        for tick in range(n - new, n - old):  # filled: the same phase, seasons later
            later = tick + m * -(-(n - old - tick) // m)
            assert n - old <= later < n - old + m
            assert got.history[t, tick % new] == comb.history[slot, later % new]
        assert Snapshot.decode(target.snapshot("s2")).version == SNAPSHOT_VERSION
