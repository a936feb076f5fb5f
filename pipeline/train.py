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
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.corpus import (
    BEIJING_FILE,
    ETT_FILES,
    ETT_SPLIT,
    STOCKS_FILE,
    broad_corpus,
    source_weights,
)
from pipeline.dataset import (
    DEFAULT_SPLIT,
    Series,
    Split,
    SplitSpec,
    add_data_arguments,
    load_data,
    log_target,
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
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cut every training part into ``seg``-tick lanes: x (L, seg, I), y (L, seg, H), mask,
    and each lane's series index (L,)."""
    xs, ys, ms, owner = [], [], [], []
    for index, (p, sp) in enumerate(zip(prepared, splits, strict=True)):
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
            owner.append(index)
            m = ~np.isnan(y_l)
            if start > 0:
                m[:BURN_IN] = False  # lanes cut mid-series start from a cold hidden state
            ms.append(m)
    x, y_all, keep = (torch.from_numpy(np.stack(a)) for a in (xs, ys, ms))
    return x, torch.nan_to_num(y_all), keep, torch.tensor(owner)


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
    # Lanes drawn (without replacement) per epoch; None: every lane. Bounds an epoch's cost on
    # a large corpus, where a pass over every lane would take hours on two cores.
    lanes_per_epoch: int | None = None
    # Validation starts the model this many ticks before each validation part (cold hidden
    # state, not scored) instead of at the series' first tick; None: from the first tick.
    val_warmup: int | None = None


def fit(
    model: Forecaster,
    prepared: list[Prepared],
    splits: list[Split],
    cfg: TrainConfig,
    progress: bool = True,
    series_weights: list[float] | None = None,
) -> dict[str, list[float]]:
    """Train in place; returns per-epoch train and validation loss; keeps the best weights.

    With ``series_weights`` (one per series) and ``cfg.lanes_per_epoch``, an epoch's lanes are
    drawn with probability proportional to their series' weight (without replacement);
    otherwise uniformly.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y, mask, owner = _lanes(prepared, splits, cfg.segment)
    lane_weights = None
    if series_weights is not None and cfg.lanes_per_epoch:
        lane_weights = torch.tensor(series_weights, dtype=torch.float64)[owner]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = _loss_fn(cfg.loss)
    history: dict[str, list[float]] = {"train": [], "val": []}
    best, best_state, bad_epochs = math.inf, None, 0
    for epoch in range(cfg.epochs):
        started = time.monotonic()
        model.train()
        if lane_weights is not None:
            draw = min(cfg.lanes_per_epoch or x.shape[0], x.shape[0])
            order = torch.multinomial(lane_weights, draw, replacement=False, generator=gen)
        else:
            order = torch.randperm(x.shape[0], generator=gen)[: cfg.lanes_per_epoch]
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
        val = validation_loss(model, prepared, splits, cfg.loss, cfg.val_warmup)
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
    return predict_all(model, [p])[0]


@torch.no_grad()
def predict_all(model: Forecaster, prepared: list[Prepared]) -> list[F64]:
    """:func:`predict` for every series, in padded batches: [(T_i, H)] in stream units."""
    model.eval()
    hs = horizon_scale(model.config.horizon)
    outputs = _run_windows(model, [(p, 0, len(p.inputs)) for p in prepared])
    return [
        p.last[:, None] + (p.scale[:, None] * hs) * y.double().numpy()
        for p, y in zip(prepared, outputs, strict=True)
    ]


BATCH_SERIES = 16


@torch.no_grad()
def _run_windows(model: Forecaster, windows: list[tuple[Prepared, int, int]]) -> list[Tensor]:
    """Scaled outputs (end - first, H) of the model run over ``inputs[first:end]`` of each window,
    hidden state cold at ``first``.

    Windows of similar length run as one padded batch (batch-1 recurrences cost ~10x more per
    tick); the padding sits after each window's end, so it changes no output that is used.
    """
    order = sorted(range(len(windows)), key=lambda i: windows[i][2] - windows[i][1])
    out: list[Tensor | None] = [None] * len(windows)
    for b in range(0, len(order), BATCH_SERIES):
        idx = order[b : b + BATCH_SERIES]
        longest = max(windows[i][2] - windows[i][1] for i in idx)
        x = np.zeros((len(idx), longest, windows[idx[0]][0].inputs.shape[1]), dtype=np.float32)
        for row, i in enumerate(idx):
            p, first, end = windows[i]
            x[row, : end - first] = p.inputs[first:end]
        y, _ = model(torch.from_numpy(x))
        for row, i in enumerate(idx):
            out[i] = y[row, : windows[i][2] - windows[i][1]]
    return cast(list[Tensor], out)  # every window was filled above


def validation_loss(
    model: Forecaster,
    prepared: list[Prepared],
    splits: list[Split],
    loss: str,
    warmup: int | None = None,
) -> float:
    """Mean loss on the validation parts (scaled units).

    The model runs from each series' first tick, or from ``warmup`` ticks before its validation
    part (the normalizer's state is in the inputs already; only the hidden state starts cold).
    """
    loss_fn = _loss_fn(loss)
    total, count = 0.0, 0
    firsts = [0 if warmup is None else max(sp.train_end - warmup, 0) for sp in splits]
    windows = [(p, f, sp.val_end) for p, f, sp in zip(prepared, firsts, splits, strict=True)]
    outputs = _run_windows(model, windows)
    for p, sp, first, y in zip(prepared, splits, firsts, outputs, strict=True):
        target = torch.from_numpy(p.targets[sp.train_end : sp.val_end])
        pred = y[sp.train_end - first :]
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
    p.add_argument("--corpus", choices=["broad"],
                   help="train on the broad corpus read from the --data directory (every ETT "
                        "channel, Beijing, stock log prices) plus --synthetic generated series, "
                        "each with its source's split; the shipped default's recipe")  # fmt: skip
    p.add_argument("--synthetic", type=int, default=400,
                   help="--corpus broad: generated series (6,000 ticks each)")  # fmt: skip
    p.add_argument("--lanes-per-epoch", type=int,
                   help="lanes drawn per epoch (default: all)")  # fmt: skip
    p.add_argument("--val-warmup", type=int,
                   help="validate from this many ticks before each validation part "
                        "(default: from each series' first tick)")  # fmt: skip
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
    series, splits, spec, sources, weights = _training_series(args)
    feature_names = series[0].features
    target_name = args.target or feature_names[0]
    target = feature_names.index(target_name)
    if args.target_transform == "log":
        series = [log_target(s, target) for s in series]
    norm_cfg = NormalizerConfig(calendar=args.calendar)
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
        lanes_per_epoch=args.lanes_per_epoch,
        val_warmup=args.val_warmup,
    )
    started = time.monotonic()
    history = fit(model, prepared, splits, cfg, series_weights=weights)
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
        data=fingerprint(_data_files(args)),
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
            **({"sources": sources} if sources else {}),
        },
    )
    side = save_model(model, meta, args.out)
    _plot(history, args.out.with_suffix(".loss.png"))
    summary = {k: report[k] for k in ("val", "test")}
    print(json.dumps({"model": str(args.out), "metadata": str(side), **summary}, indent=2))
    return 0


def _training_series(
    args: argparse.Namespace,
) -> tuple[list[Series], list[Split], SplitSpec, dict[str, Any], list[float] | None]:
    """Series, their splits, the split recorded in the metadata, and the corpus composition.

    With ``--corpus broad`` the recorded split is ETT's (the default model's headline protocol;
    backtest its other sources with ``--split 0.6,0.2``).
    """
    if args.corpus:
        if args.split or args.features or args.format != "wide" or len(args.data) != 1:
            raise DataError(
                "--corpus broad takes one --data directory and fixes each source's split, "
                "format and feature: drop --split/--features/--format"
            )
        corpus = broad_corpus(args.data[0], args.synthetic, args.seed)
        sources: dict[str, Any] = {}
        for c in corpus:
            sources[c.source] = sources.get(c.source, 0) + 1
        splits = [c.split for c in corpus]
        weights = source_weights(corpus)
        return [c.series for c in corpus], splits, parse_split(ETT_SPLIT), sources, weights
    series = load_data(args)
    spec = parse_split(args.split or DEFAULT_SPLIT)
    return series, [spec.points(s.ts) for s in series], spec, {}, None


def _data_files(args: argparse.Namespace) -> list[Path]:
    if args.corpus:
        root = Path(args.data[0])
        names = [*ETT_FILES, BEIJING_FILE, STOCKS_FILE]
        return [root / n for n in names]
    return list(args.data)


def evaluate_splits(
    model: Forecaster, prepared: list[Prepared], splits: list[Split], transform: str = "none"
) -> dict[str, Any]:
    """Mean over series of MAE ratios (model / persistence) on validation and test parts.

    Errors are in stream units: with a log target, forecasts and values are exponentiated first.
    """
    out: dict[str, Any] = {}
    forecasts = predict_all(model, prepared)  # state carried from each series' start
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
