"""The forecaster: GRU cell equations written out by hand, step == forward, checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from pipeline.errors import ModelFileError
from pipeline.model import (
    Forecaster,
    ModelConfig,
    ModelMeta,
    load_model,
    save_model,
)
from pipeline.normalize import NormalizerConfig

T = 20  # time steps
B = 5  # streams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gru_cell_by_hand(x: Tensor, h: Tensor, rnn: torch.nn.GRU) -> Tensor:
    """One GRU step in plain torch, with PyTorch's parameter layout.

    ``weight_ih`` (3S, I) and ``weight_hh`` (3S, S) stack the rows of the reset gate r, the update
    gate z and the candidate n, in that order; so do ``bias_ih`` and ``bias_hh``:

        r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h

    Sign convention: torch's z multiplies the OLD state h. This is the same cell as the textbook
    form h_t = (1 - z') ⊙ h_{t-1} + z' ⊙ h~_t with z' = 1 - z (and h~ = n); note also that r
    multiplies (W_hn h + b_hn), the hidden part of the candidate including its bias, not h alone.
    """
    w_ir, w_iz, w_in = rnn.weight_ih_l0.chunk(3, dim=0)
    w_hr, w_hz, w_hn = rnn.weight_hh_l0.chunk(3, dim=0)
    b_ir, b_iz, b_in = rnn.bias_ih_l0.chunk(3)
    b_hr, b_hz, b_hn = rnn.bias_hh_l0.chunk(3)
    r = torch.sigmoid(x @ w_ir.T + b_ir + h @ w_hr.T + b_hr)
    z = torch.sigmoid(x @ w_iz.T + b_iz + h @ w_hz.T + b_hz)
    n = torch.tanh(x @ w_in.T + b_in + r * (h @ w_hn.T + b_hn))
    h_new = (1 - z) * n + z * h
    # The textbook form with z' = 1 - z is the same update.
    z_book = 1 - z
    torch.testing.assert_close((1 - z_book) * h + z_book * n, h_new, rtol=1e-6, atol=1e-6)
    return h_new


def test_gru_step_matches_hand_written_equations() -> None:
    torch.manual_seed(1234)
    model = Forecaster(ModelConfig(n_inputs=3, layers=(64, 32), horizon=4))
    model.eval()
    gru1, gru2 = model.rnns
    assert isinstance(gru1, torch.nn.GRU) and isinstance(gru2, torch.nn.GRU)
    assert model.state_sizes == [64, 32]
    with torch.no_grad():  # make the biases matter: torch's init keeps everything small
        for p in model.parameters():
            p.mul_(2.0)
    x = 2 * torch.randn(B, T, 3)
    h0 = [0.5 * torch.randn(B, 64), 0.5 * torch.randn(B, 32)]  # a non-trivial start state
    h1, h2 = h0[0].clone(), h0[1].clone()
    state = [h.clone() for h in h0]
    stepped = []
    with torch.no_grad():
        for t in range(T):
            y, state = model.step(x[:, t], state)
            h1 = gru_cell_by_hand(x[:, t], h1, gru1)
            h2 = gru_cell_by_hand(h1, h2, gru2)
            y_hand = h2 @ model.head.weight.T + model.head.bias
            assert y.shape == (B, 4)
            torch.testing.assert_close(state[0], h1, rtol=0, atol=1e-5)
            torch.testing.assert_close(state[1], h2, rtol=0, atol=1e-5)
            torch.testing.assert_close(y, y_hand, rtol=0, atol=1e-5)
            stepped.append(y)
        assert h2.abs().max() > 0.1  # the state is not trivially zero

        # forward() over the 20-step sequence equals the stepped outputs and final state.
        y_seq, final = model(x, [h.clone() for h in h0])
    assert y_seq.shape == (B, T, 4)
    torch.testing.assert_close(y_seq, torch.stack(stepped, dim=1), rtol=0, atol=1e-5)
    torch.testing.assert_close(final[0], h1, rtol=0, atol=1e-5)
    torch.testing.assert_close(final[1], h2, rtol=0, atol=1e-5)


def test_hand_written_gru_matches_hand_written_sequence_of_forward() -> None:
    """forward() from the default (zero) state follows the hand-written equations too."""
    torch.manual_seed(99)
    model = Forecaster(ModelConfig(n_inputs=3, layers=(64, 32), horizon=4))
    x = torch.randn(B, T, 3)
    with torch.no_grad():
        y_seq, _ = model(x)
        h1, h2 = torch.zeros(B, 64), torch.zeros(B, 32)
        for t in range(T):
            h1 = gru_cell_by_hand(x[:, t], h1, model.rnns[0])
            h2 = gru_cell_by_hand(h1, h2, model.rnns[1])
            y_hand = h2 @ model.head.weight.T + model.head.bias
            torch.testing.assert_close(y_seq[:, t], y_hand, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_step_equals_forward(cell: str) -> None:
    torch.manual_seed(7)
    model = Forecaster(ModelConfig(n_inputs=5, layers=(16, 8, 4), horizon=3, cell=cell))  # type: ignore[arg-type]
    factor = 2 if cell == "lstm" else 1
    assert model.state_sizes == [16 * factor, 8 * factor, 4 * factor]
    x = torch.randn(B, T, 5)
    state0 = [0.3 * torch.randn(B, s) for s in model.state_sizes]
    with torch.no_grad():
        y_seq, final = model(x, [s.clone() for s in state0])
    state = [s.clone() for s in state0]
    ys = []
    for t in range(T):
        y, state = model.step(x[:, t], state)
        assert [s.shape for s in state] == [(B, n) for n in model.state_sizes]
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, dim=1), y_seq, rtol=0, atol=1e-5)
    for a, b in zip(final, state, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # The start state matters (so the comparison above is not of two zero-state runs).
    with torch.no_grad():
        y_zero, _ = model(x)
    assert not torch.allclose(y_zero[:, 0], y_seq[:, 0], atol=1e-4)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_sequence_equals_forward(cell: str) -> None:
    """The serving path for one stream's run (compiled recurrence for GRU, ``forward`` for the
    others) gives forward's numbers to float32 rounding, from a non-zero state, over a run long
    enough for rounding to compound."""
    torch.manual_seed(11)
    model = Forecaster(ModelConfig(n_inputs=3, layers=(64, 32), horizon=6, cell=cell))  # type: ignore[arg-type]
    steps = 2_000
    x = torch.randn(steps, 3) * 2.0
    state0 = [0.5 * torch.randn(1, s) for s in model.state_sizes]
    with torch.no_grad():
        want_y, want_state = model(x[None], [s.clone() for s in state0])
    got_y, got_state = model.sequence(x, [s.clone() for s in state0])
    assert got_y.shape == (steps, 6)
    torch.testing.assert_close(got_y, want_y[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(got_state, want_state, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(s.abs().sum() > 0 for s in state0)
    assert not got_y.requires_grad


def test_gru_kernel_propagates_non_finite_inputs() -> None:
    """No finite-math shortcuts: an infinite or NaN input reaches the output as in torch, so the
    engine's finiteness guard still sees it."""
    torch.manual_seed(12)
    model = Forecaster(ModelConfig(n_inputs=3, layers=(8, 4), horizon=2))
    x = torch.randn(5, 3)
    x[2, 0] = float("nan")
    got_y, _ = model.sequence(x, model.initial_state(1))
    with torch.no_grad():
        want_y, _ = model(x[None])
    assert torch.isfinite(got_y[:2]).all()
    assert torch.equal(torch.isnan(got_y), torch.isnan(want_y[0]))
    assert torch.isnan(got_y[2:]).all()


def test_step_does_not_track_gradients() -> None:
    model = Forecaster(ModelConfig())
    y, state = model.step(torch.randn(2, 3), model.initial_state(2))
    assert not y.requires_grad
    assert all(not s.requires_grad for s in state)


def test_invalid_config() -> None:
    with pytest.raises(ValueError):
        ModelConfig(layers=())
    with pytest.raises(ValueError):
        ModelConfig(horizon=0)
    with pytest.raises(ValueError):
        ModelConfig(cell="transformer")  # type: ignore[arg-type]


# ---------------------------------------------------------------- checkpoints


def make_meta(name: str = "unit-model") -> ModelMeta:
    return ModelMeta(
        config=ModelConfig(),
        normalizer=NormalizerConfig(level_alpha=0.03, warmup=7),
        features=["value"],
        target="value",
        name=name,
        train_command="pipeline train --unit-test",
        data={"x.csv": {"sha256": "0" * 64}},
        metrics={"val": {"ratio_h1": 0.9}},
    )


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Forecaster, Path]:
    torch.manual_seed(3)
    model = Forecaster(ModelConfig(n_inputs=3, layers=(12, 6), horizon=5, cell="gru"))
    side = save_model(model, make_meta(), tmp_path / "sub" / "m.pt")
    return model, side


def test_save_load_round_trip(saved: tuple[Forecaster, Path]) -> None:
    model, side = saved
    pt = side.with_suffix(".pt")
    assert side.suffix == ".json" and side.is_file() and pt.is_file()
    loaded = load_model(pt)
    assert loaded.path == pt
    assert loaded.model.config == model.config == ModelConfig(3, (12, 6), 5, "gru")
    assert not loaded.model.training
    x = torch.randn(4, 9, 3)
    with torch.no_grad():
        a, sa = model(x)
        b, sb = loaded.model(x)
    assert torch.equal(a, b)
    for u, v in zip(sa, sb, strict=True):
        assert torch.equal(u, v)
    meta = loaded.meta
    sha = hashlib.sha256(pt.read_bytes()).hexdigest()
    assert meta.weights_sha256 == sha
    assert meta.version == f"unit-model-{sha[:12]}"
    assert meta.version.startswith(meta.name)
    assert meta.normalizer == NormalizerConfig(level_alpha=0.03, warmup=7)
    assert meta.config == model.config  # save_model records the real constructor arguments
    assert meta.train_command == "pipeline train --unit-test"
    assert meta.features == ["value"] and meta.target == "value"
    assert meta.data == {"x.csv": {"sha256": "0" * 64}}
    doc = json.loads(side.read_text())
    assert doc["version"] == meta.version
    # The same model loads from the .json path or the suffix-less path too.
    assert load_model(side).meta.version == meta.version
    assert load_model(pt.with_suffix("")).meta.version == meta.version


def test_corrupted_weights_fail_sha256(saved: tuple[Forecaster, Path]) -> None:
    _, side = saved
    pt = side.with_suffix(".pt")
    blob = bytearray(pt.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # flip one bit
    pt.write_bytes(bytes(blob))
    with pytest.raises(ModelFileError) as info:
        load_model(pt)
    assert "sha256" in str(info.value)
    assert info.value.path == str(pt)


def test_wrong_format_version(saved: tuple[Forecaster, Path]) -> None:
    _, side = saved
    doc = json.loads(side.read_text())
    doc["format_version"] = doc["format_version"] + 1
    side.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError) as info:
        load_model(side)
    assert "format" in str(info.value)


def test_wrong_format_name(saved: tuple[Forecaster, Path]) -> None:
    _, side = saved
    doc = json.loads(side.read_text())
    doc["format"] = "something-else"
    side.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError):
        load_model(side)


def test_metadata_config_mismatch(saved: tuple[Forecaster, Path]) -> None:
    _, side = saved
    doc = json.loads(side.read_text())
    doc["config"]["horizon"] = 99
    side.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError):
        load_model(side)


def test_broken_metadata(saved: tuple[Forecaster, Path]) -> None:
    _, side = saved
    side.write_text("{not json")
    with pytest.raises(ModelFileError):
        load_model(side)
    doc = {"format": "pipeline-forecaster", "format_version": 1}
    side.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError):
        load_model(side)


def test_missing_files(tmp_path: Path, saved: tuple[Forecaster, Path]) -> None:
    with pytest.raises(ModelFileError) as info:
        load_model(tmp_path / "nope.pt")
    assert "nope" in str(info.value)
    _, side = saved
    side.unlink()  # weights without their metadata
    with pytest.raises(ModelFileError):
        load_model(side.with_suffix(".pt"))


def test_shipped_default_model() -> None:
    loaded = load_model(None)
    meta = loaded.meta
    assert meta.train_command.strip()
    assert meta.features and all(isinstance(f, str) and f for f in meta.features)
    assert meta.target in meta.features
    assert meta.version.startswith(meta.name + "-")
    cfg = loaded.model.config
    assert cfg.n_inputs == 2 * len(meta.features) + 1  # what the normalizer produces
    with torch.no_grad():
        y, _ = loaded.model.step(torch.zeros(2, cfg.n_inputs), loaded.model.initial_state(2))
    assert y.shape == (2, cfg.horizon)
    assert torch.isfinite(y).all()
