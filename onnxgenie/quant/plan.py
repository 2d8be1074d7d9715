"""Which tensors are quantized, to how many bits: the quantization plan of a BN-folded model.

Follows the GENIE/BRECQ setting: weights of every Conv/Gemm/MatMul per output channel, the
activation entering each of those ops, and the shortcut input of residual Adds (the reference
quantizes the identity path with the same quantizer as the block's first conv; an option-A shortcut,
Slice + zero Pad of the block input, reads that quantizer's values too). One quantizer per
tensor, shared by all its consumers, with the highest bit width any consumer asked for. The first
layer keeps 8-bit weights and a float input (the image), the second layer's input is 8-bit, and
the last layer's weights and input are 8-bit (``first_last_bits``).

Weight grids (``weight_grid``): the reference's asymmetric per-channel grid, except that ``"auto"``
gives depthwise convolutions a symmetric one: with 9 weights per channel the asymmetric grid costs
ShuffleNet 5 pt at W4A8, and at W8A8 onnxruntime's depthwise QLinearConv with per-channel weight zero
points is 6x slower than the whole FP32 model (docs/design.md).
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from ..builder import attr
from ..errors import BadInputError
from .spec import TARGETS, ActQuant, QuantPlan, WeightQuant

QUANT_OPS = ("Conv", "Gemm", "MatMul")
WEIGHT_BITS = range(2, 9)
WEIGHT_GRIDS = ("auto", "asym", "sym")
ACT_BITS = range(4, 9)
# Ops that keep every value of a quantized tensor on its grid (Pad only with the value 0, always on the grid).
_GRID_PRESERVING = ("Slice", "Pad", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity",
                    "MaxPool", "Relu")
# Ops that move values without changing them: a tensor after them is non-negative iff before.
_SIGN_PRESERVING = ("Relu", "MaxPool", "Reshape", "Transpose", "Flatten", "Slice", "Pad", "Identity",
                    "Squeeze", "Unsqueeze", "GlobalAveragePool", "AveragePool", "Concat")


def weight_axis(node: onnx.NodeProto) -> int:
    """Output-channel axis of the weight: Conv [O, I, kH, kW] -> 0, Gemm B^T [O, I] -> 0, B [I, O] -> 1."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return 1  # MatMul x @ W, W [I, O]


def quantized_layers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv/Gemm/MatMul nodes with an initializer weight, in topological order."""
    inits = {t.name for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type not in QUANT_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.input[0] in inits or (node.op_type == "Gemm" and attr(node, "transA", 0)):
            continue
        layers.append(node)
    return layers


def residual_adds(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Add nodes whose two inputs are both activations (not constants): the residual joins."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n for n in model.graph.node
            if n.op_type == "Add" and len(n.input) == 2 and not (set(n.input) & consts)]


_NON_NEGATIVE_OPS = ("Relu", "Sigmoid", "HardSigmoid", "Softplus")


def _clip_at_zero_or_above(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    if node.op_type != "Clip" or len(node.input) < 2 or not node.input[1]:
        return False
    low = next((t for t in model.graph.initializer if t.name == node.input[1]), None)
    return low is not None and float(numpy_helper.to_array(low)) >= 0


def _non_negative(model: onnx.ModelProto, tensor: str) -> bool:
    """True if ``tensor`` is a ReLU (ReLU6, Sigmoid, ...) output, possibly through value-moving ops (a
    guess before calibration, which decides)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    seen = set()
    todo = [tensor]
    while todo:
        t = todo.pop()
        node = producers.get(t)
        if node is not None and (node.op_type in _NON_NEGATIVE_OPS or _clip_at_zero_or_above(model, node)):
            continue
        if node is None or node.op_type not in _SIGN_PRESERVING or t in seen:
            return False
        seen.add(t)
        todo.extend([node.input[0]] if node.op_type != "Concat" else list(node.input))
    return True


def _pads_with_zero(model: onnx.ModelProto, pad: onnx.NodeProto) -> bool:
    if attr(pad, "mode", b"constant") not in (b"constant", "constant"):
        return False
    if len(pad.input) < 3 or not pad.input[2]:
        return True
    name = pad.input[2]  # convert only the pad value, not every initializer
    found = [t for t in model.graph.initializer if t.name == name]
    found += [n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.output[0] == name
              and n.attribute and n.attribute[0].name == "value"]
    return bool(found) and not numpy_helper.to_array(found[0]).any()


def grid_source(model: onnx.ModelProto, tensor: str, quantized) -> tuple[str, str] | None:
    """(quantized tensor, first node) when ``tensor`` is a quantized tensor moved by grid-preserving ops.

    The option-A shortcut of CIFAR ResNets (Slice + zero Pad of the block input) is the case: its
    values are already on the block input's grid, and a second quantizer there would round them again.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    node = None
    while tensor not in quantized:
        node = producers.get(tensor)
        if node is None or node.op_type not in _GRID_PRESERVING:
            return None
        if node.op_type == "Pad" and not _pads_with_zero(model, node):
            return None
        tensor = node.input[0]
    return (tensor, node.name) if node is not None else None


def is_depthwise(node: onnx.NodeProto, weight_shape) -> bool:
    """A Conv with one input channel per group and more than one group."""
    return node.op_type == "Conv" and attr(node, "group", 1) > 1 and len(weight_shape) > 1 and weight_shape[1] == 1


def check_weight_grid(weight_grid: str, target: str) -> None:
    if weight_grid not in WEIGHT_GRIDS:
        raise BadInputError(f"unknown weight grid {weight_grid!r}; use one of {', '.join(WEIGHT_GRIDS)}")
    if target == "tensorrt" and weight_grid == "asym":
        raise BadInputError("--target tensorrt needs symmetric weights (zero points 0); "
                            "use --weight-grid auto or sym, or --target ort")


def check_bits(wbits: int, abits: int, first_last_bits: int, target: str) -> None:
    if target not in TARGETS:
        raise BadInputError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    for what, bits, allowed in (("weight", wbits, WEIGHT_BITS), ("activation", abits, ACT_BITS),
                                ("first/last layer", first_last_bits, ACT_BITS)):
        if bits not in allowed:
            raise BadInputError(f"{what} bit width {bits} is not supported; use {allowed.start} to "
                                f"{allowed.stop - 1} bits")
    if target == "tensorrt" and (abits != 8 or first_last_bits != 8):
        raise BadInputError(f"--target tensorrt runs int8 activations only ({min(abits, first_last_bits)}-bit "
                            "asked; TensorRT's int4 is weight-only); use --abits 8 or --target ort")


def _check_node_names(folded: onnx.ModelProto, names, flag: str) -> None:
    known = {n.name for n in folded.graph.node}
    unknown = [e for e in names if e not in known]
    if unknown:
        raise BadInputError(f"{flag} names no node of the model: {', '.join(unknown)}; "
                            "see `onnxgenie inspect --plan` for the node names")


def build_plan(folded: onnx.ModelProto, wbits: int, abits: int, first_last_bits: int = 8,
               target: str = "ort", exclude=(), weight_grid: str = "auto", high_bits=(),
               op_types=None) -> QuantPlan:
    """The quantizers of a BN-folded normal-form model (no scales yet: see ``quant.init``).

    ``target="ort"``: asymmetric per-channel weights (unsigned with zero points, as the reference);
    ``weight_grid`` "sym" / "auto" (depthwise convs only) makes those weights symmetric.
    ``"tensorrt"``: symmetric narrow-range weights, signed activations, Q/DQ on the first layer's
    input too (int8 layers need both inputs quantized) and on both inputs of every residual Add.
    ``exclude`` names nodes that stay float, and ``op_types`` (when given) the only op types quantized,
    as onnxruntime's ``nodes_to_exclude`` / ``op_types_to_quantize``; ``high_bits`` names nodes quantized like the first and
    last layer (weights and input at ``first_last_bits``: mixed precision). At W8A8 the ``"ort"``
    target quantizes the image and both inputs of every residual Add too, so that onnxruntime's CPU int8 kernels (QLinearConv, QLinearAdd)
    take whole residual blocks instead of running float convolutions between DequantizeLinear nodes.
    """
    check_bits(wbits, abits, first_last_bits, target)
    check_weight_grid(weight_grid, target)
    _check_node_names(folded, exclude, "--exclude")
    _check_node_names(folded, high_bits, "--high-bits")
    excluded, high = set(exclude), set(high_bits)
    graph_inputs = {i.name for i in folded.graph.input}
    layers = [n for n in quantized_layers(folded)]
    if op_types is not None:
        candidates = layers + residual_adds(folded)
        if not any(n.op_type in op_types for n in candidates):
            kinds = sorted({n.op_type for n in candidates})
            raise BadInputError(f"--op-types {' '.join(op_types)} matches no quantizable node of the model; "
                                f"use some of {', '.join(kinds)}")
        excluded |= {n.name for n in candidates if n.op_type not in op_types}
    plan = QuantPlan(target=target)
    trt = target == "tensorrt"
    int8_kernels = trt or (wbits == abits == first_last_bits == 8)   # every conv input and Add input quantized

    def add_act(tensor: str, bits: int, consumer: str) -> None:
        if tensor in graph_inputs and not int8_kernels:
            return  # the image: already quantized by its 8-bit encoding (TensorRT wants Q/DQ on every conv input)
        act = plan.acts.get(tensor)
        if act is None:
            act = plan.acts[tensor] = ActQuant(tensor, bits, signed=trt or not _non_negative(folded, tensor))
        act.bits = max(act.bits, bits)
        act.consumers.append(consumer)

    shapes = {t.name: tuple(t.dims) for t in folded.graph.initializer}
    last = len(layers) - 1
    for i, node in enumerate(layers):
        if node.name in excluded:
            continue
        edge = i in (0, last) or node.name in high
        symmetric = trt or weight_grid == "sym" or (weight_grid == "auto" and is_depthwise(node, shapes[node.input[1]]))
        plan.weights[node.name] = WeightQuant(
            node=node.name, weight=node.input[1], bits=first_last_bits if edge else wbits,
            symmetric=symmetric, axis=weight_axis(node), narrow=trt)
        if i > 0 or int8_kernels:  # the first layer reads the image
            wide = i in (0, 1, last) or node.name in high
            add_act(node.input[0], first_last_bits if wide else abits, node.name)

    producers = {o: n.op_type for n in folded.graph.node for o in n.output}
    for add in residual_adds(folded):
        if add.name in excluded:
            continue
        for tensor in add.input:
            if int8_kernels or producers.get(tensor) not in QUANT_OPS:
                moved = None if int8_kernels or tensor in plan.acts else grid_source(folded, tensor, plan.acts)
                if moved:  # read the source's quantized values instead of rounding them again
                    plan.acts[moved[0]].consumers.append(moved[1])
                else:
                    add_act(tensor, first_last_bits if add.name in high else abits, add.name)
    if int8_kernels and not trt:  # every reader of a quantized tensor reads the quantized value
        # (the tensorrt target keeps float side paths: onnxruntime's int8->uint8 rewrite breaks on them)
        for act in plan.acts.values():
            act.consumers += [n.name for n in folded.graph.node
                              if act.tensor in n.input and n.name not in act.consumers and n.name not in excluded]
    return plan


def format_plan(plan: QuantPlan) -> str:
    """One line per quantizer, for ``onnxgenie inspect --plan``."""
    lines = [f"target {plan.target}: {len(plan.weights)} weight quantizers, {len(plan.acts)} activation quantizers"]
    for w in plan.weights.values():
        kind = "symmetric" if w.symmetric else "asymmetric"
        lines.append(f"  W{w.bits} {kind:10} axis {w.axis}  {w.node}  ({w.weight})")
    for a in plan.acts.values():
        sign = "signed" if a.signed else ("unsigned" if not a.zero_point else f"unsigned, zero point {a.zero_point}")
        lines.append(f"  A{a.bits} {sign:10}         {a.tensor}  -> {', '.join(a.consumers)}")
    return "\n".join(lines)
