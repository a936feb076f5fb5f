"""Failed transactions: rolled back in memory, retried, never fatal; fencing stops the daemon.

In-process daemons (``Daemon.step``) on the shared broker, with failures injected through the
sink's own failure path (``ExactlyOnceSink._fail``: abort, fresh producer, TransactionFailed),
so what is exercised is the code a real broker failure runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from kafka import KafkaProducer
from prometheus_client import REGISTRY

from pipeline import transaction
from pipeline.clients import ClientError
from pipeline.config import Settings, load_settings
from pipeline.daemon import Daemon
from pipeline.engine import Engine
from pipeline.errors import ConfigError, TransactionsUnsupported
from pipeline.messages import Source, Tick, decode
from pipeline.model import load_model
from pipeline.sink import AtLeastOnceSink, ExactlyOnceSink
from pipeline.source import Source as PollSource
from tests.chaos_daemon import fail_in_background
from tests.kafka_helpers import DaemonProcess, create_topics, produce, read_topic, unique

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("kafka_client")]

T0 = 1_700_000_000.0


def _settings(bootstrap: str, inp: str, group: str, **extra: Any) -> Settings:
    kafka = {"bootstrap_servers": bootstrap, "input_topic": inp, "output_topic": unique("fc"),
             "dlq_topic": unique("dlq"), "group_id": group, "session_timeout_ms": 2000,
             "heartbeat_interval_ms": 500, "instance_id": "one"}  # fmt: skip
    kafka.update(extra.pop("kafka", {}))
    return load_settings(overrides={"kafka": kafka, "metrics": {"port": 0}, **extra})


def _ticks(start: int, n: int, streams: int) -> list[tuple[bytes | None, bytes | None]]:
    return [
        (f"t{s}".encode(), json.dumps({"ts": T0 + t, "value": 3.0 + s + (t % 5)}).encode())
        for t in range(start, start + n)
        for s in range(streams)
    ]


def _run_until(daemon: Daemon, done: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "condition not reached"
        daemon.step(timeout_ms=200)


def _fail_some(
    sink: ExactlyOnceSink, method: str, pick: Callable[[ExactlyOnceSink], bool]
) -> list[int]:
    """Make ``sink.<method>`` fail through the real failure path when ``pick(sink)``;
    returns a list that counts the failures. A picked ``start_commit`` fails every other time
    at once (a send of the transaction had failed) and otherwise on the call thread, while the
    daemon polls on (tests/chaos_daemon.py)."""
    real = getattr(sink, method)
    failures: list[int] = []

    def flaky(*args: Any) -> None:
        if pick(sink):
            failures.append(1)
            if method == "start_commit" and len(failures) % 2 == 0:
                fail_in_background(sink, *args)
                return
            sink._guard(lambda: (_ for _ in ()).throw(ClientError("injected by the test")))
        real(*args)

    setattr(sink, method, flaky)
    return failures


def _reference(records: list[tuple[bytes | None, bytes | None]]) -> dict[tuple[str, int], list]:
    """(stream, seq) -> forecast of a clean in-process run over the same records, in order."""
    engine = Engine(load_model(None))
    ticks = [decode(k, v, Source("in", 0, i)) for i, (k, v) in enumerate(records)]
    out = engine.process([t for t in ticks if isinstance(t, Tick)])
    return {(t.stream, int(out.seq[i])): out.forecast[i].tolist() for i, t in enumerate(out.ticks)}


def _check(docs: list[dict], ref: dict[tuple[str, int], list]) -> None:
    got: dict[tuple[str, int], list] = {}
    for d in docs:  # repeats (Tansu shows aborted records) must equal the committed copy
        got.setdefault((d["stream"], d["seq"]), d["forecast"])
        np.testing.assert_allclose(d["forecast"], got[(d["stream"], d["seq"])], atol=2e-5)
    assert got.keys() == ref.keys()
    for key, forecast in got.items():  # float32 GRU, other batch shapes: ~1e-6 apart
        np.testing.assert_allclose(forecast, ref[key], rtol=1e-5, atol=2e-5)


CADENCES = {
    "per_poll": {"commit_interval_ms": 0},
    "multi_poll": {"commit_interval_ms": 3000, "commit_records": 12},  # ~3 polls per commit
}


@pytest.mark.parametrize("cadence", sorted(CADENCES))
@pytest.mark.parametrize("changelog", [True, False])
def test_aborted_and_failed_transactions_roll_back_in_memory(
    bootstrap: str, changelog: bool, cadence: str
) -> None:
    """Every other commit aborts and every third begin fails, with or without a changelog,
    with one transaction per poll or several polls per transaction: each transaction is redone
    from an in-memory undo, and the forecasts are those of a clean run (issue 11 #2: without a
    changelog, replays used to be applied to the state twice)."""
    inp = unique("ticks")
    create_topics(bootstrap, [inp], 2)
    kafka = {"max_poll_records": 5, **CADENCES[cadence]}
    s = _settings(bootstrap, inp, unique("g"), kafka=kafka, state={"changelog": changelog})
    records = _ticks(0, 8, 4)
    produce(bootstrap, inp, records)
    daemon = Daemon(s, load_model(None))
    assert daemon._connect() and daemon.sink is not None
    commits = iter(range(10**6))
    begins = iter(range(10**6))
    aborted = _fail_some(daemon.sink, "start_commit", lambda _: next(commits) % 2 == 0)
    failed = _fail_some(daemon.sink, "begin", lambda _: next(begins) % 3 == 1)
    try:
        _run_until(daemon, lambda: daemon.totals.forecasts == len(records), timeout_s=90)
    finally:
        daemon._close()
    if cadence == "per_poll":
        assert len(aborted) >= 4 and len(failed) >= 2
    else:
        assert len(aborted) >= 2 and len(failed) >= 1
        assert daemon.totals.batches > daemon.totals.commits  # several polls per commit
    assert daemon.totals.dead_letters == 0  # replays are not "late"
    docs = [r.json() for r in read_topic(bootstrap, s.kafka.output_topic, len(records),
                                         idle_s=1.5)]  # fmt: skip
    _check(docs, _reference(records))


def test_an_aborted_eviction_leaves_the_state_for_the_next_owner(bootstrap: str) -> None:
    """An eviction whose transaction aborted, then a crash before the retry: the tombstone is
    in the changelog (Tansu shows aborted records) but must not delete the stream's state."""
    inp, group = unique("ticks"), unique("g")
    create_topics(bootstrap, [inp], 1)
    state = {"max_streams": 3, "evict_interval_seconds": 0.05}
    first = Daemon(_settings(bootstrap, inp, group, state=state), load_model(None))
    assert first._connect() and first.sink is not None
    produce(bootstrap, inp, _ticks(0, 3, 3))  # t0, t1, t2: at the cap
    _run_until(first, lambda: first.totals.forecasts == 9)
    evicts = lambda sink: any(v is None for _, _, v, _ in sink._batch_state)  # noqa: E731
    aborted = _fail_some(first.sink, "start_commit", evicts)
    time.sleep(0.1)
    produce(bootstrap, inp, [(b"t3", json.dumps({"ts": T0 + 9, "value": 1.0}).encode())])
    _run_until(first, lambda: bool(aborted))  # a new stream: over the cap, t0 evicted, aborted
    assert "t0" in first.engine.store  # rolled back
    first._close()  # "crash": the retry never commits

    second = Daemon(_settings(bootstrap, inp, group, state={"changelog": True}),
                    load_model(None))  # fmt: skip
    assert second._connect()
    try:
        _run_until(second, lambda: second.totals.forecasts == 1)  # t3 again, after the restore
        assert sorted(second.engine.store.slot_of) == ["t0", "t1", "t2", "t3"]
        produce(bootstrap, inp, [(b"t0", json.dumps({"ts": T0 + 10, "value": 2.0}).encode())])
        _run_until(second, lambda: second.totals.forecasts == 2)
    finally:
        second._close()
    docs = [r.json() for r in read_topic(bootstrap, second.settings.kafka.output_topic, 2)]
    seqs = {d["stream"]: d["seq"] for d in docs}
    assert seqs == {"t3": 1, "t0": 4}  # t0 continued from its state, not cold


def test_a_fenced_daemon_stops_with_the_reason(
    bootstrap: str, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Another instance took our transactional id: stop (exit 6) instead of fencing it back,
    which would make two instances take the id from each other for ever (issue 11 #3)."""
    inp, out, group = unique("ticks"), unique("fc"), unique("g")
    create_topics(bootstrap, [inp], 1)
    args = ["--bootstrap-servers", bootstrap, "--input-topic", inp, "--output-topic", out,
            "--dlq-topic", unique("dlq"), "--group-id", group, "--metrics-port", "0",
            "--no-sample-feed"]  # fmt: skip
    daemon = start_daemon(args, env={"PIPELINE_KAFKA__INSTANCE_ID": "twin"})
    produce(bootstrap, inp, _ticks(0, 2, 2))
    assert len(read_topic(bootstrap, out, 4)) == 4
    usurper = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"{group}-twin",
                            enable_idempotence=True)  # fmt: skip
    usurper.init_transactions()
    try:
        produce(bootstrap, inp, _ticks(2, 2, 2))
        daemon.proc.wait(timeout=60)
        assert daemon.proc.returncode == 6, daemon.log()[-3000:]
        assert "was fenced" in daemon.log() and "kafka.instance_id" in daemon.log()
        assert "Traceback" not in daemon.log()
        usurper.begin_transaction()  # the usurper still holds the id
        usurper.send(out, b"usurper")
        usurper.commit_transaction()
    finally:
        usurper.close()


def test_the_stream_cap_holds_without_a_changelog(bootstrap: str) -> None:
    """Eviction used to run only with a changelog: without one, memory grew without bound."""
    inp = unique("ticks")
    create_topics(bootstrap, [inp], 1)
    state = {"changelog": False, "max_streams": 3, "evict_interval_seconds": 0.01}
    daemon = Daemon(_settings(bootstrap, inp, unique("g"), state=state), load_model(None))
    assert daemon._connect()
    try:
        for r in range(4):  # 8 new streams a round
            produce(bootstrap, inp, [(f"r{r}-{s}".encode(), json.dumps({"ts": T0 + r,
                                      "value": 1.0}).encode()) for s in range(8)])  # fmt: skip
            _run_until(daemon, lambda r=r: daemon.totals.forecasts == 8 * (r + 1))
            assert len(daemon.engine.store) == 3
            time.sleep(0.02)  # the next batch's eviction is due
    finally:
        daemon._close()


@pytest.mark.parametrize("assignor", ["range", "cooperative-sticky"])
def test_a_transaction_open_at_a_rebalance_is_committed_by_the_revoke(
    bootstrap: str, assignor: str, kafka_client: str
) -> None:
    """Transactions of several polls (kafka.commit_interval_ms = 2 s): a member holding one
    open when a second member joins commits it in its revoke callback, changelog included, so
    the new owner of its partitions restores the state those forecasts came from. Every
    (stream, seq) is forecast once, as in an uninterrupted run. With the cooperative protocol
    only the partition that moves is revoked; the other keeps its streams."""
    inp, group = unique("ticks"), unique("g")
    cadence = {"commit_interval_ms": 2000, "commit_records": 10**6, "assignor": assignor}
    if assignor == "cooperative-sticky" and kafka_client == "kafka-python":
        with pytest.raises(ConfigError, match=r"kafka\.assignor"):  # refused: decisions.md #25
            _settings(bootstrap, inp, group, kafka=cadence)
        return
    create_topics(bootstrap, [inp], 2)
    first_records, second_records = _ticks(0, 10, 4), _ticks(10, 10, 4)
    s_a = _settings(bootstrap, inp, group, kafka={**cadence, "instance_id": "a"})
    out = s_a.kafka.output_topic
    s_b = _settings(bootstrap, inp, group, kafka={**cadence, "instance_id": "b",
                                                  "output_topic": out})  # fmt: skip
    produce(bootstrap, inp, first_records)
    a = Daemon(s_a, load_model(None))
    revoked: list[int] = []  # what the first member gives up (its source holds the callback)
    real_revoke = a._on_revoked
    a._on_revoked = lambda parts: (revoked.extend(parts), real_revoke(parts))[1]  # type: ignore[method-assign]
    assert a._connect()
    _run_until(a, lambda: a.unit.open_batches > 0 and a.unit._pending.records == 40)
    assert a.unit.is_open and a.totals.forecasts == 0  # nothing committed yet
    b = Daemon(s_b, load_model(None))
    assert b._connect() and b.source is not None and a.source is not None
    try:
        deadline = time.monotonic() + 60
        while not (a.source.assignment() and b.source.assignment()):
            assert time.monotonic() < deadline, "the group did not split the partitions"
            a.step(timeout_ms=100)
            b.step(timeout_ms=100)
        assert a.totals.forecasts == 40 and a.totals.commits == 1  # committed by the revoke
        # Eager (range): the first member gives up both partitions; cooperative: only the one
        # that moves.
        assert sorted(revoked) == ([0, 1] if assignor == "range" else b.source.assignment())
        produce(bootstrap, inp, second_records)
        deadline = time.monotonic() + 60
        while a.totals.forecasts + b.totals.forecasts < 80:
            assert time.monotonic() < deadline, "second round not forecast"
            a.step(timeout_ms=100)
            b.step(timeout_ms=100)
    finally:
        a._close()
        b._close()
    assert b.totals.forecasts > 0  # the joiner did take partitions and work
    docs = [r.json() for r in read_topic(bootstrap, out, 80, idle_s=1.5)]
    assert len(docs) == 80  # once each: no transaction aborted, none replayed
    _check(docs, _reference(first_records + second_records))


def test_a_broker_without_transactions_gets_at_least_once(
    bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the broker refuses transactions the daemon falls back to at-least-once, and the
    whole loop then runs the at-least-once path (before the sinks were split, the transaction
    unit kept its exactly-once flag and its first commit failed an assertion)."""

    def refuse(self: ExactlyOnceSink) -> None:
        raise TransactionsUnsupported("the broker refuses transactions (injected by the test)")

    monkeypatch.setattr(ExactlyOnceSink, "_init_transactions", refuse)
    inp, group = unique("ticks"), unique("g")
    create_topics(bootstrap, [inp], 1)
    settings = _settings(bootstrap, inp, group)
    daemon = Daemon(settings, load_model(None))
    assert daemon._connect()
    assert isinstance(daemon.sink, AtLeastOnceSink) and not daemon.exactly_once
    produce(bootstrap, inp, _ticks(0, 10, 2))
    _run_until(daemon, lambda: daemon.totals.forecasts == 20)
    daemon.unit.commit()
    daemon._close()
    out = read_topic(bootstrap, settings.kafka.output_topic, 20, timeout_s=30)
    assert sorted((r.key, r.json()["seq"]) for r in out) == sorted(
        (f"t{s}".encode(), seq) for s in range(2) for seq in range(1, 11)
    )
    again = Daemon(settings, load_model(None))  # the offsets were committed: nothing comes again
    assert again._connect()
    for _ in range(10):
        again.step(timeout_ms=200)
    assert again.totals.consumed == 0
    again._close()


@pytest.mark.parametrize(
    ("gather_s", "behind", "sizes"),
    [(60.0, True, [12, 12]), (0.0, True, [4] * 6), (0.0, False, [12, 12])],
)
def test_small_polls_are_gathered_into_fewer_engine_batches(
    bootstrap: str,
    monkeypatch: pytest.MonkeyPatch,
    gather_s: float,
    behind: bool,
    sizes: list[int],
) -> None:
    """Polls smaller than ``kafka.max_poll_records`` wait in the open transaction and go
    through the engine together (at low rates a poll holds a few records, and every engine
    batch and every batch of sends has a fixed cost): behind the high watermark for up to
    ``GATHER_S``, caught up until the commit (decisions.md 35). The forecasts are a clean
    run's either way. ``behind`` makes every poll look short of the watermark."""
    monkeypatch.setattr(transaction, "GATHER_S", gather_s)
    if behind:
        monkeypatch.setattr(PollSource, "_read_to_end", lambda self, partition_offset: False)
    inp = unique("ticks")
    create_topics(bootstrap, [inp], 1)
    kafka = {"max_poll_records": 1000, "commit_interval_ms": 600_000, "commit_records": 12}
    s = _settings(bootstrap, inp, unique("g"), kafka=kafka)
    records = _ticks(0, 6, 4)  # 24 records: two commits of 12
    daemon = Daemon(s, load_model(None))
    assert daemon._connect()
    seen: list[int] = []
    real_process = daemon.engine.process
    daemon.engine.process = lambda ticks: (seen.append(len(ticks)), real_process(ticks))[1]  # type: ignore[method-assign]
    try:
        for start in range(0, len(records), 4):  # four records a poll
            produce(bootstrap, inp, records[start : start + 4])
            before = daemon.totals.consumed + daemon.unit.uncommitted_records
            _run_until(daemon, lambda b=before: daemon.totals.consumed  # type: ignore[misc]
                       + daemon.unit.uncommitted_records >= b + 4)  # fmt: skip
    finally:
        daemon._close()
    assert daemon.totals.commits == 2 and daemon.totals.batches == 6
    assert seen == sizes
    docs = [r.json() for r in read_topic(bootstrap, s.kafka.output_topic, 24, idle_s=1.5)]
    _check(docs, _reference(records))


def test_a_batch_polled_before_a_failed_commit_is_read_again_in_order(bootstrap: str) -> None:
    """A commit that fails between a poll and the use of its records (here: the commit before
    a model reload) rewinds the input; the batch already polled must not be processed on top of
    the rewound state, or the rewound records would come back older than it (``late``)."""
    inp = unique("ticks")
    create_topics(bootstrap, [inp], 1)
    kafka = {"max_poll_records": 3, "commit_interval_ms": 60_000, "commit_records": 12}
    s = _settings(bootstrap, inp, unique("g"), kafka=kafka)
    records = _ticks(0, 4, 3)  # 12 records, polled 3 at a time
    produce(bootstrap, inp, records)
    daemon = Daemon(s, load_model(None))
    assert daemon._connect() and daemon.sink is not None
    commits = iter(range(10**6))
    aborted = _fail_some(daemon.sink, "start_commit", lambda _: next(commits) == 0)
    try:
        _run_until(daemon, lambda: daemon.unit.open_batches >= 1)  # a batch processed, open
        daemon.request_reload()  # the next step polls, then commits before reloading: fails
        _run_until(daemon, lambda: daemon.totals.forecasts == len(records), timeout_s=60)
    finally:
        daemon._close()
    assert aborted == [1]
    assert daemon.totals.dead_letters == 0  # nothing came back "late"
    docs = [r.json() for r in read_topic(bootstrap, s.kafka.output_topic, len(records),
                                         idle_s=1.5)]  # fmt: skip
    _check(docs, _reference(records))


@pytest.mark.parametrize("background", [True, False], ids=["background", "waiting"])
def test_a_commit_failing_in_the_background_gives_back_the_poll_made_meanwhile(
    bootstrap: str, background: bool
) -> None:
    """Cadence commits run on the sink's call thread while the daemon polls the next records
    (decisions.md 41). When such a commit fails, the poll made meanwhile must not be processed
    on top of the rolled-back state: it is given back and read again after the aborted
    records, and the forecasts are a clean run's. Fails if commits block the loop (no poll
    overlaps one) or if the overlapping poll is processed. With ``kafka.commit_in_background``
    off, no poll overlaps a commit and the failed one rolls back the same way."""
    inp = unique("ticks")
    create_topics(bootstrap, [inp], 1)
    kafka = {"max_poll_records": 3, "commit_interval_ms": 0, "commit_in_background": background}
    s = _settings(bootstrap, inp, unique("g"), kafka=kafka)
    records = _ticks(0, 6, 3)  # 18 records, polled 3 at a time
    produce(bootstrap, inp, records)
    daemon = Daemon(s, load_model(None))
    assert daemon._connect() and daemon.sink is not None and daemon.source is not None
    sink, source = daemon.sink, daemon.source
    assert isinstance(sink, ExactlyOnceSink)
    starts = iter(range(10**6))
    real_start = sink.start_commit

    def start(*args: Any) -> None:
        if next(starts) == 1:  # the second commit fails on the thread, 0.3 s in
            fail_in_background(sink, *args, delay_s=0.3)
        else:
            real_start(*args)

    sink.start_commit = start  # type: ignore[method-assign]
    aborted_before = _aborted()
    overlapped: list[bool] = []
    real_poll, given_back = source.poll, []
    source.poll = lambda ms: (overlapped.append(sink.committing), real_poll(ms))[1]  # type: ignore[method-assign]
    real_give_back = source.give_back
    source.give_back = lambda p: (given_back.append(len(p)), real_give_back(p))[1]  # type: ignore[method-assign]
    try:
        _run_until(daemon, lambda: daemon.totals.forecasts == len(records), timeout_s=60)
    finally:
        daemon._close()
    if background:
        assert any(overlapped)  # polls ran while a commit was in flight
        assert given_back  # the overlapping poll came again
    else:
        assert overlapped and not any(overlapped) and not given_back
    assert daemon.totals.dead_letters == 0
    assert _aborted() == aborted_before + 1
    docs = [r.json() for r in read_topic(bootstrap, s.kafka.output_topic, len(records),
                                         idle_s=1.5)]  # fmt: skip
    _check(docs, _reference(records))


def _aborted() -> float:
    return REGISTRY.get_sample_value("pipeline_transactions_total", {"outcome": "aborted"}) or 0.0


def _commits(trigger: str) -> float:
    return REGISTRY.get_sample_value("pipeline_commits_total", {"trigger": trigger}) or 0.0


def _commit_records() -> float:
    """The sum of ``pipeline_commit_records``: input records committed so far."""
    return REGISTRY.get_sample_value("pipeline_commit_records_sum") or 0.0


def test_a_caught_up_daemon_commits_early_and_a_backlog_waits_for_the_interval(
    bootstrap: str,
) -> None:
    """``kafka.commit_records_caught_up``: once a poll has read its partitions to the high
    watermark, the transaction commits as soon as that many records are in (a steady feed's
    forecasts are not held back for the interval); polls behind the watermark (a backlog) keep
    gathering until the interval or ``commit_records``. Fails if either side ignores the poll's
    position."""
    inp = unique("ticks")
    create_topics(bootstrap, [inp], 1)
    kafka = {"max_poll_records": 25, "commit_interval_ms": 600_000, "commit_records": 10_000,
             "commit_records_caught_up": 30}  # fmt: skip
    s = _settings(bootstrap, inp, unique("g"), kafka=kafka)
    backlog = _ticks(0, 20, 5)  # 100 records: four full polls, the last one at the watermark
    produce(bootstrap, inp, backlog)
    daemon = Daemon(s, load_model(None))
    before = {t: _commits(t) for t in ("caught_up", "interval", "records")}
    records_before = _commit_records()
    assert daemon._connect()
    try:
        _run_until(daemon, lambda: daemon.totals.consumed == 100)
        assert (daemon.totals.commits, daemon.totals.batches) == (1, 4)
        assert _commits("caught_up") == before["caught_up"] + 1
        assert _commit_records() == records_before + 100
        steady = _ticks(20, 4, 5)  # 20 records at once: one poll at the watermark, below 30
        produce(bootstrap, inp, steady)
        _run_until(daemon, lambda: daemon.unit._pending.records == 20)
        assert daemon.totals.commits == 1  # caught up, but fewer than 30 records are in
        produce(bootstrap, inp, _ticks(24, 2, 5))  # 10 more: 30 in, caught up -> commit
        _run_until(daemon, lambda: daemon.totals.consumed == 130)
        assert daemon.totals.commits == 2 and daemon.unit._pending.records == 0
        after = {t: _commits(t) for t in ("caught_up", "interval", "records")}
        assert after == {**before, "caught_up": before["caught_up"] + 2}
        assert _commit_records() == records_before + 130
    finally:
        daemon._close()
    records = backlog + steady + _ticks(24, 2, 5)
    docs = [r.json() for r in read_topic(bootstrap, s.kafka.output_topic, 130, idle_s=1.5)]
    _check(docs, _reference(records))
