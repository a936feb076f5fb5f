"""Small random-weight models for tests that need a model but not a trained one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.model import Forecaster, ModelConfig, ModelMeta, save_model
from pipeline.normalize import NormalizerConfig


def random_model(
    path: Path,
    features: Sequence[str] = ("value",),
    *,
    layers: tuple[int, ...] = (8, 4),
    horizon: int = 3,
    seed: int = 0,
    gain: float = 3.0,
    warmup: int = 5,
    name: str = "test",
) -> Path:
    """Save a seeded random model for ``features`` (the first is the target) at ``path``.

    ``gain`` scales the weights so outputs clearly depend on inputs and state. Returns the
    ``.pt`` path (the ``.json`` metadata lies beside it).
    """
    torch.manual_seed(seed)
    config = ModelConfig(n_inputs=2 * len(features) + 1, layers=layers, horizon=horizon)
    model = Forecaster(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(gain)
    meta = ModelMeta(
        config=config,
        normalizer=NormalizerConfig(warmup=warmup),
        name=name,
        features=list(features),
        target=features[0],
    )
    side = save_model(model, meta, path)
    return side.with_suffix(".pt")
