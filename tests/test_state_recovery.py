"""Crash and rebalance: state survives, forecasts equal an uninterrupted run (issue 4)."""

from __future__ import annotations

import json
import math
import random
import re
import signal
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence

import pytest
from kafka import KafkaProducer

from pipeline.embedded import EmbeddedBroker
from tests.kafka_helpers import (
    DaemonProcess,
    Record,
    create_topics,
    read_topic,
    tansu_left_ranges,
    unique,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("kafka_client")]

T0 = 1_700_000_000.0
STREAMS = 200
TICKS = 30  # per stream


def _feed(bootstrap: str, topic: str, done: threading.Event, seconds: float) -> None:
    """Streams TICKS rounds of STREAMS ticks over ~``seconds``, keyed by stream."""
    rng = random.Random(11)
    scale = {s: 10 ** rng.uniform(-3, 5) for s in range(STREAMS)}
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, enable_idempotence=False,
                             max_in_flight_requests_per_connection=1)  # fmt: skip
    for t in range(TICKS):
        for s in range(STREAMS):
            value = scale[s] * (1 + 0.2 * math.sin(t / 4 + s) + 0.05 * rng.gauss(0, 1))
            doc = {"ts": T0 + 60 * t, "value": value}
            producer.send(topic, key=f"st{s:03d}".encode(), value=json.dumps(doc).encode())
        producer.flush()
        time.sleep(seconds / TICKS)
    producer.close()
    done.set()


def _args(bootstrap: str, inp: str, out: str, group: str) -> list[str]:
    return ["--bootstrap-servers", bootstrap, "--input-topic", inp, "--output-topic", out,
            "--dlq-topic", unique("dlq"), "--group-id", group, "--metrics-port", "0",
            "--no-sample-feed"]  # fmt: skip


def _by_key(records: list) -> dict[tuple[str, int], list[list[float]]]:
    out: dict[tuple[str, int], list[list[float]]] = defaultdict(list)
    for rec in records:
        doc = rec.json()
        out[(doc["stream"], doc["seq"])].append(doc["forecast"])
    return out


def _all_keys() -> Callable[[Record], bool]:
    """For read_topic(until=...): True once every (stream, seq) of the feed has been read."""
    seen: set[tuple[str, int]] = set()

    def complete(rec: Record) -> bool:
        doc = rec.json()
        seen.add((doc["stream"], doc["seq"]))
        return len(seen) >= STREAMS * TICKS

    return complete


def _check_against_reference(got: dict, ref: dict) -> None:
    assert len(ref) == STREAMS * TICKS
    per_stream: dict[str, list[int]] = defaultdict(list)
    for stream, seq in got:
        per_stream[stream].append(seq)
    for stream in {s for s, _ in ref}:
        assert sorted(per_stream[stream]) == list(range(1, TICKS + 1)), stream  # no gap
    for key, copies in got.items():
        expected = ref[key][0]
        for forecast in copies:  # every copy, repeats included, equals the uninterrupted run
            for u, v in zip(forecast, expected, strict=True):
                assert u == pytest.approx(v, rel=1e-5, abs=1e-5 * abs(v)), key


def _run(
    bootstrap: str,
    start_daemon: Callable[..., DaemonProcess],
    chaos: Callable,
    env: dict[str, str] | None = None,
    broker: EmbeddedBroker | None = None,
    fenced: Sequence[DaemonProcess] = (),
) -> None:
    inp, out_a, out_ref = unique("ticks"), unique("fc"), unique("ref")
    create_topics(bootstrap, [inp], 6)
    group, ref_group = unique("g"), unique("ref")
    reference = start_daemon(_args(bootstrap, inp, out_ref, ref_group),
                             env={"PIPELINE_KAFKA__INSTANCE_ID": "reference"})  # fmt: skip
    done = threading.Event()
    feeder = threading.Thread(target=_feed, args=(bootstrap, inp, done, 45.0), daemon=True)
    feeder.start()
    survivors = chaos(lambda instance: start_daemon(
        _args(bootstrap, inp, out_a, group),
        env={"PIPELINE_KAFKA__INSTANCE_ID": instance, **(env or {})},
    ), done)  # fmt: skip
    feeder.join(timeout=120)
    ref = _by_key(read_topic(bootstrap, out_ref, 0, timeout_s=120, until=_all_keys()))
    # Repeats may exist (replayed batches): one reader reads on until every (stream, seq) is
    # there. (Fresh readers that stopped at a count could end mid-partition, and did in CI.)
    got = _by_key(read_topic(bootstrap, out_a, 0, timeout_s=180, until=_all_keys()))
    if len(got) < STREAMS * TICKS and broker is not None:
        fenced_ids = {_transactional_id(d) for d in fenced}
        missing = STREAMS * TICKS - len(got)
        got = _read_past_tansu_stall(bootstrap, out_a, broker, fenced_ids, missing)
    _check_against_reference(got, ref)
    for proc in [*survivors, reference]:
        assert proc.proc.poll() is None, proc.log()[-2000:]


def test_sigkill_five_times_then_same_forecasts(
    bootstrap: str, start_daemon: Callable[..., DaemonProcess]
) -> None:
    rng = random.Random(5)

    killed: list[DaemonProcess] = []

    def chaos(start: Callable[[str], DaemonProcess], done: threading.Event) -> list[DaemonProcess]:
        daemon = start("crashy")
        for _ in range(5):
            daemon.wait_for("event=state_restored", timeout_s=60)  # assigned and running
            time.sleep(rng.uniform(1.0, 3.0))  # mid-stream: some batches committed, one open
            daemon.stop(signal.SIGKILL)
            killed.append(daemon)
            daemon = start("crashy")  # same instance id: fences and recovers the open txn
        return [daemon]

    _run(bootstrap, start_daemon, chaos)
    # The kills really hit a working daemon: later incarnations restored state from the changelog.
    restored = [_restored_streams(d) for d in killed[1:]]
    assert sum(restored) > 0, restored
    assert all("event=partitions_assigned partitions=0" in d.log() for d in killed)


def test_three_instances_join_then_one_dies(
    bootstrap: str,
    start_daemon: Callable[..., DaemonProcess],
    embedded_broker: EmbeddedBroker | None,
) -> None:
    members: list[DaemonProcess] = []
    killed: list[DaemonProcess] = []  # the member killed and fenced

    def chaos(start: Callable[[str], DaemonProcess], done: threading.Event) -> list[DaemonProcess]:
        for name in ("r1", "r2", "r3"):
            members.append(start(name))
            members[-1].wait_for("event=state_restored", timeout_s=60)
            time.sleep(4)
        members[1].stop(signal.SIGKILL)
        _expire_open_transaction(bootstrap, members[1])
        killed.append(members[1])
        return [members[0], members[2]]

    _run(bootstrap, start_daemon, chaos, broker=embedded_broker, fenced=killed)
    # Every member did work, and the partitions moved with their state.
    for member in members:
        assigned = [ln for ln in member.log().splitlines() if "event=partitions_assigned" in ln]
        assert any(not ln.endswith("partitions=") for ln in assigned), member.log()[-2000:]
    assert _restored_streams(members[1]) + _restored_streams(members[2]) > 0


def _expire_open_transaction(bootstrap: str, killed: DaemonProcess) -> None:
    """Ends the killed member's open transaction, as Apache Kafka does after its timeout.

    A SIGKILLed member may die with a transaction open that already holds output records.
    Kafka aborts it after ``transaction.timeout.ms`` and read_committed readers move on; Tansu
    never expires it (broker.md), so the readers of this test would stop there for good, or not,
    depending on where the kill landed. Fencing the member's transactional id is what the
    timeout does, without the wait, and makes the test independent of the kill's timing.
    """
    usurper = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=_transactional_id(killed))
    usurper.init_transactions()
    usurper.close()


def _transactional_id(daemon: DaemonProcess) -> str:
    found = re.search(r"event=exactly_once transactional_id=(\S+)", daemon.log())
    assert found, daemon.log()[-2000:]
    return found.group(1)


def _read_past_tansu_stall(
    bootstrap: str, topic: str, broker: EmbeddedBroker, fenced: set[str], missing: int
) -> dict:
    """The read_committed read-back stopped short on Tansu: if the broker left the fenced
    member's last transaction holding offset ranges (its warning, tests/kafka_helpers.py), every
    later transaction on those partitions stays unsettled and read_committed readers stop for
    good. Apache Kafka has no such state. On Tansu read_committed also shows aborted records
    (broker.md), so read_uncommitted checks the same forecasts here: read them that way, and say
    so. Any other short read fails as before."""
    stuck = tansu_left_ranges(broker.output) & fenced
    assert stuck, f"read_committed read-back is {missing} (stream, seq) short; no Tansu stall seen"
    warnings.warn(
        f"Tansu left fenced transaction(s) {sorted(stuck)} holding offset ranges: read_committed "
        f"stopped {missing} forecasts short; checked with read_uncommitted (broker bug)",
        stacklevel=2,
    )
    records = read_topic(bootstrap, topic, 0, timeout_s=180, until=_all_keys(),
                         isolation_level="read_uncommitted")  # fmt: skip
    return _by_key(records)


def _restored_streams(daemon: DaemonProcess) -> int:
    total = 0
    for line in daemon.log().splitlines():
        if "event=state_restored" in line:
            total += int(line.split("streams=")[1].split()[0])
    return total


def test_tansu_stall_signature_is_recognised() -> None:
    """The warning Tansu 0.6.0 printed (colours and all) in a run of the test above."""
    line = (
        "\x1b[2m2026-12-07T17:31:31.591453Z\x1b[0m \x1b[33m WARN\x1b[0m "
        "\x1b[2mtansu_storage::dynostore\x1b[0m\x1b[2m:\x1b[0m \x1b[2m2601:\x1b[0m "
        '\x1b[3mtransaction\x1b[0m\x1b[2m=\x1b[0m"g-c97859e0-r1" \x1b[3mproducer\x1b[0m'
        "\x1b[2m=\x1b[0m2 \x1b[3mepoch\x1b[0m\x1b[2m=\x1b[0m0 \x1b[3motherwise\x1b[0m"
        "\x1b[2m=\x1b[0mSome(Committed)"
    )
    assert tansu_left_ranges(["ready in 4ms", line]) == {"g-c97859e0-r1"}
    assert tansu_left_ranges([line.replace("Some(Committed)", "Some(Begin)")]) == set()
