"""The fake-quant simulation: activation quantizers equal the NumPy reference, weights are the
dequantized integers, and the insertion of quantizers takes other forms (training graph, export)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import fixtures
from onnxgenie.graph.blocks import extract_block_model, partition_blocks
from onnxgenie.graph.bn import fold_bn, initializers
from onnxgenie.builder import GraphBuilder
from onnxgenie.graph.load import normalize
from onnxgenie.quant.fakequant import fakequant_model, insert_acts, insert_weights
from onnxgenie.quant.init import act_fake_quant, init_activations, init_weights
from onnxgenie.quant.plan import build_plan
from onnxgenie.runtime import predict

BASIC = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def _planned(wbits=4, abits=4, target="ort", model=None):
    folded = fold_bn(normalize(model or fixtures.conv_bn_net()))
    x = fixtures.random_input(folded, 24, seed=1)
    plan = build_plan(folded, wbits, abits, target=target)
    init_weights(folded, plan)
    init_activations(folded, plan, x)
    return folded, plan, x


def _with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return out


def _run(model, x, names):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, s.run(names, {s.get_inputs()[0].name: x})))


def test_activation_quantizers_match_numpy():
    folded, plan, x = _planned()
    sim = fakequant_model(folded, plan)
    onnx.checker.check_model(sim)
    names = [t for t in plan.acts] + [f"{t}_fq" for t in plan.acts]
    values = _run(_with_outputs(sim, names), x, names)
    for t, act in plan.acts.items():
        expected = act_fake_quant(values[t], act)
        np.testing.assert_array_equal(values[f"{t}_fq"], expected)
        levels = np.unique(np.round(values[f"{t}_fq"] / np.float32(act.scale)))
        qmin, qmax = act.qrange
        assert len(levels) <= 2 ** act.bits and levels.min() >= qmin and levels.max() <= qmax
    # every planned consumer reads the quantized tensor, nothing else does
    for node in sim.graph.node:
        for t, act in plan.acts.items():
            if t in node.input:
                assert node.name not in act.consumers
            if f"{t}_fq" in node.input and not node.name.startswith(f"{t}_fq"):
                assert node.name in act.consumers


def test_weights_are_dequantized_integers():
    folded, plan, _ = _planned()
    sim = initializers(fakequant_model(folded, plan))
    for wq in plan.weights.values():
        np.testing.assert_array_equal(sim[wq.weight], wq.dequantized())


def test_weights_only_simulation_equals_float_model_with_quantized_weights():
    folded, plan, x = _planned()
    manual = onnx.ModelProto()
    manual.CopyFrom(folded)
    for t in manual.graph.initializer:
        for wq in plan.weights.values():
            if t.name == wq.weight:
                t.CopyFrom(numpy_helper.from_array(wq.dequantized(), t.name))
    a = predict(fakequant_model(folded, plan, quantize_acts=False), x, level=BASIC)
    np.testing.assert_array_equal(a, predict(manual, x, level=BASIC))
    assert not np.array_equal(a, predict(folded, x, level=BASIC))


def test_other_forms_go_where_the_simulation_puts_its_own():
    """The insertion is shared (GENIE-M's training graph and the QDQ export use it with their own forms):
    a weight form that floors, an activation form that scales by 2, placed and rewired like the simulation's."""
    folded, plan, x = _planned()
    floats = initializers(folded)

    def floor_weight(b: GraphBuilder, wq):   # computed in the graph: floor(W/s) * s as a Mul of two constants
        s = wq.scale.reshape(wq.bshape(floats[wq.weight].ndim)).astype(np.float32)
        floored = (np.floor(floats[wq.weight] / s) * s).astype(np.float32)
        b.op("Mul", b.const(floored), b.const(np.ones_like(floored)), out=wq.weight)

    def doubled(b: GraphBuilder, act):
        return b.op("Mul", act.tensor, b.const(np.float32(2.0)))

    model = onnx.ModelProto()
    model.CopyFrom(folded)
    b = GraphBuilder()
    insert_weights(model, plan, floor_weight, b)
    quantized = insert_acts(model, plan, doubled, b)
    onnx.checker.check_model(model)   # topologically sorted, every weight written once
    assert quantized == list(plan.acts.values())
    assert not {wq.weight for wq in plan.weights.values()} & {t.name for t in model.graph.initializer}
    original = {n.name for n in folded.graph.node}
    for act in plan.acts.values():   # the consumers read the doubled tensor; the others still read the tensor
        readers = {n.name for n in model.graph.node if act.tensor in n.input}
        others = {n.name for n in folded.graph.node if act.tensor in n.input} - set(act.consumers)
        assert others <= readers and len(readers - others - original) == 1 and not readers & set(act.consumers)
    assert not np.array_equal(predict(model, x), predict(fakequant_model(folded, plan), x))


def test_a_block_gets_the_quantizers_of_its_own_nodes():
    folded, plan, x = _planned(model=fixtures.opset17())
    block = partition_blocks(folded, list(plan.weights))[1]
    part = extract_block_model(folded, block)
    sim = fakequant_model(part, plan)
    quantized = {n.name for n in sim.graph.node if n.name.endswith("_fq_mul")}
    inside = {n.name for n in part.graph.node}
    assert quantized == {f"{a.tensor}_fq_mul" for a in plan.acts.values() if set(a.consumers) & inside}
    assert 0 < len(quantized) < len(plan.acts)
    assert {wq.weight for wq in plan.weights.values() if wq.node in inside} <= {t.name for t in sim.graph.initializer}


def test_tensorrt_biases_on_int32_grid():
    folded, plan, _ = _planned(8, 8, "tensorrt")
    sim = initializers(fakequant_model(folded, plan))
    nodes = {n.name: n for n in folded.graph.node}
    checked = 0
    for wq in plan.weights.values():
        node = nodes[wq.node]
        if node.input[0] in plan.acts and len(node.input) > 2:
            step = np.float32(plan.acts[node.input[0]].scale) * wq.scale
            k = sim[node.input[2]] / step
            np.testing.assert_allclose(k, np.round(k), atol=1e-3)
            checked += 1
    assert checked >= 2
