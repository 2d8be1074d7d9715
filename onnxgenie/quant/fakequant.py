"""Where a plan's quantizers go in a graph, and the float simulation of the plan.

Every graph that quantizes a plan is built by the same insertion, and differs only in the forms it writes
(the simulation here, GENIE-M's block training graph in ``quant.reconstruct.graph``, the QDQ export in
``export.qdq``):
- a weight form writes the quantized weight under the weight's own name (``insert_weights``): its nodes
  go before every other node, its initializers replace the float one;
- an activation form computes the quantized tensor, which the quantizer's consumers then read instead
  (``insert_acts``): its nodes go right after the tensor's producer.

The simulation's forms: the dequantized round-to-nearest weight (``nearest_weight``), and each activation
through x -> Div(scale) -> Round -> Clip(qmin, qmax) -> Mul(scale) (``nearest_act``; an activation's zero
point shifts the clip range: ``ActQuant.qrange``). The exported QDQ model computes exactly the same numbers.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from ..builder import GraphBuilder, insert_after_producer, insert_nodes, replace_initializers, rewire
from ..errors import UnsupportedModelError
from .spec import ActQuant, QuantPlan, WeightQuant

WeightForm = Callable[[GraphBuilder, WeightQuant], None]   # writes the tensor ``wq.weight``
ActForm = Callable[[GraphBuilder, ActQuant], str]          # returns the quantized tensor


def insert_weights(model: onnx.ModelProto, plan: QuantPlan, form: WeightForm, b: GraphBuilder) -> None:
    """In place: each planned weight of ``model``'s nodes written by ``form`` through ``b`` (one builder for
    every insertion into a model, so that fresh names stay unique)."""
    present = {n.name for n in model.graph.node}
    for wq in plan.weights.values():
        if wq.node in present:
            form(b, wq)
    nodes, inits = b.take()
    replace_initializers(model, inits, drop={o for n in nodes for o in n.output})
    insert_nodes(model, 0, nodes)


def act_readers(model: onnx.ModelProto, act: ActQuant) -> list[onnx.NodeProto]:
    """The nodes of ``model`` that read ``act.tensor`` quantized: its consumers (every reader if none is named)."""
    return [n for n in model.graph.node if act.tensor in n.input and (not act.consumers or n.name in act.consumers)]


def insert_acts(model: onnx.ModelProto, plan: QuantPlan, form: ActForm, b: GraphBuilder) -> list[ActQuant]:
    """In place: the consumers in ``model`` of each planned activation read ``form``'s output (built through
    ``b``) instead; returns the activations quantized (those with a consumer in ``model``)."""
    done = []
    for act in plan.acts.values():
        readers = act_readers(model, act)
        if not readers:
            continue
        out = form(b, act)
        nodes, inits = b.take()
        model.graph.initializer.extend(inits)
        insert_after_producer(model, act.tensor, nodes)
        rewire(readers, act.tensor, out)
        done.append(act)
    return done


def nearest_weight(b: GraphBuilder, wq: WeightQuant) -> None:
    """Round-to-nearest: the dequantized weight as a constant."""
    b.const(wq.dequantized(), wq.weight)


def nearest_act(b: GraphBuilder, act: ActQuant) -> str:
    """scale · clip(round(x / scale), qmin, qmax) as float ops."""
    qmin, qmax = act.qrange
    p = f"{act.tensor}_fq"
    scale = b.const(np.float32(act.scale), f"{p}_scale")
    low, high = b.const(np.float32(qmin), f"{p}_qmin"), b.const(np.float32(qmax), f"{p}_qmax")
    rounded = b.op("Round", b.op("Div", act.tensor, scale, out=f"{p}_div"), out=f"{p}_round")
    return b.op("Mul", b.op("Clip", rounded, low, high, out=f"{p}_int", name=f"{p}_clip"), scale, out=p,
                name=f"{p}_mul")


def bias_scale(plan: QuantPlan, node: onnx.NodeProto) -> np.ndarray | None:
    """s_x * s_w (float32 [C]) of an int32 bias (tensorrt target), or None where the bias stays float."""
    wq = plan.weights.get(node.name)
    act = plan.acts.get(node.input[0])
    if plan.target != "tensorrt" or wq is None or act is None or len(node.input) < 3 or not node.input[2]:
        return None
    return (np.float32(act.scale) * wq.scale.astype(np.float32)).astype(np.float32)


def quantize_bias(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.round(bias.astype(np.float32) / scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)


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


def fakequant_model(folded: onnx.ModelProto, plan: QuantPlan, quantize_acts: bool = True,
                    opset: int | None = None, int_biases: bool = True) -> onnx.ModelProto:
    """The simulation of ``plan`` on ``folded`` (float ops only; input model unchanged). ``folded`` may be
    a part of the planned model (a GENIE-M block): the quantizers of its own nodes are inserted.

    It keeps ``folded``'s opset (17, what training graphs use) unless ``opset`` is given: onnxruntime
    runs some ops (AveragePool) with different kernels at opset 19+, so a bit-exact comparison with
    the opset-21 export simulates at opset 21 (``export.qdq.EXPORT_OPSET``). ``int_biases=False`` leaves
    the tensorrt target's biases float, as GENIE-M's block graphs learn them.
    """
    model = onnx.ModelProto()
    model.CopyFrom(folded)
    if opset:
        model = at_opset(model, opset)
    b = GraphBuilder()
    insert_weights(model, plan, nearest_weight, b)
    if int_biases:
        _int_biases(model, plan)
    if quantize_acts:
        insert_acts(model, plan, nearest_act, b)
    return model


def _int_biases(model: onnx.ModelProto, plan: QuantPlan) -> None:
    """The tensorrt target's biases as the int32 grid's values (``bias_scale``)."""
    biases = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    b = GraphBuilder()
    for node in (nodes[wq.node] for wq in plan.weights.values() if wq.node in nodes):
        scale = bias_scale(plan, node)
        if scale is not None:
            b.const(quantize_bias(biases[node.input[2]], scale).astype(np.float32) * scale, node.input[2])
    replace_initializers(model, b.inits)
