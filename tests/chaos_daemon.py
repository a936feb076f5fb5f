"""``pipeline run`` whose transactions fail on purpose, for tests/test_daemon_random.py.

Run as ``python -m tests.chaos_daemon run ...`` with

- ``CHAOS_SEED``: seed of the failure draws (default 0);
- ``CHAOS_ABORT``: probability that a commit aborts instead (default 0);
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
from typing import Any

from pipeline.cli import main
from pipeline.clients import ClientError
from pipeline.sink import ExactlyOnceSink


def _injected() -> None:
    raise ClientError("chaos: failure injected by tests/chaos_daemon.py")


def install() -> None:
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "0")))
    abort_rate = float(os.environ.get("CHAOS_ABORT", "0"))
    begin_rate = float(os.environ.get("CHAOS_BEGIN", "0"))
    nth = int(os.environ.get("CHAOS_ABORT_NTH", "0"))
    commits = [0]
    real_begin, real_commit = ExactlyOnceSink.begin, ExactlyOnceSink.commit

    def begin(self: ExactlyOnceSink) -> None:
        real_begin(self)
        if self.transactional_id and rng.random() < begin_rate:
            self._guard(_injected)

    def commit(self: ExactlyOnceSink, *args: Any) -> None:
        commits[0] += 1
        if rng.random() < abort_rate or commits[0] == nth:
            self._guard(_injected)
        real_commit(self, *args)

    ExactlyOnceSink.begin = begin  # type: ignore[method-assign]
    ExactlyOnceSink.commit = commit  # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    sys.exit(main(sys.argv[1:]))
