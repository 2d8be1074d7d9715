"""BN statistics and folding: fold_bn keeps the logits (shared models on real images, every fixture),
folds into Conv/Gemm producers, writes the rest as Mul+Add, and reads statistics exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import fixtures
from conftest import dev_images, shared_model
from onnxgenie.errors import NoBatchNormError
from onnxgenie.graph.bn import bn_layers, fold_bn, initializers, require_bn
from onnxgenie.graph.load import normalize


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.slow  # the real CIFAR models
@pytest.mark.parametrize("fold_into_producer", [True, False])
def test_fold_bn_parity_on_shared_models(shared_model_name, fold_into_producer):
    normal = normalize(shared_model(shared_model_name))
    folded = fold_bn(normal, fold_into_producer=fold_into_producer)
    assert "BatchNormalization" not in _ops(folded)
    onnx.checker.check_model(folded)
    x, _ = dev_images(shared_model_name, 64)
    diff = np.abs(fixtures.run(folded, x) - fixtures.run(normal, x, optimize=False)).max()
    assert diff <= 1e-4, f"max |logit difference| {diff}"
    if fold_into_producer:  # every BN of these models follows a Conv: no Mul/Add left behind
        assert _ops(folded).count("Mul") == _ops(normal).count("Mul")
        assert _ops(folded).count("Conv") == _ops(normal).count("Conv")


@pytest.mark.parametrize("name", sorted(fixtures.WITH_BN))
@pytest.mark.parametrize("fold_into_producer", [True, False])
def test_fold_bn_parity_on_fixtures(name, fold_into_producer):
    normal = normalize(fixtures.WITH_BN[name]())
    folded = fold_bn(normal, fold_into_producer=fold_into_producer)
    assert "BatchNormalization" not in _ops(folded)
    x = fixtures.random_input(normal, 4) * 3  # wide inputs exercise negative-gamma channels too
    np.testing.assert_allclose(fixtures.run(folded, x), fixtures.run(normal, x, optimize=False), rtol=0, atol=1e-4)


def test_fold_bn_routes_each_bn_by_producer():
    normal = normalize(fixtures.bn_after_add())
    bns = bn_layers(normal)
    assert sorted(b.producer_op for b in bns) == ["Add", "Conv", "Conv", "Conv", "Gemm"]
    folded = fold_bn(normal)
    names = {n.name for n in folded.graph.node}
    assert {"block.add_bn_mul", "block.add_bn_add"} <= names  # BN after the residual Add → Mul+Add
    assert _ops(folded).count("Mul") == 1
    assert _ops(folded).count("Conv") == 3 and _ops(folded).count("Gemm") == 2


def test_fold_into_depthwise_conv_scales_each_output_channel():
    normal = normalize(fixtures.depthwise())
    bn = next(b for b in bn_layers(normal) if b.name == "block.bn")
    w = initializers(normal)["block.conv.weight"]
    assert w.shape[1] == 1  # group == channels
    folded = initializers(fold_bn(normal))
    a = bn.gamma / np.sqrt(bn.var + bn.eps)
    assert (a < 0).any(), "fixture should have a negative gamma here"
    np.testing.assert_allclose(folded["block.conv.weight"], w * a[:, None, None, None], rtol=1e-6)
    bias = next(v for k, v in folded.items() if k.startswith("block.conv") and v.shape == (fixtures.WIDTH,))
    np.testing.assert_allclose(bias, bn.beta - bn.mean * a, rtol=1e-5, atol=1e-6)


def test_gemm_head_fold_matches_numpy():
    normal = normalize(fixtures.gemm_head())
    bn = next(b for b in bn_layers(normal) if b.producer_op == "Gemm")
    before, after = initializers(normal), initializers(fold_bn(normal))
    a = bn.gamma / np.sqrt(bn.var + bn.eps)
    np.testing.assert_allclose(after["fc1.weight"], before["fc1.weight"] * a[:, None], rtol=1e-6)  # transB=1
    np.testing.assert_allclose(after["fc1.bias"], (before["fc1.bias"] - bn.mean) * a + bn.beta,
                               rtol=1e-5, atol=1e-6)


def test_bn_layers_reads_the_stored_statistics():
    model = fixtures.opset17()
    inits = initializers(model)
    layers = bn_layers(model)
    assert [b.name for b in layers] == ["stem.bn", "block.bn", "down.bn", "fc1.bn"]
    stem = layers[0]
    np.testing.assert_array_equal(stem.mean, inits["stem.bn.running_mean"])
    np.testing.assert_array_equal(stem.var, inits["stem.bn.running_var"])
    np.testing.assert_allclose(stem.std, np.sqrt(inits["stem.bn.running_var"] + 1e-5), rtol=1e-6)
    assert stem.channels == fixtures.WIDTH and stem.producer_op == "Conv" and stem.input == "stem.conv"


def test_require_bn_refuses_a_model_without_bn():
    with pytest.raises(NoBatchNormError, match="--calib-data"):
        require_bn(fixtures.no_bn())
    assert len(require_bn(fixtures.opset17())) == 4


def test_fold_bn_leaves_its_argument_alone():
    normal = normalize(fixtures.opset17())
    before = normal.SerializeToString()
    fold_bn(normal)
    fold_bn(normal, fold_into_producer=False)
    assert normal.SerializeToString() == before


def test_fold_bn_parity_on_default_model():
    from conftest import DEFAULT_MODEL, digits_split

    normal = normalize(onnx.load(str(DEFAULT_MODEL)))
    x = digits_split().x_test[:128]
    for fold_into_producer in (True, False):
        folded = fold_bn(normal, fold_into_producer=fold_into_producer)
        assert "BatchNormalization" not in _ops(folded)
        np.testing.assert_allclose(fixtures.run(folded, x), fixtures.run(normal, x, optimize=False), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["gemm_head", "bn_after_add", "opset11"])
def test_fold_bn_on_models_without_inferred_shapes(name):
    """Straight from the exporter (no value_info): Mul+Add constants still get the right rank
    ([1, C] after a Gemm, [1, C, 1, 1] after a Conv)."""
    raw = fixtures.WITH_BN[name]()
    x = fixtures.random_input(raw, 3)
    for fold_into_producer in (True, False):
        folded = fold_bn(raw, fold_into_producer=fold_into_producer)
        np.testing.assert_allclose(fixtures.run(folded, x), fixtures.run(raw, x, optimize=False), rtol=0, atol=1e-5)
