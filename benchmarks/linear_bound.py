"""How far below persistence can a forecaster get on a data set? A linear reference.

``python -m benchmarks.linear_bound --data ../shared/data/ETTh1.csv --target OT
--features HUFL,HULL,MUFL,MULL,LUFL,LULL,OT --split 12mo,4mo,4mo --lags 168``

Fits a direct multi-horizon linear model (the changes ``y[t+h] - y[t]``, h = 1..H, from the last
``--lags`` target values and ``--cov-lags`` values of each covariate, all relative to their value
at t, plus the levels at t) with the MAE loss, twice:

- on the training part, scored on the test part: an honest linear forecaster (DLinear-like);
- on the test part itself, scored there: an *oracle* that has seen the answers. With hundreds of
  coefficients fitted in-sample it is optimistic, so it bounds what a linear model of these inputs
  can reach on that window.

Both are MAE ratios to persistence pooled over series, the way ``pipeline backtest`` pools them.
The README's accuracy section uses it to judge whether a missed target is within reach.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.dataset import DEFAULT_SPLIT, Series, add_data_arguments, load_data, parse_split
from pipeline.normalize import F64


def design(
    s: Series, target: int, lags: int, cov_lags: int, horizon: int, rows: range
) -> tuple[F64, F64]:
    """Inputs (N, K) and targets (N, H) for the ticks t in ``rows`` with a full history and
    all H future values inside ``rows``."""
    y = s.values[:, target]
    covs = [j for j in range(s.values.shape[1]) if j != target]
    first = max(rows.start, lags - 1, cov_lags - 1)
    ts = np.arange(first, rows.stop - horizon)
    parts = [y[ts - k][:, None] - y[ts][:, None] for k in range(1, lags)]  # (N, 1) each
    parts.append(y[ts][:, None])
    for j in covs:
        c = s.values[:, j]
        parts += [c[ts - k][:, None] - c[ts][:, None] for k in range(1, cov_lags)]
        parts.append(c[ts][:, None])
    x = np.concatenate(parts, axis=1)
    future = np.stack([y[ts + h] - y[ts] for h in range(1, horizon + 1)], axis=1)
    return x, future


def fit_l1(x: F64, y: F64, mean: F64, std: F64, steps: int, seed: int) -> F64:
    """Least absolute deviations on standardized inputs; returns (K + 1, H).

    Starts from the least-squares solution and refines it with full-batch Adam on the MAE, the
    step size annealed to zero (converges where a fixed step keeps oscillating).
    """
    torch.manual_seed(seed)
    xa = torch.from_numpy(np.c_[(x - mean) / std, np.ones(len(x))])
    yt = torch.from_numpy(y)
    ridge = 1e-6 * len(x) * torch.eye(xa.shape[1], dtype=torch.float64)
    w0 = torch.linalg.solve(xa.T @ xa + ridge, xa.T @ yt)
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        loss = (xa @ w - yt).abs().mean()
        loss.backward()
        opt.step()
        schedule.step()
    return w.detach().numpy()


def ratios(w: F64, x: F64, y: F64, mean: F64, std: F64) -> dict[str, float]:
    pred = np.c_[(x - mean) / std, np.ones(len(x))] @ w
    mae, persistence = np.abs(pred - y).mean(axis=0), np.abs(y).mean(axis=0)
    return {
        "ratio_h1": float(mae[0] / persistence[0]),
        "ratio_mean": float(mae.mean() / persistence.mean()),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    series = load_data(args)
    spec = parse_split(args.split or DEFAULT_SPLIT)
    target = series[0].features.index(args.target) if args.target in series[0].features else 0
    train, test = [], []
    for s in series:
        sp = spec.points(s.ts)
        train.append(
            design(s, target, args.lags, args.cov_lags, args.horizon, range(0, sp.train_end))
        )
        test.append(
            design(
                s, target, args.lags, args.cov_lags, args.horizon, range(sp.val_end, sp.test_end)
            )
        )
    x_tr, y_tr = (np.concatenate(a) for a in zip(*train, strict=True))
    x_te, y_te = (np.concatenate(a) for a in zip(*test, strict=True))
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0) + 1e-9
    honest = fit_l1(x_tr, y_tr, mean, std, args.steps, args.seed)
    oracle = fit_l1(x_te, y_te, mean, std, args.steps, args.seed)
    return {
        "window": spec.describe(),
        "inputs": x_tr.shape[1],
        "train_rows": len(x_tr),
        "test_rows": len(x_te),
        "linear_fit_on_train": ratios(honest, x_te, y_te, mean, std),
        "linear_fit_on_test_oracle": ratios(oracle, x_te, y_te, mean, std),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.linear_bound", description=__doc__.split("\n")[0]
    )
    add_data_arguments(p)
    p.add_argument("--horizon", type=int, default=24)
    p.add_argument("--lags", type=int, default=168, help="target values per input row")
    p.add_argument("--cov-lags", type=int, default=24, help="values of each covariate per row")
    p.add_argument("--steps", type=int, default=1500, help="Adam steps (full batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON report")
    args = p.parse_args()
    torch.set_num_threads(1)
    report = run(args)
    print(f"linear reference, {report['window']}, {report['inputs']} inputs, "
          f"{report['train_rows']} train / {report['test_rows']} test rows")  # fmt: skip
    print("| linear model | h1 / persistence | mean 1..H / persistence |\n|---|---|---|")
    for name in ("linear_fit_on_train", "linear_fit_on_test_oracle"):
        r = report[name]
        print(f"| {name} | {r['ratio_h1']:.3f} | {r['ratio_mean']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
