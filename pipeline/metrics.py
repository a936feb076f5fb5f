"""Prometheus metrics, declared once. Units in names; labels bounded (never a stream id)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    make_wsgi_app,
)
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

# Seconds. From a few ms (in-process) to a minute (a consumer far behind).
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.35,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000)


class BulkHistogram(Collector):
    """A Prometheus histogram fed a whole array per call (one micro-batch), not one value.

    ``prometheus_client.Histogram.observe`` costs ~4 µs per value under its lock; here a batch
    costs one ``searchsorted`` and one ``bincount``. Exposed exactly like a Histogram
    (``_bucket{le}``, ``_sum``, ``_count``); bucket ``le=x`` counts values ``<= x``.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self.name, self.documentation = name, documentation
        self._upper = np.array([*buckets, math.inf], dtype=np.float64)
        self._counts = np.zeros(len(self._upper), dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def observe_many(self, values: npt.NDArray[np.float64]) -> None:
        """Count every value of ``values`` (any shape; NaN counts in the +Inf bucket only)."""
        if values.size == 0:
            return
        flat = values.ravel()
        counts = np.bincount(
            np.searchsorted(self._upper, flat, side="left"), minlength=len(self._upper)
        )
        total = float(np.nansum(flat))
        with self._lock:
            self._counts += counts[: len(self._upper)]
            self._sum += total

    def observe(self, value: float) -> None:
        self.observe_many(np.array([value], dtype=np.float64))

    def snapshot(self) -> tuple[list[int], float]:
        """Cumulative bucket counts (``le`` order, +Inf last) and the sum."""
        with self._lock:
            return np.cumsum(self._counts).tolist(), self._sum

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[Metric]:
        cumulative, total = self.snapshot()
        family = HistogramMetricFamily(self.name, self.documentation)
        labels = ["+Inf" if math.isinf(b) else repr(b) for b in self._upper.tolist()]
        family.add_metric([], list(zip(labels, cumulative, strict=True)), total)
        return [family]


END_TO_END = BulkHistogram(
    "pipeline_end_to_end_latency_seconds",
    "Input record timestamp to its forecast acknowledged by the broker (committed, under "
    "exactly-once).",
    LATENCY_BUCKETS,
)
BATCH_SECONDS = Histogram(
    "pipeline_batch_processing_seconds",
    "Wall time of one micro-batch inside its transaction: engine, encode, send.",
    buckets=STAGE_BUCKETS,
)
COMMIT_SECONDS = Histogram(
    "pipeline_commit_seconds",
    "Wall time of one commit: changelog snapshots, flush or transaction commit, offsets.",
    buckets=STAGE_BUCKETS,
)
MODEL_SECONDS = Histogram(
    "pipeline_model_step_seconds",
    "Wall time of the batched model steps (normalizer + torch) of one micro-batch.",
    buckets=STAGE_BUCKETS,
)
BATCH_SIZE = Histogram(
    "pipeline_batch_size", "Input records per micro-batch (one poll).", buckets=SIZE_BUCKETS
)
TICKS = Counter("pipeline_ticks_consumed_total", "Input records consumed.", ["topic"])
FORECASTS = Counter("pipeline_forecasts_emitted_total", "Forecast records produced.", ["topic"])
DEAD_LETTERS = Counter(
    "pipeline_dead_letters_total", "Input records sent to the dead-letter topic.", ["reason"]
)
RECORDS = Counter(
    "pipeline_records_total",
    "Input records by outcome (forecast, dead_letter, dropped), per partition; they reconcile "
    "with the offsets consumed.",
    ["topic", "partition", "outcome"],
)
STATE_RESETS = Counter(
    "pipeline_state_resets_total", "Streams whose state turned non-finite and was reset."
)
SCORED = Counter(
    "pipeline_forecasts_scored_total",
    "One-step forecasts of warm streams compared with the value that arrived next.",
)
SCALED_ERROR = Counter(
    "pipeline_forecast_scaled_abs_error_total",
    "Sum of |actual - one-step forecast| / stream scale; divide its rate by the scored rate "
    "for a scale-free MAE.",
)
PERSISTENCE_ERROR = Counter(
    "pipeline_persistence_scaled_abs_error_total",
    "The same sum for the last-value forecast (the baseline the model must beat).",
)
MAE = Gauge(
    "pipeline_forecast_mae_scaled",
    "Recent scale-free MAE of the one-step forecast (exponentially weighted over batches).",
)
SKILL = Gauge(
    "pipeline_forecast_skill_ratio",
    "Recent model MAE / last-value MAE on the same ticks; below 1 means the model helps.",
)
MEMBER_WEIGHT = Gauge(
    "pipeline_member_weight",
    "Recent mean weight of each member in the served one-step forecast, over all streams "
    "(the model mixed with cheap rules by their recent errors; weights sum to 1).",
    ["member"],
)
INTERVAL_SCORED = Counter(
    "pipeline_interval_scored_total",
    "Served forecast intervals compared with the value that arrived, at the representative "
    "step of each horizon group.",
    ["horizon"],
)
INTERVAL_COVERED = Counter(
    "pipeline_interval_covered_total",
    "Of pipeline_interval_scored_total, those with the value inside [lower, upper].",
    ["horizon"],
)
INTERVAL_COVERAGE = Gauge(
    "pipeline_interval_coverage",
    "Recent share of scored intervals that held the value (exponentially weighted over batches); "
    "the target is forecast.interval_level.",
    ["horizon"],
)
INTERVAL_WIDTH = Gauge(
    "pipeline_interval_width_scaled",
    "Recent mean width of the served intervals, in units of the stream's typical one-step move "
    "times sqrt(step).",
    ["horizon"],
)
DRIFTS = Counter(
    "pipeline_drift_detections_total",
    "Changes in the forecast residuals detected by River's ADWIN.",
)
SEND_RETRIES = Counter(
    "pipeline_send_retries_total", "Micro-batches whose outputs had to be sent again."
)
COMMIT_FAILURES = Counter(
    "pipeline_commit_failures_total", "Offset commits that failed (the batch may be redelivered)."
)
BROKER_RETRIES = Counter(
    "pipeline_broker_connect_retries_total", "Failed attempts to reach the broker at start-up."
)
REDELIVERED = Counter(
    "pipeline_redelivered_skipped_total",
    "Records redelivered after a failed commit and skipped (their outputs were already sent).",
)
TOPICS_RECREATED = Counter(
    "pipeline_topics_recreated_total", "Topics found missing while running and created again."
)
EVICTED = Counter("pipeline_streams_evicted_total", "Streams evicted (idle TTL or stream cap).")
RESTORED = Counter("pipeline_streams_restored_total", "Stream states restored from the changelog.")
RESTORE_SECONDS = Histogram(
    "pipeline_restore_seconds",
    "Time to restore the state of newly assigned partitions from the changelog.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
REBALANCES = Counter("pipeline_rebalances_total", "Partition assignments received from the group.")
REJOINS_FORCED = Counter(
    "pipeline_group_rejoins_forced_total",
    "Consumers recreated because the group owed an assignment past kafka.rejoin_timeout_ms.",
)
ASSIGNED = Gauge("pipeline_assigned_partitions", "Input partitions assigned to this instance.")
COMMITS = Counter(
    "pipeline_commits_total",
    "Commits (exactly-once: transactions) by what made them due: interval (kafka."
    "commit_interval_ms), records (kafka.commit_records), caught_up (kafka."
    "commit_records_caught_up) or forced (rebalance, restore, model reload, shutdown).",
    ["trigger"],
)
COMMIT_RECORDS = Histogram(
    "pipeline_commit_records", "Input records per commit.", buckets=SIZE_BUCKETS
)
TRANSACTIONS = Counter(
    "pipeline_transactions_total",
    "Micro-batch transactions by outcome (committed, aborted).",
    ["outcome"],
)
GUARANTEE = Info("pipeline_processing", "The processing guarantee in force.")
MODEL_RELOADS = Counter(
    "pipeline_model_reloads_total",
    "Model reloads by outcome: kept_state (same shapes), rewarmed (hidden state reset), failed.",
    ["outcome"],
)
STREAMS_REWARMED = Counter(
    "pipeline_streams_rewarmed_total", "Streams whose hidden state was reset by a model reload."
)
LAG = Gauge(
    "pipeline_consumer_lag_records",
    "High watermark minus the consumer position, per assigned input partition.",
    ["topic", "partition"],
)
ACTIVE_STREAMS = Gauge("pipeline_active_streams", "Streams with state held by this instance.")
STATE_BYTES = Gauge("pipeline_state_bytes", "Bytes of per-stream arrays (allocated capacity).")
MODEL_INFO = Info("pipeline_model", "The serving model and the settings fingerprint.")


READY = Gauge("pipeline_ready", "1 while /readyz answers 200 (in the group, polling the broker).")


@dataclass
class Health:
    """What /healthz and /readyz report; the daemon loop updates it."""

    loop_at: float = 0.0  # monotonic time of the last loop iteration
    poll_ok_at: float = 0.0  # monotonic time of the last poll that did not fail
    assigned: bool = False  # the group has given this instance its (possibly empty) share
    restoring: bool = False  # state of newly assigned partitions is being restored
    stuck_after_s: float = 60.0
    stale_after_s: float = 30.0

    def alive(self) -> bool:
        return self.loop_at == 0.0 or time.monotonic() - self.loop_at < self.stuck_after_s

    def ready(self) -> bool:
        fresh = time.monotonic() - self.poll_ok_at < self.stale_after_s
        return self.assigned and not self.restoring and fresh and self.alive()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not worth a log line


def serve(host: str, port: int, health: Health) -> None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` from a daemon thread.

    Port 0 disables the endpoint. Raises OSError if the port is taken.
    """
    if not port:
        return
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok = health.alive() if path == "/healthz" else health.ready()
            READY.set(1 if health.ready() else 0)
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"not ready\n"]
        READY.set(1 if health.ready() else 0)
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
