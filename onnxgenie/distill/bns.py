"""The BN-statistics (BNS) loss of GENIE-D, built into the teacher graph.

For every BatchNormalization layer l with stored mean μ_BN and std σ_BN = sqrt(var + eps), the
per-channel mean μ_l and std σ_l = sqrt(biased batch variance + eps) of the layer's input are
computed in the graph, and

    loss = Σ_l ( ‖μ_l − μ_BN‖² + ‖σ_l − σ_BN‖² ) / C_l                       (BN terms)
         + Σ_{n,c} ( μ_{n,c}² + (σ_{n,c} − 1)² ) / N                          (input term)

Normalisation as in the reference (``l2_loss(A, B) = ‖A − B‖² / B.size(0)``): each BN term is
divided by its channel count, and the input term uses *per-image* per-channel statistics of the
image, summed over channels and averaged over images. eps = 1e-6 on both sides (the reference's
value, used for the stored and the batch std alike; the reference's batch std is unbiased, ours is
the biased one, as torch.nn.BatchNorm normalises with).

The teacher's BN layers become their eval-mode affine form (a training graph must not contain
BatchNormalization, see ../shared/notes/ort-training.md). With ``fused=True`` a BN is folded into
its Conv/Gemm producer and its input statistics are recovered per channel from the folded output
y = a·x + b: mean_x = (mean_y − b)/a, var_x = var_y/a². That is exact and saves a full-tensor
Mul+Add (and its backward) per layer; a BN whose producer cannot be folded, or with a zero or tiny
gamma in any channel (timm's zero_init_last, pruned channels: y no longer carries x there, see
``recoverable``), keeps the Mul+Add form and is tapped at its input directly.

The same loss on a batch in chunks (GENIE-D's ``ChunkedGraph``): the BN terms see the batch only through
each tapped tensor's per-channel mean m and variance v, which per-image statistics give exactly
(``bns_statistics_model``, ``batch_statistics``); the head L(m, v) (``bns_head_model``) gives g_m, g_v,
and each chunk's surrogate Σ_c g_m·Σx/(N·P) + g_v·Σ(x − m)²/(N·P) (``bns_surrogate_model``; N images of
P positions) has L's gradient w.r.t. the chunk's pixels:
    ∂m/∂x = 1/(N·P) and ∂v/∂x = 2(x − m)/(N·P) (v's path through m is 0 as Σ(x − m) = 0);
    a chunk's pixels enter only its own part of the sums, and the input term is per image.

Every graph here is written in the forms onnxruntime-training can differentiate (``engine_forms``:
totals as chains of Add, the teacher through ``trainable_form``, which writes Relu as Clip among others).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, shape_inference

from ..builder import GraphBuilder, make_model, value_infos
from ..engine_forms import trainable_form
from ..graph.bn import BNLayer, fold_bn, require_bn
from ..graph.load import nhwc_transpose

STD_EPS = 1e-6
LOSS = "bns_loss"
SURROGATE = "bns_surrogate"
INPUT_TERMS = "bns.input_terms"       # per-image input term [N]
IMAGE_WEIGHTS = "bns.image_weights"   # per-image weight of the surrogate [N]: 1/batch, 0 for padding


def image_mean_name(i: int) -> str:   # per-image mean of layer i's tapped tensor over positions [N, C]
    return f"bns.l{i}.image_mean"


def image_var_name(i: int) -> str:    # per-image biased variance over positions [N, C]
    return f"bns.l{i}.image_var"


def batch_mean_name(i: int) -> str:   # the whole batch's mean [C]: trainable in the head, fed to the surrogate
    return f"bns.l{i}.batch_mean"


def batch_var_name(i: int) -> str:
    return f"bns.l{i}.batch_var"


def grad_mean_name(i: int) -> str:    # dL/dm and dL/dv of the head, fed to the surrogate [C]
    return f"bns.l{i}.grad_mean"


def grad_var_name(i: int) -> str:
    return f"bns.l{i}.grad_var"


def _builder() -> GraphBuilder:
    return GraphBuilder("bns.", sep="")


def _const(b: GraphBuilder, name: str, value) -> str:
    return b.const(value, f"bns.{name}")


def mean_var(b: GraphBuilder, x: str, axes: list[int]) -> tuple[str, str]:
    """Mean (keepdims) and biased variance (reduced) over ``axes``."""
    mean = b.op("ReduceMean", x, axes=axes, keepdims=1)
    centred = b.op("Sub", x, mean)
    var = b.op("ReduceMean", b.op("Mul", centred, centred), axes=axes, keepdims=0)
    return mean, var


def std(b: GraphBuilder, var: str) -> str:
    return b.op("Sqrt", b.op("Add", var, _const(b, "std_eps", np.float32(STD_EPS))))


def mse(b: GraphBuilder, a: str, target: str) -> str:
    """Mean over all elements of (a − target)²."""
    d = b.op("Sub", a, target)
    return b.op("ReduceMean", b.op("Mul", d, d), keepdims=0)


def sum_over(b: GraphBuilder, x: str, *axes: int) -> str:
    axes_name = "axes" + "".join(map(str, axes))
    return b.op("ReduceSum", x, _const(b, axes_name, np.array(axes, np.int64)), keepdims=0)


def bn_term(b: GraphBuilder, mean: str, var: str, tap: "Tap", i: int) -> str:
    """‖μ − μ_BN‖²/C + ‖σ − σ_BN‖²/C of layer ``i`` from its tapped tensor's mean and variance [C]."""
    bn = tap.layer
    if tap.folded:  # statistics of x from those of y = a·x + b, per channel
        a = bn.gamma / bn.std
        mean = b.op("Mul", b.op("Sub", mean, _const(b, f"l{i}.shift", bn.beta - bn.mean * a)),
                    _const(b, f"l{i}.inv_scale", 1.0 / a))
        var = b.op("Mul", var, _const(b, f"l{i}.inv_scale_sq", 1.0 / (a * a)))
    mean_loss = mse(b, mean, _const(b, f"l{i}.mean", bn.mean))
    std_loss = mse(b, std(b, var), _const(b, f"l{i}.std", np.sqrt(bn.var + STD_EPS)))
    return b.op("Add", mean_loss, std_loss)


def input_terms(b: GraphBuilder, image: str, channels: int) -> str:
    """Per image: Σ_c μ_{n,c}² + (σ_{n,c} − 1)² of the NCHW image ([N])."""
    mean, var = mean_var(b, image, [2, 3])
    mean_sq = sum_over(b, b.op("Mul", mean, mean), 1, 2, 3)
    d = b.op("Sub", std(b, var), _const(b, "one", np.float32(1.0)))
    return b.op("Add", mean_sq, sum_over(b, b.op("Mul", d, d), 1), out=INPUT_TERMS)


def per_image(b: GraphBuilder, x: str, rank: int) -> tuple[str, str]:
    """Per-image mean and biased variance [N, C] of x over its positions (axes 2.. of a rank-4 x)."""
    if rank == 2:   # one position per image
        return x, b.op("Sub", x, x)
    mean, var = mean_var(b, x, list(range(2, rank)))
    return b.op("Reshape", mean, _const(b, "rows", np.array([0, -1], np.int64))), var


@dataclass(frozen=True)
class Tap:
    """Where a BN layer's statistics are read: its input, or its output folded into the producer."""
    layer: BNLayer
    tensor: str
    folded: bool
    rank: int


def _rank(model: onnx.ModelProto, tensor: str) -> int:
    vi = value_infos(model).get(tensor)
    if vi is None:
        raise ValueError(f"no shape for {tensor}; run graph.load.normalize first")
    return len(vi.type.tensor_type.shape.dim)


def _tapped(teacher: onnx.ModelProto, fused: bool) -> tuple[onnx.ModelProto, list[Tap], str, int]:
    """The teacher with its BNs in eval-mode affine form, where each layer is tapped, the NCHW image
    tensor the input term reads and its channel count."""
    layers = require_bn(teacher)
    affine = fold_bn(teacher, fold_into_producer=fused,
                     keep=frozenset(bn.output for bn in layers if not recoverable(bn)))
    produced = {o for n in affine.graph.node for o in n.output}
    image = affine.graph.input[0]
    to_nchw = nhwc_transpose(affine, image.name)   # the input term is taken on the NCHW image
    channels = image.type.tensor_type.shape.dim[1 if to_nchw is None else 3].dim_value
    taps = []
    for bn in layers:
        folded = bn.input not in produced and bn.input != image.name
        tensor = bn.output if folded else bn.input
        taps.append(Tap(bn, tensor, folded, _rank(affine, tensor)))
    return affine, taps, image.name if to_nchw is None else to_nchw.output[0], channels


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers that do not lead to a graph output."""
    needed = {o.name for o in model.graph.output}
    keep = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    inits = [t for t in model.graph.initializer if t.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)


# x = (y − b)/a in float32 keeps about 1e-4 of x's spread where |a|·σ_x = |γ| ≥ 1e-3·|b|
MIN_GAMMA_RATIO = 1e-3
MIN_GAMMA = 1e-6


def recoverable(bn: BNLayer) -> bool:
    """Whether the statistics of x can be read from those of the folded output y = a·x + b in float32:
    not where a channel's gamma is zero (y is constant) or so small beside the shift b that y holds
    too few bits of x."""
    a = bn.gamma / bn.std
    shift = np.abs(bn.beta - bn.mean * a)
    return bool(np.all(np.abs(bn.gamma) >= np.maximum(MIN_GAMMA_RATIO * shift, MIN_GAMMA)))


def _finish(affine: onnx.ModelProto, b: GraphBuilder, outputs: list[onnx.ValueInfoProto],
            inputs: list[onnx.ValueInfoProto] = ()) -> onnx.ModelProto:
    """``affine`` with ``b``'s nodes, only ``outputs`` as outputs (and what leads to them), ``inputs`` added."""
    out = onnx.ModelProto()
    out.CopyFrom(affine)
    out.graph.node.extend(b.nodes)
    out.graph.initializer.extend(b.inits)
    out.graph.input.extend(inputs)
    trainable_form(out)
    del out.graph.output[:]
    out.graph.output.extend(outputs)
    _prune(out)
    del out.graph.value_info[:]
    return shape_inference.infer_shapes(out)


def _float(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def bns_loss_model(teacher: onnx.ModelProto, fused: bool = True, extra_outputs: tuple[str, ...] = ()
                   ) -> onnx.ModelProto:
    """The teacher (normal form) with its BNS loss as first output ``bns_loss`` (a scalar).

    Its logits are dropped (and what only feeds them); ``extra_outputs`` names tensors to keep as
    further outputs. The image input is unchanged.
    """
    affine, taps, image, channels = _tapped(teacher, fused)
    b = _builder()
    total = b.op("ReduceMean", input_terms(b, image, channels), keepdims=0)
    for i, tap in enumerate(taps):
        mean, var = mean_var(b, tap.tensor, [0, *range(2, tap.rank)])
        mean = b.op("Reshape", mean, _const(b, "flat", np.array([-1], np.int64)))
        total = b.op("Add", total, bn_term(b, mean, var, tap, i))
    b.op("Identity", total, out=LOSS)
    shapes = value_infos(affine)
    extra = [shapes[name] if name in shapes else _float(name, None) for name in extra_outputs]
    return _finish(affine, b, [_float(LOSS, []), *extra])


# The same loss on a batch in chunks (see the module docstring) ------------------------------------

def bns_statistics_model(teacher: onnx.ModelProto, fused: bool = True) -> onnx.ModelProto:
    """Forward only: per image, the input term (``INPUT_TERMS``) and each layer's mean and variance over
    positions of its tapped tensor (``image_mean_name(i)``, ``image_var_name(i)``)."""
    affine, taps, image, channels = _tapped(teacher, fused)
    b = _builder()
    outputs = [_float(input_terms(b, image, channels), ["N"])]
    for i, tap in enumerate(taps):
        mean, var = per_image(b, tap.tensor, tap.rank)
        b.op("Identity", mean, out=image_mean_name(i))
        b.op("Identity", var, out=image_var_name(i))
        outputs += [_float(image_mean_name(i), ["N", tap.layer.channels]),
                    _float(image_var_name(i), ["N", tap.layer.channels])]
    return _finish(affine, b, outputs)


def batch_statistics(image_means: np.ndarray, image_vars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance [C] over a batch from per-image ones [N, C] (each image has the same
    number of positions): the law of total variance, in float64."""
    image_means = np.asarray(image_means, np.float64)
    mean = image_means.mean(axis=0)
    var = np.asarray(image_vars, np.float64).mean(axis=0) + ((image_means - mean) ** 2).mean(axis=0)
    return mean.astype(np.float32), var.astype(np.float32)


def bns_head_model(teacher: onnx.ModelProto, fused: bool = True) -> onnx.ModelProto:
    """The BN terms of the loss as a function of the initializers ``batch_mean_name(i)`` and
    ``batch_var_name(i)`` (the batch statistics of each tapped tensor); output ``bns_loss``
    without the input term."""
    _, taps, _, _ = _tapped(teacher, fused)
    b, statistics, total = _builder(), GraphBuilder(), None
    for i, tap in enumerate(taps):
        zeros = np.zeros(tap.layer.channels, np.float32)
        statistics.const(zeros, batch_mean_name(i))
        statistics.const(zeros, batch_var_name(i))
        term = bn_term(b, batch_mean_name(i), batch_var_name(i), tap, i)
        total = term if total is None else b.op("Add", total, term)
    b.op("Identity", total, out=LOSS)
    model = make_model(b.nodes, "bns_head", [], [_float(LOSS, [])], statistics.inits + b.inits, teacher,
                       producer_name="onnxgenie")
    return shape_inference.infer_shapes(model)


def bns_surrogate_model(teacher: onnx.ModelProto, fused: bool = True) -> onnx.ModelProto:
    """The teacher with the scalar output ``bns_surrogate`` = Σ_n w_n·(input term_n + Σ_l Σ_c
    g_m·mean_n + g_v·mean_n((x − m)²)) over the images of a chunk, whose gradient w.r.t. the image is
    that of the whole batch's BNS loss (see above). Inputs beside the image: ``IMAGE_WEIGHTS`` [N]
    (1/batch; 0 for padding) and per layer ``batch_mean_name(i)``, ``grad_mean_name(i)``,
    ``grad_var_name(i)`` [C]."""
    affine, taps, image, channels = _tapped(teacher, fused)
    b = _builder()
    inputs = [_float(IMAGE_WEIGHTS, ["N"])]
    total = input_terms(b, image, channels)
    for i, tap in enumerate(taps):
        c = tap.layer.channels
        inputs += [_float(name(i), [c]) for name in (batch_mean_name, grad_mean_name, grad_var_name)]
        bcast = _const(b, f"bcast{tap.rank}", np.array([1, -1] + [1] * (tap.rank - 2), np.int64))
        d = b.op("Sub", tap.tensor, b.op("Reshape", batch_mean_name(i), bcast))
        sq = b.op("Mul", d, d)
        x_mean, sq_mean = tap.tensor, sq
        if tap.rank > 2:   # means over positions [N, C]
            positions = list(range(2, tap.rank))
            x_mean = b.op("ReduceMean", x_mean, axes=positions, keepdims=0)
            sq_mean = b.op("ReduceMean", sq_mean, axes=positions, keepdims=0)
        term = b.op("Add", b.op("Mul", x_mean, grad_mean_name(i)), b.op("Mul", sq_mean, grad_var_name(i)))
        total = b.op("Add", total, sum_over(b, term, 1))
    b.op("ReduceSum", b.op("Mul", total, IMAGE_WEIGHTS), out=SURROGATE, keepdims=0)
    return _finish(affine, b, [_float(SURROGATE, [])], inputs)


def fused_layers(teacher: onnx.ModelProto) -> int:
    """How many BN layers ``bns_loss_model(fused=True)`` folds into their producer."""
    return sum(tap.folded for tap in _tapped(teacher, True)[1])
