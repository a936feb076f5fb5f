"""``pipeline run`` whose transactions fail on purpose, for tests/test_daemon_random.py.

Run as ``python -m tests.chaos_daemon run ...`` with

- ``CHAOS_SEED``: seed of the failure draws (default 0);
- ``CHAOS_ABORT``: probability that a commit aborts instead (default 0): half of them fail
  before the commit starts, half on the sink's call thread while the daemon polls on;
- ``CHAOS_BEGIN``: probability that a begin fails (default 0);
- ``CHAOS_ABORT_NTH``: the n-th commit of the process always aborts (default: none).

A forced failure goes through ``ExactlyOnceSink``'s own failure path (abort, fresh producer,
``TransactionFailed``), which is what a broker error at that point runs, so the daemon's
rollback, rewind and backoff are the real ones. Nothing of this is imported by the package.
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any

from pipeline.cli import main
from pipeline.clients import ClientError, ProducerClient
from pipeline.sink import ExactlyOnceSink


def _injected() -> None:
    raise ClientError("chaos: failure injected by tests/chaos_daemon.py")


class _FailingCommit:
    """The sink's producer, except that ``commit_transaction`` fails after ``delay_s`` (the
    commit runs on the sink's call thread: the daemon polls meanwhile)."""

    def __init__(self, producer: ProducerClient, delay_s: float) -> None:
        self._producer = producer
        self._delay_s = delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    def commit_transaction(self) -> None:
        time.sleep(self._delay_s)
        _injected()


def fail_in_background(sink: ExactlyOnceSink, *args: Any, delay_s: float = 0.05) -> None:
    """``sink.start_commit(*args)`` whose commit fails on the call thread, through the sink's
    own failure path when it is joined (abort, fresh producer, TransactionFailed)."""
    real = sink.producer
    sink.producer = _FailingCommit(real, delay_s)  # type: ignore[assignment]
    try:
        ExactlyOnceSink.start_commit(sink, *args)
    finally:
        sink.producer = real


def install() -> None:
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "0")))
    abort_rate = float(os.environ.get("CHAOS_ABORT", "0"))
    begin_rate = float(os.environ.get("CHAOS_BEGIN", "0"))
    nth = int(os.environ.get("CHAOS_ABORT_NTH", "0"))
    commits = [0]
    real_begin, real_commit = ExactlyOnceSink.begin, ExactlyOnceSink.start_commit

    def begin(self: ExactlyOnceSink) -> None:
        real_begin(self)
        if self.transactional_id and rng.random() < begin_rate:
            self._guard(_injected)

    def start_commit(self: ExactlyOnceSink, *args: Any) -> None:
        commits[0] += 1
        if rng.random() < abort_rate or commits[0] == nth:
            if rng.random() < 0.5:
                self._guard(_injected)
            fail_in_background(self, *args)
            return
        real_commit(self, *args)

    ExactlyOnceSink.begin = begin  # type: ignore[method-assign]
    ExactlyOnceSink.start_commit = start_commit  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    sys.exit(main(sys.argv[1:]))
