"""Statistics and plain-text tables shared by the benchmark parts."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from typing import Any


def median(values: Sequence[float]) -> float:
    """Median of the finite-or-infinite values (NaN, i.e. failed runs, are left out)."""
    kept = [v for v in values if v == v]
    return float(statistics.median(kept)) if kept else float("nan")


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {
        "median": median(values),
        "min": float(min(values)),
        "max": float(max(values)),
        "n": len(values),
    }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted sequence."""
    if len(sorted_values) == 0:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q / 100.0 * (len(sorted_values) - 1))))
    return float(sorted_values[k])


def fmt_rate(x: float) -> str:
    if x != x:  # nan
        return "n/a"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:,.1f}"


def fmt_ms(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds * 1000:,.0f} ms"


def fmt_ratio(x: float) -> str:
    if x != x:
        return "n/a"
    return f"{x:,.1f}x" if x >= 10 else f"{x:.2f}x"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISSED")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A fixed-width table; the first column is left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            row[i].ljust(widths[i]) if i == 0 else row[i].rjust(widths[i]) for i in range(len(row))
        ]
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out.append(line(cells[0]))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)


def busy_cores(seconds: float = 1.0) -> float:
    """Cores kept busy by the whole machine over ``seconds`` (call it while this process idles)."""
    import time

    def read() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            parts = [int(x) for x in fh.readline().split()[1:]]
        return sum(parts) - parts[3] - parts[4], sum(parts)

    try:
        b0, t0 = read()
        time.sleep(seconds)
        b1, t1 = read()
    except OSError:
        return float("nan")
    return (b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1)


def load_note(cores: float) -> str:
    if cores != cores:
        return "background load: unknown"
    text = f"background load before start: {cores:.2f} of {os.cpu_count()} cores busy"
    if cores > 0.3:
        text += " -- WARNING: other processes are using the CPU; figures are depressed"
    return text


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for raw in fh:
                if raw.startswith("model name"):
                    info["cpu_model"] = raw.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import kafka

        info["kafka_python"] = kafka.__version__
    except ImportError:
        pass
    return info
