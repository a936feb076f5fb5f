"""Test helpers that talk to a real broker: produce raw records, read topics to a count."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

ROOT = Path(__file__).resolve().parents[1]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create_topics(bootstrap: str, topics: Iterable[str], partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(t, partitions, 1) for t in topics])
    finally:
        admin.close()


def produce(
    bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes | None]]
) -> int:
    """Send (key, value) records in order; returns the count. Ordered per partition."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=5,
        enable_idempotence=False,
        max_in_flight_requests_per_connection=1,
    )
    n = 0
    for key, value in records:
        producer.send(topic, key=key, value=value)
        n += 1
    producer.flush()
    producer.close()
    return n


@dataclass
class Record:
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    partition: int
    offset: int

    def json(self) -> Any:
        return json.loads(self.value or b"null")


def read_topic(
    bootstrap: str,
    topic: str,
    count: int,
    timeout_s: float = 60.0,
    idle_s: float = 0.0,
    until: Callable[[Record], bool] | None = None,
    isolation_level: str = "read_committed",
) -> list[Record]:
    """Read ``topic`` from the beginning until ``count`` records arrived (or the timeout).

    With ``idle_s``, go on reading after that until no record came for ``idle_s`` seconds:
    for topics that may hold more than ``count`` (repeats of aborted transactions on Tansu).
    With ``until``, read until it returns True for a record (it sees every record once, in
    order), whatever the count: for topics whose repeats make a count meaningless.
    """
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=unique("reader"),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation_level,
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
    )
    out: list[Record] = []
    deadline = time.monotonic() + timeout_s
    last_new = time.monotonic()
    done = False
    try:
        while time.monotonic() < deadline and not done:
            if until is None and len(out) >= count and time.monotonic() - last_new >= idle_s:
                break
            for tp, recs in consumer.poll(timeout_ms=200).items():
                for r in recs:
                    headers = {k: v for k, v in r.headers}
                    out.append(Record(r.key, r.value, headers, tp.partition, r.offset))
                    last_new = time.monotonic()
                    if until is not None and until(out[-1]):
                        done = True
    finally:
        consumer.close()
    return out


# Tansu 0.6.0's EndTxn, after a transaction's markers, settles every overlapping transaction that
# is prepared. When a second producer's EndTxn settles this one while it is still writing its
# markers, the markers written after that add offset ranges to a finished transaction that nothing
# clears, and the broker warns with this line (tansu-storage dynostore txn_end, `otherwise =>`).
# For a producer that goes on, its next transaction reuses the epoch and clears them; for one that
# was killed and fenced, they stay, every later transaction on those partitions overlaps them and
# is never settled, and read_committed readers stop there for good. docs/decisions.md 39.
_TANSU_LEFT_RANGES = re.compile(
    r'transaction="(?P<id>[^"]+)" producer=\d+ epoch=\d+ '
    r"otherwise=Some\((Committed|Aborted)\)"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def tansu_left_ranges(broker_output: Iterable[str]) -> set[str]:
    """Transactional ids whose finished transaction Tansu left holding offset ranges (above)."""
    found = (_TANSU_LEFT_RANGES.search(_ANSI.sub("", line)) for line in broker_output)
    return {m.group("id") for m in found if m}


class DaemonProcess:
    """``pipeline run`` as a subprocess with its log in a file; stop() sends SIGTERM."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        module: str = "pipeline.cli",
    ):
        full_env = {
            **os.environ,
            "PIPELINE_KAFKA__SESSION_TIMEOUT_MS": "2000",
            "PIPELINE_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
            **(env or {}),
        }
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "run", *args],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, text: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(
            f"{text!r} not in daemon log after {timeout_s}s:\n{self.log()[-3000:]}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
