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

The teacher's Relu nodes become Clip(x, 0): the same values, and onnxruntime-training 1.19's CPU
ReluGrad (a branch per element) took 15–28 % of a step, 3–5× ClipGrad's time. The two gradients
differ only at x == 0 exactly (Clip passes it, Relu does not).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from ..graph.bn import BNLayer, bn_layers, fold_bn, require_bn
from ..graph.load import nhwc_transpose
from ..ortrain import trainable_form

STD_EPS = 1e-6
LOSS = "bns_loss"


class _LossBuilder:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        if f"bns.{name}" not in {t.name for t in self.inits}:
            value = np.asarray(value)
            value = value if value.dtype == np.int64 else value.astype(np.float32)
            self.inits.append(numpy_helper.from_array(value, f"bns.{name}"))
        return f"bns.{name}"

    def op(self, op: str, inputs: list[str], **attrs) -> str:
        self.count += 1
        out = f"bns.{op.lower()}{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def mean_var(self, x: str, axes: list[int]) -> tuple[str, str]:
        """Mean (keepdims) and biased variance (reduced) over ``axes``."""
        mean = self.op("ReduceMean", [x], axes=axes, keepdims=1)
        centred = self.op("Sub", [x, mean])
        var = self.op("ReduceMean", [self.op("Mul", [centred, centred])], axes=axes, keepdims=0)
        return mean, var

    def std(self, var: str) -> str:
        return self.op("Sqrt", [self.op("Add", [var, self.const("std_eps", np.float32(STD_EPS))])])

    def mse(self, a: str, target: str) -> str:
        """Mean over all elements of (a − target)²."""
        d = self.op("Sub", [a, target])
        return self.op("ReduceMean", [self.op("Mul", [d, d])], keepdims=0)


def _rank(model: onnx.ModelProto, tensor: str) -> int:
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == tensor:
            return len(vi.type.tensor_type.shape.dim)
    raise ValueError(f"no shape for {tensor}; run graph.load.normalize first")


def _bn_term(b: _LossBuilder, model: onnx.ModelProto, bn: BNLayer, i: int, folded: bool) -> str:
    tapped = bn.output if folded else bn.input
    rank = _rank(model, tapped)
    mean, var = b.mean_var(tapped, [0, *range(2, rank)])
    mean = b.op("Reshape", [mean, b.const("flat", np.array([-1], np.int64))])
    if folded:  # statistics of x from those of y = a·x + b, per channel
        a = bn.gamma / bn.std
        mean = b.op("Mul", [b.op("Sub", [mean, b.const(f"l{i}.shift", bn.beta - bn.mean * a)]),
                            b.const(f"l{i}.inv_scale", 1.0 / a)])
        var = b.op("Mul", [var, b.const(f"l{i}.inv_scale_sq", 1.0 / (a * a))])
    mean_loss = b.mse(mean, b.const(f"l{i}.mean", bn.mean))
    std_loss = b.mse(b.std(var), b.const(f"l{i}.std", np.sqrt(bn.var + STD_EPS)))
    return b.op("Add", [mean_loss, std_loss])


def _input_term(b: _LossBuilder, image: str, channels: int) -> str:
    mean, var = b.mean_var(image, [2, 3])
    mean_loss = b.mse(mean, b.const("input.mean", np.zeros((1, channels, 1, 1))))
    std_loss = b.mse(b.std(var), b.const("input.std", np.ones((1, channels))))
    # mse averages over N·C; the reference sums over channels and averages over images
    return b.op("Mul", [b.op("Add", [mean_loss, std_loss]), b.const("input.channels", np.float32(channels))])


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


def bns_loss_model(teacher: onnx.ModelProto, fused: bool = True, extra_outputs: tuple[str, ...] = ()
                   ) -> onnx.ModelProto:
    """The teacher (normal form) with its BNS loss as first output ``bns_loss`` (a scalar).

    Its logits are dropped (and what only feeds them); ``extra_outputs`` names tensors to keep as
    further outputs. The image input is unchanged.
    """
    layers = require_bn(teacher)
    affine = fold_bn(teacher, fold_into_producer=fused,
                     keep=frozenset(bn.output for bn in layers if not recoverable(bn)))
    produced = {o for n in affine.graph.node for o in n.output}
    image = affine.graph.input[0]
    to_nchw = nhwc_transpose(affine, image.name)   # the input term is taken on the NCHW image
    b = _LossBuilder()
    channels = image.type.tensor_type.shape.dim[1 if to_nchw is None else 3].dim_value
    total = _input_term(b, image.name if to_nchw is None else to_nchw.output[0], channels)
    for i, bn in enumerate(layers):
        folded = bn.input not in produced and bn.input != image.name
        total = b.op("Add", [total, _bn_term(b, affine, bn, i, folded)])
    b.nodes.append(helper.make_node("Identity", [total], [LOSS], name=LOSS))
    out = onnx.ModelProto()
    out.CopyFrom(affine)
    out.graph.node.extend(b.nodes)
    out.graph.initializer.extend(b.inits)
    trainable_form(out)
    shapes = {vi.name: vi for vi in list(out.graph.value_info) + list(out.graph.input)}
    del out.graph.output[:]
    out.graph.output.append(helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, []))
    for name in extra_outputs:
        out.graph.output.append(shapes[name] if name in shapes else
                                helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    _prune(out)
    del out.graph.value_info[:]
    return shape_inference.infer_shapes(out)


def fused_layers(teacher: onnx.ModelProto) -> int:
    """How many BN layers ``bns_loss_model(fused=True)`` folds into their producer."""
    layers = bn_layers(teacher)
    affine = fold_bn(teacher, fold_into_producer=True,
                     keep=frozenset(bn.output for bn in layers if not recoverable(bn)))
    produced = {o for n in affine.graph.node for o in n.output}
    return sum(bn.input not in produced for bn in layers)
