"""The graph forms onnxruntime-training 1.19 can differentiate (``onnxgenie.engine_forms``): each rewrite
gives the same values as the op it replaces and gradients that match finite differences, and the
original form fails where the rewrite exists for that."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import fixtures
from onnxgenie.engine_forms import shared_concat_inputs, trainable_form
from onnxgenie.graph.bn import fold_bn
from onnxgenie.graph.load import normalize
from onnxgenie.ortrain import GradientGraph, inference_session


def _with_square_loss(model):
    """Append loss = mean(logits^2) as the first output."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    logits = out.graph.output[0].name
    out.graph.node.extend([helper.make_node("Mul", [logits, logits], ["sq"]),
                           helper.make_node("ReduceMean", ["sq"], ["loss"], keepdims=0)])
    out.graph.output.insert(0, helper.make_tensor_value_info("loss", TensorProto.FLOAT, []))
    return out


def test_frozen_bn_must_be_mul_add_inside_training_graphs():
    """ORT trains every BatchNormalization with batch statistics (the trap in the notes); its
    Mul+Add form from fold_bn(fold_into_producer=False) gives the inference-mode loss."""
    normal = normalize(fixtures.opset17())
    x = fixtures.random_input(normal, 4)
    reference = float(inference_session(_with_square_loss(normal)).run(None, {"input": x})[0])
    affine = GradientGraph(_with_square_loss(fold_bn(normal, fold_into_producer=False)), ["fc.bias"])
    assert affine.step(x)[0] == pytest.approx(reference, rel=1e-5)
    assert affine.evaluate(x)[0] == pytest.approx(reference, rel=1e-5)
    kept = GradientGraph(_with_square_loss(normal), ["fc.bias"])
    assert kept.step(x)[0] != pytest.approx(reference, rel=1e-2)


# Activations without a gradient in onnxruntime-training, rewritten (trainable_form) -----------------

def _activation_loss_model(op: str, attrs: dict, x: np.ndarray, opset: int) -> onnx.ModelProto:
    """loss = sum(w * op(x)) with x trainable (w fixed random weights, so every element matters)."""
    inits = [numpy_helper.from_array(x, "x"),
             numpy_helper.from_array(np.random.default_rng(1).standard_normal(x.shape).astype(np.float32), "w")]
    inputs = ["x"]
    if op == "PRelu":
        inits.append(numpy_helper.from_array(np.array([0.25, -0.1, 0.5], np.float32).reshape(3, 1, 1), "slope"))
        inputs.append("slope")
    nodes = [helper.make_node(op, inputs, ["y"], name="act", **attrs),
             helper.make_node("Mul", ["y", "w"], ["wy"]),
             helper.make_node("ReduceSum", ["wy"], ["loss"], keepdims=0)]
    graph = helper.make_graph(nodes, "act", [], [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("op,attrs", [("HardSigmoid", {"alpha": 0.25, "beta": 0.4}), ("HardSwish", {}),
                                      ("PRelu", {}), ("Elu", {"alpha": 0.7}), ("Selu", {}), ("Celu", {"alpha": 2.0}),
                                      ("Softplus", {}), ("Softsign", {}), ("ThresholdedRelu", {"alpha": 0.5}),
                                      ("Mish", {})])
def test_activations_without_gradient_are_rewritten_with_the_same_values_and_gradient(op, attrs):
    opset = 18 if op == "Mish" else 17
    x = (np.random.default_rng(0).standard_normal((2, 3, 4, 4)) * 3).astype(np.float32)
    x[0, 0, 0, :3] = [30.0, -30.0, 0.5]   # far tails (Softplus must not overflow)
    if op == "ThresholdedRelu":   # a jump at alpha: keep finite differences off it
        x = np.where(np.abs(x - attrs["alpha"]) < 0.05, x + 0.1, x).astype(np.float32)
    model = _activation_loss_model(op, attrs, x, opset)
    with pytest.raises(Exception):   # the reason for the rewrite
        GradientGraph(model, ["x"])
    rewritten = copy.deepcopy(model)
    trainable_form(rewritten)
    assert op not in {n.op_type for n in rewritten.graph.node}
    want = float(inference_session(model).run(None, {})[0])
    assert float(inference_session(rewritten).run(None, {})[0]) == pytest.approx(want, rel=1e-5, abs=1e-4)
    gg = GradientGraph(rewritten, ["x"])
    assert gg.step()[0] == pytest.approx(want, rel=1e-5, abs=1e-4)
    grad = gg.grads()["x"]

    def loss_at(values: np.ndarray) -> np.ndarray:   # per-element losses of the original op, float64 steps
        out = []
        for v in values:
            probe = copy.deepcopy(model)
            probe.graph.initializer[0].CopyFrom(numpy_helper.from_array(v.astype(np.float32), "x"))
            out.append(float(inference_session(probe).run(None, {})[0]))
        return np.array(out)

    h = 1e-2
    rng = np.random.default_rng(2)
    for _ in range(3):   # directional derivatives
        d = rng.standard_normal(x.shape).astype(np.float32)
        d /= np.linalg.norm(d)
        plus, minus = loss_at([x + h * d, x - h * d])
        assert (plus - minus) / (2 * h) == pytest.approx(float((grad * d).sum()), rel=2e-2, abs=2e-2)


def _dense_block(rng):
    """DenseNet's pattern: the input read by three Concats (one of them alone), 1x1 convs between."""
    def weight(name, out, inp):
        return numpy_helper.from_array(rng.standard_normal((out, inp, 1, 1)).astype(np.float32) * 0.1, name)

    nodes = [helper.make_node("Concat", ["x"], ["c1"], axis=1, name="c1"),
             helper.make_node("Conv", ["c1", "w1"], ["h1"], name="conv1"),
             helper.make_node("Concat", ["x", "h1"], ["c2"], axis=1, name="c2"),
             helper.make_node("Conv", ["c2", "w2"], ["h2"], name="conv2"),
             helper.make_node("Concat", ["x", "h1", "h2"], ["out"], axis=1, name="out"),
             helper.make_node("Mul", ["out", "out"], ["sq"], name="sq"),
             helper.make_node("ReduceMean", ["sq"], ["loss"], keepdims=0, name="loss")]
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
                              [weight("w1", 2, 4), weight("w2", 2, 6)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _dense_loss_np(x, w1, w2):
    conv = lambda a, w: np.einsum("nchw,oc->nohw", a, w[:, :, 0, 0])  # noqa: E731
    h1 = conv(x, w1)
    h2 = conv(np.concatenate([x, h1], 1), w2)
    return float(np.mean(np.concatenate([x, h1, h2], 1) ** 2))


def test_tensor_read_by_several_concats_gets_correct_gradients():
    """onnxruntime-training 1.19 defines two gradients for a tensor that several Concats read when
    the tensor needs none itself (DenseNet's dense blocks), and rejects its own graph: a scalar 1
    in front of it (``anchor_shared_concat_inputs``) makes the gradients build, and they are right."""
    rng = np.random.default_rng(0)
    model = onnx.shape_inference.infer_shapes(_dense_block(rng))
    assert shared_concat_inputs(model, ["w1", "w2"]) == {"x"}   # h1, read by two Concats too, has a gradient
    before = model.SerializeToString()
    gg = GradientGraph(model, ["w1", "w2"])
    assert model.SerializeToString() == before          # the caller's model is not changed
    assert set(gg.grads()) == {"w1", "w2"} and set(gg.params()) == {"w1", "w2"}
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    loss, = gg.step(x)
    w = {n: v.astype(np.float64) for n, v in gg.params().items()}
    assert loss == pytest.approx(_dense_loss_np(x.astype(np.float64), w["w1"], w["w2"]), rel=1e-5)
    h = 1e-4
    for name, grad in gg.grads().items():
        for idx in [(0, 0, 0, 0), (1, 3, 0, 0), (0, 5, 0, 0) if name == "w2" else (1, 1, 0, 0)]:
            plus, minus = dict(w), dict(w)
            plus[name] = w[name].copy(); plus[name][idx] += h
            minus[name] = w[name].copy(); minus[name][idx] -= h
            numeric = (_dense_loss_np(x, plus["w1"], plus["w2"]) - _dense_loss_np(x, minus["w1"], minus["w2"])) / (2 * h)
            assert grad[idx] == pytest.approx(numeric, rel=1e-3, abs=1e-6)


def test_layer_normalization_gets_correct_gradients_after_trainable_form():
    """Exporters write LayerNormalization with its output Y only; onnxruntime-training's gradient
    reads the optional Mean / InvStdDev outputs and asserted (ConvNeXt's blocks). ``trainable_form``
    adds them; the gradients match finite differences of a float64 NumPy layer norm."""

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 8)).astype(np.float32)
    gamma = (1 + 0.1 * rng.standard_normal(8)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5),
             helper.make_node("Mul", ["y", "y"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["loss"], keepdims=0)]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
                              [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(gamma, "gamma"),
                               numpy_helper.from_array(beta, "beta")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    rewritten = copy.deepcopy(model)
    trainable_form(rewritten)
    gg = GradientGraph(rewritten, ["w", "gamma"])
    x = rng.standard_normal((4, 6)).astype(np.float32)

    def loss_np(w_, g_):
        h = x.astype(np.float64) @ w_
        y = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * g_ + beta
        return float(np.mean(y ** 2))

    ref = {"w": w.astype(np.float64), "gamma": gamma.astype(np.float64)}
    assert gg.step(x)[0] == pytest.approx(loss_np(ref["w"], ref["gamma"]), rel=1e-5)
    grads, h = gg.grads(), 1e-5
    for name, idx in [("w", (0, 0)), ("w", (5, 7)), ("w", (2, 3)), ("gamma", (1,)), ("gamma", (6,))]:
        plus, minus = {k: v.copy() for k, v in ref.items()}, {k: v.copy() for k, v in ref.items()}
        plus[name][idx] += h
        minus[name][idx] -= h
        numeric = (loss_np(plus["w"], plus["gamma"]) - loss_np(minus["w"], minus["gamma"])) / (2 * h)
        assert grads[name][idx] == pytest.approx(numeric, rel=1e-3, abs=1e-6)


def _scaled_avgpool_model(batch, pool_attrs: dict):
    """loss = sum(AveragePool(x * s) + Conv1x1(x * s)): x * s read by a pool and a conv, as in ShuffleNet's
    stride-2 units (whose block input GENIE-M quantizes at W8A8)."""
    nodes = [helper.make_node("Mul", ["x", "s"], ["xs"]),
             helper.make_node("AveragePool", ["xs"], ["p"], **pool_attrs),
             helper.make_node("Conv", ["xs", "w"], ["c"], strides=pool_attrs["strides"]),
             helper.make_node("Add", ["p", "c"], ["pc"]),
             helper.make_node("ReduceSum", ["pc"], ["loss"], keepdims=0)]
    inits = [numpy_helper.from_array(np.array([1.5], np.float32), "s"),
             numpy_helper.from_array(np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4, 1, 1), "w")]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 8, 8])],
                              [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("pool_attrs", [dict(kernel_shape=[2, 2], strides=[2, 2]),
                                        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                             count_include_pad=1)])
def test_average_pool_gets_its_gradient_with_a_symbolic_batch(pool_attrs):
    """onnxruntime-training 1.19's AveragePoolGrad fails on a symbolic batch axis (ShuffleNet W8A8 crashed
    in GENIE-M with it); trainable_form writes the pool as a depthwise Conv, same values and gradient."""

    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    symbolic = _scaled_avgpool_model("N", pool_attrs)
    with pytest.raises(Exception, match="broadcast"):
        GradientGraph(symbolic, ["s"]).step(x)
    static = GradientGraph(_scaled_avgpool_model(2, pool_attrs), ["s"])   # the native kernel works here
    loss_ref, = static.step(x)
    grad_ref = static.grads()["s"]
    trainable_form(symbolic)
    assert "AveragePool" not in {n.op_type for n in symbolic.graph.node}
    rewritten = GradientGraph(symbolic, ["s"])
    assert rewritten.step(x)[0] == pytest.approx(loss_ref, rel=1e-5)
    np.testing.assert_allclose(rewritten.grads()["s"], grad_ref, rtol=1e-5)
    plain = ort.InferenceSession(_scaled_avgpool_model("N", pool_attrs).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    assert plain.run(None, {"x": x})[0] == pytest.approx(loss_ref, rel=1e-5)


def test_average_pool_that_no_conv_matches_is_left_alone():

    model = _scaled_avgpool_model("N", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    trainable_form(model)   # count_include_pad=0 with pads: the border averages fewer values than a conv
    assert "AveragePool" in {n.op_type for n in model.graph.node}
