"""Tick generators and a paced producer: replay a CSV or synthesize seeded streams.

CSV layouts:

- ``wide`` (like ETT): a time column, then one column per stream; stream id = ``PREFIX.COLUMN``.
- ``long`` (like the stocks file): one row per tick with stream, time and value columns.

Times in the CSV may be epoch seconds, epoch milliseconds or ISO-8601/"YYYY-MM-DD HH:MM:SS" (UTC).
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import numpy as np

from pipeline.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SimTick:
    """One tick to produce: stream id, event time (epoch s) and value."""

    stream: str
    ts: float
    value: float


def open_text(path: Path) -> TextIO:
    """Open a CSV, transparently gunzipping ``.gz`` files."""
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
        return path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot open ({exc.strerror})", path=str(path)) from exc


def parse_time(raw: str) -> float:
    """Epoch seconds from epoch s/ms digits or an ISO-like string (naive = UTC)."""
    text = raw.strip()
    try:
        number = float(text)
    except ValueError:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    return number / 1000.0 if number > 1e11 else number


def wide_csv_ticks(
    path: Path, *, time_col: str | None = None, columns: Sequence[str] | None = None
) -> Iterator[SimTick]:
    """Ticks of a wide CSV, row by row; each numeric column is a stream ``STEM.COLUMN``."""
    prefix = path.name.split(".")[0]
    with open_text(path) as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise DataError("empty CSV", path=str(path))
        tcol = header.index(time_col) if time_col else 0
        wanted = [c for c in header if c != header[tcol]] if not columns else list(columns)
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(f"columns {missing} not in header {header}", path=str(path))
        idx = [(header.index(c), f"{prefix}.{c}") for c in wanted]
        for row in reader:
            ts = parse_time(row[tcol])
            for i, stream in idx:
                if row[i] not in ("", "NA", "nan", "NaN"):
                    yield SimTick(stream, ts, float(row[i]))


def long_csv_ticks(
    path: Path, *, stream_col: str, time_col: str, value_col: str
) -> Iterator[SimTick]:
    """Ticks of a long CSV, one per row, in file order."""
    with open_text(path) as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        missing = [c for c in (stream_col, time_col, value_col) if c not in fields]
        if missing:
            raise DataError(f"columns {missing} not in header {fields}", path=str(path))
        for row in reader:
            raw = row[value_col]
            if raw in ("", "NA", "nan", "NaN"):
                continue
            yield SimTick(row[stream_col], parse_time(row[time_col]), float(raw))


def synthetic_ticks(
    n_streams: int, *, seed: int = 0, start: float | None = None, interval: float = 1.0
) -> Iterator[SimTick]:
    """Endless seeded sensor-like streams, scales from 1e-3 to 1e5: a cycle (20 to 200 ticks,
    amplitude 2-6 typical moves), a level that drifts with momentum (its change is AR(1) with
    phi 0.5-0.85), and a little measurement noise. Both the cycle and the momentum make the next
    value predictable beyond "same as the last one", as in real sensor and market feeds, so the
    demo's skill ratio shows what the forecaster adds.

    Round-robin over streams; stream i ticks every ``interval`` seconds of event time.
    """
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-3, 5, n_streams)
    level = scale * rng.uniform(20, 100, n_streams)
    period = rng.uniform(20, 200, n_streams)
    phase = rng.uniform(0, 2 * math.pi, n_streams)
    amplitude = rng.uniform(2, 6, n_streams)
    momentum = rng.uniform(0.5, 0.85, n_streams)
    drift = np.zeros(n_streams)
    t0 = time.time() if start is None else start
    k = 0
    while True:
        drift = momentum * drift + rng.normal(0, 0.3, n_streams)
        level = level + scale * drift
        cycle = amplitude * np.sin(2 * math.pi * k / period + phase)
        values = level + scale * (cycle + rng.normal(0, 0.05, n_streams))
        ts = t0 + k * interval
        for i in range(n_streams):
            yield SimTick(f"sensor-{i:04d}", ts, float(values[i]))
        k += 1


class Pacer:
    """Sleeps so that ticks leave at ``rate`` per second, or at event time / ``speedup``."""

    def __init__(self, rate: float | None = None, speedup: float | None = None) -> None:
        self.rate, self.speedup = rate, speedup
        self._start = time.monotonic()
        self._count = 0
        self._ts0: float | None = None

    def wait(self, tick: SimTick) -> None:
        self._count += 1
        if self.rate:
            due = self._start + self._count / self.rate
        elif self.speedup:
            self._ts0 = tick.ts if self._ts0 is None else self._ts0
            due = self._start + (tick.ts - self._ts0) / self.speedup
        else:
            return
        delay = due - time.monotonic()
        if delay > 0.002:
            time.sleep(delay)


def produce(
    bootstrap_servers: str,
    topic: str,
    ticks: Iterable[SimTick],
    *,
    rate: float | None = None,
    speedup: float | None = None,
    limit: int | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Produce ``ticks`` into ``topic`` (key = stream) paced as asked; returns the count sent."""
    from kafka import KafkaProducer

    from pipeline.messages import encode_tick

    producer = KafkaProducer(
        bootstrap_servers=bootstrap_servers.split(","), linger_ms=5, enable_idempotence=False
    )
    pacer = Pacer(rate, speedup)
    sent = 0
    try:
        for tick in ticks:
            if (limit is not None and sent >= limit) or (stop is not None and stop.is_set()):
                break
            pacer.wait(tick)
            producer.send(topic, key=tick.stream.encode(), value=encode_tick(tick.ts, tick.value))
            sent += 1
        producer.flush()
    finally:
        producer.close(timeout=5)
    return sent


class SampleFeed(threading.Thread):
    """Background synthetic feed used by ``pipeline run`` on the embedded broker."""

    def __init__(self, bootstrap_servers: str, topic: str, streams: int, rate: float, seed: int):
        super().__init__(name="sample-feed", daemon=True)
        self.args = (bootstrap_servers, topic, streams, rate, seed)
        self.stop_event = threading.Event()

    def run(self) -> None:
        servers, topic, streams, rate, seed = self.args
        try:
            produce(
                servers, topic, synthetic_ticks(streams, seed=seed), rate=rate, stop=self.stop_event
            )
        except Exception:
            log.exception("event=sample_feed_failed")

    def stop(self) -> None:
        """Stop producing and wait for the last sends (call before the broker goes away)."""
        self.stop_event.set()
        self.join(timeout=10)
