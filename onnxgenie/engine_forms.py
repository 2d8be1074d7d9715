"""The graph forms onnxruntime-training 1.19 can differentiate: every workaround for a gradient it lacks,
and for its slow or broken gradient kernels, in one place (a successor engine changes this module and
``ortrain``; the paper-level graphs that call these stay as they are).

What this build cannot differentiate, and how the graphs here get around it:
- ``Round``, ``Floor``, ``Ceil``, ``Sign`` (``NO_GRADIENT_OPS``): rounding passes its gradient straight
  through a Cast (``round_ste``); a model with such an op before a BN cannot be distilled.
- Activations (``REWRITTEN_OPS``: HardSigmoid, HardSwish, PRelu, Elu, ...): written with ops that have
  one (``trainable_form``), the same values up to float rounding.
- ``Sum`` (n-ary): totals are chains of ``Add`` (``add_all``).
- ``Pad`` in reflect mode: a Concat of mirrored border slices (``reflect_pad``).
- ``Resize``: nearest ×2 upsampling as a MatMul and a Concat (``upsample2``).
- ``BatchNormalization`` is turned into training mode inside any training graph, running statistics
  updated: frozen BN layers are written as Mul+Add (``graph.bn.fold_bn``), batch-statistics BN with
  ReduceMean (``distill.generator``).
And where its kernels are slow or fail:
- ``Relu``: ClipGrad is 3–5× faster than the CPU ReluGrad (``relu_as_clip``).
- ``AveragePool``: its gradient fails on a symbolic batch axis; a depthwise Conv does not (``avgpool_as_conv``);
  it divides by zero (SIGFPE) where the batch is not static, which ``crop`` keeps static.
- ``LayerNormalization``: its gradient reads the optional statistics outputs (``trainable_form``).
- a tensor several Concats read without a gradient of its own: two definitions of its gradient
  (``anchor_shared_concat_inputs``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .builder import GraphBuilder, attr, attrs, value_infos

# Ops without a gradient that nothing rewrites: training cannot pass them.
NO_GRADIENT_OPS = ("Floor", "Ceil", "Round", "Sign")
# Activations without a gradient that ``trainable_form`` rewrites.
REWRITTEN_OPS = ("HardSigmoid", "HardSwish", "PRelu", "Elu", "Selu", "Celu", "Softplus", "Softsign",
                 "ThresholdedRelu", "Mish")
STE_SHIFT = 23


# Forms used while building a graph -----------------------------------------------------------------

def round_ste(b: GraphBuilder, c: str) -> str:
    """round(c) forward, derivative 1 backward: c + stopgrad(round(c) − c). The residual passes through a
    Cast to int32 and back, which carries no gradient; it is scaled by 2^STE_SHIFT first so that the cast
    keeps its bits (|residual| ≤ 0.5). Forward: round(c) up to 2^-23."""
    residual = b.op("Sub", b.op("Round", c), c)
    as_int = b.op("Cast", b.op("Mul", residual, b.const(2.0 ** STE_SHIFT)), to=TensorProto.INT32)
    frozen = b.op("Mul", b.op("Cast", as_int, to=TensorProto.FLOAT), b.const(2.0 ** -STE_SHIFT))
    return b.op("Add", c, frozen)


def add_all(b: GraphBuilder, terms: list[str]) -> str:
    """Σ terms as a chain of Add (n-ary Sum has no gradient)."""
    total = terms[0]
    for term in terms[1:]:
        total = b.op("Add", total, term)
    return total


def reflect_pad(b: GraphBuilder, x: str, name: str, axis: int, size: int) -> str:
    """Reflection padding by one along ``axis`` (of length ``size``): Concat(x[1], x, x[size−2]).
    (Gather with a reflected index vector computes the same, but its gradient, a scatter-add, took 21 %
    of a ResNet-20 distillation step; Concat's is a Split.)"""
    def border(index: int, part: str) -> str:
        bounds = [b.const(np.array([v], np.int64), f"{name}_{part}_{k}")
                  for k, v in (("start", index), ("end", index + 1), ("axis", axis))]
        return b.op("Slice", x, *bounds, out=f"{name}_{part}")

    first, last = border(1, "first"), border(size - 2, "last")
    return b.op("Concat", first, x, last, out=name, axis=axis)


def crop(b: GraphBuilder, x: str, starts: str, ends: str, axes: str, shape: str, name: str) -> str:
    """Slice at fed ``starts``, then Reshape to the static ``shape``: shape inference cannot know a Slice's
    shape when its starts are inputs, and without it MaxPool's gradient downstream came back empty and
    AveragePool's divides by zero (SIGFPE) on a batch that is not static."""
    cropped = b.op("Slice", x, starts, ends, axes, out=f"{name}_any", name=name)
    return b.op("Reshape", cropped, shape, out=name, name=f"{name}_shape")


def upsample2(b: GraphBuilder, x: str, name: str, h: int, w: int) -> str:
    """Nearest ×2 of [N, C, h, w]: along W a MatMul with a 0/1 matrix, along H a Concat of two copies of
    each row (no CPU ResizeGrad; Reshape→Expand→Reshape works but its kernels copy one float at a time,
    2.5× slower for the generator's second upsample). Constants and tensors are named ``name.*``."""
    repeat_w = b.const(np.repeat(np.eye(w, dtype=np.float32), 2, axis=1), f"{name}.repeat_w")
    x = b.op("MatMul", x, repeat_w, out=f"{name}.w")
    x = b.op("Reshape", x, b.const(np.array([0, 0, h, 1, 2 * w], np.int64), f"{name}.rows_shape"), out=f"{name}.rows")
    x = b.op("Concat", x, x, out=f"{name}.h", axis=3)
    return b.op("Reshape", x, b.const(np.array([0, 0, 2 * h, 2 * w], np.int64), f"{name}.merge_shape"), out=name)


# Rewrites of a whole model before training -------------------------------------------------------

def _elu_part(b: GraphBuilder, x: str, alpha: float, inner_scale: float = 1.0) -> str:
    """alpha * (exp(min(x, 0) / inner_scale) - 1): the negative side of Elu/Celu/Selu."""
    neg = b.op("Min", x, b.const(0.0))
    if inner_scale != 1.0:
        neg = b.op("Div", neg, b.const(inner_scale))
    return b.op("Mul", b.const(alpha), b.op("Sub", b.op("Exp", neg), b.const(1.0)))


def _softplus(b: GraphBuilder, x: str, out: str | None = None) -> str:
    """relu(x) + log(1 + exp(-|x|)): log(1 + exp(x)) without overflow."""
    tail = b.op("Log", b.op("Add", b.const(1.0), b.op("Exp", b.op("Neg", b.op("Abs", x)))))
    return b.op("Add", b.op("Relu", x), tail, out=out)


def _rewrite(b: GraphBuilder, node: onnx.NodeProto) -> None:
    """``node`` (one of ``REWRITTEN_OPS``) written with ops that have a gradient, into its own output."""
    x, y, a, op = node.input[0], node.output[0], attrs(node), node.op_type
    if op == "HardSigmoid":
        lin = b.op("Add", b.op("Mul", x, b.const(a.get("alpha", 0.2))), b.const(a.get("beta", 0.5)))
        b.op("Clip", lin, b.const(0.0), b.const(1.0), out=y)
    elif op == "HardSwish":
        lin = b.op("Add", b.op("Mul", x, b.const(1 / 6)), b.const(0.5))
        b.op("Mul", x, b.op("Clip", lin, b.const(0.0), b.const(1.0)), out=y)
    elif op == "PRelu":   # relu(x) - slope * relu(-x)
        neg = b.op("Mul", node.input[1], b.op("Relu", b.op("Neg", x)))
        b.op("Sub", b.op("Relu", x), neg, out=y)
    elif op in ("Elu", "Celu"):
        alpha = a.get("alpha", 1.0)
        b.op("Add", b.op("Relu", x), _elu_part(b, x, alpha, alpha if op == "Celu" else 1.0), out=y)
    elif op == "Selu":
        elu = b.op("Add", b.op("Relu", x), _elu_part(b, x, a.get("alpha", 1.67326319217681884765625)))
        b.op("Mul", b.const(a.get("gamma", 1.05070102214813232421875)), elu, out=y)
    elif op == "Softplus":
        _softplus(b, x, out=y)
    elif op == "Softsign":
        b.op("Div", x, b.op("Add", b.const(1.0), b.op("Abs", x)), out=y)
    elif op == "ThresholdedRelu":
        zero = b.const(0.0)
        b.op("Where", b.op("Greater", x, b.const(a.get("alpha", 1.0))), x, zero, out=y)
    elif op == "Mish":
        b.op("Mul", x, b.op("Tanh", _softplus(b, x)), out=y)


def _standard(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def trainable_form(model: onnx.ModelProto) -> None:
    """In place: activations without a gradient (``REWRITTEN_OPS``) written with ops that have one,
    LayerNormalization with its statistics outputs, Relu as Clip (``relu_as_clip``) and AveragePool as
    Conv (``avgpool_as_conv``). Values are unchanged up to float rounding."""
    nodes = []
    for node in model.graph.node:
        if node.op_type in REWRITTEN_OPS and _standard(node):
            b = GraphBuilder(f"{node.name or node.output[0]}/grad_form/", sep="")
            _rewrite(b, node)
            model.graph.initializer.extend(b.inits)
            nodes += b.nodes
        else:
            if node.op_type == "LayerNormalization" and _standard(node):
                _with_layer_norm_statistics(node)
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    relu_as_clip(model)
    avgpool_as_conv(model)


def _with_layer_norm_statistics(node: onnx.NodeProto) -> None:
    """onnxruntime-training's LayerNormalization gradient reads the node's optional Mean and
    InvStdDev outputs, which exporters leave out (its builder asserts: ConvNeXt's blocks failed)."""
    while len(node.output) < 3:
        node.output.append(f"{node.output[0]}/layer_norm_{('mean', 'inv_std_dev')[len(node.output) - 1]}")


def relu_as_clip(model: onnx.ModelProto) -> None:
    """Relu -> Clip(x, 0) in place: the same values; in a training graph ClipGrad is 3-5x faster than
    onnxruntime-training 1.19's CPU ReluGrad (it took 15–28 % of a distillation step). The gradients
    differ only at x == 0 exactly (Clip passes it, Relu does not)."""
    relus = [n for n in model.graph.node if n.op_type == "Relu"]
    if relus:
        model.graph.initializer.append(numpy_helper.from_array(np.float32(0), "engine_forms.relu_floor"))
    for node in relus:
        node.op_type = "Clip"
        node.input.append("engine_forms.relu_floor")


def _channel_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Static channel counts (axis 1) of the tensors shape inference knows ({} if it fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - an unknown shape only means no rewrite
        return {}
    counts = {}
    for name, vi in value_infos(inferred).items():
        dims = vi.type.tensor_type.shape.dim
        if len(dims) > 1 and dims[1].dim_value > 0:
            counts[name] = dims[1].dim_value
    return counts


def avgpool_as_conv(model: onnx.ModelProto) -> None:
    """AveragePool -> depthwise Conv with weights 1/(kernel area), in place, where the two are the same
    function (no ceil mode or dilation; zero pads, or pads counted in the average). onnxruntime-training
    1.19's AveragePoolGrad fails when the batch axis is symbolic ("Can broadcast 0 by 0 or 1"; distillation
    fixes its batch, GENIE-M's block graphs do not); ConvGrad does not. Values equal up to float rounding."""
    pools = [n for n in model.graph.node if n.op_type == "AveragePool" and _standard(n)]
    channel_counts = _channel_counts(model) if pools else {}
    for node in pools:
        pads = list(attr(node, "pads", []))
        explicit_pads = attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        pads_averaged = not any(pads) or attr(node, "count_include_pad", 0)
        plain = not attr(node, "ceil_mode", 0) and all(d == 1 for d in attr(node, "dilations", []))
        channels = channel_counts.get(node.input[0])
        if not (explicit_pads and pads_averaged and plain) or channels is None:
            continue
        kernel = list(attr(node, "kernel_shape"))
        weight = np.full([channels, 1, *kernel], 1.0 / float(np.prod(kernel)), np.float32)
        w_name = f"{node.name or node.output[0]}/as_conv_weight"
        model.graph.initializer.append(numpy_helper.from_array(weight, w_name))
        conv = {"kernel_shape": kernel, "group": channels, "strides": list(attr(node, "strides", [1] * len(kernel)))}
        if pads:
            conv["pads"] = pads
        node.op_type = "Conv"
        node.input.append(w_name)
        del node.attribute[:]
        node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in conv.items())


# Applied by ortrain.GradientGraph ------------------------------------------------------------------

GRAD_ANCHOR = "/grad_anchor"


def shared_concat_inputs(model: onnx.ModelProto, trainable: list[str]) -> set[str]:
    """Tensors without a gradient of their own that two or more differentiated Concats read."""
    needs_grad = set(trainable)
    for node in model.graph.node:
        if any(i in needs_grad for i in node.input):
            needs_grad.update(node.output)
    readers: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Concat" and node.output[0] in needs_grad:
            for t in set(node.input):
                readers[t] = readers.get(t, 0) + 1
    return {t for t, n in readers.items() if n > 1 and t not in needs_grad}


def anchor_shared_concat_inputs(model: onnx.ModelProto, trainable: list[str]) -> list[str]:
    """Work around onnxruntime-training 1.19's Concat gradient (DenseNet's dense blocks): for a
    tensor that several Concats read and whose own gradient is not needed (a graph input, or
    computed from frozen values only), each Concat's gradient defines ``<tensor>_grad`` and the
    builder rejects its own graph. Multiplying the tensor by a scalar 1 that is "trainable" gives it
    a gradient that onnxruntime accumulates like any other. Changes ``model`` in place; returns the
    scalars' names (to be differentiated, never updated)."""
    g = model.graph
    shared = shared_concat_inputs(model, trainable)
    if not shared:
        return []
    anchored: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    anchors: list[onnx.TensorProto] = []
    b = GraphBuilder()
    produced_at_start = {i.name for i in g.input} | {t.name for t in g.initializer}

    def anchor(t: str) -> None:
        name = t + GRAD_ANCHOR
        anchored[t] = b.op("Mul", t, b.const(np.float32(1.0), name), out=name + "ed", name=name + "/Mul")
        new_nodes, new_inits = b.take()
        nodes.extend(new_nodes)
        anchors.extend(new_inits)

    for t in sorted(shared & produced_at_start):
        anchor(t)
    for node in g.node:
        if node.op_type == "Concat":
            for i, t in enumerate(node.input):
                if t in anchored:
                    node.input[i] = anchored[t]
        nodes.append(node)
        for t in node.output:
            if t in shared:
                anchor(t)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(anchors)
    return [t.name for t in anchors]
