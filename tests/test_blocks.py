"""Block partition: coverage of every quantized layer, block structure, and chained blocks == model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import fixtures
from conftest import dev_images, shared_model
from onnxgenie.graph.blocks import cut_points, extract_block_model, partition_blocks, quantizable_nodes
from onnxgenie.graph.bn import fold_bn
from onnxgenie.graph.load import normalize
from onnxgenie.ortrain import inference_session


def _folded(model: onnx.ModelProto) -> onnx.ModelProto:
    return fold_bn(normalize(model))


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = inference_session(model, threads=1)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _check_partition(folded: onnx.ModelProto, x: np.ndarray) -> list:
    blocks = partition_blocks(folded)
    quantized = quantizable_nodes(folded)
    owners = [n for b in blocks for n in b.quantized_nodes]
    assert sorted(owners) == sorted(quantized)          # every quantized layer in exactly one block
    all_nodes = [n for b in blocks for n in b.nodes]
    assert sorted(all_nodes) == sorted(n.name for n in folded.graph.node)   # and every node once
    assert blocks[0].input == folded.graph.input[0].name
    assert blocks[-1].output == folded.graph.output[0].name
    for prev, nxt in zip(blocks, blocks[1:]):
        assert prev.output == nxt.input
    h = x
    for block in blocks:
        h = _run(extract_block_model(folded, block), h)
    np.testing.assert_allclose(h, _run(folded, x), rtol=1e-5, atol=1e-5)
    return blocks


@pytest.mark.parametrize("name, residual_blocks", [("resnet20_cifar10", 9), ("resnet32_cifar10", 15),
                                                   ("shufflenet_g3_cifar10", 16)])
def test_shared_models_split_into_stem_units_head(name, residual_blocks):
    folded = _folded(shared_model(name))
    x, _ = dev_images(name, 8)
    blocks = _check_partition(folded, x)
    assert len(blocks) == 1 + residual_blocks + 1
    ops = {n.name: n.op_type for n in folded.graph.node}
    assert [ops[n] for n in blocks[0].nodes] == ["Conv", "Relu"]            # stem with its ReLU
    assert [ops[n] for n in blocks[-1].nodes] == ["GlobalAveragePool", "Flatten", "Gemm"]
    for block in blocks[1:-1]:                                               # one unit each, ends at its join
        kinds = [ops[n] for n in block.nodes]
        assert kinds[-1] == "Relu" and ("Add" in kinds or "Concat" in kinds)


@pytest.mark.parametrize("name", sorted(fixtures.VALID))
def test_fixtures_partition(name):
    model = fixtures.VALID[name]()
    folded = _folded(model)
    x = fixtures.random_input(folded, 3)
    blocks = _check_partition(folded, x)
    # the fixture's residual unit (conv + shortcut add + activation) is one block, the stem conv another
    residual = next(b for b in blocks if "block.add" in b.nodes)
    assert len(residual.quantized_nodes) == 1 and residual.nodes[-1] == "block.relu"
    assert blocks[0].quantized_nodes != residual.quantized_nodes
    if name == "bn_after_add":   # the BN after the add, folded into a Mul and an Add, stays inside the unit
        assert residual.nodes.index("block.add") < residual.nodes.index("block.add_bn_mul") \
            < residual.nodes.index("block.add_bn_add") < residual.nodes.index("block.relu")


def _chain(n_layers: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "input"
    for i in range(n_layers):
        w = numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), f"w{i}")
        inits.append(w)
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        x = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 3, 3])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 4, 3, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_plain_chain_falls_back_to_single_layers():
    model = onnx.shape_inference.infer_shapes(_chain(3))
    blocks = partition_blocks(model)
    assert [b.quantized_nodes for b in blocks] == [["conv0"], ["conv1"], ["conv2"]]
    assert [b.nodes for b in blocks] == [["conv0", "relu0"], ["conv1", "relu1"], ["conv2", "relu2"]]
    assert [t for _, t in cut_points(model)] == ["input", "c0", "r0", "c1", "r1", "c2", "r2"]


def test_residual_interior_is_not_a_cut():
    folded = _folded(fixtures.opset17())
    cuts = {t for _, t in cut_points(folded)}
    add = next(n for n in folded.graph.node if n.op_type == "Add")
    conv_out = next(i for i in add.input if i != "stem.relu")
    assert "stem.relu" in cuts and conv_out not in cuts   # the shortcut keeps stem.relu alive


def test_cli_inspect_blocks(tmp_path, capsys):
    import json

    from onnxgenie.cli import main

    src = fixtures.save(fixtures.opset17(), tmp_path)
    assert main(["inspect", str(src), "--blocks", "--json"]) == 0
    blocks = json.loads(capsys.readouterr().out)["blocks"]
    assert [b["quantized_nodes"] for b in blocks] == [["stem.conv"], ["block.conv"], ["down.conv"], ["fc1"], ["fc"]]
    assert main(["inspect", str(src), "--blocks"]) == 0
    assert "5 reconstruction blocks" in capsys.readouterr().out
