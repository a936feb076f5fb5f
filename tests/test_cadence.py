"""The commit cadence of :class:`pipeline.transaction.Transaction` (no Kafka: only the clock)."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.checkpoint import StateKeeper
from pipeline.config import load_settings
from pipeline.engine import Engine
from pipeline.model import load_model
from pipeline.source import Polled
from pipeline.transaction import Transaction


def _unit(**kafka: int) -> Transaction:
    settings = load_settings(overrides={"kafka": kafka})
    engine = Engine(load_model())
    unit = Transaction(settings, engine, StateKeeper(settings, engine.store), threading.Event())
    unit.is_open, unit.opened_at = True, 0.0  # as _open leaves it at t = 0
    unit.load = 0.0  # as measured on an idle process
    return unit


def test_a_caught_up_daemon_commits_sooner() -> None:
    unit = _unit(commit_interval_ms=100, commit_caught_up_ms=25, max_poll_records=10)
    assert not unit.caught_up  # until a poll says otherwise: the longer cadence
    assert unit.time_left_ms(now=0.010) == 90
    assert not unit.due(now=0.030)
    assert unit.add(Polled())  # an empty poll: nothing is waiting
    assert unit.caught_up
    assert unit.time_left_ms(now=0.010) == 15
    assert not unit.due(now=0.020)
    assert unit.due(now=0.030)
    unit.caught_up = False  # as after a full poll (max_poll_records records): a backlog
    assert not unit.due(now=0.030)
    assert unit.due(now=0.100)


def test_slow_commits_stretch_the_caught_up_cadence_and_a_backlog_is_not_caught_up() -> None:
    unit = _unit(commit_interval_ms=100, commit_caught_up_ms=25, max_poll_records=10)
    unit.add(Polled())
    unit.last_commit_s = 0.015  # a slow commit: open at least COMMIT_DUTY (4) times as long
    assert unit.time_left_ms(now=0.0) == 60
    unit.last_commit_s = 0.5  # never past the interval
    assert unit.time_left_ms(now=0.0) == 100
    unit.last_commit_s = 0.0
    unit.add(Polled(behind=10))  # a poll's worth of records waits behind this one
    assert not unit.caught_up
    assert unit.time_left_ms(now=0.0) == 100


def test_a_busy_process_keeps_the_long_cadence() -> None:
    """Early commits spend idle CPU: a process using most of a core is not caught up, nor one
    whose load is not measured yet."""
    settings = load_settings(overrides={"kafka": {"commit_caught_up_ms": 25}})
    engine = Engine(load_model())
    fresh = Transaction(settings, engine, StateKeeper(settings, engine.store), threading.Event())
    fresh.add(Polled())
    assert not fresh.caught_up
    unit = _unit(commit_interval_ms=100, commit_caught_up_ms=25)
    wall, cpu = time.monotonic(), time.process_time()
    unit._window = (wall - 1.0, cpu - 0.9)  # 0.9 CPU seconds in the last second
    unit.add(Polled())
    assert unit.load > 0.5
    assert not unit.caught_up
    assert unit.time_left_ms(now=0.0) == 100


@pytest.mark.parametrize(("interval", "caught_up", "want_ms"), [(100, 500, 100), (0, 25, 0)])
def test_the_caught_up_cadence_is_never_longer_than_the_interval(
    interval: int, caught_up: int, want_ms: int
) -> None:
    unit = _unit(commit_interval_ms=interval, commit_caught_up_ms=caught_up)
    unit.add(Polled())
    assert unit.time_left_ms(now=0.0) == want_ms
