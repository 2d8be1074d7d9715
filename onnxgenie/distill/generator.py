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
compute the same thing.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LATENT_DIM, C1 = 256, 128
MIN_CHANNELS = 8
LINEAR_SIDE = 8   # the Linear layer's output side grows to at most this before a stage is added
BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default
PREFIX = "generator."


class _Graph:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), PREFIX + name))
        return PREFIX + name

    def op(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = PREFIX + name
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def batch_norm(self, x: str, name: str, channels: int, affine: bool = True) -> str:
        """Training-mode BN: normalise by this batch's per-channel mean and biased variance."""
        mean = self.op("ReduceMean", [x], f"{name}.mean", axes=[0, 2, 3], keepdims=1)
        centred = self.op("Sub", [x, mean], f"{name}.centred")
        var = self.op("ReduceMean", [self.op("Mul", [centred, centred], f"{name}.sq")], f"{name}.var",
                      axes=[0, 2, 3], keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [var, self.const(f"{name}.eps", np.float32(BN_EPS))],
                                       f"{name}.var_eps")], f"{name}.std")
        y = self.op("Div", [centred, std], f"{name}.normed")
        if not affine:
            return y
        shape = (1, channels, 1, 1)
        y = self.op("Mul", [y, self.const(f"{name}.weight", np.ones(shape, np.float32))], f"{name}.scaled")
        return self.op("Add", [y, self.const(f"{name}.bias", np.zeros(shape, np.float32))], f"{name}.out")

    def upsample2(self, x: str, name: str, h: int, w: int) -> str:
        """Nearest ×2: along W a MatMul with a 0/1 matrix, along H a Concat of two copies of each row.

        onnxruntime-training has no CPU ResizeGrad; Reshape→Expand→Reshape works but its kernels
        copy one float at a time (2.5× slower for the generator's second upsample)."""
        repeat_w = self.const(f"{name}.repeat_w", np.repeat(np.eye(w, dtype=np.float32), 2, axis=1))
        x = self.op("MatMul", [x, repeat_w], f"{name}.w")
        x = self.op("Reshape", [x, self.const(f"{name}.rows_shape", np.array([0, 0, h, 1, 2 * w], np.int64))],
                    f"{name}.rows")
        x = self.op("Concat", [x, x], f"{name}.h", axis=3)
        return self.op("Reshape", [x, self.const(f"{name}.merge_shape", np.array([0, 0, 2 * h, 2 * w], np.int64))],
                       name)

    def conv3x3(self, x: str, name: str, cin: int, cout: int) -> str:
        w = self.const(f"{name}.weight", np.zeros((cout, cin, 3, 3), np.float32))
        b = self.const(f"{name}.bias", np.zeros(cout, np.float32))
        return self.op("Conv", [x, w, b], name, kernel_shape=[3, 3], pads=[1, 1, 1, 1])


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
    g = _Graph()
    weight = g.const("linear.weight", np.zeros((chans[0] * h0 * w0, latent_dim), np.float32))
    bias = g.const("linear.bias", np.zeros(chans[0] * h0 * w0, np.float32))
    x = g.op("Gemm", [latents, weight, bias], "linear", transB=1)
    x = g.op("Reshape", [x, g.const("view_shape", np.array([-1, chans[0], h0, w0], np.int64))], "view")
    x = g.batch_norm(x, "bn1", chans[0])
    for i, (cin, cout) in enumerate(zip(chans, chans[1:] + [c]), start=1):
        x = g.conv3x3(g.upsample2(x, f"up{i}", h0 << (i - 1), w0 << (i - 1)), f"conv{i}", cin, cout)
        if i < k:
            x = g.op("LeakyRelu", [g.batch_norm(x, f"bn{i + 1}", cout)], "lrelu" if i == 1 else f"lrelu{i}", alpha=0.2)
    if (h0 << k, w0 << k) != (h, w):
        x = g.op("Slice", [x, g.const("crop_starts", np.array([0, 0], np.int64)),
                           g.const("crop_ends", np.array([h, w], np.int64)),
                           g.const("crop_axes", np.array([2, 3], np.int64))], "crop")
    x = g.batch_norm(g.op("Tanh", [x], "tanh"), f"bn{k + 1}", c, affine=False)
    g.nodes.append(helper.make_node("Identity", [x], [images], name=PREFIX + "images"))
    graph = helper.make_graph(
        g.nodes, "genie_generator", [helper.make_tensor_value_info(latents, TensorProto.FLOAT, ["N", latent_dim])],
        [helper.make_tensor_value_info(images, TensorProto.FLOAT, ["N", c, h, w])], g.inits)
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
