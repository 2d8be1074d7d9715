"""Front end: normalize() keeps every fixture's and shared model's outputs, converts to opset 17,
keeps a dynamic batch axis, refuses what it cannot handle with a one-line typed error, and
inspect_model() reports what the models contain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import fixtures
from conftest import dev_images, shared_model
from onnxgenie.errors import BadInputError, UnsupportedModelError
from onnxgenie.graph.bn import bn_layers
from onnxgenie.graph.load import (INTERNAL_OPSET, check_dynamic_batch, image_io, load_model, model_opset,
                                  normalize)
from onnxgenie.inspect import inspect_model


def _fixed_batch(model: onnx.ModelProto) -> int:
    return model.graph.input[0].type.tensor_type.shape.dim[0].dim_value  # 0 when symbolic


def _batches(model: onnx.ModelProto) -> tuple[int, int]:
    fixed = _fixed_batch(model)
    return (fixed, 2 * fixed) if fixed > 1 else (1, 3)


def _run_original(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    step = _fixed_batch(model) or len(x)  # a fixed-batch original runs chunk by chunk
    return np.concatenate([fixtures.run(model, x[i:i + step]) for i in range(0, len(x), step)])


@pytest.mark.parametrize("name", sorted(fixtures.VALID))
def test_normalize_keeps_outputs_at_two_batch_sizes(name):
    original = fixtures.VALID[name]()
    before = original.SerializeToString()
    normal = normalize(original)
    assert original.SerializeToString() == before, "normalize must not change its argument"
    assert model_opset(normal) == INTERNAL_OPSET
    assert [o.domain for o in normal.opset_import] == [""]
    onnx.checker.check_model(normal, full_check=True)
    batch_dim = normal.graph.input[0].type.tensor_type.shape.dim[0]
    assert not batch_dim.HasField("dim_value"), "the batch axis must stay dynamic"
    for seed, batch in enumerate(_batches(original)):
        x = fixtures.random_input(original, batch, seed=seed)
        expected = _run_original(original, x)
        got = fixtures.run(normal, x)
        assert got.shape == (batch, fixtures.CLASSES)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(fixtures.VALID))
def test_normalize_keeps_bn_statistics(name):
    original = fixtures.VALID[name]()
    want = {layer.output: layer for layer in bn_layers(original)}
    got = {layer.output: layer for layer in bn_layers(normalize(original))}
    assert got.keys() == want.keys()
    for key, layer in want.items():
        np.testing.assert_array_equal(got[key].var, layer.var)
        np.testing.assert_array_equal(got[key].gamma, layer.gamma)


@pytest.mark.parametrize("name, pads_left", [("same_padding", 0), ("same_padding_nonzero", 1),
                                             ("opset19_pad_reflect", 1)])
def test_zero_pads_are_folded_into_the_conv(name, pads_left):
    normal = normalize(fixtures.VALID[name]())
    assert sum(n.op_type == "Pad" for n in normal.graph.node) == pads_left
    if not pads_left:
        conv = next(n for n in normal.graph.node if n.name == "down.conv")
        assert next(list(a.ints) for a in conv.attribute if a.name == "pads") == [0, 0, 1, 1]


def test_opset_conversion_really_happens():
    # the opset-11 fixture lists its initializers as inputs and uses opset-11 BN; opset 21 is relabelled
    for make in (fixtures.opset11, fixtures.opset21, fixtures.opset18_reduce_mean):
        assert model_opset(make()) != INTERNAL_OPSET
        normal = normalize(make())
        assert model_opset(normal) == INTERNAL_OPSET
        assert normal.ir_version <= 10
        assert [i.name for i in normal.graph.input] == ["input"]  # opset 11 listed initializers as inputs
    reduce = next(n for n in normalize(fixtures.opset18_reduce_mean()).graph.node if n.op_type == "ReduceMean")
    assert len(reduce.input) == 1 and [a.name for a in reduce.attribute if a.name == "axes"] == ["axes"]


def test_nhwc_input_is_read_through_its_transpose():
    normal = normalize(fixtures.nhwc_input())
    io = image_io(normal)
    assert io.chw == (fixtures.C_IN, fixtures.HW, fixtures.HW)
    assert io.input == "input" and io.num_classes == fixtures.CLASSES


def test_check_dynamic_batch_on_fixture():
    original = fixtures.dynamic_batch()
    assert check_dynamic_batch(original, normalize(original)) < 1e-5


def test_dynamic_hw_needs_input_size_and_works_with_it():
    original = fixtures.dynamic_hw()
    with pytest.raises(UnsupportedModelError, match="--input-size"):
        normalize(original)
    normal = normalize(original, input_hw=(8, 8))
    assert image_io(normal).chw == (3, 8, 8)
    x = fixtures.random_input(original, 3, hw=(8, 8))
    np.testing.assert_allclose(fixtures.run(normal, x), fixtures.run(original, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, words", [("custom_op", "com.example::FancyRelu"), ("two_inputs", "2 inputs"),
                                         ("int64_input", "INT64"), ("dynamic_hw", "--input-size"),
                                         ("opset20_gelu", "Gelu"),
                                         ("fixed_batch_baked_constant", "dynamic_axes"),
                                         ("dynamic_batch_as_number", "batch size takes part in the computation "
                                                                     "at node batch_mul (Mul)"),
                                         ("opset19_pad_wrap", "Pad-19")])
def test_refused_models_raise_one_line_typed_errors(name, words):
    with pytest.raises(UnsupportedModelError) as err:
        normalize(fixtures.REFUSED[name]())
    message = str(err.value)
    assert words in message and "\n" not in message
    assert ";" in message, "the message names the problem, then the fix"


def test_newer_ir_version_is_refused():
    model = fixtures.opset17()
    model.ir_version = 11
    with pytest.raises(UnsupportedModelError, match="IR version 11"):
        load_model(model)


def test_load_model_on_bad_files(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(BadInputError, match="directory"):
        load_model(tmp_path)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(BadInputError, match="empty"):
        load_model(tmp_path / "empty.onnx")


@pytest.mark.parametrize("name", sorted(fixtures.VALID))
def test_inspect_fields_on_fixtures(name):
    original = fixtures.VALID[name]()
    info = inspect_model(original)
    bn_nodes = [n for n in original.graph.node if n.op_type == "BatchNormalization"]
    assert info["opset"] == model_opset(original) and info["nodes"] == len(original.graph.node)
    assert info["inputs"] == [{"name": "input", "shape": [d.dim_value or d.dim_param for d in
                                                         original.graph.input[0].type.tensor_type.shape.dim]}]
    assert info["image"] == {"input": "input", "chw": [3, 8, 8], "output": "logits", "classes": 10}
    assert len(info["bn_layers"]) == len(bn_nodes)
    assert len(info["strided_convs"]) == 1  # the fixture's one stride-2 conv
    assert info["zero_shot_ready"] is bool(bn_nodes)
    producers = {b["name"]: b["producer_op"] for b in info["bn_layers"]}
    if name == "bn_after_add":
        assert producers["block.add_bn"] == "Add"
    if "fc1.bn" in producers:
        assert producers["fc1.bn"] == "Gemm"
    if not bn_nodes:
        assert "--calib-data" in info["reason"] and "TrainingMode.PRESERVE" in info["reason"]


# Real exported models ----------------------------------------------------------------------------

# counted in the models (BatchNormalization nodes; Conv nodes with a stride above 1)
SHARED_COUNTS = {"resnet20_cifar10": (19, 2), "resnet32_cifar10": (31, 2), "shufflenet_g3_cifar10": (49, 2)}
DEBRIS = {"Shape", "Gather", "Unsqueeze", "ConstantOfShape", "Cast", "Div"}  # exporter shape arithmetic


def test_shared_counts_are_the_models_own(shared_model_name):
    """The table below must match a direct count in the exported file (guards the table)."""
    model = shared_model(shared_model_name)
    bns = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    strided = sum(n.op_type == "Conv" and any(a.name == "strides" and max(a.ints) > 1 for a in n.attribute)
                  for n in model.graph.node)
    assert (bns, strided) == SHARED_COUNTS[shared_model_name]


def test_inspect_shared_models(shared_model_name):
    info = inspect_model(shared_model(shared_model_name))
    bns, strided = SHARED_COUNTS[shared_model_name]
    assert info["opset"] == 17 and info["zero_shot_ready"] is True and info["reason"] is None
    assert len(info["bn_layers"]) == bns and len(info["strided_convs"]) == strided
    assert info["image"] == {"input": "input", "chw": [3, 32, 32], "output": "logits", "classes": 10}
    assert info["inputs"][0]["shape"][1:] == [3, 32, 32] and isinstance(info["inputs"][0]["shape"][0], str)
    assert all(b["producer_op"] == "Conv" for b in info["bn_layers"])
    assert info["normalized_nodes"] < info["nodes"]


def test_normalize_shared_models_cleans_and_keeps_logits(shared_model_name):
    original = shared_model(shared_model_name)
    normal = normalize(original)
    ops = {n.op_type for n in normal.graph.node}
    assert not ops & DEBRIS, f"shape debris left after folding: {ops & DEBRIS}"
    x, _ = dev_images(shared_model_name, 5)
    for batch in (1, 5):
        np.testing.assert_allclose(fixtures.run(normal, x[:batch]), fixtures.run(original, x[:batch]),
                                   rtol=0, atol=1e-4)


# The embedded default model ----------------------------------------------------------------------

def test_default_model_is_small_clean_and_as_documented():
    from conftest import DEFAULT_MODEL, default_model_info

    meta = default_model_info()
    assert DEFAULT_MODEL.stat().st_size < 200_000
    model = load_model(DEFAULT_MODEL)
    info = inspect_model(DEFAULT_MODEL)
    assert info["zero_shot_ready"] and len(info["bn_layers"]) == 9 and len(info["strided_convs"]) == 4
    assert info["image"] == {"input": meta["input"], "chw": [1, *meta["size"]], "output": meta["output"],
                             "classes": 10}
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert all(a.i == 0 for n in bns for a in n.attribute if a.name == "training_mode")
    assert {"Add", "Gemm"} <= {n.op_type for n in model.graph.node}


def test_default_model_accuracy_matches_its_json():
    from conftest import DEFAULT_MODEL, default_model_info, digits_split

    split = digits_split()
    meta = default_model_info()
    logits = fixtures.run(load_model(DEFAULT_MODEL), split.x_test)
    top1 = float((logits.argmax(1) == split.y_test).mean() * 100)
    assert top1 == pytest.approx(meta["fp32_top1_test"], abs=0.01)
    assert top1 >= 95.0


def test_digits_npz_evaluates_like_the_json(tmp_path):
    from conftest import DEFAULT_MODEL, default_model_info, digits_split
    from onnxgenie.datasets import write_digits_npz
    from onnxgenie.evaluate import evaluate

    digits_split()  # skips without scikit-learn
    assert write_digits_npz(tmp_path / "digits_test.npz") == 540
    result = evaluate(DEFAULT_MODEL, tmp_path / "digits_test.npz")
    assert result["images"] == 540 and result["top1"] == default_model_info()["fp32_top1_test"]


DATA = Path(__file__).parent / "data"


def test_channel_shuffles_fold_to_static_shapes():
    """A PyTorch channel shuffle computes its Reshape targets from x.size(); one fold pass leaves the
    second shuffle's chain dynamic (its input shape is known only after the first is folded), and the
    strided conv after it had no static height/width for swing."""
    from onnxgenie.graph.swing import swing_rewrite

    original = load_model(DATA / "shuffle_strided.onnx")
    normal = normalize(original)
    assert not [n.op_type for n in normal.graph.node if n.op_type in ("Shape", "Gather", "Concat")]
    swung = swing_rewrite(normal)
    assert any(n.name.endswith("_crop") for n in swung.graph.node)
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16), dtype=np.float32)
    np.testing.assert_allclose(fixtures.run(normal, x), _run_original(original, x), rtol=1e-5, atol=1e-5)
