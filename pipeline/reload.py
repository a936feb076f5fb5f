"""Hot model reload: when to read the serving model's file again, and swapping it in.

The daemon asks :meth:`ModelWatcher.due` once per loop and calls :func:`reload_model` between
micro-batches, so a reload never splits a batch. What happens to the streams' state is the
engine's policy (:meth:`pipeline.engine.Engine.swap_model`, docs/decisions.md #11).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline import metrics
from pipeline.engine import Engine
from pipeline.errors import PipelineError
from pipeline.model import load_model

log = logging.getLogger(__name__)


class ModelWatcher:
    """Says when to load the model file again: after :meth:`request` (SIGHUP), or when its mtime
    changed, looked at every ``watch_seconds`` (0: only on request)."""

    def __init__(self, path: Path, watch_seconds: float) -> None:
        self.path = path
        self.watch_seconds = watch_seconds
        self._mtime = _mtime(path)
        self._next_check = time.monotonic() + watch_seconds
        self._requested = False

    def request(self) -> None:
        """Ask for a reload at the next :meth:`due` (safe in a signal handler: sets a flag)."""
        self._requested = True

    def due(self, now: float) -> bool:
        """True once per request or per change of the file; ``now`` is ``time.monotonic()``."""
        if not self._requested and (self.watch_seconds <= 0 or now < self._next_check):
            return False
        self._next_check = now + self.watch_seconds
        mtime = _mtime(self.path)
        if not self._requested and mtime == self._mtime:
            return False
        self._requested, self._mtime = False, mtime
        return True


def reload_model(engine: Engine, path: Path) -> str | None:
    """Load ``path`` and serve it from the next batch on; returns the outcome (``kept_state`` or
    ``rewarmed``), or None when the file is refused and the old model keeps serving."""
    try:
        outcome = engine.swap_model(load_model(path))
    except (PipelineError, ValueError) as exc:
        metrics.MODEL_RELOADS.labels("failed").inc()
        log.warning("event=model_reload_failed path=%s error=%s action=keep_serving_old", path, exc)
        return None
    metrics.MODEL_RELOADS.labels(outcome).inc()
    if outcome == "rewarmed":
        metrics.STREAMS_REWARMED.inc(len(engine.store))
    log.info("event=model_reloaded version=%s outcome=%s streams=%d", engine.version, outcome,
             len(engine.store))  # fmt: skip
    return outcome


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
