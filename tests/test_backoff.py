"""The one backoff policy of every retry loop."""

from __future__ import annotations

import threading

from pipeline.backoff import Backoff


def test_delays_double_up_to_the_cap_and_reset_on_success() -> None:
    backoff = Backoff(first_s=0.1, max_s=0.5)
    assert [backoff.fail() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert backoff.failures == 5
    backoff.reset()
    assert backoff.fail() == 0.1


def test_a_stop_cuts_the_wait_short() -> None:
    stop = threading.Event()
    stop.set()
    assert Backoff(stop).wait(3600.0) is True  # returns at once
    assert Backoff(threading.Event()).wait(0.0) is False
