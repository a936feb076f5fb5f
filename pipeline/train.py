"""``pipeline train``: fit a forecaster on CSV history with the serving normalizer.

Every series is normalized by :class:`~pipeline.normalize.Normalizer` run tick by tick from its
first row, exactly as the daemon would (train/serve parity), then split chronologically into
train / validation / test. Training is truncated BPTT over lanes (segments of the training part)
with the recurrent state carried between chunks; Adam on MSE by default; early stopping on the
validation loss. Evaluation runs each whole series with its state carried from the first row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.dataset import (
    DEFAULT_SPLIT,
    Series,
    Split,
    add_data_arguments,
    load_data,
    parse_split,
)
from pipeline.errors import DataError
from pipeline.model import Forecaster, ModelConfig, ModelMeta, save_model
from pipeline.normalize import F32, F64, Normalizer, NormalizerConfig, horizon_scale

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One series after the online normalizer: model inputs and scaled targets per tick."""

    name: str
    inputs: F32  # (T, I)
    targets: F32  # (T, H) scaled change of the target; NaN where t + h is past the end
    last: F64  # (T,) target value at t, stream units
    scale: F64  # (T,) one-step scale at t, stream units
    actual: F64  # (T,) target value, stream units (for errors)


def prepare(
    series: list[Series], norm_cfg: NormalizerConfig, horizon: int, target: int
) -> list[Prepared]:
    """Run the serving normalizer over every series tick by tick and build inputs and targets.

    Series advance together, one slot each (the normalizer is elementwise per slot, so this is
    the same arithmetic as stepping each series alone, only fewer numpy calls).
    """
    n_series, n_features = len(series), series[0].values.shape[1]
    lengths = np.array([len(s.ts) for s in series])
    longest = int(lengths.max())
    values = np.zeros((n_series, longest, n_features))  # (S, T, F), padded
    ts = np.zeros((n_series, longest))
    for i, s in enumerate(series):
        values[i, : lengths[i]], ts[i, : lengths[i]] = s.values, s.ts
    norm = Normalizer(norm_cfg, n_features, capacity=n_series)
    inputs = np.zeros((n_series, longest, norm.n_inputs), dtype=np.float32)
    last, scale = np.zeros((n_series, longest)), np.zeros((n_series, longest))
    active = np.arange(n_series)
    for t in range(longest):
        if t == lengths[active].min():
            active = active[lengths[active] > t]
        out = norm.step(active, values[active, t], ts[active, t], target)
        inputs[active, t], last[active, t], scale[active, t] = out.inputs, out.last, out.scale
    prepared = []
    for i, s in enumerate(series):
        n = lengths[i]
        actual = s.values[:, target]
        targets = _targets(actual, last[i, :n], scale[i, :n], horizon)
        # A stream that sat still makes `scale` tiny and its next move huge in scaled units;
        # such outliers would dominate MSE, so targets are clipped like the inputs (2x wider).
        np.clip(targets, -2 * norm_cfg.clip, 2 * norm_cfg.clip, out=targets)
        prepared.append(Prepared(s.name, inputs[i, :n], targets, last[i, :n], scale[i, :n], actual))
    return prepared


def _targets(actual: F64, last: F64, scale: F64, horizon: int) -> F32:
    n = len(actual)
    out = np.full((n, horizon), np.nan, dtype=np.float32)
    hs = horizon_scale(horizon)
    for h in range(1, horizon + 1):
        out[: n - h, h - 1] = (actual[h:] - last[: n - h]) / (scale[: n - h] * hs[h - 1])
    return out


def _lanes(
    prepared: list[Prepared], splits: list[Split], seg: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Cut every training part into ``seg``-tick lanes: x (L, seg, I), y (L, seg, H), mask."""
    xs, ys, ms = [], [], []
    for p, sp in zip(prepared, splits, strict=True):
        end = sp.train_end
        y = p.targets[:end].copy()
        for h in range(y.shape[1]):  # no target may look into the validation part
            y[max(end - h - 1, 0) :, h] = np.nan
        for start in range(0, end, seg):
            stop = min(start + seg, end)
            x_l = np.zeros((seg, p.inputs.shape[1]), dtype=np.float32)
            y_l = np.full((seg, y.shape[1]), np.nan, dtype=np.float32)
            x_l[: stop - start], y_l[: stop - start] = p.inputs[start:stop], y[start:stop]
            xs.append(x_l)
            ys.append(y_l)
            m = ~np.isnan(y_l)
            if start > 0:
                m[:BURN_IN] = False  # lanes cut mid-series start from a cold hidden state
            ms.append(m)
    x, y_all, keep = (torch.from_numpy(np.stack(a)) for a in (xs, ys, ms))
    return x, torch.nan_to_num(y_all), keep


BURN_IN = 32


def _loss_fn(name: str) -> nn.Module:
    return {
        "mse": nn.MSELoss(reduction="none"),
        "huber": nn.HuberLoss(reduction="none", delta=1.0),
        "mae": nn.L1Loss(reduction="none"),
    }[name]


@dataclass
class TrainConfig:
    epochs: int = 30
    lr: float = 2e-3
    batch_lanes: int = 64
    segment: int = 1024
    bptt: int = 64
    patience: int = 5
    loss: str = "mse"
    seed: int = 0
    clip_grad: float = 1.0


def fit(
    model: Forecaster,
    prepared: list[Prepared],
    splits: list[Split],
    cfg: TrainConfig,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train in place; returns per-epoch train and validation loss; keeps the best weights."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y, mask = _lanes(prepared, splits, cfg.segment)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = _loss_fn(cfg.loss)
    history: dict[str, list[float]] = {"train": [], "val": []}
    best, best_state, bad_epochs = math.inf, None, 0
    for epoch in range(cfg.epochs):
        started = time.monotonic()
        model.train()
        order = torch.randperm(x.shape[0], generator=gen)
        total, count = 0.0, 0
        groups = torch.split(order, cfg.batch_lanes)
        for gi, group in enumerate(groups):
            state: list[Tensor] | None = None
            for c0 in range(0, cfg.segment, cfg.bptt):
                xb = x[group, c0 : c0 + cfg.bptt]  # (B, L, I)
                mb = mask[group, c0 : c0 + cfg.bptt]
                if not bool(mb.any()):
                    continue
                pred, state = model(xb, state)
                state = [s.detach() for s in state]
                err = loss_fn(pred, y[group, c0 : c0 + cfg.bptt])[mb]
                loss = err.mean()
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                opt.step()
                total += float(err.detach().sum())
                count += int(mb.sum())
            if progress:
                _bar(epoch, cfg.epochs, gi + 1, len(groups), total / max(count, 1))
        val = validation_loss(model, prepared, splits, cfg.loss)
        history["train"].append(total / max(count, 1))
        history["val"].append(val)
        if progress:
            sys.stderr.write(f"  val={val:.4f}  {time.monotonic() - started:.0f}s\n")
        if val < best - 1e-5:
            best, bad_epochs = val, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def _bar(epoch: int, epochs: int, done: int, total: int, loss: float) -> None:
    width = 30
    filled = int(width * done / total)
    sys.stderr.write(
        f"\repoch {epoch + 1:>3}/{epochs} [{'#' * filled}{'.' * (width - filled)}] "
        f"{done}/{total} loss={loss:.4f}"
    )
    sys.stderr.flush()


@torch.no_grad()
def predict(model: Forecaster, p: Prepared) -> F64:
    """Run the whole series with state carried from row 0: (T, H) forecasts in stream units."""
    model.eval()
    y, _ = model(torch.from_numpy(p.inputs)[None])  # (1, T, H)
    hs = horizon_scale(model.config.horizon)
    out: F64 = p.last[:, None] + (p.scale[:, None] * hs) * y[0].double().numpy()
    return out


def validation_loss(
    model: Forecaster, prepared: list[Prepared], splits: list[Split], loss: str
) -> float:
    """Mean loss on the validation parts (scaled units), state carried from each series' start."""
    loss_fn = _loss_fn(loss)
    total, count = 0.0, 0
    with torch.no_grad():
        for p, sp in zip(prepared, splits, strict=True):
            y, _ = model(torch.from_numpy(p.inputs[: sp.val_end])[None])
            target = torch.from_numpy(p.targets[sp.train_end : sp.val_end])
            pred = y[0, sp.train_end :]
            keep = ~torch.isnan(target)
            # targets reaching past val_end belong to the test part
            for h in range(target.shape[1]):
                keep[max(len(target) - h - 1, 0) :, h] = False
            err = loss_fn(pred, torch.nan_to_num(target))[keep]
            total += float(err.sum())
            count += int(keep.sum())
    return total / max(count, 1)


def errors(
    forecast: F64, p: Prepared, start: int, end: int, season: int | None = None
) -> dict[str, Any]:
    """MAE per horizon step on ticks [start, end) of the model vs persistence, stream units.

    A forecast made at t for step h counts only when t + h < end.
    """
    horizon = forecast.shape[1]
    mae, base = [], []
    for h in range(1, horizon + 1):
        t = np.arange(start, max(end - h, start))
        actual = p.actual[t + h]
        mae.append(float(np.mean(np.abs(forecast[t, h - 1] - actual))))
        base.append(float(np.mean(np.abs(p.last[t] - actual))))
    return {"mae": mae, "persistence_mae": base, "n": end - start}


def fingerprint(paths: list[Path]) -> dict[str, Any]:
    """sha256 and size of each data file (recorded in the model metadata)."""
    out: dict[str, Any] = {}
    for path in paths:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        out[path.name] = {"sha256": digest, "bytes": path.stat().st_size}
    return out


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    add_data_arguments(p)
    p.add_argument("--horizon", type=int, default=24)
    p.add_argument("--target-transform", choices=["none", "log"], default="none",
                   help="log: model log changes (log returns), forecast prices")  # fmt: skip
    p.add_argument("--calendar", action="store_true",
                   help="add time-of-day and day-of-week inputs (from the tick's ts)")  # fmt: skip
    p.add_argument("--cell", choices=["gru", "lstm", "rnn"], default="gru")
    p.add_argument("--layers", default="64,32", help="hidden sizes, comma-separated")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--loss", choices=["mse", "huber", "mae"], default="mse")
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--bptt", type=int, default=64,
                   help="ticks per truncated-BPTT chunk (how far gradients reach)")  # fmt: skip
    p.add_argument("--batch-lanes", type=int, default=64,
                   help="training lanes (1,024-tick segments) per optimizer batch")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--name", default="forecaster", help="model name (forecasts carry it)")
    p.add_argument("--out", type=Path, default=Path("out/model.pt"))
    p.add_argument("--debug", action="store_true")
    p.add_argument("--config", type=Path, help=argparse.SUPPRESS)


def train_main(args: argparse.Namespace, argv: list[str]) -> int:
    """Entry point of ``pipeline train``; writes the model, its metadata and a loss-curve PNG.

    ``argv`` (the command line after ``pipeline``) is recorded in the metadata.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    series = load_data(args)
    feature_names = series[0].features
    target_name = args.target or feature_names[0]
    target = feature_names.index(target_name)
    if args.target_transform == "log":
        series = [log_target(s, target) for s in series]
    norm_cfg = NormalizerConfig(calendar=args.calendar)
    spec = parse_split(args.split or DEFAULT_SPLIT)
    splits = [spec.points(s.ts) for s in series]
    for s, sp in zip(series, splits, strict=True):
        if sp.train_end < 2 or sp.val_end <= sp.train_end:
            raise DataError(
                f"--split {spec.text}: series {s.name} gets no training or validation rows"
            )
    prepared = prepare(series, norm_cfg, args.horizon, target)
    layers = tuple(int(v) for v in args.layers.split(","))
    config = ModelConfig(
        n_inputs=prepared[0].inputs.shape[1], layers=layers, horizon=args.horizon, cell=args.cell
    )
    model = Forecaster(config)
    cfg = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        loss=args.loss,
        seed=args.seed,
        patience=args.patience,
        batch_lanes=args.batch_lanes,
        bptt=args.bptt,
    )
    started = time.monotonic()
    history = fit(model, prepared, splits, cfg)
    seconds = time.monotonic() - started
    report = evaluate_splits(model, prepared, splits, args.target_transform)
    meta = ModelMeta(
        config=config,
        normalizer=norm_cfg,
        # A univariate model reads ticks' "value" whatever the column was called in the CSV.
        features=["value"] if len(feature_names) == 1 else feature_names,
        target="value" if len(feature_names) == 1 else target_name,
        target_transform=args.target_transform,
        name=args.name,
        train_command="pipeline " + " ".join(shlex.quote(a) for a in argv),
        data=fingerprint(list(args.data)),
        metrics={
            **report,
            "history": history,
            "train_seconds": round(seconds, 1),
            "parameters": model.n_parameters(),
        },
        extra={
            "train": cfg.__dict__,
            "split": spec.text,
            "series": [p.name for p in prepared],
        },
    )
    side = save_model(model, meta, args.out)
    _plot(history, args.out.with_suffix(".loss.png"))
    summary = {k: report[k] for k in ("val", "test")}
    print(json.dumps({"model": str(args.out), "metadata": str(side), **summary}, indent=2))
    return 0


def log_target(s: Series, target: int) -> Series:
    """``s`` with its target column replaced by its natural log (DataError if any value <= 0)."""
    column = s.values[:, target]
    if not (column > 0).all():
        raise DataError(f"series {s.name}: --target-transform log needs values > 0")
    values = s.values.copy()
    values[:, target] = np.log(column)
    return replace(s, values=values)


def evaluate_splits(
    model: Forecaster, prepared: list[Prepared], splits: list[Split], transform: str = "none"
) -> dict[str, Any]:
    """Mean over series of MAE ratios (model / persistence) on validation and test parts.

    Errors are in stream units: with a log target, forecasts and values are exponentiated first.
    """
    out: dict[str, Any] = {}
    forecasts = [predict(model, p) for p in prepared]  # state carried from each series' start
    if transform == "log":
        forecasts = [np.exp(f) for f in forecasts]
        prepared = [replace(p, actual=np.exp(p.actual), last=np.exp(p.last)) for p in prepared]
    for part in ("val", "test"):
        ratios_1, ratios_all, per_series = [], [], {}
        for p, sp, fc in zip(prepared, splits, forecasts, strict=True):
            start, end = (sp.train_end, sp.val_end) if part == "val" else (sp.val_end, sp.test_end)
            e = errors(fc, p, start, end)
            r = [
                m / b if b > 0 else 1.0 for m, b in zip(e["mae"], e["persistence_mae"], strict=True)
            ]
            ratios_1.append(r[0])
            ratios_all.append(float(np.mean(e["mae"]) / max(np.mean(e["persistence_mae"]), 1e-300)))
            per_series[p.name] = {
                "mae_h1": e["mae"][0],
                "persistence_mae_h1": e["persistence_mae"][0],
            }
        out[part] = {
            "ratio_h1": float(np.mean(ratios_1)),
            "ratio_mean_h": float(np.mean(ratios_all)),
            "series": per_series,
        }
    return out


def _plot(history: dict[str, list[float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("event=no_loss_plot reason='matplotlib not installed (pip install .[plots])'")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = range(1, len(history["train"]) + 1)
    ax.plot(epochs, history["train"], label="train")
    ax.plot(epochs, history["val"], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (scaled units)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
