"""The compiled GRU cell of the engine's waves against ``torch.gru_cell``, the reference.

The kernel (:func:`pipeline.gru_kernel.gru_cell`) replaces torch's element-wise part of the cell
with a polynomial ``exp`` that vectorizes; these tests pin its numbers to torch's within float32
rounding over generated shapes, weights and inputs (saturated gates included), its handling of
inf and NaN, and that the parallel parts change nothing.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipeline import gru_kernel
from pipeline.model import Forecaster, ModelConfig

pytestmark = [
    pytest.mark.skipif(not gru_kernel.AVAILABLE, reason="numba is not installed"),
    pytest.mark.usefixtures("one_torch_thread"),
]


def _fused(
    x: torch.Tensor, h: torch.Tensor, w: tuple[torch.Tensor, ...], parts: int = 1
) -> np.ndarray:
    w_ih, w_hh, b_ih, b_hh = w
    gates_x = torch.addmm(b_ih, x, w_ih.t()).numpy()
    gates_h = torch.addmm(b_hh, h, w_hh.t()).numpy()
    return gru_kernel.gru_cell(gates_x, gates_h, h.numpy(), parts)


def _weights(
    rng: np.random.Generator, n_in: int, size: int, scale: float
) -> tuple[torch.Tensor, ...]:
    shapes = [(3 * size, n_in), (3 * size, size), (3 * size,), (3 * size,)]
    return tuple(
        torch.from_numpy((scale * rng.standard_normal(s)).astype(np.float32)) for s in shapes
    )


@given(
    rows=st.integers(1, 300),
    size=st.sampled_from([1, 3, 8, 32, 64]),
    n_in=st.sampled_from([1, 3, 7, 64]),
    weight_scale=st.sampled_from([0.01, 0.3, 3.0, 30.0]),
    input_scale=st.sampled_from([0.0, 1.0, 10.0, 1e4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_the_fused_cell_gives_torch_numbers(
    rows: int, size: int, n_in: int, weight_scale: float, input_scale: float, seed: int
) -> None:
    """Across shapes and scales, from gates near zero to gates saturated far past ±88 (the
    clamp of the exponential): within 2e-6 of ``torch.gru_cell`` (a few float32 roundings of a
    state in [-1, 1]), plus what a rounding of the reset gate r becomes in ``r * (W_hn h + b_hn)``:
    both cells round r, and large weights magnify it."""
    rng = np.random.default_rng(seed)
    w = _weights(rng, n_in, size, weight_scale)
    x = torch.from_numpy((input_scale * rng.standard_normal((rows, n_in))).astype(np.float32))
    h = torch.from_numpy(np.tanh(rng.standard_normal((rows, size))).astype(np.float32))
    want = torch.gru_cell(x, h, *w).numpy()
    got = _fused(x, h, w)
    assert got.shape == want.shape and got.dtype == np.float32
    w_hh, b_hh = w[1], w[3]
    hidden_n = torch.addmm(b_hh, h, w_hh.t()).numpy()[:, 2 * size :]  # (B, S) W_hn h + b_hn
    error = np.abs(got.astype(np.float64) - want)
    assert (error <= 2e-6 + 3e-7 * np.abs(hidden_n)).all(), float(error.max())


def test_saturated_and_tiny_gates_keep_their_limits() -> None:
    """Gates at ±1e30 give exactly torch's limits (0, 1, ±1 and the state itself), and tiny
    ones give ~the linear regime, not a rounding artefact."""
    size = 4
    w_ih = torch.zeros(3 * size, 1)
    w_hh = torch.zeros(3 * size, size)
    h = torch.tensor([[0.25, -0.5, 0.75, 0.0]] * 4)
    for pre in (1e30, -1e30, 1e-7, -1e-7, 0.0):
        b_ih = torch.full((3 * size,), pre)
        b_hh = torch.zeros(3 * size)
        w = (w_ih, w_hh, b_ih, b_hh)
        x = torch.zeros(4, 1)
        np.testing.assert_allclose(_fused(x, h, w), torch.gru_cell(x, h, *w).numpy(), atol=1e-7)


def test_non_finite_values_propagate_as_in_torch() -> None:
    """No finite-math shortcut: a NaN or infinite input or state reaches the new state exactly
    where torch's cell puts NaN or inf, so the engine's finiteness guard sees it."""
    rng = np.random.default_rng(5)
    w = _weights(rng, 3, 8, 0.5)
    x = torch.from_numpy(rng.standard_normal((6, 3)).astype(np.float32))
    h = torch.from_numpy(np.tanh(rng.standard_normal((6, 8))).astype(np.float32))
    x[1, 0] = float("nan")
    x[2, 1] = float("inf")
    x[3, 2] = -float("inf")
    h[4, 3] = float("nan")
    h[5, 0] = float("inf")
    want = torch.gru_cell(x, h, *w).numpy()
    got = _fused(x, h, w)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    assert not finite[1:].all()  # the non-finite rows did reach the output
    np.testing.assert_allclose(got[finite], want[finite], atol=2e-6)


def test_parallel_parts_change_nothing() -> None:
    """Rows are independent: a wave split into parts gives the single pass's numbers bit for bit."""
    rng = np.random.default_rng(6)
    rows = 3 * gru_kernel.ROWS_PER_PART + 17
    w = _weights(rng, 3, 64, 0.5)
    x = torch.from_numpy(rng.standard_normal((rows, 3)).astype(np.float32))
    h = torch.from_numpy(np.tanh(rng.standard_normal((rows, 64))).astype(np.float32))
    one = _fused(x, h, w, parts=1)
    for parts in (2, 3, 8):
        assert np.array_equal(_fused(x, h, w, parts=parts), one)


def test_model_step_runs_the_fused_cell_and_matches_torch_cells(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Forecaster.step`` for a GRU stack (the engine's waves) uses the kernel, and its outputs
    and states match torch's cells (the path without numba) over a run of steps."""
    torch.manual_seed(13)
    model = Forecaster(ModelConfig(n_inputs=3, layers=(64, 32), horizon=6))
    calls: list[int] = []
    kernel = gru_kernel.gru_cell

    def counted(*args: object) -> object:
        calls.append(1)
        return kernel(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(gru_kernel, "gru_cell", counted)
    fused_state = [0.5 * torch.randn(50, s) for s in model.state_sizes]
    torch_state = [s.clone() for s in fused_state]
    for _ in range(30):
        x = 3.0 * torch.randn(50, 3)
        monkeypatch.setattr(gru_kernel, "AVAILABLE", True)
        y_fused, fused_state = model.step(x, fused_state)
        monkeypatch.setattr(gru_kernel, "AVAILABLE", False)
        y_torch, torch_state = model.step(x, torch_state)
        torch.testing.assert_close(y_fused, y_torch, rtol=0, atol=1e-5)
        for a, b in zip(fused_state, torch_state, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert len(calls) == 30 * 2  # two layers per step


def test_a_one_thread_engine_starts_no_worker_threads() -> None:
    """The daemon runs torch on one thread; the engine's waves, large ones included, must not
    start numba's OpenMP threads there (torch's calls then spin on them, decision 31). In a
    fresh interpreter: the process's thread count after a 5,000-stream wave is what it was
    before the engine existed, while two torch threads do start the parallel cell."""
    code = (
        "import os, sys, torch\n"
        "from pipeline.engine import Engine\n"
        "from pipeline.messages import Source, Tick\n"
        "from pipeline.model import load_model\n"
        "from pipeline import gru_kernel\n"
        "torch.set_num_threads(int(sys.argv[1]))\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "engine = Engine(load_model(), capacity=8192)\n"
        "for k in range(2):\n"
        "    engine.process([Tick(f's{i}', 1e9 + k, (1.0 + i + k,), Source('t', 0, i))\n"
        "                    for i in range(5000)])\n"
        "threads = len(os.listdir('/proc/self/task')) - before\n"
        "print(threads, bool(gru_kernel.cell_parts.signatures))\n"
    )
    one = subprocess.run([sys.executable, "-c", code, "1"], check=True, timeout=120,
                         capture_output=True, text=True)  # fmt: skip
    assert one.stdout.split() == ["0", "False"], one.stdout + one.stderr
    if gru_kernel.PARALLEL:
        two = subprocess.run([sys.executable, "-c", code, "2"], check=True, timeout=120,
                             capture_output=True, text=True)  # fmt: skip
        assert two.stdout.split()[1] == "True", two.stdout + two.stderr
