"""Zero-shot accuracy on public series the model never saw: ``python -m benchmarks.heldout``.

The series come from the data sets bundled inside three well-known Python packages (their
wheels are fetched once with ``pip download --no-deps`` into ``out/heldout/wheels`` and read as
zip files; nothing is installed): statsmodels 0.14.4 (BSD-3), pmdarima 2.1.1 (MIT) and sktime
1.2.0 (BSD-3). None of them is in the training corpus (ETT, Beijing air quality, ten US stocks
that do not include MSFT). Each series is cut to its last 2,000 ticks and replayed through the
serving engine (``pipeline.backtest.engine_forecasts``), at a regular interval, as its own stream.

Protocol (issue 13): one-step MAE after a 50-tick warm-up, as a ratio to persistence (the last
value); the table's summary is the geometric mean of the ratios. Beside the served (combined)
forecast: the model alone, the damped-trend rule ``x_t + 0.5 (x_t - x_{t-1})``, and the best of
persistence and damped per series (an oracle choice). Intervals: empirical coverage of the served
80% bounds at step 1, and pooled over all steps.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backtest import ServedForecasts, damped_trend, engine_forecasts
from pipeline.combine import CombineConfig
from pipeline.dataset import Series
from pipeline.model import load_model

WHEELS = {
    "statsmodels": "statsmodels==0.14.4",
    "pmdarima": "pmdarima==2.1.1",
    "sktime": "sktime==1.2.0",
}
WARMUP = 50
LAST = 2_000
HOUR, DAY = 3_600.0, 86_400.0


@dataclass
class Public:
    """One held-out series: where it comes from, what it measures, its tick interval."""

    name: str
    domain: str
    origin: str
    step_seconds: float
    values: np.ndarray


def fetch_wheels(folder: Path) -> dict[str, zipfile.ZipFile]:
    """The three wheels as open zip files, downloaded on first use."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, spec in WHEELS.items():
        found = sorted(folder.glob(f"{name}-*.whl"))
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder)]
            subprocess.run([*cmd, spec], check=True)
            found = sorted(folder.glob(f"{name}-*.whl"))
        out[name] = zipfile.ZipFile(found[-1])
    return out


def _csv_column(text: str, column: int, skip: int = 1) -> np.ndarray:
    rows = [line.split(",") for line in text.splitlines()[skip:] if line.strip()]
    return np.array([float(r[column]) if r[column] not in ("", "NA") else math.nan for r in rows])


def _ts_cases(text: str) -> list[np.ndarray]:
    """Series of a ``.ts`` file (sktime/UEA format), one per case, class label dropped."""
    cases = []
    for line in text.splitlines():
        if line and not line.startswith(("#", "@")):
            cases.append(np.array([float(v) for v in line.split(":")[0].split(",")]))
    return cases


def public_series(wheels: dict[str, zipfile.ZipFile]) -> list[Public]:
    """Twelve series from seven domains (see the module docstring)."""
    sm, pm, sk = wheels["statsmodels"], wheels["pmdarima"], wheels["sktime"]

    def read(z: zipfile.ZipFile, path: str) -> str:
        raw = z.read(path)
        return (gzip.decompress(raw) if path.endswith(".gz") else raw).decode()

    def untar(z: zipfile.ZipFile, path: str, member: str) -> str:
        with tarfile.open(fileobj=io.BytesIO(z.read(path))) as tar:
            f = tar.extractfile(member)
            assert f is not None
            return f.read().decode()

    sk_data = "sktime/datasets/data/"
    elnino = read(sm, "statsmodels/datasets/elnino/elnino.csv").splitlines()[1:]
    sunspots = read(pm, "pmdarima/datasets/data/sunspots.txt.gz").split()
    acsf1 = _ts_cases(read(sk, sk_data + "ACSF1/ACSF1_TRAIN.ts"))
    plaid = _ts_cases(read(sk, sk_data + "PLAID/PLAID_TRAIN.ts"))
    series = [
        Public("co2", "atmosphere", "statsmodels co2 (Mauna Loa, weekly)", 7 * DAY,
               _csv_column(read(sm, "statsmodels/datasets/co2/co2.csv"), 1)),
        Public("elnino", "ocean", "statsmodels elnino (Niño 1+2 SST, monthly)", 30 * DAY,
               np.array([float(v) for row in elnino for v in row.split(",")[1:]])),
        Public("sunspots", "astronomy", "pmdarima sunspots (monthly)", 30 * DAY,
               np.array([float(v) for v in sunspots])),
        Public("msft", "finance", "pmdarima msft (daily close)", DAY,
               _csv_column(untar(pm, "pmdarima/datasets/data/msft.tar.gz", "msft.csv"), 4)),
        Public("ecg", "physiology", "sktime mitdb (ECG)", 1 / 360,
               _csv_column(read(sk, sk_data + "mitdb/mitdb.csv"), 0)),
        Public("electric_devices", "energy", "sktime ElectricDevices (segmentation)", 120.0,
               _csv_column(read(sk, sk_data + "segmentation/ElectricDevices.csv"), 1, 0)),
        Public("solar", "energy", "sktime solar (UK generation, 30 min)", 1_800.0,
               _csv_column(read(sk, sk_data + "solar/solar.csv"), 1)),
        Public("acsf1_a", "energy", "sktime ACSF1 case 0 (appliance power)", 10.0, acsf1[0]),
        Public("acsf1_b", "energy", "sktime ACSF1 case 50 (appliance power)", 10.0, acsf1[50]),
        Public("plaid", "energy", "sktime PLAID case 0 (appliance current)", 1 / 30_000,
               plaid[0]),
        Public("gunpoint", "motion", "sktime GunPoint (segmentation, hand position)", 1 / 30,
               _csv_column(read(sk, sk_data + "segmentation/GunPoint.csv"), 1, 0)),
        Public("yahoo", "web", "sktime yahoo (service traffic)", HOUR,
               _csv_column(read(sk, sk_data + "yahoo/yahoo.csv"), 0)),
    ]  # fmt: skip
    for s in series:
        s.values = s.values[~np.isnan(s.values)][-LAST:]
    return series


def one_step_mae(forecast: np.ndarray, actual: np.ndarray, start: int = WARMUP) -> float:
    """MAE of ``forecast[t]`` (made at t for t + 1) against ``actual[t + 1]``, for t >= start."""
    return float(np.mean(np.abs(forecast[start:-1] - actual[start + 1 :])))


def coverage(
    served: ServedForecasts, actual: np.ndarray, start: int = WARMUP
) -> tuple[float, float]:
    """Share of actuals inside the served bounds: at step 1, and pooled over every step."""
    hits, total, first = 0, 0, math.nan
    for h in range(1, served.lower.shape[1] + 1):
        t = np.arange(start, len(actual) - h)
        inside = (served.lower[t, h - 1] <= actual[t + h]) & (
            actual[t + h] <= served.upper[t, h - 1]
        )
        hits, total = hits + int(inside.sum()), total + len(t)
        if h == 1:
            first = float(inside.mean())
    return first, hits / max(total, 1)


def evaluate(
    model: Path | None, combine: CombineConfig, series: Sequence[Public]
) -> dict[str, Any]:
    loaded = load_model(model)
    streams = [
        Series(s.name, 1.7e9 + s.step_seconds * np.arange(len(s.values)), s.values[:, None],
               ["value"])
        for s in series
    ]  # fmt: skip
    served = engine_forecasts(loaded, streams, combine=combine)
    rows = []
    for s, out in zip(series, served, strict=True):
        x = s.values
        persistence = one_step_mae(x, x)
        damped = one_step_mae(damped_trend(x, 1)[:, 0], x)
        combined, alone = one_step_mae(out.combined[:, 0], x), one_step_mae(out.model[:, 0], x)
        cov1, cov = coverage(out, x)
        rows.append({
            "series": s.name, "domain": s.domain, "origin": s.origin, "n": len(x),
            "combined": combined / persistence, "model": alone / persistence,
            "damped": damped / persistence, "best_rule": min(persistence, damped) / persistence,
            "coverage_h1": cov1, "coverage": cov,
        })  # fmt: skip

    def gm(key: str) -> float:
        return float(np.exp(np.mean([np.log(r[key]) for r in rows])))

    return {
        "model": loaded.meta.version,
        "combine": combine.to_dict(),
        "series": rows,
        "geomean": {k: gm(k) for k in ("combined", "model", "damped", "best_rule")},
        "worst_vs_best_rule": max(r["combined"] / r["best_rule"] for r in rows),
        "coverage": float(np.mean([r["coverage"] for r in rows])),
        "domains": sorted({r["domain"] for r in rows}),
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']}; one-step MAE / persistence after {WARMUP} ticks",
        "",
        "| series | domain | n | served | model alone | damped rule | best rule | served / best "
        "rule | 80% coverage h1 / all steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["series"]:
        lines.append(
            f"| {r['series']} | {r['domain']} | {r['n']} | {r['combined']:.3f} | {r['model']:.3f} "
            f"| {r['damped']:.3f} | {r['best_rule']:.3f} | {r['combined'] / r['best_rule']:.3f} "
            f"| {r['coverage_h1']:.3f} / {r['coverage']:.3f} |"
        )
    g = report["geomean"]
    lines.append(
        f"| **geometric mean** | {len(report['domains'])} domains | | **{g['combined']:.3f}** "
        f"| {g['model']:.3f} | {g['damped']:.3f} | {g['best_rule']:.3f} | "
        f"worst {report['worst_vs_best_rule']:.3f} | mean {report['coverage']:.3f} |"
    )
    ok = [
        ("geometric mean <= 0.84", g["combined"] <= 0.84),
        ("below the damped rule", g["combined"] < g["damped"]),
        ("every series <= 1.02x the best rule", report["worst_vs_best_rule"] <= 1.02),
    ]
    lines.append("")
    lines += [f"target {name}: {'met' if good else 'MISSED'}" for name, good in ok]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.heldout", description=__doc__)
    p.add_argument("--model", type=Path, help="model .pt (default: the shipped model)")
    p.add_argument("--wheels", type=Path, default=Path("out/heldout/wheels"))
    p.add_argument("--json", type=Path, default=Path("out/heldout.json"))
    p.add_argument("--members", help="comma-separated members (default: all)")
    args = p.parse_args(argv)
    combine = CombineConfig()
    if args.members:
        combine = CombineConfig(members=tuple(args.members.split(",")))
    report = evaluate(args.model, combine, public_series(fetch_wheels(args.wheels)))
    print(render(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
