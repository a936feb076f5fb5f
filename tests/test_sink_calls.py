"""The watchdog of ExactlyOnceSink's transactional calls, without a broker: calls run on one
long-lived thread (not a thread per call), a hung call fails the transaction and the next call
gets a fresh thread, and errors reach the caller as before."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.clients import ClientError
from pipeline.sink import ExactlyOnceSink


class _Failed(Exception):
    pass


def _sink() -> tuple[ExactlyOnceSink, list[tuple[str, dict[str, Any]]]]:
    """An ExactlyOnceSink with only what _guard touches; _fail records and raises."""
    sink = object.__new__(ExactlyOnceSink)
    sink._calls = None
    failures: list[tuple[str, dict[str, Any]]] = []

    def fail(why: str, **kwargs: Any) -> None:
        failures.append((why, kwargs))
        raise _Failed(why)

    sink._fail = fail  # type: ignore[method-assign]
    return sink, failures


def test_bounded_calls_share_one_thread() -> None:
    sink, failures = _sink()
    seen: list[int | None] = []
    before = threading.active_count()
    for _ in range(20):
        sink._guard(lambda: seen.append(threading.get_native_id()), 5.0)
    assert len(set(seen)) == 1 and seen[0] != threading.get_native_id()
    assert threading.active_count() == before + 1 and not failures
    assert sink._calls is not None
    sink._calls.stop()


def test_a_hung_call_fails_the_transaction_and_the_next_call_gets_a_new_thread() -> None:
    sink, failures = _sink()
    release = threading.Event()
    threads: list[int] = []

    def hang() -> None:
        threads.append(threading.get_native_id())
        release.wait(10)

    with pytest.raises(_Failed, match="hung"):
        sink._guard(hang, 0.2)
    assert failures[0][1] == {"abort": False} and sink._calls is None
    sink._guard(lambda: threads.append(threading.get_native_id()), 5.0)
    assert threads[0] != threads[1]  # the hung thread is not reused
    release.set()


def test_errors_of_a_bounded_call_reach_the_caller() -> None:
    sink, failures = _sink()

    def client_error() -> None:
        raise ClientError("broker said no")

    with pytest.raises(_Failed, match="broker said no"):
        sink._guard(client_error, 5.0)
    assert isinstance(failures[0][1]["cause"], ClientError)

    def bug() -> None:
        raise KeyError("not a client error")

    with pytest.raises(KeyError):
        sink._guard(bug, 5.0)
    sink._guard(lambda: None, 5.0)  # the thread survived both


class _WedgedProducer:
    """A producer whose abort never returns (kafka-python's after a broker restart)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.closed = False

    def forget(self) -> None:
        pass

    def fenced(self) -> bool:
        return False

    def abort_transaction(self) -> None:
        self.release.wait()

    def close(self, timeout_s: float) -> None:
        self.closed = True

    def init_transactions(self) -> None:
        pass


def test_a_hung_abort_does_not_stop_the_failure_path() -> None:
    """_fail aborts within the transaction timeout, then starts a fresh producer (which fences
    the wedged one) and raises TransactionFailed: the loop goes on to rewind and retry."""
    from pipeline.sink import TransactionFailed

    wedged, fresh = _WedgedProducer(), _WedgedProducer()
    sink = object.__new__(ExactlyOnceSink)
    sink.kafka = SimpleNamespace(transaction_timeout_ms=200)  # type: ignore[assignment]
    sink.transactional_id, sink.producer = "t", wedged  # type: ignore[assignment]
    sink._calls, sink._needs_rebuild = None, False
    sink._batch, sink._batch_state, sink._broken = [], [], None
    sink._new_producer = lambda: fresh  # type: ignore[assignment,method-assign,return-value]
    raised: list[BaseException] = []

    def fail() -> None:
        try:
            sink._fail("broker said no")
        except BaseException as exc:
            raised.append(exc)

    failing = threading.Thread(target=fail, daemon=True)
    failing.start()
    failing.join(5.0)  # 25 limits: it returns after one, or (unbounded) never
    wedged.release.set()
    assert len(raised) == 1 and isinstance(raised[0], TransactionFailed), raised
    assert "broker said no" in str(raised[0])
    assert wedged.closed and sink.producer is fresh and sink._calls is None


class _SlowProducer:
    """What start_commit/finish_commit touch of a producer: the two calls take ``delay_s``."""

    def __init__(self, delay_s: float, error: Exception | None = None) -> None:
        self.delay_s, self.error, self.calls = delay_s, error, []  # type: ignore[var-annotated]
        self.release = threading.Event()

    def send_offsets_to_transaction(self, offsets: object, group_metadata: object) -> None:
        self.calls.append("offsets")

    def commit_transaction(self) -> None:
        self.release.wait(self.delay_s)
        self.calls.append("commit")
        if self.error is not None:
            raise self.error

    def forget(self) -> None:
        self.calls.append("forget")


def _committing_sink(
    producer: _SlowProducer, timeout_ms: int = 60_000
) -> tuple[ExactlyOnceSink, list[tuple[str, dict[str, Any]]]]:
    sink, failures = _sink()
    sink.kafka = SimpleNamespace(transaction_timeout_ms=timeout_ms)  # type: ignore[assignment]
    sink.producer = producer  # type: ignore[assignment]
    sink._broken, sink._commit, sink._batch, sink._batch_state = None, None, [], []
    return sink, failures


def test_a_started_commit_runs_on_the_thread_until_joined() -> None:
    """start_commit returns at once; a non-blocking finish_commit says None while the commit
    runs and the commit time once it returned; the producer is forgotten only after."""
    producer = _SlowProducer(10.0)
    sink, failures = _committing_sink(producer)
    before = time.time()
    sink.start_commit({"in": {0: 5}}, object())
    assert sink.committing and sink.finish_commit(block=False) is None
    assert "forget" not in producer.calls
    producer.release.set()
    committed_at = sink.finish_commit()
    assert committed_at is not None and committed_at >= before
    assert producer.calls == ["offsets", "commit", "forget"] and not sink.committing
    assert not failures
    assert sink._calls is not None
    sink._calls.stop()


def test_a_background_commit_that_fails_or_hangs_fails_when_joined() -> None:
    producer = _SlowProducer(0.0, ClientError("broker said no"))
    sink, failures = _committing_sink(producer)
    sink.start_commit({"in": {0: 5}}, object())
    with pytest.raises(_Failed, match="broker said no"):
        sink.finish_commit()
    assert not sink.committing and isinstance(failures[0][1]["cause"], ClientError)

    hung = _SlowProducer(10.0)
    sink, failures = _committing_sink(hung, timeout_ms=100)  # 2 x 0.1 s for both calls
    sink.start_commit({"in": {0: 5}}, object())
    assert sink.finish_commit(block=False) is None
    time.sleep(0.25)
    with pytest.raises(_Failed, match="hung"):
        sink.finish_commit(block=False)  # past the deadline: a non-blocking join fails too
    assert failures[0][1] == {"abort": False} and sink._calls is None
    hung.release.set()
