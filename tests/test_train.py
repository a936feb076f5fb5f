"""`pipeline train` on a small series, and train/serve parity through the engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.dataset import Split, load_series, parse_split
from pipeline.engine import Engine
from pipeline.errors import DataError, ModelFileError
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
    """Train/serve parity: the serving engine's model forecast, fed tick by tick, equals
    train.predict (what is served mixes it with cheap rules: test_combine, test_backtest)."""
    data, out = trained
    loaded = load_model(out)
    series = load_series(data)
    prepared = prepare(series, loaded.meta.normalizer, 4, 0)
    engine = Engine(loaded, keep_model=True)
    for s, p in zip(series, prepared, strict=True):
        expected = predict(loaded.model, p)  # (T, H)
        src = Source("t", 0, 0)
        ticks = [
            Tick(s.name, float(ts), (float(v),), src)
            for ts, v in zip(s.ts, s.values[:, 0], strict=True)
        ]
        got = np.concatenate(
            [engine.process(ticks[i : i + 97]).model_forecast for i in range(0, len(ticks), 97)]
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


def test_split_by_fractions_and_by_durations() -> None:
    hourly = 1_467_331_200.0 + 3600.0 * np.arange(17_420)  # ETTh1's length, from 2016-07-01
    assert parse_split("0.6,0.2").points(hourly) == Split(10_452, 13_936, 17_420)
    assert parse_split("0.5,0.25,0.25").points(hourly[:100]) == Split(50, 75, 100)
    # The ETT protocol (Informer's borders): 12/4/4 months of 30 days = 8,640/2,880/2,880 rows.
    assert parse_split("12mo,4mo,4mo").points(hourly) == Split(8_640, 11_520, 14_400)
    assert parse_split("360d,120d").points(hourly) == Split(8_640, 11_520, 17_420)
    # Durations count time, not rows: a gap of missing rows does not move the borders.
    gappy = np.delete(hourly, np.arange(100, 1_100))
    assert parse_split("12mo,4mo,4mo").points(gappy) == Split(7_640, 10_520, 13_400)
    assert parse_split("2h,1h").points(np.array([0.0, 3_599.0, 3_600.0, 7_200.0, 10_800.0])) == (
        Split(3, 4, 5)
    )


@pytest.mark.parametrize("text", ["0.9,0.2", "0.6", "0.6,0.2,0.1,0.1", "12mo,4", "12y,4mo", "a,b",
                                  "0,0.5", "0mo,4mo"])  # fmt: skip
def test_bad_split_names_the_option_and_the_forms(text: str) -> None:
    with pytest.raises(DataError, match=r"--split .*12mo,4mo,4mo"):
        parse_split(text)
