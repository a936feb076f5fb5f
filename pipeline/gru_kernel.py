"""GRU layers as compiled loops (numba): one stream's run of ticks (hot streams), and one step
of many streams (the engine's waves).

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

A wave (one tick of B streams, :func:`gru_cell`) keeps its two matrix products in torch's BLAS and
fuses the rest of the cell into one pass per row. ``torch.gru_cell`` on the CPU runs that rest as
about ten separate element-wise operations over (B, S) arrays, with libm-grade ``tanh`` at ~4 ns an
element on this machine: at 10k rows the element-wise part cost more than the products. Here the
three gates use one exponential each, a polynomial that the compiler turns into SIMD code (Cephes'
``expf``: relative error ~1e-7, about one float32 rounding), and ``tanh(a) = 1 - 2 / (1 + e^{2a})``.
Near a = 0 that form loses the relative precision of ``tanh`` itself, keeping ~6e-8 absolute error,
which is the rounding of a hidden state of order 1 anyway.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps a broken install usable
    numba = None  # type: ignore[assignment]

from pipeline.combine_kernel import PARALLEL

AVAILABLE = numba is not None
F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]


# Reordering and fusing the sums only (no finite-math flags: inf and NaN must propagate). Division
# by zero gives inf as in numpy (error_model="numpy"): python's model checks every division for
# zero and raises, a branch per division that kept the loops from vectorizing (the gates: ~6 ns
# a unit with it, ~2.7 without; a loop of reciprocals alone: 1.26 against 0.17 ns an element).
_FAST = {"reassoc", "contract", "nsz", "arcp"}


def _compiled_inline(fn: Any) -> Any:
    """A helper the kernels inline (numba), or the plain function without numba."""
    if numba is None:
        return fn
    return numba.njit(inline="always", fastmath=_FAST, error_model="numpy")(fn)


@_compiled_inline
def _exp_split(v: np.float32) -> tuple[np.float32, np.float32]:
    """e^v = y * 2^k for a float32 ``v``: returns (y, k), y in [0.7, 1.5), k an integral float.

    ``v`` is clamped to [-87, 89] without dropping NaN (``not v > c`` is true for NaN), so NaN
    stays NaN in y. Above ~88.4, k = 128, whose bits are those of inf: e^v overflows to inf as it
    should (a sigmoid of -inf is then exactly 0, as in torch); below -87, e^-87 (~1.6e-38)."""
    v = v if not v > np.float32(89.0) else np.float32(89.0)
    v = v if not v < np.float32(-87.0) else np.float32(-87.0)
    k = np.floor(v * np.float32(1.4426950408889634) + np.float32(0.5))
    r = v - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)  # ln 2 in two parts
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return p * r * r + r + np.float32(1.0), k


@_compiled_inline
def _gates(gates_x: F32, gates_h: F32, h: F32, out: F32, scratch: F32, bits: I32) -> None:
    """One stream's GRU step from its gate products: ``gates_x`` (3S,) = W_ih x + b_ih,
    ``gates_h`` (3S,) = W_hh h + b_hh, ``h`` (S,) the state before → ``out`` (S,) after.
    ``scratch``/``bits`` (3S,) are work space. Four passes over the gates, each a loop without
    calls or branches so that it vectorizes; 2^k goes through ``bits`` viewed as float32 (the
    exponent field), which is how a SIMD ``exp`` scales its polynomial."""
    size = h.shape[0]
    one, two, bias = np.float32(1.0), np.float32(2.0), np.int32(127)
    powers = bits.view(np.float32)
    for j in range(2 * size):  # r and z: sigmoid(a) = 1 / (1 + e^-a)
        y, k = _exp_split(-(gates_x[j] + gates_h[j]))
        scratch[j] = y
        bits[j] = (np.int32(k) + bias) << np.int32(23)
    for j in range(2 * size):
        scratch[j] = one / (one + scratch[j] * powers[j])
    for j in range(size):  # n = tanh(a) = 1 - 2 / (1 + e^2a), a = gx_n + r * gh_n
        y, k = _exp_split(two * (gates_x[2 * size + j] + scratch[j] * gates_h[2 * size + j]))
        scratch[2 * size + j] = y
        bits[2 * size + j] = (np.int32(k) + bias) << np.int32(23)
    for j in range(size):
        n = one - two / (one + scratch[2 * size + j] * powers[2 * size + j])
        out[j] = n + scratch[size + j] * (h[j] - n)  # (1 - z) n + z h


def _recurrence(gates_x: F32, w_hh_t: F32, b_hh: F32, h0: F32, out: F32) -> None:
    """``out[t]`` = the hidden state after step t (T, S), from ``gates_x`` (T, 3S) = W_ih x_t +
    b_ih, ``w_hh_t`` (S, 3S) = W_hh transposed (contiguous, so the product is a run of
    vectorizable updates), ``b_hh`` (3S,), ``h0`` (S,) the state before the first step."""
    steps, size = out.shape
    h = h0.copy()
    gates_h = np.empty(3 * size, dtype=np.float32)
    scratch, bits = np.empty(3 * size, np.float32), np.empty(3 * size, np.int32)
    for t in range(steps):
        gates_h[:] = b_hh
        for k in range(size):
            hk = h[k]
            for j in range(3 * size):
                gates_h[j] += w_hh_t[k, j] * hk
        _gates(gates_x[t], gates_h, h, out[t], scratch, bits)
        h[:] = out[t]


def _cell(gates_x: F32, gates_h: F32, h: F32, out: F32, scratch: F32, bits: I32) -> None:
    """One GRU step of B streams: :func:`_gates` for each row of ``gates_x``/``gates_h``
    (B, 3S), ``h`` (B, S) → ``out`` (B, S); ``scratch``/``bits`` (3S,) work space."""
    for b in range(h.shape[0]):
        _gates(gates_x[b], gates_h[b], h[b], out[b], scratch, bits)


def _cell_parts(cuts: I64, gates_x: F32, gates_h: F32, h: F32, out: F32) -> None:
    """:func:`_cell` on the rows ``[cuts[p], cuts[p + 1])`` of every part p in parallel (on the
    OpenMP pool torch's kernels use, as :func:`pipeline.combine_kernel.step_parts` does)."""
    size = h.shape[1]
    for p in _prange(len(cuts) - 1):
        a, b = cuts[p], cuts[p + 1]
        scratch, bits = np.empty(3 * size, np.float32), np.empty(3 * size, np.int32)
        _cell_rows(gates_x[a:b], gates_h[a:b], h[a:b], out[a:b], scratch, bits)


recurrence: Any = _recurrence
cell: Any = _cell
cell_parts: Any = _cell_parts
_cell_rows: Any = _cell
_prange: Any = range
if numba is not None:

    def _kernel(fn: Any) -> Any:
        return numba.njit(cache=True, nogil=True, fastmath=_FAST, error_model="numpy")(fn)

    recurrence = _kernel(_recurrence)
    cell = _cell_rows = _kernel(_cell)
    _prange = numba.prange
    cell_parts = numba.njit(cache=True, nogil=True, parallel=PARALLEL)(_cell_parts)

# A wave runs in parallel parts of at least this many rows each (fewer: one part, no fork).
ROWS_PER_PART = 1024


def gru_cell(gates_x: F32, gates_h: F32, h: F32, parts: int = 1) -> F32:
    """One GRU step of B streams from the two gate products (see :func:`_cell`); float32,
    C-contiguous (B, 3S), (B, 3S), (B, S) → the new state (B, S). ``parts`` > 1 splits the rows
    into that many parallel parts (rows are independent), when numba has a thread-safe layer."""
    size = h.shape[1]
    out = np.empty_like(h)
    parts = min(parts, len(h) // ROWS_PER_PART) if PARALLEL else 1
    if parts <= 1:
        scratch, bits = np.empty(3 * size, np.float32), np.empty(3 * size, np.int32)
        cell(gates_x, gates_h, h, out, scratch, bits)
    else:
        cell_parts(np.linspace(0, len(h), parts + 1).astype(np.int64), gates_x, gates_h, h, out)
    return out


def gru_layer(x: F32, h0: F32, w_ih: F32, w_hh: F32, b_ih: F32, b_hh: F32) -> F32:
    """One GRU layer over one sequence: ``x`` (T, I), ``h0`` (S,) → hidden states (T, S).

    Weights in torch's layout: ``w_ih`` (3S, I), ``w_hh`` (3S, S), biases (3S,), float32.
    """
    gates_x = np.ascontiguousarray(x @ w_ih.T + b_ih, dtype=np.float32)
    out = np.empty((len(x), len(h0)), dtype=np.float32)
    recurrence(gates_x, np.ascontiguousarray(w_hh.T), b_hh, np.ascontiguousarray(h0), out)
    return out


def warm(parallel: bool = False) -> None:
    """Compile (or load from numba's cache) the loops now, so the first batch a daemon meets
    does not wait for them (~2 s to compile, ~0.1 s from the cache). Idempotent. ``parallel``:
    also the parallel cell, only for a process whose torch has more than one thread: running
    it starts numba's OpenMP threads, and in a one-thread process torch's own calls then spin
    on them (decision 31)."""
    if numba is None:
        return
    f32 = np.float32
    gates, size = 6, 2
    if parallel and PARALLEL and not cell_parts.signatures:
        one_row = [np.zeros((1, n), f32) for n in (gates, gates, size, size)]
        cell_parts(np.array([0, 1], dtype=np.int64), *one_row)
    if recurrence.signatures and cell.signatures:
        return
    gru_cell(np.zeros((1, gates), f32), np.zeros((1, gates), f32), np.zeros((1, size), f32))
    gru_layer(np.zeros((1, 1), f32), np.zeros(size, f32), np.zeros((gates, 1), f32),
              np.zeros((gates, size), f32), np.zeros(gates, f32), np.zeros(gates, f32))  # fmt: skip
