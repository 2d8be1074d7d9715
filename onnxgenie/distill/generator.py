"""The GENIE-D generator as an ONNX graph (the reference's ``Generator``: latent 256, channels 128, 64).

latents [N, 256] → Linear → view [N, 128, h0, w0] → BN → k × (Upsample×2 → Conv3×3 → BN → LeakyReLU 0.2),
the last stage's conv to C channels followed by Tanh → BN without affine → images [N, C, H, W].

The stages halve the channels (128 → 64 → 32 ...; never below ``MIN_CHANNELS``). k = 2 up to 32×32
inputs: exactly the reference's generator (h0 = H/4). Larger inputs get one more stage per doubling
(``stages``), so the Linear layer stays at 128×h0×w0 with h0, w0 ≤ 8 and the costly convolutions run
with few channels at high resolution: at 224² the reference's shape would map 256 latents to
128×56×56 (103 M weights) and run a 128→64 conv at 112², more than the teacher itself costs.
When H or W is not h0·2^k the last conv's output is cropped to H×W (top-left) before Tanh. Every BN
uses the statistics of the current batch, written out with ReduceMean/Sub/Mul/Sqrt/Div (no
BatchNormalization node, no running statistics), so a training and an inference session of this graph
compute the same thing. The upsampling is ``engine_forms.upsample2`` (no Resize gradient in the engine).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..builder import GraphBuilder
from ..engine_forms import upsample2

LATENT_DIM, C1 = 256, 128
MIN_CHANNELS = 8
LINEAR_SIDE = 8   # the Linear layer's output side grows to at most this before a stage is added
BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default
PREFIX = "generator."


def _const(b: GraphBuilder, name: str, value) -> str:
    return b.const(value, PREFIX + name)


def _op(b: GraphBuilder, op: str, inputs: list[str], name: str, **attrs) -> str:
    return b.op(op, *inputs, out=PREFIX + name, **attrs)


def _batch_norm(b: GraphBuilder, x: str, name: str, channels: int, affine: bool = True) -> str:
    """Training-mode BN: normalise by this batch's per-channel mean and biased variance."""
    mean = _op(b, "ReduceMean", [x], f"{name}.mean", axes=[0, 2, 3], keepdims=1)
    centred = _op(b, "Sub", [x, mean], f"{name}.centred")
    var = _op(b, "ReduceMean", [_op(b, "Mul", [centred, centred], f"{name}.sq")], f"{name}.var",
              axes=[0, 2, 3], keepdims=1)
    std = _op(b, "Sqrt", [_op(b, "Add", [var, _const(b, f"{name}.eps", np.float32(BN_EPS))], f"{name}.var_eps")],
              f"{name}.std")
    y = _op(b, "Div", [centred, std], f"{name}.normed")
    if not affine:
        return y
    shape = (1, channels, 1, 1)
    y = _op(b, "Mul", [y, _const(b, f"{name}.weight", np.ones(shape, np.float32))], f"{name}.scaled")
    return _op(b, "Add", [y, _const(b, f"{name}.bias", np.zeros(shape, np.float32))], f"{name}.out")


def _conv3x3(b: GraphBuilder, x: str, name: str, cin: int, cout: int) -> str:
    w = _const(b, f"{name}.weight", np.zeros((cout, cin, 3, 3), np.float32))
    bias = _const(b, f"{name}.bias", np.zeros(cout, np.float32))
    return _op(b, "Conv", [x, w, bias], name, kernel_shape=[3, 3], pads=[1, 1, 1, 1])


def stages(h: int, w: int) -> int:
    """Upsampling stages for an H×W image: 2 (the reference's) up to 32², one more per doubling beyond."""
    return max(2, math.ceil(math.log2(max(h, w) / LINEAR_SIDE)))


def channels(k: int, c1: int = C1) -> list[int]:
    """Channels entering each of the ``k`` stages: c1, c1/2, ... (at least ``MIN_CHANNELS``)."""
    return [max(c1 >> i, MIN_CHANNELS) for i in range(k)]


def build_generator(chw: tuple[int, int, int], latents: str = "latents", images: str = "images",
                    latent_dim: int = LATENT_DIM, c1: int = C1) -> onnx.ModelProto:
    """The generator graph (input ``latents``, output ``images``); weights are placeholders: use
    ``init_generator`` for a fresh PyTorch-style initialisation."""
    c, h, w = chw
    k = stages(h, w)
    h0, w0 = math.ceil(h / 2 ** k), math.ceil(w / 2 ** k)
    chans = channels(k, c1)
    b = GraphBuilder()
    weight = _const(b, "linear.weight", np.zeros((chans[0] * h0 * w0, latent_dim), np.float32))
    bias = _const(b, "linear.bias", np.zeros(chans[0] * h0 * w0, np.float32))
    x = _op(b, "Gemm", [latents, weight, bias], "linear", transB=1)
    x = _op(b, "Reshape", [x, _const(b, "view_shape", np.array([-1, chans[0], h0, w0], np.int64))], "view")
    x = _batch_norm(b, x, "bn1", chans[0])
    for i, (cin, cout) in enumerate(zip(chans, chans[1:] + [c]), start=1):
        x = _conv3x3(b, upsample2(b, x, f"{PREFIX}up{i}", h0 << (i - 1), w0 << (i - 1)), f"conv{i}", cin, cout)
        if i < k:
            x = _op(b, "LeakyRelu", [_batch_norm(b, x, f"bn{i + 1}", cout)], "lrelu" if i == 1 else f"lrelu{i}",
                    alpha=0.2)
    if (h0 << k, w0 << k) != (h, w):
        x = _op(b, "Slice", [x, _const(b, "crop_starts", np.array([0, 0], np.int64)),
                             _const(b, "crop_ends", np.array([h, w], np.int64)),
                             _const(b, "crop_axes", np.array([2, 3], np.int64))], "crop")
    x = _batch_norm(b, _op(b, "Tanh", [x], "tanh"), f"bn{k + 1}", c, affine=False)
    b.op("Identity", x, out=images, name=PREFIX + "images")
    graph = helper.make_graph(
        b.nodes, "genie_generator", [helper.make_tensor_value_info(latents, TensorProto.FLOAT, ["N", latent_dim])],
        [helper.make_tensor_value_info(images, TensorProto.FLOAT, ["N", c, h, w])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxgenie")
    model.ir_version = 8
    return model


def trainable_names(generator: onnx.ModelProto) -> list[str]:
    """The generator's learned parameters (weights and biases of Linear, Conv and BN)."""
    return [t.name for t in generator.graph.initializer if t.name.endswith((".weight", ".bias"))]


def init_generator(generator: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fresh parameters as PyTorch initialises them: Linear/Conv weight and bias U(±1/sqrt(fan_in))
    (kaiming_uniform with a=sqrt(5)), BN weight 1 and bias 0."""
    values = {}
    shapes = {t.name: tuple(t.dims) for t in generator.graph.initializer}
    for name in trainable_names(generator):
        layer, shape = name[len(PREFIX):].split(".")[0], shapes[name]
        if layer.startswith("bn"):
            values[name] = (np.ones if name.endswith("weight") else np.zeros)(shape, np.float32)
            continue
        weight_shape = shapes[f"{PREFIX}{layer}.weight"]
        bound = 1.0 / math.sqrt(int(np.prod(weight_shape[1:])))
        values[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
    return values


def generator_floats(chw: tuple[int, int, int], latent_dim: int = LATENT_DIM, c1: int = C1) -> tuple[int, int]:
    """(initializer floats, activation floats per image) of ``build_generator(chw)``, from the shapes alone:
    the memory estimate must not build the generator (at 8192² its upsampling constants alone are 268 MB).
    Counts every float tensor the graph computes, as ``memory.activation_floats`` does."""
    c, h, w = chw
    k = stages(h, w)
    h0, w0 = math.ceil(h / 2 ** k), math.ceil(w / 2 ** k)
    chans = channels(k, c1)

    def bn(full: int, ch: int, affine: bool = True) -> int:   # centred, square, normed (+ scaled, out)
        return (5 if affine else 3) * full + 4 * ch          # + mean, var, var + eps, std per channel

    first = chans[0] * h0 * w0
    weights = first * latent_dim + first + 2 * chans[0] + k + 1   # Linear, bn1, an eps per BN
    acts = 2 * first + bn(first, chans[0])                    # Gemm, view, bn1
    for i, (cin, cout) in enumerate(zip(chans, chans[1:] + [c]), start=1):
        hi, wi = h0 << (i - 1), w0 << (i - 1)
        weights += wi * 2 * wi + cin * cout * 9 + cout        # the upsampling matrix, conv weight and bias
        acts += 12 * cin * hi * wi                            # upsample: MatMul, Reshape, Concat, Reshape
        out = cout * 4 * hi * wi
        acts += out
        if i < k:
            weights += 2 * cout
            acts += bn(out, cout) + out                       # BN, LeakyRelu
    crop = (h0 << k, w0 << k) != (h, w)
    acts += (c * h * w if crop else 0) + c * h * w + bn(c * h * w, c, affine=False) + c * h * w  # tanh, BN, images
    return weights, acts
