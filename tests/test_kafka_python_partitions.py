"""The kafka-python adapter's per-key partition memo picks what the library's default
partitioner picks, and forgets a topic whose partitions changed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.partitioner.default import DefaultPartitioner

from pipeline.clients.kafka_python import _KeyPartitions


class _Cluster:
    """What the default partitioner and ``partitions_for`` read of a producer's metadata."""

    def __init__(self, partitions: dict[str, set[int]]) -> None:
        self.partitions = partitions
        self.asked = 0

    def topics(self) -> set[str]:
        return set(self.partitions)

    def partitions_for_topic(self, topic: str) -> set[int]:
        return self.partitions[topic]

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return self.partitions[topic]

    def partitions_for(self, topic: str) -> set[int]:  # KafkaProducer.partitions_for
        self.asked += 1
        return self.partitions[topic]


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=60),
    counts=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=4),
)
def test_the_memo_picks_the_default_partitioners_partition(
    keys: list[bytes], counts: list[int]
) -> None:
    """Over generated keys and partition counts that change between batches (a topic
    recreated or grown), every key lands where kafka-python's DefaultPartitioner puts it."""
    cluster = _Cluster({"out": set(range(counts[0]))})
    memo = _KeyPartitions(cluster)  # type: ignore[arg-type]
    library = DefaultPartitioner()
    for count in counts:
        cluster.partitions["out"] = set(range(count))
        memo.refresh()
        for key in keys + keys:  # the second pass reads the memo
            expected = library.partition("out", key, key, None, None, cluster)
            assert memo("out", key) == expected


def test_a_topics_memo_is_bounded_and_asks_the_metadata_once_per_batch() -> None:
    cluster = _Cluster({"out": set(range(6)), "dlq": {0}})
    memo = _KeyPartitions(cluster)  # type: ignore[arg-type]
    memo.MAX_KEYS = 8
    keys = [f"s{i}".encode() for i in range(20)]
    first = [memo("out", key) for key in keys]
    assert cluster.asked == 1  # the first key of the topic; the rest are hashed or memoised
    assert [memo("out", key) for key in keys] == first
    assert all(len(m) <= 8 for _, m in memo._topics.values())
    assert memo("dlq", b"x") == 0
    memo.refresh()
    assert cluster.asked == 4  # once per memoised topic and batch
