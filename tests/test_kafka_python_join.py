"""kafka-python 3.0 threw away a group join that finished between two polls; the adapter keeps it.

Two members of one group on the real broker. The second member's join finishes on kafka-python's
IO thread while nobody polls it; its next poll must take that assignment. Without
:func:`pipeline.clients.kafka_python_join.keep_finished_joins` that poll sends a new JoinGroup,
the member comes back with nothing, and the first member loses its partitions again: two
in-process daemons stepped in turn went round like that for over a minute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import kafka
import pytest
from kafka import KafkaConsumer
from kafka.coordinator.base import BaseCoordinator

from pipeline.clients import kafka_python  # noqa: F401  (importing it applies the patch)
from pipeline.clients.kafka_python_join import PATCHED_VERSIONS, keep_finished_joins
from tests.kafka_helpers import create_topics, unique

pytestmark = pytest.mark.integration


def _wait(done: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def member(bootstrap: str) -> Iterator[Callable[[], KafkaConsumer]]:
    """Makes members of one new group on a new two-partition topic."""
    topic, group = unique("join"), unique("g")
    create_topics(bootstrap, [topic], 2)
    made: list[KafkaConsumer] = []

    def make() -> KafkaConsumer:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
            session_timeout_ms=2000, heartbeat_interval_ms=500,
        )  # fmt: skip
        consumer.subscribe([topic])
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        consumer.close(autocommit=False)


def test_the_patch_is_active_for_the_pinned_version() -> None:
    assert kafka.__version__.startswith(PATCHED_VERSIONS)
    assert keep_finished_joins()  # idempotent: already applied at import
    assert hasattr(BaseCoordinator.join_group_async, "__wrapped__")


def test_a_join_finished_between_polls_is_taken_by_the_next_poll(
    member: Callable[[], KafkaConsumer],
) -> None:
    first = member()
    _wait(lambda: bool(first.poll(timeout_ms=100) or first.assignment()), "first member alone")
    assert len(first.assignment()) == 2

    second = member()
    # Poll until its JoinGroup with a member id is in flight: the first one only gets the id
    # (MEMBER_ID_REQUIRED, KIP-394) and is retried by a poll. The broker holds that join for
    # the round, which cannot end before the first member rejoins.
    coordinator = second._coordinator

    def joining_with_an_id() -> bool:
        second.poll(timeout_ms=20)
        task = coordinator._join_task
        return bool(coordinator._generation.member_id) and task is not None and not task.is_done

    _wait(joining_with_an_id, "the second member's join with a member id never went out")
    # Only the first member polls: it learns of the rebalance, rejoins and gets its share.
    _wait(lambda: bool(first.poll(timeout_ms=100) or len(first.assignment()) == 1),
          "the first member never got its new share")  # fmt: skip
    generation = first._coordinator._generation.generation_id
    join = coordinator._join_task
    assert join is not None, "the second member has no join in flight"
    _wait(lambda: join.is_done, "the second member's join never finished on its IO thread")
    assert join.succeeded(), join.exception

    second.poll(timeout_ms=100)  # the first poll since its join finished

    assert len(second.assignment()) == 1, "the finished join was thrown away"
    assert coordinator._join_task is None
    assert first.assignment().isdisjoint(second.assignment())
    first.poll(timeout_ms=1500)  # heartbeats for longer than a join round: no new rebalance
    assert len(first.assignment()) == 1
    assert first._coordinator._generation.generation_id == generation
