"""GENIE-M weight quantizer: a frozen integer base B plus learned softbits h(V), with a learned step s.

    W_q = s · (clip(B + h(V) + z, qmin, qmax) − z),   B = floor(W / s0),   h(V) = clip(σ(V)·(ζ−γ) + γ, 0, 1)

(GENIE, Eq. 13; AdaRound's rectified sigmoid with γ = −0.1, ζ = 1.1). V starts where h(V) = W/s0 − B, so
the first forward pass reproduces W exactly inside the grid. With s fixed at s0 this is AdaRound.
After reconstruction the soft bits become hard ones: h(V) ≥ 0.5 ⇔ V ≥ 0.
"""

from __future__ import annotations

import numpy as np

from ..builder import GraphBuilder

GAMMA, ZETA = -0.1, 1.1


def rectified_sigmoid(v: np.ndarray) -> np.ndarray:
    return np.clip(1.0 / (1.0 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_softbits(w: np.ndarray, scale: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, V) with B = floor(W/s0) and h(V) = W/s0 − B (float32, the weight's shape)."""
    shape = [1] * w.ndim
    shape[axis] = -1
    ws = w.astype(np.float64) / scale.astype(np.float64).reshape(shape)
    base = np.floor(ws)
    rest = np.clip(ws - base, 0.0, 1.0)
    v = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)
    return base.astype(np.float32), v.astype(np.float32)


def hard_round(base: np.ndarray, v: np.ndarray, zero_point: np.ndarray, axis: int,
               qrange: tuple[int, int]) -> np.ndarray:
    """Integer weights (zero point included): clip(B + [h(V) ≥ 0.5] + z, qmin, qmax)."""
    shape = [1] * base.ndim
    shape[axis] = -1
    z = zero_point.astype(np.int64).reshape(shape)
    wint = base.astype(np.int64) + (v >= 0).astype(np.int64) + z
    return np.clip(wint, *qrange).astype(np.int32)


def softbit_weight(b: GraphBuilder, base: np.ndarray, zero_point: np.ndarray, axis: int,
                   qrange: tuple[int, int], s_name: str, v_name: str, out: str | None = None) -> tuple[str, str]:
    """Append W_q's nodes (writing ``out`` when given); ``s_name``/``v_name`` are initializers added by the
    caller. Returns (W_q tensor, h(V) tensor) — h(V) feeds the rounding regulariser.
    """
    shape = [1] * base.ndim
    shape[axis] = -1
    z = b.const(zero_point.astype(np.float32).reshape(shape))
    sig = b.op("Sigmoid", v_name)
    stretched = b.op("Add", b.op("Mul", sig, b.const(ZETA - GAMMA)), b.const(GAMMA))
    h = b.op("Clip", stretched, b.const(0.0), b.const(1.0))
    grid = b.op("Add", b.op("Add", b.const(base), h), z)
    clipped = b.op("Clip", grid, b.const(float(qrange[0])), b.const(float(qrange[1])))
    w_q = b.op("Mul", b.op("Sub", clipped, z), s_name, out=out)
    return w_q, h
