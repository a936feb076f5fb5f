"""A fix for kafka-python 3.0's group join: a join that finishes between two polls is kept.

kafka-python 3.0 runs JoinGroup + SyncGroup as a task on its IO thread, and
``BaseCoordinator.join_group_async`` (called from ``poll()``) waits for it at most the poll's
timeout. When the task finishes while no ``poll()`` is waiting, the next poll finds it done and
schedules a **new** JoinGroup instead of reading its result (``if self._join_task is None or
self._join_task.is_done``): the assignment is thrown away and the whole group rebalances again.
Members that spend part of their time outside ``poll()`` (processing a batch, or two consumers
stepped in turn by one thread) can go round like that for a minute: each rebalance one of them
misses its result and starts the next. The Java client keeps the finished join future and
completes the join from it on the next poll; :func:`keep_finished_joins` does the same.

Only a join that succeeded is completed here, with the same steps the library runs when it is
waiting at the time (state STABLE, heartbeat on, ``_on_join_complete_async``: the assignment and
the rebalance listener). A failed one is left to the library, which retries it as before. The
patch is applied once, at import of :mod:`pipeline.clients.kafka_python`, and only to the
kafka-python versions ``pyproject.toml`` allows; ``tests/test_kafka_python_join.py`` drives it
against a real broker.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import kafka
from kafka.coordinator.base import BaseCoordinator, MemberState

log = logging.getLogger(__name__)

PATCHED_VERSIONS = ("3.0.",)  # the range pyproject.toml pins; re-check the library on an upgrade
_MARK = "_pipeline_keeps_finished_joins"


def keep_finished_joins() -> bool:
    """Patch ``BaseCoordinator.join_group_async`` (idempotent); returns whether it is patched."""
    if getattr(BaseCoordinator.join_group_async, _MARK, False):
        return True
    if not kafka.__version__.startswith(PATCHED_VERSIONS) or not hasattr(
        BaseCoordinator, "_on_join_complete_async"
    ):
        log.warning("event=kafka_python_join_patch_skipped version=%s", kafka.__version__)
        return False
    original = BaseCoordinator.join_group_async

    @functools.wraps(original)  # the original stays reachable as __wrapped__
    async def join_group_async(self: Any, timeout_ms: float | None = None) -> bool:
        if (task := _finished_join(self)) is not None:
            return await _complete_finished_join(self, task)
        return bool(await original(self, timeout_ms))

    setattr(join_group_async, _MARK, True)
    BaseCoordinator.join_group_async = join_group_async
    return True


def _finished_join(coordinator: Any) -> Any:
    """The join task that succeeded while nobody waited for it, or None."""
    task = coordinator._join_task
    if task is None or not task.is_done or not task.succeeded():
        return None
    # Only while that join is still the current attempt: a reset generation (left the group,
    # unknown member) makes its result stale, and the library then starts a new join.
    if coordinator.state is not MemberState.REBALANCING or not coordinator.need_rejoin():
        return None
    return task


async def _complete_finished_join(coordinator: Any, task: Any) -> bool:
    """What ``join_group_async`` does after its wait returns ``task``'s assignment bytes."""
    coordinator._join_task = None
    with coordinator._lock:
        coordinator.rejoining = False
        coordinator.rejoin_needed = False
        coordinator.state = MemberState.STABLE
        coordinator._enable_heartbeat()
    generation = coordinator._generation
    log.debug("event=join_completed_from_finished_task generation=%s", generation.generation_id)
    await coordinator._on_join_complete_async(
        generation.generation_id, generation.member_id, generation.protocol, task.value
    )
    return True
