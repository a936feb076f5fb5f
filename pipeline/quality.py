"""Online forecast quality: scale-free MAE, skill against last value, drift in the residuals,
the combination's member weights and the intervals' coverage and width."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Gauge
from river import drift

from pipeline import metrics
from pipeline.normalize import F64, I64

# Residual samples fed to ADWIN per micro-batch (evenly spread): bounds the per-batch cost.
ADWIN_SAMPLES = 512
EW_ALPHA = 0.05  # weight of one batch in the recent MAE/skill gauges


class Quality:
    """Turns each batch's scored errors into the quality metrics."""

    def __init__(self) -> None:
        self.adwin = drift.ADWIN()  # type: ignore[no-untyped-call]
        self.mae: float | None = None
        self.base: float | None = None
        self.drifts = 0
        self.weights: F64 | None = None
        self.coverage: dict[str, float] = {}
        self.width: dict[str, float] = {}

    def observe(self, error: F64, persistence_error: F64) -> None:
        """``error``/``persistence_error`` (M,): scaled absolute errors of M scored forecasts."""
        if len(error) == 0:
            return
        total, base_total = float(error.sum()), float(persistence_error.sum())
        metrics.SCORED.inc(len(error))
        metrics.SCALED_ERROR.inc(total)
        metrics.PERSISTENCE_ERROR.inc(base_total)
        mae, base = total / len(error), base_total / len(error)
        self.mae = mae if self.mae is None else self.mae + EW_ALPHA * (mae - self.mae)
        self.base = base if self.base is None else self.base + EW_ALPHA * (base - self.base)
        metrics.MAE.set(self.mae)
        if self.base > 0:
            metrics.SKILL.set(self.mae / self.base)
        step = max(len(error) // ADWIN_SAMPLES, 1)
        for value in error[::step][:ADWIN_SAMPLES].tolist():
            # Clipped: one wild tick is not a drift.
            self.adwin.update(min(value, 50.0))  # type: ignore[no-untyped-call]
            if self.adwin.drift_detected:
                self.drifts += 1
                metrics.DRIFTS.inc()

    def observe_combination(
        self,
        members: Sequence[str],
        groups: Sequence[str],
        rows: int,
        weight_sum: F64,
        scored: I64,
        covered: I64,
        width_sum: F64,
    ) -> None:
        """One batch's combination figures: ``rows`` forecasts, the sum of their member weights
        (M,), and per horizon group (G,) intervals scored/covered and the sum of their widths."""
        if rows == 0 or len(weight_sum) != len(members):
            return
        mean = weight_sum / rows
        self.weights = (
            mean if self.weights is None else self.weights + EW_ALPHA * (mean - self.weights)
        )
        for name, w in zip(members, self.weights.tolist(), strict=True):
            metrics.MEMBER_WEIGHT.labels(name).set(w)
        for g, label in enumerate(groups):
            _ew_set(self.width, label, float(width_sum[g]) / rows, metrics.INTERVAL_WIDTH)
            n = int(scored[g])
            if n == 0:
                continue
            metrics.INTERVAL_SCORED.labels(label).inc(n)
            metrics.INTERVAL_COVERED.labels(label).inc(int(covered[g]))
            _ew_set(self.coverage, label, int(covered[g]) / n, metrics.INTERVAL_COVERAGE)


def _ew_set(recent: dict[str, float], label: str, value: float, gauge: Gauge) -> None:
    old = recent.get(label)
    recent[label] = value if old is None else old + EW_ALPHA * (value - old)
    gauge.labels(label).set(recent[label])
