"""--auto-high-bits: layer sensitivity from the calibration images (quant.sensitivity) and its use
in the pipeline and CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import fixtures
from conftest import shared_model, train_images
from onnxgenie.cli import main
from onnxgenie.graph.bn import fold_bn
from onnxgenie.graph.load import normalize
from onnxgenie.quant.fakequant import fakequant_model
from onnxgenie.quant.init import init_activations, init_weights
from onnxgenie.quant.plan import build_plan, quantized_layers
from onnxgenie.quant.sensitivity import candidates, choose, high_bits_gains, kl_divergence
from onnxgenie.runtime import predict


def _plan(folded, x, high_bits=()):
    plan = build_plan(folded, 4, 4, high_bits=high_bits)
    init_weights(folded, plan)
    init_activations(folded, plan, x)
    return plan


def test_kl_divergence_is_zero_for_equal_logits_and_positive_otherwise():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 10)).astype(np.float32)
    assert abs(kl_divergence(a, a)) < 1e-9
    assert abs(kl_divergence(a, a + 3.0)) < 1e-9   # softmax is shift-invariant
    p = np.exp(a - a.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    b = a + rng.standard_normal(a.shape).astype(np.float32)
    q = np.exp(b - b.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    assert np.isclose(kl_divergence(a, b), np.mean(np.sum(p * np.log(p / q), axis=1)), rtol=1e-5)


def test_gain_equals_that_of_a_plan_built_with_the_node_high():
    model = fixtures.conv_bn_net()
    x = fixtures.random_input(model, 32)
    folded = fold_bn(normalize(model))
    layers = [n.name for n in quantized_layers(folded)]
    low, high = _plan(folded, x), _plan(folded, x, layers)
    nodes = candidates(low, high)
    assert nodes == layers[1:-1]   # the first and last layer are 8-bit already
    gains, base = high_bits_gains(folded, low, high, x)
    reference = predict(folded, x)
    assert np.isclose(base, kl_divergence(reference, predict(fakequant_model(folded, low), x)), rtol=1e-6)
    for node in nodes:
        alone = _plan(folded, x, (node,))
        expected = base - kl_divergence(reference, predict(fakequant_model(folded, alone), x))
        assert np.isclose(gains[node], expected, rtol=1e-5, atol=1e-9), node


def test_choose_takes_the_largest_positive_gains():
    gains = {"a": 0.1, "b": -0.2, "c": 0.3, "d": 0.0, "e": 0.2}
    assert choose(gains, 2) == ["c", "e"]
    assert choose(gains, 10) == ["c", "e", "a"] and choose(gains, 0) == []


@pytest.mark.slow  # a real ResNet-20 quantized per choice
def test_most_sensitive_layers_beat_the_least_sensitive_on_resnet20():
    """ResNet-20 W4A4 at its starting point, real calibration images: the two layers with the largest
    gains, together at 8 bits, bring the model closer to FP32 than the two with the smallest (which,
    at round-to-nearest, can even move it away)."""
    model = shared_model("resnet20_cifar10")
    x, _ = train_images("resnet20_cifar10", 64)
    folded = fold_bn(normalize(model))
    layers = [n.name for n in quantized_layers(folded)]
    gains, base = high_bits_gains(folded, _plan(folded, x), _plan(folded, x, layers), x)
    order = sorted(gains, key=lambda n: -gains[n])
    reference = predict(folded, x)

    def kl(high):
        return kl_divergence(reference, predict(fakequant_model(folded, _plan(folded, x, high)), x))

    top, bottom = kl(choose(gains, 2)), kl(order[-2:])
    assert choose(gains, 2) == order[:2] and top < min(bottom, base), (top, bottom, base)


def test_quantize_auto_high_bits_cli(tmp_path, capsys):
    model = fixtures.conv_bn_net()
    src = fixtures.save(model, tmp_path)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code = main(["quantize", str(src), "-o", str(out), "--no-reconstruct", "--calib", "noise", "--calib-images", "64",
                 "--auto-high-bits", "1", "--report", str(report), "-q"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads(report.read_text())
    (chosen,) = rep["high_bits"]["chosen"]
    assert rep["high_bits"]["kl_after"] < rep["high_bits"]["kl_before"]
    q = onnx.load(str(out))
    node = next(n for n in q.graph.node if n.name == chosen)
    dequant = next(n for n in q.graph.node if n.output[0] == node.input[1])
    stored = {t.name: t.data_type for t in q.graph.initializer}[dequant.input[0]]
    assert stored == onnx.TensorProto.UINT8   # 8-bit weights; the other middle layers stay 4-bit
    code = main(["quantize", str(src), "-o", str(tmp_path / "bad.onnx"), "--no-reconstruct", "--calib", "noise",
                 "--auto-high-bits", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--auto-high-bits" in err[0] and not (tmp_path / "bad.onnx").exists()
