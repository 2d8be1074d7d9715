"""The quantization plan: which tensors, how many bits, the first/last-layer policy, shared
quantizers, residual Adds, targets, --exclude, --high-bits and bad bit widths."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import fixtures
from conftest import shared_model
from onnxgenie.cli import main
from onnxgenie.errors import BadInputError
from onnxgenie.graph.bn import fold_bn
from onnxgenie.graph.load import normalize
from onnxgenie.quant.init import init_weights
from onnxgenie.quant.plan import build_plan, grid_source, quantized_layers, residual_adds
from onnxgenie.quant.spec import QuantPlan


def _folded(model):
    return fold_bn(normalize(model))


def test_policy_on_fixture():
    folded = _folded(fixtures.conv_bn_net())
    layers = quantized_layers(folded)
    plan = build_plan(folded, 4, 4)
    assert [w.node for w in plan.weights.values()] == [n.name for n in layers]
    bits = [plan.weights[n.name].bits for n in layers]
    assert bits[0] == 8 and bits[-1] == 8 and set(bits[1:-1]) == {4}
    assert layers[0].input[0] not in plan.acts                     # the image is not quantized
    assert plan.acts[layers[1].input[0]].bits == 8                 # second layer's input
    assert plan.acts[layers[-1].input[0]].bits == 8                # last layer's input
    assert {plan.acts[n.input[0]].bits for n in layers[2:-1]} == {4}
    gemm = next(n for n in layers if n.op_type == "Gemm")
    assert plan.weights[gemm.name].axis == 0                       # transB=1: weight [out, in]
    assert not any(w.symmetric for w in plan.weights.values())     # ort: asymmetric like the reference


def test_residual_add_shares_the_conv_input_quantizer():
    folded = _folded(fixtures.conv_bn_net())
    plan = build_plan(folded, 4, 4)
    (add,) = residual_adds(folded)
    producers = {o: n.op_type for n in folded.graph.node for o in n.output}
    shortcut = next(t for t in add.input if producers[t] != "Conv")
    act = plan.acts[shortcut]
    # the shortcut also feeds the second layer, whose input is 8-bit: one quantizer, the wider width
    assert add.name in act.consumers and len(act.consumers) == 2 and act.bits == 8
    conv_out = next(t for t in add.input if producers[t] == "Conv")
    assert conv_out not in plan.acts                               # the conv branch stays float into the Add


def test_tensorrt_quantizes_both_add_inputs_symmetric_narrow():
    folded = _folded(fixtures.conv_bn_net())
    plan = build_plan(folded, 4, 8, target="tensorrt")
    (add,) = residual_adds(folded)
    assert all(t in plan.acts and add.name in plan.acts[t].consumers for t in add.input)
    assert all(a.signed for a in plan.acts.values())
    first = quantized_layers(folded)[0]
    assert plan.acts[first.input[0]].bits == 8                     # int8 layers need Q/DQ on every input
    assert all(w.symmetric and w.narrow and w.qrange[0] == -w.qrange[1] for w in plan.weights.values())


def test_matmul_axis_and_exclude():
    folded = _folded(fixtures.matmul_head())
    mm = next(n for n in quantized_layers(folded) if n.op_type == "MatMul")
    plan = build_plan(folded, 4, 4)
    assert plan.weights[mm.name].axis == 1
    plan = build_plan(folded, 4, 4, exclude=[mm.name])
    assert mm.name not in plan.weights
    assert all(mm.name not in a.consumers for a in plan.acts.values())


def test_high_bits_node_quantized_like_first_and_last():
    folded = _folded(fixtures.conv_bn_net())
    layers = quantized_layers(folded)
    middle = layers[2]
    assert 2 < len(layers) - 1
    plain, mixed = build_plan(folded, 4, 4), build_plan(folded, 4, 4, high_bits=[middle.name])
    assert plain.weights[middle.name].bits == plain.acts[middle.input[0]].bits == 4
    assert mixed.weights[middle.name].bits == mixed.acts[middle.input[0]].bits == 8
    others = [n for n in layers if n is not middle]
    assert [mixed.weights[n.name].bits for n in others] == [plain.weights[n.name].bits for n in others]
    (add,) = residual_adds(folded)
    mixed = build_plan(folded, 4, 4, high_bits=[add.name])
    assert all(a.bits == 8 for a in mixed.acts.values() if add.name in a.consumers)


@pytest.mark.parametrize("kwargs,words", [
    (dict(wbits=1, abits=8), "weight bit width 1"),
    (dict(wbits=4, abits=3), "activation bit width 3"),
    (dict(wbits=4, abits=16), "activation bit width 16"),
    (dict(wbits=8, abits=4, target="tensorrt"), "int8 activations only"),
    (dict(wbits=8, abits=8, target="tpu"), "unknown target"),
    (dict(wbits=8, abits=8, exclude=["nope"]), "--exclude"),
    (dict(wbits=4, abits=4, high_bits=["nope"]), "--high-bits"),
    (dict(wbits=8, abits=8, weight_grid="pow2"), "unknown weight grid"),
    (dict(wbits=8, abits=8, target="tensorrt", weight_grid="asym"), "needs symmetric weights"),
])
def test_bad_plans(kwargs, words):
    with pytest.raises(BadInputError, match=words):
        build_plan(_folded(fixtures.conv_bn_net()), **kwargs)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("grid", ["auto", "asym", "sym"])
def test_weight_grid_symmetric_where_asked(grid, bits):
    """auto: the depthwise conv symmetric (signed, zero point 0 after init), the others asymmetric."""
    folded = _folded(fixtures.depthwise())
    plan = init_weights(folded, build_plan(folded, bits, bits, weight_grid=grid))
    depthwise = {n.name for n in folded.graph.node if n.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in n.attribute)}
    assert depthwise and depthwise < set(plan.weights)
    for w in plan.weights.values():
        want = grid == "sym" or (grid == "auto" and w.node in depthwise)
        assert w.symmetric == w.signed == want
        if w.bits == 4:
            assert w.qrange == ((-8, 7) if want else (0, 15))
        if want:
            assert not w.zero_point.any()


def test_plan_roundtrip_keeps_target():
    plan = build_plan(_folded(fixtures.conv_bn_net()), 4, 8, target="tensorrt")
    meta, arrays = plan.to_arrays()
    again = QuantPlan.from_arrays(meta, arrays)
    assert again.target == "tensorrt" and list(again.acts) == list(plan.acts)


def test_resnet20_plan():
    folded = _folded(shared_model("resnet20_cifar10"))
    plan = build_plan(folded, 4, 4)
    assert len(plan.weights) == 20                                 # 19 convs + the linear head
    adds = residual_adds(folded)
    assert len(adds) == 9
    producers = {o: n for n in folded.graph.node for o in n.output}
    option_a = 0
    for add in adds:  # identity shortcuts read the block input's quantizer; option-A ones its moved values
        if any(add.name in plan.acts[t].consumers for t in add.input if t in plan.acts):
            continue
        pad = producers[next(t for t in add.input if producers[t].op_type == "Pad")]
        source, first = grid_source(folded, pad.output[0], plan.acts)
        assert first in plan.acts[source].consumers and pad.output[0] not in plan.acts
        option_a += 1
    assert option_a == 2
    assert all(not a.signed for a in plan.acts.values())          # all post-ReLU or padded post-ReLU


def test_inspect_plan_cli(capsys, tmp_path):
    path = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    assert main(["inspect", str(path), "--plan", "--wbits", "3", "--abits", "5"]) == 0
    out = capsys.readouterr().out
    assert "W3 asymmetric" in out and "A5 " in out and "activation quantizers" in out
    assert main(["inspect", str(path), "--plan", "--wbits", "3", "--abits", "5", "--high-bits", "down.conv",
                 "--exclude", "block.conv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("  W8 ") and line.split()[4] == "down.conv" for line in lines)
    assert not any("block.conv" in line.split()[-2:-1] for line in lines if line.startswith("  W"))


def test_grid_source_refuses_a_nonzero_pad():
    folded = _folded(shared_model("resnet20_cifar10"))
    plan = build_plan(folded, 4, 4)
    pad = next(n for n in folded.graph.node if n.op_type == "Pad")
    assert grid_source(folded, pad.output[0], plan.acts) is not None
    folded.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one"))
    del pad.input[2:]
    pad.input.append("one")  # constant_value 1: off the grid
    assert grid_source(folded, pad.output[0], plan.acts) is None
