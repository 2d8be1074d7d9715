"""Which layers to keep at high bits, chosen without data: ``quantize --auto-high-bits K``.

On the calibration images (distilled, so no data is needed) the quantized model at its starting
point (round-to-nearest, initial steps) is compared with the FP32 model by the mean KL divergence of
their softmax outputs. For every low-bit layer, the same divergence is measured with that one layer
(its weights and its input) at ``first_last_bits``; the layers whose high bits lower the divergence
most are the ones a mixed-precision plan should spend its bits on. One forward pass of the
calibration images per layer, no gradients. The plans are composed from two initialised plans (all
low, all high), so each score equals that of ``build_plan(..., high_bits=[node])`` initialised alone.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx

from ..runtime import predict
from .fakequant import fakequant_model
from .spec import QuantPlan


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.reshape(len(logits), -1).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over images of KL(softmax(p) || softmax(q))."""
    p, q = _softmax(p_logits), _softmax(q_logits)
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))


def plan_kl(folded: onnx.ModelProto, plan: QuantPlan, images: np.ndarray, reference: np.ndarray,
            threads: int = 1) -> float:
    """Mean KL(FP32 || quantized) on ``images``: ``reference`` the FP32 logits, the plan as its fake-quant model."""
    return kl_divergence(reference, predict(fakequant_model(folded, plan), images, threads=threads))


def candidates(low: QuantPlan, high: QuantPlan) -> list[str]:
    """Layers whose weights or input quantizer have fewer bits in ``low`` than in ``high``."""
    out = []
    for node, wq in low.weights.items():
        acts = [a for a in low.acts.values() if node in a.consumers]
        if wq.bits < high.weights[node].bits or any(a.bits < high.acts[a.tensor].bits for a in acts):
            out.append(node)
    return out


def with_high_node(low: QuantPlan, high: QuantPlan, node: str) -> QuantPlan:
    """``low`` with ``node``'s weight quantizer and input quantizers taken from ``high``."""
    plan = copy.copy(low)
    plan.weights = {**low.weights, node: high.weights[node]}
    plan.acts = {t: (high.acts[t] if node in a.consumers else a) for t, a in low.acts.items()}
    return plan


def high_bits_gains(folded: onnx.ModelProto, low: QuantPlan, high: QuantPlan, images: np.ndarray,
                    threads: int = 1, reference: np.ndarray | None = None) -> tuple[dict[str, float], float]:
    """({node: KL(low) − KL(low with node high)}, KL(low)) on ``images``, for every candidate node.

    ``low`` and ``high`` are initialised plans of the same model that differ only in bit widths
    (``high``: every candidate in ``high_bits``); ``reference``: the FP32 logits, if already known."""
    if reference is None:
        reference = predict(folded, images, threads=threads)
    base = plan_kl(folded, low, images, reference, threads)
    gains = {node: base - plan_kl(folded, with_high_node(low, high, node), images, reference, threads)
             for node in candidates(low, high)}
    return gains, base


def choose(gains: dict[str, float], k: int) -> list[str]:
    """The ``k`` nodes with the largest gains (ties: model order), leaving out those whose high bits
    do not lower the divergence at all."""
    order = sorted((n for n in gains if gains[n] > 0), key=lambda n: -gains[n])
    return order[:max(k, 0)]
