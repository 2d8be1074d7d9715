"""Tiny ONNX classifiers built with onnx.helper and seeded random weights, one function per case.

The base net is conv-BN-ReLU, a second conv-BN whose output is added to the first ReLU's
(residual Add), ReLU, a stride-2 conv-BN-ReLU, global average pool, flatten and a linear head.
Each fixture varies one thing the front end must handle (opset, layout, head, depthwise conv, BN
placement, batch/size dims) or must refuse (custom op, two inputs, int64 input).
BN statistics are non-trivial: random means, positive variances far from 1, some negative gammas.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

C_IN, HW, WIDTH, CLASSES = 3, 8, 8, 10


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, domain=domain, **attrs))
        return output

    def conv(self, x: str, name: str, cin: int, cout: int, stride: int = 1, group: int = 1,
             bias: bool = False) -> str:
        w = self.rng.normal(0, np.sqrt(2.0 / (cin // group * 9)), (cout, cin // group, 3, 3))
        inputs = [x, self.const(f"{name}.weight", w.astype(np.float32))]
        if bias:
            inputs.append(self.const(f"{name}.bias", self.rng.normal(0, 0.1, cout).astype(np.float32)))
        return self.node("Conv", inputs, name, kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[stride, stride], group=group)

    def bn(self, x: str, name: str, channels: int) -> str:
        r = self.rng
        gamma = r.uniform(0.5, 1.5, channels) * np.where(r.random(channels) < 0.3, -1.0, 1.0)
        params = [gamma, r.normal(0, 0.3, channels), r.normal(0, 0.5, channels), r.uniform(0.2, 3.0, channels)]
        inputs = [x] + [self.const(f"{name}.{p}", v.astype(np.float32))
                        for p, v in zip(("weight", "bias", "running_mean", "running_var"), params)]
        return self.node("BatchNormalization", inputs, name, epsilon=1e-5)

    def linear(self, x: str, name: str, fin: int, fout: int, matmul: bool = False) -> str:
        w = self.rng.normal(0, np.sqrt(1.0 / fin), (fout, fin)).astype(np.float32)
        b = self.rng.normal(0, 0.1, fout).astype(np.float32)
        if matmul:
            y = self.node("MatMul", [x, self.const(f"{name}.weight", w.T.copy())], f"{name}_mm")
            return self.node("Add", [y, self.const(f"{name}.bias", b)], name)
        return self.node("Gemm", [x, self.const(f"{name}.weight", w), self.const(f"{name}.bias", b)], name,
                         transB=1)


def conv_bn_net(opset: int = 17, *, batch: int | str = "N", hw: tuple = (HW, HW), nhwc: bool = False,
                head: str = "gemm", depthwise: bool = False, bn_after_add: bool = False,
                batchnorm: bool = True, pool: str = "global", relu6: bool = False, silu: bool = False, act: str = "Relu", maxpool: bool = False,
                seed: int = 0) -> onnx.ModelProto:
    """The base net; keyword arguments select the variant (see the module docstring)."""
    b = _Builder(seed)
    x = "input"
    if nhwc:
        x = b.node("Transpose", [x], "to_nchw", perm=[0, 3, 1, 2])

    def conv_bn(x, name, cin, cout, **kw):
        if not batchnorm:
            return b.conv(x, name, cin, cout, bias=True, **kw)
        return b.bn(b.conv(x, f"{name}.conv", cin, cout, **kw), f"{name}.bn", cout)

    h = b.node("Relu", [conv_bn(x, "stem", C_IN, WIDTH)], "stem.relu")
    y = conv_bn(h, "block", WIDTH, WIDTH, group=WIDTH if depthwise else 1)
    y = b.node("Add", [y, h], "block.add")
    if bn_after_add and batchnorm:
        y = b.bn(y, "block.add_bn", WIDTH)
    if silu:  # SiLU as PyTorch exports it: x * Sigmoid(x)
        y = b.node("Mul", [y, b.node("Sigmoid", [y], "block.sigmoid")], "block.relu")
    elif act in ("HardSwish", "PRelu"):  # MobileNetV3 / PReLU nets
        slope = [b.const("block.slope", np.full((WIDTH, 1, 1), 0.2, np.float32))] if act == "PRelu" else []
        y = b.node(act, [y, *slope], "block.relu")
    elif relu6:  # ReLU6 as PyTorch exports it: Clip with min/max inputs
        y = b.node("Clip", [y, b.const("block.min", np.float32(0)), b.const("block.max", np.float32(6))],
                   "block.relu")
    else:
        y = b.node("Relu", [y], "block.relu")
    if maxpool:
        y = b.node("MaxPool", [y], "block.maxpool", kernel_shape=[2, 2], strides=[2, 2])
    y = b.node("Relu", [conv_bn(y, "down", WIDTH, 2 * WIDTH, stride=2)], "down.relu")
    if maxpool:  # after a strided conv too (ResNet-ImageNet stems): swing must keep MaxPool's gradient
        y = b.node("MaxPool", [y], "down.maxpool", kernel_shape=[2, 2], strides=[2, 2])
    if pool == "global":
        y = b.node("GlobalAveragePool", [y], "pool")
    elif opset >= 18:  # ReduceMean takes its axes as an input from opset 18
        y = b.node("ReduceMean", [y, b.const("pool.axes", np.array([2, 3], np.int64))], "pool", keepdims=1)
    else:
        y = b.node("ReduceMean", [y], "pool", axes=[2, 3], keepdims=1)
    y = b.node("Flatten", [y], "flatten", axis=1)
    if head == "gemm":
        hidden = b.linear(y, "fc1", 2 * WIDTH, 12)
        if batchnorm:
            hidden = b.bn(hidden, "fc1.bn", 12)
        y = b.linear(b.node("Relu", [hidden], "fc1.relu"), "fc", 12, CLASSES)
    elif head == "matmul":
        y = b.linear(y, "fc", 2 * WIDTH, CLASSES, matmul=True)
    else:
        raise ValueError(head)
    b.node("Identity", [y], "logits")

    shape = [batch, *hw, C_IN] if nhwc else [batch, C_IN, *hw]
    graph = helper.make_graph(b.nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])],
                              b.inits)
    return _model(graph, opset)


def _model(graph: onnx.GraphProto, opset: int, extra_opsets: tuple = ()) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets],
                              producer_name="onnxgenie-tests")
    model.ir_version = 10 if opset >= 21 else 8
    if opset <= 11:
        model.ir_version = 6
        # up to IR 4 initializers had to be graph inputs; exporters of that era still list them
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in graph.initializer)
    onnx.checker.check_model(model)
    return model


# One function per fixture -------------------------------------------------------------------------

def opset11() -> onnx.ModelProto:
    return conv_bn_net(11)


def opset13() -> onnx.ModelProto:
    return conv_bn_net(13)


def opset17() -> onnx.ModelProto:
    return conv_bn_net(17)


def opset21() -> onnx.ModelProto:
    return conv_bn_net(21)


def opset18_reduce_mean() -> onnx.ModelProto:
    """Average pooling as ReduceMean with its axes as an input (opset 18 form)."""
    return conv_bn_net(18, pool="reduce_mean")


def opset20_gelu() -> onnx.ModelProto:
    """The last ReLU replaced by Gelu, which only exists from opset 20."""
    model = conv_bn_net(20)
    relu = [n for n in model.graph.node if n.op_type == "Relu"][-1]
    relu.op_type = "Gelu"
    onnx.checker.check_model(model)
    return model


def _with_input_pad(opset: int, mode: str) -> onnx.ModelProto:
    model = conv_bn_net(opset)
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"))
    stem = model.graph.node[0]
    stem.input[0] = "padded"
    for a in stem.attribute:
        if a.name == "pads":
            a.ints[:] = [0, 0, 0, 0]
    model.graph.node.insert(0, helper.make_node("Pad", ["input", "pads"], ["padded"], name="pad", mode=mode))
    onnx.checker.check_model(model)
    return model


def opset19_pad_reflect() -> onnx.ModelProto:
    """The stem's padding as a separate Pad (reflect), which means the same at opset 17."""
    return _with_input_pad(19, "reflect")


def opset19_pad_wrap() -> onnx.ModelProto:
    """Pad mode 'wrap' exists only from opset 19."""
    return _with_input_pad(19, "wrap")


def _with_same_padding(value: float) -> onnx.ModelProto:
    """TensorFlow-style "same" padding of the stride-2 conv as a separate asymmetric Pad (bottom/right by 1)."""
    model = conv_bn_net(17)
    conv = next(n for n in model.graph.node if n.name == "down.conv")
    for a in conv.attribute:
        if a.name == "pads":
            a.ints[:] = [0, 0, 0, 0]
    model.graph.initializer.extend([numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "same_pads"),
                                    numpy_helper.from_array(np.array(value, np.float32), "same_value")])
    pad = helper.make_node("Pad", [conv.input[0], "same_pads", "same_value"], ["same_padded"], name="same_pad")
    conv.input[0] = "same_padded"
    model.graph.node.insert(list(model.graph.node).index(conv), pad)
    onnx.checker.check_model(model)
    return model


def same_padding() -> onnx.ModelProto:
    """A zero Pad before a conv: folded into the conv's pads by the front end."""
    return _with_same_padding(0.0)


def same_padding_nonzero() -> onnx.ModelProto:
    """A Pad with a non-zero value is not a conv's padding: kept."""
    return _with_same_padding(0.5)


def nhwc_input() -> onnx.ModelProto:
    return conv_bn_net(nhwc=True)


def gemm_head() -> onnx.ModelProto:
    return conv_bn_net(head="gemm")


def matmul_head() -> onnx.ModelProto:
    return conv_bn_net(head="matmul")


def depthwise() -> onnx.ModelProto:
    return conv_bn_net(depthwise=True)


def relu6() -> onnx.ModelProto:
    return conv_bn_net(relu6=True)


def silu() -> onnx.ModelProto:
    return conv_bn_net(silu=True)


def hardswish() -> onnx.ModelProto:
    return conv_bn_net(act="HardSwish")


def prelu() -> onnx.ModelProto:
    return conv_bn_net(act="PRelu")


def maxpool() -> onnx.ModelProto:
    return conv_bn_net(maxpool=True, hw=(16, 16))


def bn_after_add() -> onnx.ModelProto:
    return conv_bn_net(bn_after_add=True)


def no_bn() -> onnx.ModelProto:
    return conv_bn_net(batchnorm=False)


def dynamic_batch() -> onnx.ModelProto:
    return conv_bn_net(batch="batch")


def fixed_batch() -> onnx.ModelProto:
    return conv_bn_net(batch=2)


def fixed_batch1_reshape() -> onnx.ModelProto:
    """Batch 1 baked in, as a fixed-shape export folds ``x.view(x.size(0), -1)`` into Reshape [1, -1]."""
    model = conv_bn_net(batch=1)
    flatten = next(n for n in model.graph.node if n.op_type == "Flatten")
    flatten.op_type = "Reshape"
    del flatten.attribute[:]
    flatten.input.append("flatten.shape")
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, -1], np.int64), "flatten.shape"))
    onnx.checker.check_model(model)
    return model


def fixed_batch_baked_constant() -> onnx.ModelProto:
    """Batch 2 baked into a constant of shape [2, 16] added to the features (cannot be freed)."""
    model = conv_bn_net(batch=2)
    flatten = next(n for n in model.graph.node if n.op_type == "Flatten")
    out = flatten.output[0]
    flatten.output[0] = "flatten.raw"
    model.graph.initializer.append(numpy_helper.from_array(np.full((2, 2 * WIDTH), 0.1, np.float32), "baked"))
    index = list(model.graph.node).index(flatten)
    model.graph.node.insert(index + 1, helper.make_node("Add", ["flatten.raw", "baked"], [out], name="baked_add"))
    onnx.checker.check_model(model)
    return model


# BatchNormalization written out as elementwise ops on its constants, as exporters without a BN op do:
BN_ARITHMETIC = {
    "rsqrt_nchw": "(x - mean) * (Reciprocal(Sqrt(var + eps)) * gamma) + beta, constants [1, C, 1, 1]",
    "div_nchw": "(x - mean) / Sqrt(var + eps) * gamma + beta, constants [C, 1, 1], eps a Constant node",
    "affine_nhwc": "x * a + (beta - mean * a), a = Pow(var + eps, -0.5) * gamma (tf.nn.batch_normalization), "
                   "channels last",
    "commuted_nhwc": "beta + (gamma / Sqrt(eps + var)) * (x - mean), constants first, channels last",
}


def bn_as_arithmetic(variant: str) -> onnx.ModelProto:
    """``conv_bn_net`` with every BatchNormalization written as ``BN_ARITHMETIC[variant]`` (the same
    function; its last op has the BN's name). ``*_nhwc``: a rank-4 BN's ops work on channels-last
    tensors between a Transpose pair, with constants of shape [C]."""
    model = conv_bn_net()
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim)
             for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    b = _Builder(0)
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            b.nodes.append(node)
            continue
        x, y, name = node.input[0], node.output[0], node.name
        gamma, beta, mean, var = (inits[i] for i in node.input[1:])
        eps = np.float32(next(a.f for a in node.attribute if a.name == "epsilon"))
        channels_last = variant.endswith("_nhwc") and ranks[x] == 4
        shape = {4: [1, -1, 1, 1] if variant == "rsqrt_nchw" else [-1, 1, 1], 2: [1, -1]}[ranks[x]]
        shape = [-1] if channels_last else shape

        def c(role, value):
            return b.const(f"{name}/{role}", np.asarray(value, np.float32).reshape(shape if value.ndim else []))

        if channels_last:
            x = b.node("Transpose", [x], f"{name}/to_nhwc", perm=[0, 2, 3, 1])
        out = f"{name}/nhwc" if channels_last else y
        op = dict(name=name)
        if variant == "rsqrt_nchw":
            inv = b.node("Reciprocal", [b.node("Sqrt", [b.node("Add", [c("var", var), c("eps", eps)], f"{name}/ve")],
                                                 f"{name}/sd")], f"{name}/inv")
            scaled = b.node("Mul", [b.node("Sub", [x, c("mean", mean)], f"{name}/xm"),
                                    b.node("Mul", [inv, c("gamma", gamma)], f"{name}/a")], f"{name}/xs")
            b.nodes.append(helper.make_node("Add", [scaled, c("beta", beta)], [out], **op))
        elif variant == "div_nchw":
            eps_node = b.node("Constant", [], f"{name}/eps", value=numpy_helper.from_array(eps))
            sd = b.node("Sqrt", [b.node("Add", [c("var", var), eps_node], f"{name}/ve")], f"{name}/sd")
            normed = b.node("Div", [b.node("Sub", [x, c("mean", mean)], f"{name}/xm"), sd], f"{name}/xn")
            scaled = b.node("Mul", [normed, c("gamma", gamma)], f"{name}/xs")
            b.nodes.append(helper.make_node("Add", [scaled, c("beta", beta)], [out], **op))
        elif variant == "affine_nhwc":
            root = b.node("Pow", [b.node("Add", [c("var", var), c("eps", eps)], f"{name}/ve"),
                                  b.const(f"{name}/minus_half", np.float32(-0.5))], f"{name}/inv")
            a = b.node("Mul", [root, c("gamma", gamma)], f"{name}/a")
            shift = b.node("Sub", [c("beta", beta), b.node("Mul", [c("mean", mean), a], f"{name}/ma")], f"{name}/b")
            b.nodes.append(helper.make_node("Add", [b.node("Mul", [x, a], f"{name}/xa"), shift], [out], **op))
        elif variant == "commuted_nhwc":
            a = b.node("Div", [c("gamma", gamma), b.node("Sqrt", [b.node("Add", [c("eps", eps), c("var", var)],
                                                                           f"{name}/ve")], f"{name}/sd")], f"{name}/a")
            scaled = b.node("Mul", [a, b.node("Sub", [x, c("mean", mean)], f"{name}/xm")], f"{name}/xs")
            b.nodes.append(helper.make_node("Add", [c("beta", beta), scaled], [out], **op))
        else:
            raise ValueError(variant)
        if channels_last:
            b.nodes.append(helper.make_node("Transpose", [out], [y], name=f"{name}/to_nchw", perm=[0, 3, 1, 2]))
    used = {i for n in b.nodes for i in n.input}
    graph = helper.make_graph(b.nodes, "tiny_bn_arithmetic", model.graph.input, model.graph.output,
                              [t for t in model.graph.initializer if t.name in used] + b.inits)
    return _model(graph, 17)


def dynamic_batch_as_number() -> onnx.ModelProto:
    """A dynamic batch whose size scales the features (``x * x.shape[0]``): folded at a fixed batch it
    would become a constant factor."""
    model = conv_bn_net()
    flatten = next(n for n in model.graph.node if n.op_type == "Flatten")
    out = flatten.output[0]
    flatten.output[0] = "flatten.raw"
    model.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), "batch.axis"))
    index = list(model.graph.node).index(flatten)
    for k, node in enumerate([
            helper.make_node("Shape", ["input"], ["batch.shape"], name="batch.shape"),
            helper.make_node("Gather", ["batch.shape", "batch.axis"], ["batch.size"], name="batch.size"),
            helper.make_node("Cast", ["batch.size"], ["batch.float"], name="batch.float", to=TensorProto.FLOAT),
            helper.make_node("Mul", ["flatten.raw", "batch.float"], [out], name="batch_mul")]):
        model.graph.node.insert(index + 1 + k, node)
    onnx.checker.check_model(model)
    return model


def dynamic_hw() -> onnx.ModelProto:
    return conv_bn_net(hw=("height", "width"))


def custom_op() -> onnx.ModelProto:
    """The first ReLU replaced by an op from a private domain."""
    model = conv_bn_net()
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain = "FancyRelu", "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.checker.check_model(model)
    return model


def two_inputs() -> onnx.ModelProto:
    """A second float input (a per-sample gain) multiplied into the image."""
    model = conv_bn_net()
    model.graph.input.append(helper.make_tensor_value_info("gain", TensorProto.FLOAT, ["N", 1, 1, 1]))
    scaled = helper.make_node("Mul", ["input", "gain"], ["input_scaled"], name="gain_mul")
    for node in model.graph.node:
        node.input[:] = ["input_scaled" if i == "input" else i for i in node.input]
    model.graph.node.insert(0, scaled)
    onnx.checker.check_model(model)
    return model


def int64_input() -> onnx.ModelProto:
    """An int64 image input cast to float inside the graph."""
    model = conv_bn_net()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    cast = helper.make_node("Cast", ["input"], ["input_float"], name="cast", to=TensorProto.FLOAT)
    for node in model.graph.node:
        node.input[:] = ["input_float" if i == "input" else i for i in node.input]
    model.graph.node.insert(0, cast)
    onnx.checker.check_model(model)
    return model


# Models the front end must accept and that keep one float image input.
VALID = {f.__name__: f for f in (opset11, opset13, opset17, opset18_reduce_mean, opset19_pad_reflect, opset21,
                                 nhwc_input, gemm_head, matmul_head, depthwise, bn_after_add, no_bn,
                                 dynamic_batch, fixed_batch, fixed_batch1_reshape, same_padding,
                                 same_padding_nonzero)}
# Models with BN statistics (fold_bn has something to fold).
WITH_BN = {k: f for k, f in VALID.items() if k != "no_bn"}
# Models the front end must refuse (without --input-size for dynamic_hw).
REFUSED = {f.__name__: f for f in (custom_op, two_inputs, int64_input, dynamic_hw, opset20_gelu,
                                   fixed_batch_baked_constant, opset19_pad_wrap, dynamic_batch_as_number)}


def save(model: onnx.ModelProto, tmp_path: Path, name: str = "model") -> Path:
    path = Path(tmp_path) / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def random_input(model: onnx.ModelProto, batch: int, seed: int = 0, hw: tuple | None = None) -> np.ndarray:
    """A float32 batch matching ``model``'s first input (symbolic dims other than batch need ``hw``)."""
    dims = [d.dim_value if d.HasField("dim_value") else None for d in model.graph.input[0].type.tensor_type.shape.dim]
    dims[0] = batch
    if hw is not None:
        spatial = (1, 2) if dims[3] in (1, 3, 4) else (2, 3)
        for axis, size in zip(spatial, hw):
            dims[axis] = size
    return np.random.default_rng(seed).standard_normal(dims).astype(np.float32)


def run(model: onnx.ModelProto, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    """The model's first output on ``x`` with one ORT thread.

    ``optimize=False`` turns ORT's graph optimisations off, so that BatchNormalization is computed
    as written rather than fused into the Conv before it (a fair reference for our own folding).
    """
    from onnxgenie.ortrain import inference_session

    sess = inference_session(model, 1, optimization=None if optimize else "disable")
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def wait_for(predicate, proc, timeout=60.0):
    """Poll ``predicate`` while the subprocess ``proc`` runs; fail the test if it ends first or time runs out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("timed out waiting for the run")
