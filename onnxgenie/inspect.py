"""``onnxgenie inspect``: what the front end sees in a model, as a dict (JSON) or a short summary."""

from __future__ import annotations

import onnx

from .builder import attr
from .engine_forms import NO_GRADIENT_OPS
from .errors import NoBatchNormError
from .graph.bn import bn_layers, require_bn
from .graph.load import _dims, image_io, load_model, model_opset, normalize


def strided_convs(model: onnx.ModelProto) -> list[str]:
    out = []
    for node in model.graph.node:
        if node.op_type == "Conv" and max(attr(node, "strides", [1])) > 1:
            out.append(node.name or node.output[0])
    return out


def no_gradient_before_bn(model: onnx.ModelProto, layers) -> onnx.NodeProto | None:
    """The first op without a gradient between the image and a BN layer (distillation cannot pass it)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    todo, seen = [b.input for b in layers], set()
    while todo:
        node = producers.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in NO_GRADIENT_OPS:
            return node
        todo.extend(i for i in node.input if i)
    return None


def _no_bn_reason(model: onnx.ModelProto, original: onnx.ModelProto) -> str:
    try:
        require_bn(model, original)
    except NoBatchNormError as err:
        return str(err)
    return ""


def inspect_model(src, input_hw=None) -> dict:
    """Summary of a model as the front end sees it.

    Raises the front end's typed error for a model the tool cannot take (unreadable, several inputs,
    custom ops, dynamic H/W without ``input_hw``); a model without BN is reported, not refused,
    because it can still be quantized with real calibration images.
    """
    original = load_model(src)
    info = {
        "opset": model_opset(original),
        "ir_version": original.ir_version,
        "inputs": [{"name": i.name, "shape": _dims(i)} for i in original.graph.input
                   if i.name not in {t.name for t in original.graph.initializer}],
        "outputs": [{"name": o.name, "shape": _dims(o)} for o in original.graph.output],
        "nodes": len(original.graph.node),
    }
    model = normalize(original, input_hw=input_hw)  # a model the tool cannot take raises (exit 2)
    io = image_io(model)
    layers = bn_layers(model)
    info.update(
        normalized_nodes=len(model.graph.node),
        image={"input": io.input, "chw": list(io.chw), "output": io.output, "classes": io.num_classes},
        bn_layers=[{"name": b.name, "channels": b.channels, "input": b.input, "producer_op": b.producer_op}
                   for b in layers],
        strided_convs=strided_convs(model),
        zero_shot_ready=bool(layers),
        reason=None if layers else _no_bn_reason(model, original),
    )
    blocker = no_gradient_before_bn(model, layers) if layers else None
    if blocker is not None:
        info.update(zero_shot_ready=False,
                    reason=f"{blocker.op_type} (node {blocker.name}) has no gradient, so distillation cannot train "
                           "through it; quantize from real images with --calib-data")
    return info


def format_summary(info: dict) -> str:
    lines = [f"opset {info['opset']}, IR {info['ir_version']}, {info['nodes']} nodes"
             + (f" ({info['normalized_nodes']} after clean-up)" if info.get("normalized_nodes") else "")]
    for i in info["inputs"]:
        lines.append(f"input  {i['name']} {i['shape']}")
    for o in info["outputs"]:
        lines.append(f"output {o['name']} {o['shape']}")
    lines.append(f"BatchNormalization layers: {len(info['bn_layers'])} "
                 f"({sum(1 for b in info['bn_layers'] if b['producer_op'] in ('Conv', 'Gemm'))} after Conv/Gemm)")
    lines.append(f"strided convs: {len(info['strided_convs'])}")
    lines.append("zero-shot ready: " + ("yes" if info["zero_shot_ready"] else f"no - {info['reason']}"))
    return "\n".join(lines)
