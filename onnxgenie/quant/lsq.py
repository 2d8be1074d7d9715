"""Activation quantizer: LSQ (learned step, straight-through rounding) and QDrop, as ONNX nodes.

    x_q = s_a · (c + stopgrad(round(c) − c)),   c = clip(x / s_a, qmin, qmax)        (LSQ)
    out = m · x_q + (1 − m) · x,                m ∈ {0, 1} per element, p = 0.5    (QDrop)

The straight-through rounding is ``engine_forms.round_ste``. Forward: round(c); backward: d/dx = 1
inside the range, 0 outside; d/ds_a = round(c) − x/s_a inside, qmin/qmax outside (LSQ without
gradient scaling, as in the GENIE reference).
"""

from __future__ import annotations

import numpy as np

from ..builder import GraphBuilder
from ..engine_forms import round_ste


def lsq_quantize(b: GraphBuilder, x: str, s_name: str, qrange: tuple[int, int]) -> str:
    c = b.op("Clip", b.op("Div", x, s_name), b.const(float(qrange[0])), b.const(float(qrange[1])))
    return b.op("Mul", round_ste(b, c), s_name)


def qdrop(b: GraphBuilder, x: str, x_q: str, mask: str) -> str:
    """m·x_q + (1−m)·x written as x + m·(x_q − x)."""
    return b.op("Add", x, b.op("Mul", mask, b.op("Sub", x_q, x)))


def lsq_numpy(x: np.ndarray, s: float, qrange: tuple[int, int]) -> np.ndarray:
    """Hard forward of the quantizer (round half to even, like ONNX Round)."""
    return (np.round(np.clip(x / s, *qrange)) * s).astype(x.dtype)
