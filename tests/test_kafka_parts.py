"""Source, Sink, the changelog reader and StateKeeper, each on its own against a real broker."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from pipeline.checkpoint import StateKeeper
from pipeline.config import Settings, load_settings
from pipeline.engine import Engine
from pipeline.errors import FencedError, TransactionFailed
from pipeline.messages import Reason, Rejection, Source, Tick
from pipeline.model import load_model
from pipeline.sink import AtLeastOnceSink, ExactlyOnceSink
from pipeline.source import TOMBSTONE_OFFSET_HEADER, Polled, read_changelog
from pipeline.source import Source as TickSource
from pipeline.ticks import TickBatch
from tests.kafka_helpers import create_topics, produce, read_topic, unique
from tests.model_helpers import random_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("kafka_client")]

T0 = 1_700_000_000.0


def settings(bootstrap: str, **kafka: Any) -> Settings:
    names = {"input_topic": unique("in"), "output_topic": unique("out"),
             "dlq_topic": unique("dlq"), "group_id": unique("g")}  # fmt: skip
    base = {"bootstrap_servers": bootstrap, "session_timeout_ms": 2000,
            "heartbeat_interval_ms": 500, **names, **kafka}  # fmt: skip
    return load_settings(overrides={"kafka": base, "metrics": {"port": 0}})


def poll_all(source: TickSource, count: int, timeout_s: float = 30) -> Polled:
    """Poll until ``count`` records came; merges the polls into one Polled."""
    polls: list[Polled] = []
    deadline = time.monotonic() + timeout_s
    while sum(map(len, polls)) < count and time.monotonic() < deadline:
        polls.append(source.poll(200))
    ticks = [t for p in polls for t in p.ticks.ticks()]
    merged = Polled(TickBatch.from_ticks(ticks), [r for p in polls for r in p.rejections])
    for polled in polls:
        merged.offsets.update(polled.offsets)
        for p, o in polled.starts.items():
            merged.starts.setdefault(p, o)
    assert len(merged) == count, f"{len(merged)} of {count} records"
    return merged


def tick_record(stream: str, t: int, value: float = 1.0) -> tuple[bytes, bytes]:
    return stream.encode(), json.dumps({"ts": T0 + t, "value": value}).encode()


# ---------------------------------------------------------------- Source


CLIENT_MODULES = {"kafka-python": "pipeline.clients.kafka_python",
                  "confluent-kafka": "pipeline.clients.confluent"}  # fmt: skip


def test_source_decodes_a_poll_and_rewinds_to_its_first_offsets(
    bootstrap: str, kafka_client: str
) -> None:
    s = settings(bootstrap)
    kafka = s.kafka
    create_topics(bootstrap, [kafka.input_topic], 1)
    produce(bootstrap, kafka.input_topic,
            [tick_record("a", t) for t in range(5)] + [(b"a", b"{oops")])  # fmt: skip
    source = TickSource(kafka, features=("value",), max_record_bytes=1024)
    # The parametrized suite really runs each client (not the default twice).
    assert type(source.consumer).__module__ == CLIENT_MODULES[kafka_client]
    try:
        first = poll_all(source, 6)
        assert first.ticks.offset.tolist() == [0, 1, 2, 3, 4] and len(first.rejections) == 1
        assert first.starts == {0: 0} and first.offsets == {0: 6}
        bad = first.rejections[0]
        assert isinstance(bad, Rejection) and bad.reason is Reason.INVALID_JSON
        assert bad.source == Source(kafka.input_topic, 0, 5, bad.source.timestamp_ms)
        source.rewind_to(first.starts)  # a rolled-back batch: the same records come again
        again = poll_all(source, 6)
        assert again.ticks.offset.tolist() == list(range(5))
        assert [r.source.offset for r in again.rejections] == [5]
        assert source.committed([0]) == {0: 0}
        assert source.commit(again.offsets)
        assert source.committed([0]) == {0: 6}
    finally:
        source.close()


# ---------------------------------------------------------------- Sink


def _forecast_batch(engine: Engine, partition: int = 0) -> Any:
    ticks = [Tick("s1", T0 + t, (float(t),), Source("in", partition, t)) for t in range(3)]
    return engine.process(ticks)


def test_at_least_once_sink_writes_forecasts_dead_letters_and_state(bootstrap: str) -> None:
    s = settings(bootstrap)
    kafka, changelog = s.kafka, unique("state")
    create_topics(bootstrap, [kafka.output_topic, kafka.dlq_topic, changelog], 2)
    engine = Engine(load_model(None))
    batch = _forecast_batch(engine)
    rejection = Rejection(Reason.NON_FINITE, "value is NaN", b"k", b"v", Source("in", 1, 7))
    sink = AtLeastOnceSink(kafka, changelog_topic=changelog)
    assert type(sink.producer).__module__ == CLIENT_MODULES[kafka.client]
    try:
        sink.send_forecasts(batch, engine.version)
        sink.send_dead_letters([rejection])
        sink.send_state([(1, b"s1", engine.store.snapshot("s1"), []),
                         (0, b"gone", None, [(TOMBSTONE_OFFSET_HEADER, b"41")])])  # fmt: skip
        sink.flush()
    finally:
        sink.close()
    forecasts = read_topic(bootstrap, kafka.output_topic, 3)
    assert [r.json()["seq"] for r in forecasts] == [1, 2, 3]
    assert [r.headers["source.offset"] for r in forecasts] == [b"0", b"1", b"2"]
    (dead,) = read_topic(bootstrap, kafka.dlq_topic, 1)
    assert (dead.key, dead.value, dead.headers["error"]) == (b"k", b"v", b"non_finite")
    assert dead.headers["source.partition"] == b"1" and dead.headers["source.offset"] == b"7"
    state = {r.key: r for r in read_topic(bootstrap, changelog, 2)}
    assert state[b"s1"].partition == 1 and state[b"s1"].value == engine.store.snapshot("s1")
    assert state[b"gone"].partition == 0 and state[b"gone"].value is None
    assert state[b"gone"].headers[TOMBSTONE_OFFSET_HEADER] == b"41"


def test_sink_never_sends_state_to_a_negative_partition(bootstrap: str) -> None:
    s = settings(bootstrap)
    changelog = unique("state")
    create_topics(bootstrap, [changelog], 1)
    sink = AtLeastOnceSink(s.kafka, changelog_topic=changelog)
    try:
        sink.send_state([(-1, b"ghost", b"x", []), (0, b"real", None, [])])
        sink.flush()
    finally:
        sink.close()
    # (A send to partition -1 raised ValueError out of the daemon before: the poison pill.)
    assert [r.key for r in read_topic(bootstrap, changelog, 1)] == [b"real"]


def _eos(bootstrap: str) -> tuple[Settings, TickSource, ExactlyOnceSink, str]:
    s = settings(bootstrap)
    kafka = s.kafka
    create_topics(bootstrap, [kafka.input_topic, kafka.output_topic, kafka.dlq_topic], 1)
    produce(bootstrap, kafka.input_topic, [tick_record("s1", t) for t in range(3)])
    source = TickSource(kafka, features=("value",), max_record_bytes=1024)
    txn = unique("txn")
    return s, source, ExactlyOnceSink(kafka, transactional_id=txn), txn


def test_exactly_once_sink_commits_outputs_with_the_offsets(bootstrap: str) -> None:
    s, source, sink, _ = _eos(bootstrap)
    try:
        polled = poll_all(source, 3)
        sink.begin()
        sink.send_forecasts(_forecast_batch(Engine(load_model(None))), "m")
        sink.commit({s.kafka.input_topic: polled.offsets}, source.group_metadata())
        assert source.committed([0]) == {0: 3}
    finally:
        sink.close()
        source.close()
    assert len(read_topic(bootstrap, s.kafka.output_topic, 3)) == 3


def test_a_failed_transaction_raises_transaction_failed_and_the_sink_goes_on(
    bootstrap: str,
) -> None:
    s, source, sink, _ = _eos(bootstrap)
    try:
        polled = poll_all(source, 3)
        sink.begin()
        sink.send_forecasts(_forecast_batch(Engine(load_model(None))), "aborted")
        with pytest.raises(TransactionFailed):
            sink._fail("forced by the test")  # what any failed transactional call ends in
        assert source.committed([0]) == {0: 0}  # the offsets did not go through
        sink.begin()  # a fresh producer, the same transactional id
        sink.send_forecasts(_forecast_batch(Engine(load_model(None))), "committed")
        sink.commit({s.kafka.input_topic: polled.offsets}, source.group_metadata())
        assert source.committed([0]) == {0: 3}
    finally:
        sink.close()
        source.close()


@pytest.mark.parametrize("fenced_before_begin", [True, False])
def test_a_fenced_sink_raises_fenced_error_instead_of_taking_the_id_back(
    bootstrap: str, fenced_before_begin: bool
) -> None:
    s, source, sink, txn = _eos(bootstrap)
    usurper = None
    try:
        polled = poll_all(source, 3)

        def fence() -> KafkaProducer:
            producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=txn,
                                     enable_idempotence=True)  # fmt: skip
            producer.init_transactions()
            return producer

        if fenced_before_begin:
            usurper = fence()
        sink.begin()
        sink.send_forecasts(_forecast_batch(Engine(load_model(None))), "m")
        if not fenced_before_begin:
            usurper = fence()
        with pytest.raises(FencedError, match="fenced"):
            sink.commit({s.kafka.input_topic: polled.offsets}, source.group_metadata())
        # The usurper still owns the id: the fenced sink did not fence it back.
        usurper.begin_transaction()
        usurper.send(s.kafka.output_topic, b"usurper")
        usurper.commit_transaction()
    finally:
        if usurper is not None:
            usurper.close()
        sink.close()
        source.close()


# ---------------------------------------------------------------- changelog reader


def test_read_changelog_keeps_records_below_the_committed_offset_only(
    bootstrap: str, tmp_path: Path
) -> None:
    kafka = settings(bootstrap).kafka
    topic = unique("state")
    create_topics(bootstrap, [topic], 1)
    engine = Engine(load_model(random_model(tmp_path / "m.pt")))
    snaps = {}
    for offset in (3, 5, 15):  # states of stream a after input offsets 3, 5 and 15
        engine.process([Tick("a", T0 + offset, (float(offset),), Source("in", 0, offset))])
        snaps[offset] = engine.store.snapshot("a")
    engine.process([Tick("b", T0, (1.0,), Source("in", 0, 2))])
    b_snap = engine.store.snapshot("b")
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for key, value, headers in [
        (b"a", snaps[3], []),
        (b"b", b_snap, []),
        (b"c", b_snap, []),
        (b"a", snaps[5], []),
        (b"junk", b"\x09 not a snapshot", []),
        (b"b", None, [(TOMBSTONE_OFFSET_HEADER, b"12")]),  # an eviction with the batch to 12
        (b"c", None, []),  # a tombstone of an older version: always honoured
        (b"a", snaps[15], []),
    ]:
        producer.send(topic, key=key, value=value, headers=headers, partition=0)
    producer.flush()
    producer.close()

    latest, count = read_changelog(kafka, topic, {0: 10})  # committed up to offset 9
    assert count == 8
    assert latest == {"a": snaps[5], "b": b_snap, "c": None}  # b's eviction did not commit
    latest, _ = read_changelog(kafka, topic, {0: 20})
    assert latest == {"a": snaps[15], "b": None, "c": None}
    assert read_changelog(kafka, unique("none"), {0: 5}) == ({}, 0)


# ---------------------------------------------------------------- StateKeeper


def _keeper(bootstrap: str, tmp_path: Path, **state: Any) -> tuple[StateKeeper, Engine]:
    s = settings(bootstrap)
    s = s.model_copy(update={"state": s.state.model_copy(update=state)})
    engine = Engine(load_model(random_model(tmp_path / "m.pt")))
    return StateKeeper(s, engine.store), engine


def test_evictions_take_streams_of_the_batch_partitions_and_tag_their_tombstones(
    bootstrap: str, tmp_path: Path
) -> None:
    keeper, engine = _keeper(bootstrap, tmp_path, max_streams=4, evict_interval_seconds=0.001)
    for k in range(6):  # seen one after the other: s0 longest ago
        engine.process([Tick(f"s{k}", T0, (1.0,), Source("in", k % 2, k))])
    time.sleep(0.01)
    records = keeper.evictions({1: 40})  # the batch read partition 1 only, up to offset 40
    evicted = sorted(key.decode() for _, key, _, _ in records)
    assert evicted == ["s1", "s3"]  # the oldest of partition 1; partition 0 waits for its turn
    assert all(value is None and headers == [(TOMBSTONE_OFFSET_HEADER, b"40")]
               for _, _, value, headers in records)  # fmt: skip
    assert sorted(engine.store.slot_of) == ["s0", "s2", "s4", "s5"]


def test_a_rolled_back_eviction_is_owed_to_the_next_batch_of_its_partition(
    bootstrap: str, tmp_path: Path
) -> None:
    keeper, engine = _keeper(bootstrap, tmp_path, max_streams=3, evict_interval_seconds=60)
    store = engine.store
    engine.process([Tick(f"s{k}", T0, (1.0,), Source("in", 0, k)) for k in range(4)])
    keeper._next_evict = 0.0
    store.track()
    assert [k for _, k, _, _ in keeper.evictions({0: 3})] == [b"s0"]
    store.rollback()
    keeper.batch_aborted()
    assert "s0" in store and len(store) == 4
    assert keeper.evictions({1: 9}) == []  # not this partition: the eviction stays owed
    (record,) = keeper.evictions({0: 5})  # the interval is not due, the debt is paid anyway
    assert record[1] == b"s0" and record[3] == [(TOMBSTONE_OFFSET_HEADER, b"5")]
    keeper.batch_committed()
    assert keeper.evictions({0: 6}) == []


def test_keeper_restores_in_bulk_what_it_wrote(bootstrap: str, tmp_path: Path) -> None:
    keeper, engine = _keeper(bootstrap, tmp_path)
    create_topics(bootstrap, [keeper.topic], 2)
    engine.process([Tick(f"s{k}", T0 + t, (float(k + t),), Source("in", k % 2, 10 * t + k))
                    for t in range(4) for k in range(20)])  # fmt: skip
    sink = AtLeastOnceSink(keeper.settings.kafka, changelog_topic=keeper.topic)
    try:
        sink.send_state(keeper.records(sorted(engine.store.slot_of)))
        sink.flush()
    finally:
        sink.close()
    before = {s: engine.store.snapshot(s) for s in engine.store.slot_of}
    for stream in list(engine.store.slot_of):
        engine.store.evict(stream)
    report = keeper.restore({0: 100, 1: 100})
    assert (report.streams, report.records, report.unusable) == (20, 20, 0)
    assert {s: engine.store.snapshot(s) for s in engine.store.slot_of} == before
    report = keeper.restore({1: 100})  # partition 1 only: its streams again, none of 0's lost
    assert report.streams == 10 and len(engine.store) == 20
