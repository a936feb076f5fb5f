"""The broad training corpus: synthetic families, per-source splits, batched evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.corpus import (
    FAMILIES,
    SOURCE_SHARES,
    CorpusSeries,
    broad_corpus,
    source_weights,
    synthetic_series,
)
from pipeline.dataset import Series, Split
from pipeline.errors import DataError
from pipeline.model import Forecaster, ModelConfig
from pipeline.normalize import NormalizerConfig
from pipeline.train import predict_all, prepare, validation_loss

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@given(seed=st.integers(0, 2**32 - 1), length=st.integers(50, 3000))
def test_every_synthetic_series_is_finite_ordered_and_scaled(seed: int, length: int) -> None:
    family, ts, values = synthetic_series(np.random.default_rng(seed), length)
    assert family.split("+")[0] in FAMILIES
    assert ts.shape == values.shape == (length,)
    assert np.isfinite(values).all() and np.isfinite(ts).all()
    assert (np.diff(ts) > 0).all()  # strictly increasing event times, regular or not
    assert values.std() > 0


def test_the_families_all_occur_with_their_modifiers() -> None:
    rng = np.random.default_rng(0)
    names = [synthetic_series(rng, 200)[0] for _ in range(300)]
    assert {n.split("+")[0] for n in names} == set(FAMILIES)
    for modifier in ("spikes", "quantized", "irregular"):
        assert any(modifier in n for n in names), modifier


def test_a_missing_source_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"ETTh1\.csv.*--data DIR"):
        broad_corpus(tmp_path, synthetic=0, seed=0)


def test_corpus_flags_that_would_be_ignored_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "--corpus", "broad", "--data", str(tmp_path), "--split", "0.5,0.2"])
    assert code != 0
    assert "drop --split" in capsys.readouterr().err


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data (CI has it)")
def test_real_sources_keep_their_protocol_splits() -> None:
    corpus = broad_corpus(DATA, synthetic=2, seed=0)
    by_source: dict[str, list] = {}
    for c in corpus:
        by_source.setdefault(c.source.split(":")[0], []).append(c)
    assert len(by_source["ETT"]) == 28  # 7 channels of 4 files
    assert len(by_source["beijing"]) == 72 and len(by_source["stocks"]) == 10
    for c in by_source["ETT"]:  # 12/4/4 months of 30 days from the first tick (Informer)
        hours = 1 if c.series.name.startswith("ETTh") else 4
        assert c.split == Split(8640 * hours, 11520 * hours, 14400 * hours), c.series.name
    for c in by_source["beijing"] + by_source["stocks"] + by_source["synthetic"]:
        n = len(c.series.ts)
        assert (c.split.train_end, c.split.val_end) == (int(0.6 * n), int(0.8 * n))
    assert all(c.series.features == ["value"] for c in corpus)


def test_batched_evaluation_equals_series_alone() -> None:
    """predict_all and validation_loss pad series of unequal length into one batch: the padding
    must change nothing, so each series alone gives the same numbers."""
    rng = np.random.default_rng(3)
    series = []
    for i, n in enumerate((300, 80, 170)):
        _, ts, values = synthetic_series(rng, n)
        series.append(Series(f"s{i}", ts, values[:, None], ["value"]))
    prepared = prepare(series, NormalizerConfig(), horizon=4, target=0)
    torch.manual_seed(0)
    model = Forecaster(ModelConfig(n_inputs=prepared[0].inputs.shape[1], layers=(8, 4), horizon=4))
    together = predict_all(model, prepared)
    for p, got in zip(prepared, together, strict=True):
        np.testing.assert_allclose(got, predict_all(model, [p])[0], rtol=1e-5, atol=1e-6)
    splits = [Split(int(0.6 * len(s.ts)), int(0.8 * len(s.ts)), len(s.ts)) for s in series]
    for warmup in (None, 20):
        pooled = validation_loss(model, prepared, splits, "mae", warmup)
        alone = [
            validation_loss(model, [p], [sp], "mae", warmup)
            for p, sp in zip(prepared, splits, strict=True)
        ]
        # entries scored per series: step h (0-based) drops the last h + 1 validation ticks
        counts = [sum(sp.val_end - sp.train_end - h - 1 for h in range(4)) for sp in splits]
        assert pooled == pytest.approx(np.average(alone, weights=counts), rel=1e-5)


def test_each_source_gets_its_share_of_the_lanes() -> None:
    """source_weights: per-lane weights such that the sources' shares of all drawn lanes are
    SOURCE_SHARES whatever their sizes, and lanes within a source are equally likely."""
    rng = np.random.default_rng(0)
    corpus = []
    for source, sizes in (("ETT", [900, 300]), ("beijing", [5000] * 4), ("stocks", [700]),
                          ("synthetic:ar", [200, 400])):  # fmt: skip
        for n in sizes:
            _, ts, values = synthetic_series(rng, n)
            corpus.append(CorpusSeries(Series(source, ts, values[:, None], ["value"]),
                                       Split(int(0.6 * n), int(0.8 * n), n), source))  # fmt: skip
    weights = source_weights(corpus)
    mass: dict[str, float] = {}
    for c, w in zip(corpus, weights, strict=True):
        key = c.source.split(":")[0]
        mass[key] = mass.get(key, 0.0) + w * c.split.train_end  # weight per tick x ticks
        same = [v for d, v in zip(corpus, weights, strict=True) if d.source == c.source]
        assert all(v == w for v in same)  # one weight per lane within a source
    assert mass == pytest.approx(SOURCE_SHARES)
