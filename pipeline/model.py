"""The forecaster: a stack of recurrent layers (GRU by default) and a linear head.

Shapes: ``B`` streams (batch), ``T`` time steps, ``I`` inputs per tick, ``H`` horizon, ``S_l`` the
state width of layer ``l`` (the hidden size; twice that for LSTM, whose state is ``[h, c]``).

- :meth:`Forecaster.forward` runs whole sequences (training, backtests).
- :meth:`Forecaster.step` advances every stream of a batch by one tick without autograd
  (serving); it uses the very same parameters through torch's fused cell kernels, so a sequence
  stepped tick by tick equals ``forward`` on it (``tests/test_model.py``).

Checkpoints are two files: ``NAME.pt`` (tensors and constructor arguments, loaded with
``weights_only=True``) and ``NAME.json`` (human-readable metadata with the sha256 of the ``.pt``).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from pipeline import __version__, gru_kernel
from pipeline.errors import ModelFileError
from pipeline.normalize import NormalizerConfig

log = logging.getLogger(__name__)

FORMAT = "pipeline-forecaster"
FORMAT_VERSION = 1
Cell = Literal["gru", "lstm", "rnn"]


@dataclass(frozen=True)
class ModelConfig:
    """Constructor arguments of :class:`Forecaster`; stored in every checkpoint."""

    n_inputs: int = 3  # per-tick inputs: 2 per feature (level z, change) + log dt ratio
    layers: tuple[int, ...] = (64, 32)  # hidden size of each stacked recurrent layer
    horizon: int = 1  # forecasts the next `horizon` values
    cell: Cell = "gru"  # gru | lstm | rnn

    def __post_init__(self) -> None:
        if self.n_inputs < 1 or self.horizon < 1 or not self.layers or min(self.layers) < 1:
            raise ValueError(f"invalid model config {self}")
        if self.cell not in ("gru", "lstm", "rnn"):
            raise ValueError(f"cell must be gru, lstm or rnn, got {self.cell!r}")


def _make_layer(cell: Cell, n_in: int, n_hidden: int) -> nn.RNNBase:
    if cell == "gru":
        return nn.GRU(n_in, n_hidden, batch_first=True)
    if cell == "lstm":
        return nn.LSTM(n_in, n_hidden, batch_first=True)
    return nn.RNN(n_in, n_hidden, batch_first=True, nonlinearity="tanh")


class Forecaster(nn.Module):
    """Stacked recurrent layers → linear head predicting H normalized changes."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        sizes = (config.n_inputs, *config.layers)
        self.rnns = nn.ModuleList(
            _make_layer(config.cell, n_in, n_out) for n_in, n_out in itertools.pairwise(sizes)
        )
        self.head = nn.Linear(config.layers[-1], config.horizon)

    @property
    def state_sizes(self) -> list[int]:
        """Width of each layer's per-stream state (hidden size; 2x for LSTM's [h, c])."""
        factor = 2 if self.config.cell == "lstm" else 1
        return [factor * n for n in self.config.layers]

    def initial_state(self, batch: int) -> list[Tensor]:
        return [torch.zeros(batch, s) for s in self.state_sizes]

    def forward(self, x: Tensor, state: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """x (B, T, I) → y (B, T, H), final state [(B, S_l)]."""
        batch = x.shape[0]
        state = state if state is not None else self.initial_state(batch)
        new_state: list[Tensor] = []
        out = x
        for rnn, s in zip(self.rnns, state, strict=True):
            if self.config.cell == "lstm":
                h0, c0 = s.chunk(2, dim=1)  # (B, S/2) each
                out, (hn, cn) = rnn(
                    out, (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous())
                )
                new_state.append(torch.cat([hn[0], cn[0]], dim=1))  # (B, S)
            else:
                out, hn = rnn(out, s.unsqueeze(0).contiguous())  # out (B, T, S)
                new_state.append(hn[0])
        return self.head(out), new_state

    @torch.no_grad()
    def step(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """One tick for B streams: x (B, I), state [(B, S_l)] → y (B, H), new state.

        A GRU stack runs the fused cell (:func:`pipeline.gru_kernel.gru_cell`: torch's two
        products, then one compiled pass for the gates; ~1.1-1.4x ``torch.gru_cell``), equal to
        it up to float32 rounding; other cells, or an install without numba, run torch's cells.
        """
        out = x
        new_state: list[Tensor] = []
        parts = torch.get_num_threads()  # the fused cell's parallel parts, as torch's threads
        for rnn, s in zip(self.rnns, state, strict=True):
            w_ih, w_hh, b_ih, b_hh = _weights(rnn)
            if self.config.cell == "gru" and gru_kernel.AVAILABLE:
                gates_x = torch.addmm(b_ih, out, w_ih.t()).numpy()  # (B, 3S)
                gates_h = torch.addmm(b_hh, s, w_hh.t()).numpy()
                before = s.contiguous().numpy()
                out = torch.from_numpy(gru_kernel.gru_cell(gates_x, gates_h, before, parts))
                new_state.append(out)
            elif self.config.cell == "gru":
                out = torch.gru_cell(out, s, w_ih, w_hh, b_ih, b_hh)  # (B, S)
                new_state.append(out)
            elif self.config.cell == "lstm":
                h, c = s.chunk(2, dim=1)
                out, c = torch.lstm_cell(out, (h, c), w_ih, w_hh, b_ih, b_hh)
                new_state.append(torch.cat([out, c], dim=1))
            else:
                out = torch.rnn_tanh_cell(out, s, w_ih, w_hh, b_ih, b_hh)
                new_state.append(out)
        return self.head(out), new_state

    @torch.no_grad()
    def sequence(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """One stream's T ticks in order, without autograd (serving a hot stream): x (T, I),
        state [(1, S_l)] → y (T, H), new state [(1, S_l)].

        Equals ``forward(x[None], state)`` up to float32 rounding. A GRU stack runs the compiled
        recurrence (:mod:`pipeline.gru_kernel`, ~5x faster than ``nn.GRU`` at batch 1); other
        cells, or an install without numba, run ``forward``.
        """
        if self.config.cell != "gru" or not gru_kernel.AVAILABLE:
            y, new_state = self.forward(x[None], state)
            return y[0], new_state
        out = x.numpy()
        new_state = []
        for rnn, s in zip(self.rnns, state, strict=True):
            w_ih, w_hh, b_ih, b_hh = (w.detach().numpy() for w in _weights(rnn))
            out = gru_kernel.gru_layer(out, s[0].numpy(), w_ih, w_hh, b_ih, b_hh)
            new_state.append(torch.from_numpy(out[-1:].copy()))
        return self.head(torch.from_numpy(out)), new_state

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _weights(rnn: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The single layer's (w_ih, w_hh, b_ih, b_hh), shared by ``forward`` and ``step``."""
    names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    w = tuple(cast(Tensor, getattr(rnn, n)) for n in names)
    return w[0], w[1], w[2], w[3]


@dataclass
class ModelMeta:
    """Everything needed to rebuild and trust a trained model; stored as ``NAME.json``."""

    config: ModelConfig
    normalizer: NormalizerConfig
    features: list[str] = field(default_factory=lambda: ["value"])
    target: str = "value"
    # "log": the model sees log(target) and forecasts log values; forecasts leave the engine in
    # stream units again (exp). For prices: the model's changes are log returns.
    target_transform: str = "none"
    name: str = "forecaster"
    train_command: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # fingerprint of the training data
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    pipeline_version: str = __version__
    weights_sha256: str = ""

    @property
    def version(self) -> str:
        """The id forecasts carry: name plus the first 12 hex digits of the weights' sha256."""
        return f"{self.name}-{self.weights_sha256[:12]}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"], data["format_version"], data["version"] = (
            FORMAT,
            FORMAT_VERSION,
            self.version,
        )
        return data


@dataclass
class LoadedModel:
    model: Forecaster
    meta: ModelMeta
    path: Path


def save_model(model: Forecaster, meta: ModelMeta, path: Path) -> Path:
    """Write ``path`` (``.pt``) and its ``.json`` sidecar; returns the ``.json`` path."""
    path = Path(path).with_suffix(".pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": asdict(model.config),
        "state_dict": model.state_dict(),
    }
    buffer = io.BytesIO()  # a file name would leak into the archive and change the sha256
    torch.save(payload, buffer)
    path.write_bytes(buffer.getvalue())
    meta.weights_sha256 = hashlib.sha256(buffer.getvalue()).hexdigest()
    meta.config = model.config
    side = path.with_suffix(".json")
    side.write_text(json.dumps(meta.to_json(), indent=2, default=str) + "\n")
    return side


def default_model_path() -> Path:
    return Path(__file__).parent / "models" / "default.pt"


def load_model(path: Path | None = None) -> LoadedModel:
    """Load and verify a checkpoint; raises :class:`ModelFileError` saying what is wrong."""
    pt = Path(path) if path is not None else default_model_path()
    pt = pt.with_suffix(".pt") if pt.suffix in ("", ".json") else pt
    side = pt.with_suffix(".json")
    for f in (pt, side):
        if not f.is_file():
            raise ModelFileError("file not found; pass --model PATH to a trained .pt", path=str(f))
    try:
        raw = side.read_text()
        doc = json.loads(raw)
        blob = pt.read_bytes()
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot read metadata ({exc})", path=str(side)) from exc
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"not a {FORMAT} v{FORMAT_VERSION} file (format={doc.get('format')!r}, "
            f"version={doc.get('format_version')!r}); retrain with `pipeline train`",
            path=str(side),
        )
    if hashlib.sha256(blob).hexdigest() != doc.get("weights_sha256"):
        raise ModelFileError(
            "weights do not match the sha256 in the metadata (corrupt or mismatched pair)",
            path=str(pt),
        )
    meta = _meta_from_json(doc, side)
    try:
        payload = torch.load(pt, map_location="cpu", weights_only=True)
        config = ModelConfig(**{**payload["config"], "layers": tuple(payload["config"]["layers"])})
        if config != meta.config:
            raise ValueError(f"constructor arguments {config} differ from metadata {meta.config}")
        model = Forecaster(config)
        model.load_state_dict(payload["state_dict"], strict=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same here
        raise ModelFileError(f"cannot rebuild the model: {exc}", path=str(pt)) from exc
    model.eval()
    return LoadedModel(model=model, meta=meta, path=pt)


TRANSFORMS = ("none", "log")


def _transform(name: object) -> str:
    if name not in TRANSFORMS:
        raise ValueError(f"target_transform {name!r} is not one of {TRANSFORMS}")
    return str(name)


def _meta_from_json(doc: dict[str, Any], side: Path) -> ModelMeta:
    try:
        cfg = doc["config"]
        return ModelMeta(
            config=ModelConfig(**{**cfg, "layers": tuple(cfg["layers"])}),
            normalizer=NormalizerConfig(**doc["normalizer"]),
            features=list(doc["features"]),
            target=str(doc["target"]),
            target_transform=_transform(doc.get("target_transform", "none")),
            name=str(doc["name"]),
            train_command=str(doc.get("train_command", "")),
            data=dict(doc.get("data", {})),
            metrics=dict(doc.get("metrics", {})),
            extra=dict(doc.get("extra", {})),
            pipeline_version=str(doc.get("pipeline_version", "")),
            weights_sha256=str(doc["weights_sha256"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"metadata is incomplete or invalid: {exc!r}", path=str(side)) from exc
