"""`pipeline train` on a small series, and train/serve parity through the engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.dataset import load_series
from pipeline.engine import Engine
from pipeline.errors import ModelFileError
from pipeline.messages import Source, Tick
from pipeline.model import load_model
from pipeline.normalize import NormalizerConfig
from pipeline.train import predict, prepare


def _write_csv(path: Path, n: int = 1500) -> None:
    rng = np.random.default_rng(0)
    lines = ["date,a,b"]
    for t in range(n):
        a = 20 + 5 * math.sin(2 * math.pi * t / 24) + rng.normal(0, 0.3)
        b = 1e-3 * (1 + 0.2 * math.sin(2 * math.pi * t / 50)) + rng.normal(0, 1e-5)
        lines.append(f"2020-01-01T00:00:00+00:00,{a},{b}".replace("2020-01-01T00:00:00+00:00",
                     f"{1577836800 + 3600 * t}"))  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("train")
    data = tmp / "toy.csv"
    _write_csv(data)
    out = tmp / "toy.pt"
    code = main(["train", "--data", str(data), "--horizon", "4", "--layers", "16,8",
                 "--epochs", "3", "--seed", "1", "--threads", "1", "--name", "toy",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    return data, out


def test_train_writes_model_metadata_and_loss_curve(trained: tuple[Path, Path]) -> None:
    data, out = trained
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["name"] == "toy" and meta["version"].startswith("toy-")
    assert meta["config"] == {"n_inputs": 3, "layers": [16, 8], "horizon": 4, "cell": "gru"}
    assert "--epochs 3" in meta["train_command"] and str(data) in meta["train_command"]
    assert meta["data"]["toy.csv"]["sha256"]
    assert len(meta["metrics"]["history"]["train"]) >= 1
    assert meta["normalizer"] == NormalizerConfig().to_dict()
    assert out.with_suffix(".loss.png").stat().st_size > 1000
    assert load_model(out).meta.version == meta["version"]


def test_training_is_deterministic(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, out = trained
    again = tmp_path / "again.pt"
    main(["train", "--data", str(data), "--horizon", "4", "--layers", "16,8", "--epochs", "3",
          "--seed", "1", "--threads", "1", "--name", "toy", "--out", str(again)])  # fmt: skip
    first, second = load_model(out).model.state_dict(), load_model(again).model.state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_engine_reproduces_training_forecasts(trained: tuple[Path, Path]) -> None:
    """Train/serve parity: the serving engine, fed tick by tick, equals train.predict."""
    data, out = trained
    loaded = load_model(out)
    series = load_series(data)
    prepared = prepare(series, loaded.meta.normalizer, 4, 0)
    engine = Engine(loaded)
    for s, p in zip(series, prepared, strict=True):
        expected = predict(loaded.model, p)  # (T, H)
        src = Source("t", 0, 0)
        ticks = [
            Tick(s.name, float(ts), (float(v),), src)
            for ts, v in zip(s.ts, s.values[:, 0], strict=True)
        ]
        got = np.concatenate(
            [engine.process(ticks[i : i + 97]).forecast for i in range(0, len(ticks), 97)]
        )
        scale = np.abs(s.values).mean()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)


def test_corrupt_model_is_refused(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = trained
    bad = tmp_path / "bad.pt"
    blob = bytearray(out.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    bad.write_bytes(bytes(blob))
    bad.with_suffix(".json").write_text(out.with_suffix(".json").read_text())
    with pytest.raises(ModelFileError, match="sha256"):
        load_model(bad)
