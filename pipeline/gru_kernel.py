"""One stream's run of ticks through a GRU layer as a compiled loop (numba), for hot streams.

A hot stream (many ticks in one micro-batch) runs as one sequence (:meth:`Engine._sequence`).
``nn.GRU`` at batch 1 spends ~20 µs per step per layer on this machine in per-operation
overhead, while the step's arithmetic is ~12k multiply-adds for 64 units. Here the input
projection of every step is one matrix product (BLAS) and the recurrence is one compiled loop:
~4 µs per step for 64 units, ~2 µs for 32 (2-core AMD EPYC).

The equations are torch's (``weight_ih``/``weight_hh`` stack the rows of r, z, n):

    r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

in float32 like the model's parameters. Results agree with ``nn.GRU`` to float32 rounding, not bit
for bit: the sums run in another order (``tests/test_model.py``). Non-finite values propagate as in
torch (no finite-math assumption), so the engine's finiteness guard still sees them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install usable
    numba = None  # type: ignore[assignment]

AVAILABLE = numba is not None
F32 = npt.NDArray[np.float32]


def _recurrence(gates_x: F32, w_hh_t: F32, b_hh: F32, h0: F32, out: F32) -> None:
    """``out[t]`` = the hidden state after step t (T, S), from ``gates_x`` (T, 3S) = W_ih x_t +
    b_ih, ``w_hh_t`` (S, 3S) = W_hh transposed (contiguous, so the product is a run of
    vectorizable updates), ``b_hh`` (3S,), ``h0`` (S,) the state before the first step."""
    steps, size = out.shape
    one = np.float32(1.0)
    h = h0.copy()
    gates_h = np.empty(3 * size, dtype=np.float32)
    for t in range(steps):
        gates_h[:] = b_hh
        for k in range(size):
            hk = h[k]
            for j in range(3 * size):
                gates_h[j] += w_hh_t[k, j] * hk
        for j in range(size):
            r = one / (one + math.exp(-(gates_x[t, j] + gates_h[j])))
            z = one / (one + math.exp(-(gates_x[t, size + j] + gates_h[size + j])))
            n = math.tanh(gates_x[t, 2 * size + j] + r * gates_h[2 * size + j])
            out[t, j] = (one - z) * n + z * h[j]
        h[:] = out[t]


recurrence: Any = _recurrence
if numba is not None:
    # Reordering and fusing the sums only (no finite-math flags: inf and NaN must propagate).
    recurrence = numba.njit(
        cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"}
    )(_recurrence)


def gru_layer(x: F32, h0: F32, w_ih: F32, w_hh: F32, b_ih: F32, b_hh: F32) -> F32:
    """One GRU layer over one sequence: ``x`` (T, I), ``h0`` (S,) → hidden states (T, S).

    Weights in torch's layout: ``w_ih`` (3S, I), ``w_hh`` (3S, S), biases (3S,), float32.
    """
    gates_x = np.ascontiguousarray(x @ w_ih.T + b_ih, dtype=np.float32)
    out = np.empty((len(x), len(h0)), dtype=np.float32)
    recurrence(gates_x, np.ascontiguousarray(w_hh.T), b_hh, np.ascontiguousarray(h0), out)
    return out


def warm() -> None:
    """Compile (or load from numba's cache) the loop now, so the first hot stream a daemon
    meets does not wait for it (~2 s to compile, ~0.1 s from the cache). Idempotent."""
    if numba is None or recurrence.signatures:
        return
    f32 = np.float32
    gates, size = 6, 2
    gru_layer(np.zeros((1, 1), f32), np.zeros(size, f32), np.zeros((gates, 1), f32),
              np.zeros((gates, size), f32), np.zeros(gates, f32), np.zeros(gates, f32))  # fmt: skip
