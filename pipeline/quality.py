"""Online forecast quality: scale-free MAE, skill against last value, drift in the residuals."""

from __future__ import annotations

from river import drift

from pipeline import metrics
from pipeline.normalize import F64

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
