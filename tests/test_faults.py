"""Broker faults: unreachable at start-up, restarted mid-stream. Each test owns its broker."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from kafka import KafkaAdminClient

from pipeline.embedded import EmbeddedBroker, free_port
from tests.kafka_helpers import DaemonProcess, produce, read_topic

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _ticks(start: int, n: int, streams: int = 10) -> list[tuple[bytes | None, bytes | None]]:
    return [
        (f"m{s}".encode(), json.dumps({"ts": T0 + t, "value": 10.0 * s + (t % 7)}).encode())
        for t in range(start, start + n)
        for s in range(streams)
    ]


def _args(bootstrap: str, metrics_port: int) -> list[str]:
    return [
        "--bootstrap-servers", bootstrap, "--input-topic", "in", "--output-topic", "out",
        "--dlq-topic", "dlq", "--group-id", "g", "--partitions", "3",
        "--metrics-port", str(metrics_port), "--no-sample-feed",
    ]  # fmt: skip


def _wait_topics(bootstrap: str, topics: set[str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap)
            names = set(admin.list_topics())
            admin.close()
            if topics <= names:
                return
        except Exception:  # the broker may still be coming up
            pass
        time.sleep(0.5)
    raise AssertionError(f"topics {topics} not created within {timeout_s}s")


def test_unreachable_broker_at_start_up_is_retried(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    port, metrics_port = free_port(), free_port()
    bootstrap = f"127.0.0.1:{port}"
    daemon = start_daemon(_args(bootstrap, metrics_port))
    daemon.wait_for("event=broker_unreachable attempt=2", timeout_s=30)
    assert _status(metrics_port, "/healthz") == 200
    assert _status(metrics_port, "/readyz") == 503
    with EmbeddedBroker(port=port):
        _wait_topics(bootstrap, {"in", "out", "dlq"})
        produce(bootstrap, "in", _ticks(0, 20))
        assert len(read_topic(bootstrap, "out", 200, timeout_s=60)) == 200
        assert _status(metrics_port, "/readyz") == 200
        assert daemon.stop() == 0
    assert daemon.log().count("Traceback") == 0


# Known open problem (issue 5 note): on Tansu the consumer group sometimes never rejoins after
# the broker restart (partitions revoked, no new assignment), in both modes, in about 1 of 3
# full-suite runs under load; it passes alone. Not strict: an unexpected pass is reported (X).
RESTART_REJOIN_FLAKE = pytest.mark.xfail(
    strict=False, reason="group rejoin after a Tansu restart sometimes stalls (open problem)"
)


@RESTART_REJOIN_FLAKE
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_broker_restart_mid_stream(
    start_daemon: Callable[..., DaemonProcess], guarantee: str
) -> None:
    port, metrics_port = free_port(), free_port()
    bootstrap = f"127.0.0.1:{port}"
    broker = EmbeddedBroker(port=port).start()
    try:
        env = {
            "PIPELINE_KAFKA__PROCESSING_GUARANTEE": guarantee,
            "PIPELINE_KAFKA__TRANSACTION_TIMEOUT_MS": "10000",
        }
        daemon = start_daemon(_args(bootstrap, metrics_port), env=env)
        _wait_topics(bootstrap, {"in", "out", "dlq"})
        produce(bootstrap, "in", _ticks(0, 20))
        first = read_topic(bootstrap, "out", 200, timeout_s=60)
        assert len(first) == 200

        broker.stop()  # memory only: every topic, group and offset is gone
        time.sleep(10)
        broker = EmbeddedBroker(port=port).start()

        _wait_topics(bootstrap, {"in", "out", "dlq"}, timeout_s=60)  # recreated by the daemon
        produce(bootstrap, "in", _ticks(20, 20))
        second = read_topic(bootstrap, "out", 200, timeout_s=90)
        assert len(second) >= 200
        # The group rebalances when the broker comes back and the daemon restores the streams of
        # its partitions from the changelog, which the memory-only broker lost with everything
        # else: every stream starts cold, seq from 1 (documented loss). On a durable cluster the
        # changelog survives and seq continues.
        for s in range(10):
            seqs = sorted({r.json()["seq"] for r in second if r.key == f"m{s}".encode()})
            assert seqs == list(range(1, 21)), (s, seqs)
        assert "event=topics_missing" in daemon.log()
        assert daemon.proc.poll() is None  # never crashed
        assert daemon.stop() == 0
    finally:
        broker.stop()
