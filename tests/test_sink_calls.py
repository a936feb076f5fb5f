"""The watchdog of ExactlyOnceSink's transactional calls, without a broker: calls run on one
long-lived thread (not a thread per call), a hung call fails the transaction and the next call
gets a fresh thread, and errors reach the caller as before."""

from __future__ import annotations

import threading
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
