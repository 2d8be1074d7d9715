"""The fake-quantized model: the float simulation of a plan that evaluation and reconstruction run.

Weights become their dequantized values; how they are produced is pluggable (``weight_fn``: the
round-to-nearest constants here, learned softbits in reconstruction). Each planned activation goes
through x -> Div(scale) -> Round -> Clip(qmin, qmax) -> Mul(scale) before its quantized consumers
(an activation's zero point shifts the clip range: ``ActQuant.qrange``). The exported QDQ model computes
exactly the same numbers.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from ..errors import UnsupportedModelError
from .spec import ActQuant, QuantPlan, WeightQuant

# weight_fn(quantizer) -> (nodes, initializers) that write a tensor named ``quantizer.weight``
WeightFn = Callable[[WeightQuant], tuple[list[onnx.NodeProto], list[onnx.TensorProto]]]


def nearest_weights(wq: WeightQuant) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Round-to-nearest: the dequantized weight as a constant initializer."""
    return [], [numpy_helper.from_array(wq.dequantized(), wq.weight)]


def bias_scale(plan: QuantPlan, node: onnx.NodeProto) -> np.ndarray | None:
    """s_x * s_w (float32 [C]) of an int32 bias (tensorrt target), or None where the bias stays float."""
    wq = plan.weights.get(node.name)
    act = plan.acts.get(node.input[0])
    if plan.target != "tensorrt" or wq is None or act is None or len(node.input) < 3 or not node.input[2]:
        return None
    return (np.float32(act.scale) * wq.scale.astype(np.float32)).astype(np.float32)


def quantize_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.round(bias.astype(np.float32) / scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)


def act_nodes(act: ActQuant, out: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Float ops computing the fake-quantized ``act.tensor`` into ``out``."""
    qmin, qmax = act.qrange
    p = f"{act.tensor}_fq"
    inits = [numpy_helper.from_array(np.float32(act.scale), f"{p}_scale"),
             numpy_helper.from_array(np.float32(qmin), f"{p}_qmin"),
             numpy_helper.from_array(np.float32(qmax), f"{p}_qmax")]
    nodes = [helper.make_node("Div", [act.tensor, f"{p}_scale"], [f"{p}_div"], name=f"{p}_div"),
             helper.make_node("Round", [f"{p}_div"], [f"{p}_round"], name=f"{p}_round"),
             helper.make_node("Clip", [f"{p}_round", f"{p}_qmin", f"{p}_qmax"], [f"{p}_int"], name=f"{p}_clip"),
             helper.make_node("Mul", [f"{p}_int", f"{p}_scale"], [out], name=f"{p}_mul")]
    return nodes, inits


def _replace_initializers(model: onnx.ModelProto, new: list[onnx.TensorProto]) -> None:
    names = {t.name for t in new}
    keep = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + new)


def rewire(model: onnx.ModelProto, tensor: str, consumers: list[str], new: str) -> None:
    """Make the named consumer nodes read ``new`` instead of ``tensor``."""
    wanted = set(consumers)
    for node in model.graph.node:
        if node.name in wanted:
            node.input[:] = [new if i == tensor else i for i in node.input]


def insert_before_consumers(model: onnx.ModelProto, tensor: str, nodes: list[onnx.NodeProto]) -> None:
    """Insert ``nodes`` right after the producer of ``tensor`` (keeps the graph topologically sorted)."""
    position = 0
    for i, node in enumerate(model.graph.node):
        if tensor in node.output:
            position = i + 1
            break
    for offset, node in enumerate(nodes):
        model.graph.node.insert(position + offset, node)


def at_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` converted to ``opset`` (a copy; IR 10 from opset 21 on)."""
    if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == opset:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    try:
        out = version_converter.convert_version(model, opset)
    except Exception as err:
        raise UnsupportedModelError(f"cannot convert the model to opset {opset} "
                                    f"({str(err).splitlines()[0][:120]}); report the model's op list") from None
    if opset >= 21:
        out.ir_version = max(out.ir_version, 10)
    return out


def fakequant_model(folded: onnx.ModelProto, plan: QuantPlan, weight_fn: WeightFn = nearest_weights,
                    quantize_acts: bool = True, opset: int | None = None) -> onnx.ModelProto:
    """The simulation of ``plan`` on ``folded`` (float ops only; input model unchanged).

    It keeps ``folded``'s opset (17, what training graphs use) unless ``opset`` is given: onnxruntime
    runs some ops (AveragePool) with different kernels at opset 19+, so a bit-exact comparison with
    the opset-21 export simulates at opset 21 (``export.qdq.EXPORT_OPSET``).
    """
    model = onnx.ModelProto()
    model.CopyFrom(folded)
    if opset:
        model = at_opset(model, opset)
    nodes_by_name = {n.name: n for n in model.graph.node}
    weight_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    for wq in plan.weights.values():
        nodes, inits = weight_fn(wq)
        weight_nodes += nodes
        new_inits += inits
        if nodes:  # the weight is computed now, no longer an initializer
            _drop_initializer(model, wq.weight)
    biases = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for wq in plan.weights.values():
        node = nodes_by_name[wq.node]
        scale = bias_scale(plan, node)
        if scale is not None:
            b = quantize_bias(biases[node.input[2]], scale).astype(np.float32) * scale
            new_inits.append(numpy_helper.from_array(b.astype(np.float32), node.input[2]))
    _replace_initializers(model, new_inits)
    for i, node in enumerate(weight_nodes):
        model.graph.node.insert(i, node)
    if quantize_acts:
        for act in plan.acts.values():
            out = f"{act.tensor}_fq"
            nodes, inits = act_nodes(act, out)
            model.graph.initializer.extend(inits)
            insert_before_consumers(model, act.tensor, nodes)
            rewire(model, act.tensor, act.consumers, out)
    return model


def _drop_initializer(model: onnx.ModelProto, name: str) -> None:
    keep = [t for t in model.graph.initializer if t.name != name]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
