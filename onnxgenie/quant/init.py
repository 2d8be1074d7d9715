"""Step-size initialisation: the step minimising the L_p quantization error, p = 2.4 (GENIE/BRECQ).

For each channel (weights) or tensor (activations) the range is shrunk by clip ratios 1.00, 0.99,
..., 0.01 and the step with the smallest mean |x - Q(x)|^p is kept (the first one on ties).
Symmetric quantizers search the max-abs range with zero point 0; asymmetric ones the min/max range
(widened to contain 0) with the zero point that puts the minimum on the grid.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph.bn import initializers
from ..runtime import batches
from .spec import ActQuant, QuantPlan, int_range

P_NORM = 2.4
CLIP_RATIOS = np.arange(100, 0, -1, dtype=np.float32) / np.float32(100)
MAX_SAMPLES = 1 << 18  # activation values scored per tensor (the range is taken from all values)
# 8-bit activations take their whole observed range: with 255 levels the rounding error is small, and what a
# clipped range costs is the tails that synthetic images under-represent (ResNet-32 W8A8 from distilled
# images, 5,000 dev images: 82.46 % with the L2.4 search, 82.82 with min/max; FP32 82.90).
FULL_RANGE_ACT_BITS = 8


def fake_quant(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """scale * (clip(round(x / scale) + zp, qmin, qmax) - zp), float32, round half to even like ONNX."""
    q = np.clip(np.round(x / scale) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).astype(np.float32)


def _candidates(x: np.ndarray, ratio: np.float32, qmin: int, qmax: int, symmetric: bool,
                lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step and zero point of each row for one clip ratio."""
    if symmetric:
        top = np.maximum(np.abs(lo), np.abs(hi)) * ratio
        bottom = -top if qmin < 0 else np.zeros_like(top)
        scale = (top - bottom) / np.float32(qmax - qmin)
        zero = np.zeros_like(scale)
    else:
        top, bottom = hi * ratio, lo * ratio
        scale = (top - bottom) / np.float32(qmax - qmin)
        zero = np.clip(np.round(qmin - bottom / np.where(scale > 0, scale, 1)), qmin, qmax)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)  # all-zero rows: any step is exact
    return scale, zero.astype(np.float32)


def lp_search(x: np.ndarray, qmin: int, qmax: int, symmetric: bool, p: float = P_NORM,
              lo: np.ndarray | None = None, hi: np.ndarray | None = None,
              ratios: np.ndarray = CLIP_RATIOS) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (x is [rows, n]) step and zero point minimising mean |x - Q(x)|^p over the clip ratios.

    ``lo``/``hi`` override the row ranges (used when ``x`` is a sample of a larger tensor); ``ratios``
    of [1.0] gives the plain min/max (or max-abs) grid.
    """
    x = x.astype(np.float32)
    lo = np.minimum(x.min(axis=1) if lo is None else lo, 0).astype(np.float32)
    hi = np.maximum(x.max(axis=1) if hi is None else hi, 0).astype(np.float32)
    best = np.full(x.shape[0], np.inf)
    best_scale = np.ones(x.shape[0], np.float32)
    best_zero = np.zeros(x.shape[0], np.float32)
    for ratio in ratios:
        scale, zero = _candidates(x, ratio, qmin, qmax, symmetric, lo, hi)
        err = np.abs(x - fake_quant(x, scale[:, None], zero[:, None], qmin, qmax))
        score = (err ** np.float32(p)).mean(axis=1, dtype=np.float64)
        better = score < best
        best = np.where(better, score, best)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    return best_scale.astype(np.float32), best_zero.astype(np.int32)


def init_weights(folded: onnx.ModelProto, plan: QuantPlan, p: float = P_NORM,
                 ratios: np.ndarray = CLIP_RATIOS) -> QuantPlan:
    """Fill scale, zero_point and round-to-nearest ``wint`` of every weight quantizer (in place; returned)."""
    inits = initializers(folded)
    for wq in plan.weights.values():
        w = inits[wq.weight].astype(np.float32)
        rows = np.moveaxis(w, wq.axis, 0).reshape(w.shape[wq.axis], -1)
        qmin, qmax = wq.qrange
        wq.scale, wq.zero_point = lp_search(rows, qmin, qmax, wq.symmetric, p, ratios=ratios)
        wq.wint = quantize_weight(w, wq.scale, wq.zero_point, wq.axis, qmin, qmax)
    return plan


def quantize_weight(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int,
                    qmin: int, qmax: int) -> np.ndarray:
    """Round-to-nearest integer weights (zero point included), int32."""
    shape = [1] * w.ndim
    shape[axis] = -1
    s, z = scale.reshape(shape).astype(np.float32), zero_point.reshape(shape).astype(np.float32)
    return np.clip(np.round(w.astype(np.float32) / s) + z, qmin, qmax).astype(np.int32)


# A tensor with negative values gets an unsigned grid with a zero point instead of a signed symmetric one
# where that at least halves the L_p error: outputs of SiLU, HardSwish, LeakyReLU (min -0.28 for SiLU)
# would use about half the codes of a signed grid. Roughly symmetric tensors keep the symmetric grid.
ASYMMETRIC_GAIN = 0.5


def _lp_error(sample: np.ndarray, scale: float, zero_point: int, qmin: int, qmax: int, p: float) -> float:
    err = np.abs(sample - fake_quant(sample, np.float32(scale), np.float32(zero_point), qmin, qmax))
    return float((err ** np.float32(p)).mean(dtype=np.float64))


def init_activations(folded: onnx.ModelProto, plan: QuantPlan, images: np.ndarray, batch_size: int = 64,
                     threads: int = 1, p: float = P_NORM, seed: int = 0) -> QuantPlan:
    """Per-tensor steps from calibration images: unsigned with zero point 0 for non-negative tensors,
    otherwise signed symmetric, or unsigned with a zero point where that halves the error
    (``ASYMMETRIC_GAIN``; not for TensorRT, which takes signed symmetric grids only). Below
    ``FULL_RANGE_ACT_BITS`` the step minimises the L_p error; at 8 bits it covers the whole range.

    The range is the exact min/max over all images; the L_p score uses a uniform random sample of
    about ``MAX_SAMPLES`` nonzero values per tensor (memory stays bounded for any number of images;
    zeros are quantized exactly by every step, so leaving them out does not change the argmin).
    """
    rng = np.random.default_rng(seed)
    names = list(plan.acts)
    lo = dict.fromkeys(names, np.inf)
    hi = dict.fromkeys(names, -np.inf)
    samples: dict[str, list[np.ndarray]] = {t: [] for t in names}
    for part, values in batches(folded, images, names, batch_size, threads):
        for t, v in zip(names, values):
            flat = v.ravel()
            lo[t], hi[t] = min(lo[t], float(flat.min())), max(hi[t], float(flat.max()))
            flat = flat[flat != 0]  # exact zeros (half of a ReLU output) have zero error at every step
            keep = int(np.ceil(MAX_SAMPLES * len(images[part]) / len(images)))
            samples[t].append(flat if flat.size <= keep else flat[rng.integers(0, flat.size, keep)])
    for t, act in plan.acts.items():
        act.signed, act.zero_point = plan.target == "tensorrt" or lo[t] < 0, 0
        qmin, qmax = act.qrange
        sample = np.concatenate([*samples.pop(t), np.zeros(1, np.float32)])
        ratios = CLIP_RATIOS[:1] if act.bits >= FULL_RANGE_ACT_BITS else CLIP_RATIOS
        bounds = dict(lo=np.float32([lo[t]]), hi=np.float32([hi[t]]), ratios=ratios)
        scale, _ = lp_search(sample[None, :], qmin, qmax, True, p, **bounds)
        act.scale = float(scale[0])
        if act.signed and plan.target != "tensorrt" and hi[t] > 0:
            umin, umax = int_range(act.bits, False)
            a_scale, a_zero = lp_search(sample[None, :], umin, umax, False, p, **bounds)
            symmetric = _lp_error(sample, act.scale, 0, qmin, qmax, p)
            if _lp_error(sample, float(a_scale[0]), int(a_zero[0]), umin, umax, p) < ASYMMETRIC_GAIN * symmetric:
                act.signed, act.scale, act.zero_point = False, float(a_scale[0]), int(a_zero[0])
    return plan


def act_fake_quant(x: np.ndarray, act: ActQuant) -> np.ndarray:
    qmin, qmax = int_range(act.bits, act.signed)
    return fake_quant(x, np.float32(act.scale), np.float32(act.zero_point), qmin, qmax)


IMAGE_SIGMAS = 3.0  # a standardised image spans about ±3σ: ImageNet mean/std map [0, 1] to [-2.12, 2.64]


def image_range(images: np.ndarray, mean=None, std=None) -> tuple[float, float]:
    """(lo, hi) of the model's input: exact from the preprocessing ``(x − mean) / std`` of x in [0, 1]
    when it is known, else ±IMAGE_SIGMAS standard deviations of ``images`` around their mean."""
    if mean is not None and std is not None:
        m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        return float(np.min(-m / s)), float(np.max((1 - m) / s))
    center, spread = float(images.mean(dtype=np.float64)), float(images.std(dtype=np.float64))
    return center - IMAGE_SIGMAS * spread, center + IMAGE_SIGMAS * spread


def set_image_step(act: ActQuant, lo: float, hi: float, signed_only: bool = False) -> ActQuant:
    """Make the image's quantizer cover [lo, hi] without clipping (symmetric, like every activation).

    Used for synthetic calibration images (GENIE-D, noise). The image is quantized only where every
    conv input must be (W8A8 on onnxruntime's int8 kernels, TensorRT). GENIE-D's images leave Tanh
    and a BN without affine: standardised, but within about ±1.25σ, where real ones reach ±2-2.6σ; a
    range fitted on them clips real images (ResNet-32 W8A8: 80.55 against 82.65 % with a range fitted
    on real images, 2,000 dev images)."""
    act.signed, act.zero_point = signed_only or lo < 0, 0  # before qrange: it is relative to the zero point
    qmin, qmax = act.qrange
    top = max(abs(lo), abs(hi)) if act.signed else max(hi, 0.0)
    act.scale = float(np.float32(top / qmax)) if top > 0 else 1.0
    return act
