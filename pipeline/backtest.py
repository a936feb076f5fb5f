"""``pipeline backtest``: replay history through the serving engine and score it against baselines.

The model's forecasts come from :class:`~pipeline.engine.Engine` fed tick by tick in micro-batches,
exactly as the daemon feeds it (no Kafka): ``combined`` is what would have been served (the model
mixed online with cheap members, :mod:`pipeline.combine`, with ``--season`` as the daemon's
``forecast.season``), ``model`` the network alone (what training evaluates). The combined
forecast's intervals are scored too: empirical coverage per step and mean width. Beside them, on
the same ticks and the same evaluation window:

- ``persistence``: the last value, for every step;
- ``damped``: the damped-trend rule ``x_t + c_h (x_t - x_{t-1})``, c_h = 0.5 + ... + 0.5^h;
- ``seasonal_naive``: the value one season before the forecast time (``--season`` ticks);
- ``snarimax`` and ``holt_winters``: River's online models, learning one tick at a time over the
  whole series and forecasting H steps at every tick of the evaluation window.

A forecast made at tick t for step h is scored when t lies in the evaluation window
``[start, n)`` and t + h < n (the same rule as ``pipeline train``'s test evaluation, so the two
agree). Errors are in stream units: MAE and RMSE per step; MASE divides MAE by the mean absolute
one-step change of the series before the window (Hyndman's non-seasonal scale).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.combine import CombineConfig
from pipeline.dataset import (
    DEFAULT_SPLIT,
    Series,
    SplitSpec,
    add_data_arguments,
    load_data,
    parse_split,
)
from pipeline.engine import Engine
from pipeline.errors import DataError
from pipeline.messages import Source, Tick
from pipeline.model import LoadedModel, load_model
from pipeline.normalize import F64

log = logging.getLogger(__name__)

BASELINES = ("persistence", "damped", "seasonal_naive", "snarimax", "holt_winters")


@dataclass
class Window:
    """The scored part of one series: ticks [start, end)."""

    start: int
    end: int


@dataclass
class Scores:
    """Absolute and squared errors summed per horizon step, over any number of series."""

    horizon: int
    abs_sum: F64 = field(init=False)
    sq_sum: F64 = field(init=False)
    count: F64 = field(init=False)
    mase: list[list[float]] = field(default_factory=list)  # per series: MASE per step

    def __post_init__(self) -> None:
        self.abs_sum = np.zeros(self.horizon)
        self.sq_sum = np.zeros(self.horizon)
        self.count = np.zeros(self.horizon)

    def add(self, forecast: F64, actual: F64, window: Window, naive_scale: float) -> list[float]:
        """Score ``forecast`` (n, H) against ``actual`` (n,); returns this series' MAE per step."""
        mae = []
        for h in range(1, self.horizon + 1):
            t = np.arange(window.start, max(window.end - h, window.start))
            err = forecast[t, h - 1] - actual[t + h]
            err = err[~np.isnan(err)]
            self.abs_sum[h - 1] += np.abs(err).sum()
            self.sq_sum[h - 1] += (err * err).sum()
            self.count[h - 1] += len(err)
            mae.append(float(np.abs(err).mean()) if len(err) else math.nan)
        self.mase.append([m / naive_scale if naive_scale > 0 else math.nan for m in mae])
        return mae

    def summary(self) -> dict[str, Any]:
        count = np.maximum(self.count, 1)
        mae, rmse = self.abs_sum / count, np.sqrt(self.sq_sum / count)
        mase = np.nanmean(np.array(self.mase), axis=0) if self.mase else np.full(self.horizon, 0.0)
        return {
            "mae": mae.tolist(),
            "rmse": rmse.tolist(),
            "mase": mase.tolist(),
            "mae_h1": float(mae[0]),
            "mae_mean": float(mae.mean()),
            "rmse_mean": float(rmse.mean()),
            "mase_mean": float(mase.mean()),
            "n": int(self.count[0]),
        }


@dataclass
class ServedForecasts:
    """What the engine served for every tick of one series: each (n, H), stream units."""

    combined: F64
    lower: F64
    upper: F64
    model: F64

    @staticmethod
    def zeros(n: int, horizon: int) -> ServedForecasts:
        return ServedForecasts(*(np.zeros((n, horizon)) for _ in range(4)))


def engine_forecasts(
    loaded: LoadedModel,
    series: Sequence[Series],
    rows_per_batch: int = 0,
    combine: CombineConfig | None = None,
) -> list[ServedForecasts]:
    """Forecasts for every tick of every series, from the serving engine.

    Series are replayed side by side, ``rows_per_batch`` rows of each per micro-batch (default:
    about 4,096 ticks per batch), each a stream of its own, in the model's feature order.
    """
    meta = loaded.meta
    # Plain Python rows once per series: Tick wants floats, and per-row numpy access is slow.
    columns = [s.values[:, _feature_columns(s, meta.features)].tolist() for s in series]
    times = [s.ts.tolist() for s in series]
    engine = Engine(loaded, capacity=max(len(series), 1), combine=combine, keep_model=True)
    horizon = loaded.model.config.horizon
    out = [ServedForecasts.zeros(len(s.ts), horizon) for s in series]
    rows = rows_per_batch or max(1, 4096 // max(len(series), 1))
    longest = max(len(s.ts) for s in series)
    for r0 in range(0, longest, rows):
        ticks: list[Tick] = []
        where: list[tuple[int, int]] = []
        for i, s in enumerate(series):
            for r in range(r0, min(r0 + rows, len(s.ts))):
                values = tuple(columns[i][r])
                ticks.append(Tick(s.name, times[i][r], values, Source("backtest", i, r, 0)))
                where.append((i, r))
        if not ticks:
            continue
        batch = engine.process(ticks)
        parts = (batch.forecast, batch.lower, batch.upper, batch.model_forecast)
        for j, (i, r) in enumerate(where):
            o = out[i]
            o.combined[r], o.lower[r], o.upper[r], o.model[r] = (a[j] for a in parts)
    return out


def _feature_columns(s: Series, features: Sequence[str]) -> list[int]:
    if list(features) == ["value"] and len(s.features) >= 1:
        return [0]
    missing = [f for f in features if f not in s.features]
    if missing:
        raise DataError(
            f"series {s.name} lacks the model's features {missing} (it has {s.features}); "
            "pass --target/--features as when the model was trained"
        )
    return [s.features.index(f) for f in features]


def seasonal_naive(actual: F64, horizon: int, season: int) -> F64:
    """(n, H): the value ``season * ceil(h / season)`` ticks before t + h; NaN where none."""
    n = len(actual)
    out = np.full((n, horizon), np.nan)
    for h in range(1, horizon + 1):
        back = season * math.ceil(h / season)
        src = np.arange(n) + h - back
        ok = src >= 0
        out[ok, h - 1] = actual[src[ok]]
    return out


def river_forecasts(make: Callable[[], Any], actual: F64, horizon: int, window: Window) -> F64:
    """(n, H) forecasts of a River forecaster learning online; NaN outside the window."""
    model = make()
    out = np.full((len(actual), horizon), np.nan)
    for t, y in enumerate(actual.tolist()):
        model.learn_one(y)
        if t >= window.start:
            # Not enough history yet: the row stays NaN and is scored as missing.
            with contextlib.suppress(ValueError, ZeroDivisionError, OverflowError):
                out[t] = model.forecast(horizon=horizon)
    return out


def make_snarimax(season: int, order: tuple[int, ...]) -> Callable[[], Any]:
    from river import linear_model, optim, preprocessing, time_series

    p, d, q, sp, sd, sq = order

    def make() -> Any:
        regressor = preprocessing.StandardScaler() | linear_model.LinearRegression(
            optimizer=optim.SGD(0.001), intercept_lr=0.001, clip_gradient=10.0
        )
        return time_series.SNARIMAX(
            p=p, d=d, q=q, m=season, sp=sp, sd=sd, sq=sq, regressor=regressor
        )

    return make


def make_holt_winters(
    season: int, params: tuple[float, ...] = (0.5, 0.01, 0.05)
) -> Callable[[], Any]:
    """Additive Holt-Winters (alpha, beta, gamma); (0.3, 0.05, 0.3) diverged on ETTm1 (m=96)."""
    from river import time_series

    alpha, beta, gamma = params

    def make() -> Any:
        return time_series.HoltWinters(  # type: ignore[no-untyped-call]
            alpha=alpha, beta=beta, gamma=gamma, seasonality=season
        )

    return make


def damped_trend(actual: F64, horizon: int, damping: float = 0.5) -> F64:
    """(n, H): ``x_t + c_h (x_t - x_{t-1})`` with c_h = phi + ... + phi^h (the first tick: x_0)."""
    change = np.r_[0.0, np.diff(actual)]
    steps = np.arange(1, horizon + 1)
    c = damping * (1 - damping**steps) / (1 - damping)
    out: F64 = actual[:, None] + c[None, :] * change[:, None]
    return out


def interval_scores(served: ServedForecasts, actual: F64, window: Window) -> dict[str, F64]:
    """Per step: how many actuals were scored, how many lay inside the interval, summed width."""
    horizon = served.combined.shape[1]
    n, inside, width = np.zeros(horizon), np.zeros(horizon), np.zeros(horizon)
    for h in range(1, horizon + 1):
        t = np.arange(window.start, max(window.end - h, window.start))
        y = actual[t + h]
        lo, hi = served.lower[t, h - 1], served.upper[t, h - 1]
        ok = ~np.isnan(y)
        n[h - 1] = ok.sum()
        inside[h - 1] = ((lo <= y) & (y <= hi) & ok).sum()
        width[h - 1] = (hi - lo)[ok].sum()
    return {"n": n, "inside": inside, "width": width}


def naive_scale(actual: F64, start: int) -> float:
    """Mean absolute one-step change before ``start`` (the MASE denominator)."""
    before = actual[: max(start, 2)]
    return float(np.mean(np.abs(np.diff(before)))) if len(before) > 1 else math.nan


@dataclass
class BacktestOptions:
    season: int = 24  # of the seasonal baselines and of the combination's seasonal member
    combine: CombineConfig | None = None  # the combination's settings (default: the daemon's)
    baselines: tuple[str, ...] = BASELINES
    snarimax_order: tuple[int, ...] = (2, 1, 1, 1, 0, 1)
    holt_winters: tuple[float, ...] = (0.5, 0.01, 0.05)
    split: SplitSpec = field(default_factory=lambda: parse_split(DEFAULT_SPLIT))


def backtest(
    loaded: LoadedModel, series: Sequence[Series], opts: BacktestOptions
) -> dict[str, Any]:
    """Score the model and the baselines on every series' evaluation window; a JSON-able report."""
    horizon = loaded.model.config.horizon
    target = loaded.meta.target if loaded.meta.target in series[0].features else None
    started = time.monotonic()
    combine = replace(opts.combine or CombineConfig(), season=opts.season)
    forecasts = engine_forecasts(loaded, series, combine=combine)
    engine_seconds = time.monotonic() - started
    methods = ["combined", "model", *opts.baselines]
    scores = {m: Scores(horizon) for m in methods}
    per_series: dict[str, dict[str, Any]] = {}
    examples: dict[str, dict[str, F64]] = {}
    timings = {"engine": engine_seconds}
    intervals = {k: np.zeros(horizon) for k in ("n", "inside", "width")}
    for i, s in enumerate(series):
        actual = s.values[:, s.features.index(target) if target else 0]
        sp = opts.split.points(s.ts)
        window = Window(sp.val_end, sp.test_end)  # training's test part
        scale = naive_scale(actual, window.start)
        served = forecasts[i]
        by_method = {
            "combined": served.combined,
            "model": served.model,
            **_baselines(actual, horizon, window, opts, timings),
        }
        for key, value in interval_scores(served, actual, window).items():
            intervals[key] += value
        per_series[s.name] = {"n": window.end - window.start, "naive_scale": scale}
        for m in methods:
            mae = scores[m].add(by_method[m], actual, window, scale)
            per_series[s.name][m] = {"mae_h1": mae[0], "mae_mean": float(np.nanmean(mae))}
        if len(examples) < 3:
            examples[s.name] = {"actual": actual, **by_method, "start": np.array([window.start])}
    summary = {m: scores[m].summary() for m in methods}
    persistence = summary.get("persistence")
    if persistence:
        for m in methods:
            summary[m]["ratio_h1"] = summary[m]["mae_h1"] / max(persistence["mae_h1"], 1e-300)
            summary[m]["ratio_mean"] = summary[m]["mae_mean"] / max(persistence["mae_mean"], 1e-300)
    meta = loaded.meta
    n_scored = np.maximum(intervals["n"], 1)
    coverage = intervals["inside"] / n_scored
    return {
        "intervals": {
            "level": combine.level,
            "coverage": float(intervals["inside"].sum() / max(intervals["n"].sum(), 1)),
            "coverage_by_step": coverage.round(4).tolist(),
            "width_mean": float((intervals["width"] / n_scored).mean()),
        },
        "model": {
            "version": meta.version,
            "cell": meta.config.cell,
            "layers": list(meta.config.layers),
            "parameters": loaded.model.n_parameters(),
            "train_seconds": meta.metrics.get("train_seconds"),
            "horizon": horizon,
        },
        "window": opts.split.describe(),
        "season": opts.season,
        "snarimax_order": list(opts.snarimax_order),
        "holt_winters": list(opts.holt_winters),
        "series": len(series),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "methods": summary,
        "per_series": per_series,
        "_examples": examples,
    }


def _baselines(
    actual: F64, horizon: int, window: Window, opts: BacktestOptions, timings: dict[str, float]
) -> dict[str, F64]:
    out: dict[str, F64] = {}
    for name in opts.baselines:
        t0 = time.monotonic()
        if name == "persistence":
            out[name] = np.repeat(actual[:, None], horizon, axis=1)
        elif name == "damped":
            out[name] = damped_trend(actual, horizon)
        elif name == "seasonal_naive":
            out[name] = seasonal_naive(actual, horizon, opts.season)
        elif name == "snarimax":
            make = make_snarimax(opts.season, opts.snarimax_order)
            out[name] = river_forecasts(make, actual, horizon, window)
        elif name == "holt_winters":
            make = make_holt_winters(opts.season, opts.holt_winters)
            out[name] = river_forecasts(make, actual, horizon, window)
        else:
            raise DataError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
        timings[name] = timings.get(name, 0.0) + time.monotonic() - t0
    return out


def table(report: dict[str, Any]) -> str:
    """The report's methods as a Markdown table (MAE in stream units, ratios vs persistence)."""
    lines = [
        "| method | MAE h1 | MAE mean 1..H | RMSE mean | MASE mean | h1 / persistence | "
        "mean / persistence |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        lines.append(
            f"| {name} | {m['mae_h1']:.4g} | {m['mae_mean']:.4g} | {m['rmse_mean']:.4g} | "
            f"{m['mase_mean']:.3f} | {m.get('ratio_h1', math.nan):.3f} | "
            f"{m.get('ratio_mean', math.nan):.3f} |"
        )
    iv = report.get("intervals")
    if iv:
        by_step = iv["coverage_by_step"]
        lines.append(
            f"\nintervals ({iv['level']:.0%}): coverage {iv['coverage']:.3f} pooled, "
            f"{min(by_step):.3f}-{max(by_step):.3f} by step; mean width {iv['width_mean']:.4g}"
        )
    return "\n".join(lines)


def cells_table(reports: Sequence[dict[str, Any]]) -> str:
    """One row per model: cell, parameters, training time, model MAE (the cell comparison)."""
    lines = [
        "| model | cell | layers | parameters | train s | MAE h1 | MAE mean | mean / persistence |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        m, model = r["methods"]["model"], r["model"]
        lines.append(
            f"| {model['version']} | {model['cell']} | {model['layers']} | {model['parameters']} "
            f"| {model['train_seconds']} | {m['mae_h1']:.4g} | {m['mae_mean']:.4g} | "
            f"{m.get('ratio_mean', math.nan):.3f} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path, last: int = 300) -> bool:
    """Forecast vs actual (one step ahead) for up to three series, and MAE per step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("event=no_plot reason='matplotlib not installed (pip install .[plots])'")
        return False
    examples = report["_examples"]
    fig, axes = plt.subplots(len(examples) + 1, 1, figsize=(9, 2.6 * (len(examples) + 1)))
    for ax, (name, ex) in zip(axes, examples.items(), strict=False):
        n = len(ex["actual"])
        t = np.arange(max(int(ex["start"][0]), n - last), n - 1)
        ax.plot(t + 1, ex["actual"][t + 1], color="black", lw=1.2, label="actual")
        ax.plot(t + 1, ex["model"][t, 0], lw=1, label="model (1 step)")
        ax.plot(t + 1, ex["combined"][t, 0], lw=1, label="combined (1 step)")
        ax.plot(t + 1, ex["persistence"][t, 0], lw=0.8, ls="--", label="persistence")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    ax = axes[-1]
    for name, m in report["methods"].items():
        ax.plot(range(1, len(m["mae"]) + 1), m["mae"], marker=".", label=name)
    ax.set_xlabel("horizon step")
    ax.set_ylabel("MAE (stream units)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def add_backtest_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", dest="models", type=Path, action="append",
                   help="model .pt (repeatable: several models are compared in one table); "
                        "default: the shipped model")  # fmt: skip
    add_data_arguments(p)
    p.add_argument("--series", help="comma-separated series names to keep (default: all)")
    p.add_argument("--season", type=int, default=24, help="season length in ticks")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help=f"subset of {','.join(BASELINES)} ('' for none)")  # fmt: skip
    p.add_argument("--snarimax-order", default="2,1,1,1,0,1", help="p,d,q,sp,sd,sq")
    p.add_argument("--holt-winters", default="0.5,0.01,0.05", help="alpha,beta,gamma")
    p.add_argument("--out", type=Path, default=Path("out/backtest.json"),
                   help="JSON report; the PNG goes beside it")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--config", type=Path, help=argparse.SUPPRESS)


def load_all(args: argparse.Namespace) -> list[Series]:
    """The series to score: every one in ``--data``, or those named by ``--series``."""
    series = load_data(args)
    if args.series:
        keep = set(args.series.split(","))
        series = [s for s in series if s.name in keep]
    if not series:
        raise DataError("no series to backtest (check --series and the data files)")
    return series


def trained_split(loaded: LoadedModel) -> SplitSpec:
    """The split a model was trained with (its metadata), so a backtest scores its test part."""
    recorded = loaded.meta.extra.get("split", DEFAULT_SPLIT)
    if isinstance(recorded, list):  # models written before duration splits: [train, val]
        recorded = ",".join(str(f) for f in recorded)
    return parse_split(str(recorded))


def backtest_main(args: argparse.Namespace) -> int:
    """Entry point of ``pipeline backtest``: prints the tables, writes JSON and PNG reports."""
    import torch

    torch.set_num_threads(args.threads)
    series = load_all(args)
    order = tuple(int(v) for v in args.snarimax_order.split(","))
    if len(order) != 6:
        raise DataError(
            f"--snarimax-order {args.snarimax_order!r}: give six integers p,d,q,sp,sd,sq"
        )
    hw = tuple(float(v) for v in args.holt_winters.split(","))
    if len(hw) != 3 or not all(0 < v < 1 for v in hw):
        raise DataError(f"--holt-winters {args.holt_winters!r}: give alpha,beta,gamma in (0, 1)")
    baselines = tuple(b for b in args.baselines.split(",") if b)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise DataError(f"--baselines: unknown {unknown}; choose from {','.join(BASELINES)}")
    opts = BacktestOptions(
        holt_winters=hw,
        season=args.season,
        baselines=baselines,
        snarimax_order=order,
    )
    split = parse_split(args.split) if args.split else None  # errors before any model loads
    models = args.models or [None]
    for path in args.models or []:
        if args.out.resolve() == Path(path).with_suffix(".json").resolve():
            raise DataError(
                f"--out {args.out} would overwrite the metadata of the model {path}; "
                "write the report elsewhere (e.g. --out backtest.json)"
            )
    reports = []
    for i, path in enumerate(models):
        loaded = load_model(path)
        split = split or trained_split(loaded)  # the first model's: one window for all models
        # Baselines do not depend on the model: score them once, with the first model.
        run_opts = replace(
            opts, split=split, baselines=opts.baselines if i == 0 else ("persistence",)
        )
        report = backtest(loaded, series, run_opts)
        reports.append(report)
        print(f"\n## {loaded.meta.version} on {len(series)} series ({report['window']})\n")
        print(table(report))
    if len(reports) > 1:
        print("\n## Cells\n")
        print(cells_table(reports))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i, report in enumerate(reports):
        out = args.out if i == 0 else args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix}")
        plotted = plot(report, out.with_suffix(".png"))
        public = {k: v for k, v in report.items() if not k.startswith("_")}
        out.write_text(json.dumps(public, indent=2) + "\n")
        sys.stderr.write(
            f"report: {out}" + (f", plot: {out.with_suffix('.png')}" if plotted else "") + "\n"
        )
    return 0
