"""Gradients of the GENIE-M training graph against float64 NumPy references.

A tiny residual block (1×1 conv, ReLU, 1×1 conv, shortcut Add) with softbit weights and LSQ+QDrop
activations: onnxruntime-training's gradients for the weight steps s, the softbits V and the
activation steps s_a equal central finite differences of a float64 NumPy re-implementation in
which the activation rounding residuals are frozen (which is what the straight-through estimator
differentiates). LSQ alone is checked against the analytic formula.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxgenie.ortrain import GradientGraph, inference_session
from onnxgenie.quant.lsq import lsq_numpy, lsq_quantize, qdrop
from onnxgenie.quant.reconstruct.graph import INPUT_BETA, INPUT_LAMBDA, INPUT_TARGET, training_model
from onnxgenie.quant.reconstruct.train import _step
from onnxgenie.builder import GraphBuilder
from onnxgenie.quant.softbits import hard_round, init_softbits, rectified_sigmoid
from onnxgenie.quant.spec import ActQuant, QuantPlan, WeightQuant

N, C, HID, HW = 4, 3, 5, 3
BETA, LAM = 3.0, 0.05


def _block() -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(1)
    w1 = rng.normal(0, 0.5, (HID, C, 1, 1)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (C, HID, 1, 1)).astype(np.float32)
    b1, b2 = rng.normal(0, 0.1, HID).astype(np.float32), rng.normal(0, 0.1, C).astype(np.float32)
    inits = [numpy_helper.from_array(v, k) for k, v in (("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("Add", ["c2", "x"], ["out"], name="add")]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "tiny", [vi("x", TensorProto.FLOAT, ["N", C, HW, HW])],
                              [vi("out", TensorProto.FLOAT, ["N", C, HW, HW])], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    return model, {"w1": w1, "w2": w2, "b1": b1, "b2": b2}


def _plan(weights: dict) -> QuantPlan:
    plan = QuantPlan()
    for node, w in (("conv1", "w1"), ("conv2", "w2")):
        arr = weights[w].reshape(len(weights[w]), -1)
        lo, hi = np.minimum(arr.min(1), 0), np.maximum(arr.max(1), 0)
        scale = ((hi - lo) / 15).astype(np.float32)
        zp = np.round(-lo / scale).astype(np.int32)
        wint = np.clip(np.round(weights[w] / scale[:, None, None, None]) + zp[:, None, None, None], 0, 15)
        plan.weights[node] = WeightQuant(node, w, 4, symmetric=False, axis=0, scale=scale, zero_point=zp,
                                         wint=wint.astype(np.int32))
    plan.acts["x"] = ActQuant("x", 4, signed=True, consumers=["conv1", "add"], scale=0.31)
    plan.acts["r1"] = ActQuant("r1", 4, signed=False, consumers=["conv2"], scale=0.13)
    return plan


def _reference_loss(p: dict, base: dict, frozen: dict | None, data: dict, plan: QuantPlan) -> tuple[float, dict]:
    """float64 loss; ``frozen`` holds the activation rounding residuals (computed when None)."""
    residuals = {} if frozen is None else frozen

    def act(t, x, s, qrange):
        c = np.clip(x / s, *qrange)
        if t not in residuals:
            residuals[t] = np.round(c) - c
        return s * (c + residuals[t])

    def weight(node, w_name, s, v):
        wq = plan.weights[node]
        z = wq.zero_point.astype(np.float64)[:, None, None, None]
        h = np.clip(1 / (1 + np.exp(-v)) * 1.2 - 0.1, 0, 1)
        return s * (np.clip(base[node] + h + z, *wq.qrange) - z), h

    x, m0, m1 = data["x"], data["m0"], data["m1"]
    xh = x + m0 * (act("x", x, p["x/act_step"][0], plan.acts["x"].qrange) - x)
    w1, h1 = weight("conv1", "w1", p["w1/step"], p["w1/softbits"])
    c1 = np.einsum("oi,nihw->nohw", w1[:, :, 0, 0], xh) + data["b1"][None, :, None, None]
    r1 = np.maximum(c1, 0)
    rh = r1 + m1 * (act("r1", r1, p["r1/act_step"][0], plan.acts["r1"].qrange) - r1)
    w2, h2 = weight("conv2", "w2", p["w2/step"], p["w2/softbits"])
    out = np.einsum("oi,nihw->nohw", w2[:, :, 0, 0], rh) + data["b2"][None, :, None, None] + xh
    recon = ((out - data["y"]) ** 2).sum(1).mean()
    rounding = sum((1 - np.abs(2 * h - 1) ** BETA).sum() for h in (h1, h2))
    return float(recon + LAM * rounding), residuals


@pytest.fixture(scope="module")
def setup():
    model, weights = _block()
    plan = _plan(weights)
    tm, names = training_model(model, plan, "genie")
    gg = GradientGraph(tm, list(names.init), threads=1)
    rng = np.random.default_rng(2)
    data = {"x": rng.normal(0, 1, (N, C, HW, HW)), "y": rng.normal(0, 1, (N, C, HW, HW)),
            "m0": (rng.random((N, C, HW, HW)) < 0.5) * 1.0, "m1": (rng.random((N, HID, HW, HW)) < 0.5) * 1.0,
            "b1": weights["b1"].astype(np.float64), "b2": weights["b2"].astype(np.float64)}
    params = {k: v.astype(np.float32) for k, v in names.init.items()}
    for k in params:  # move V off the clip kinks of h(V) and s off the initial grid
        noise = rng.normal(0, 0.4 if k.endswith("softbits") else 0.02, params[k].shape)
        params[k] = (params[k] + (noise if k.endswith("softbits") else params[k] * noise)).astype(np.float32)
    return model, plan, tm, names, gg, data, params


def _feeds(names, data) -> list[np.ndarray]:
    f32 = {k: np.asarray(v, np.float32) for k, v in data.items()}
    masks = {"x": f32["m0"], "r1": f32["m1"]}
    return [f32["x"], f32["y"], np.array(BETA, np.float32), np.array(LAM, np.float32),
            *[masks[t] for t in names.mask_tensors]]


def test_training_graph_inputs_and_trainables(setup):
    _, _, _, names, _, _, _ = setup
    assert names.inputs[:4] == ["x", INPUT_TARGET, INPUT_BETA, INPUT_LAMBDA]
    assert sorted(names.mask_tensors) == ["r1", "x"]
    assert sorted(names.init) == ["r1/act_step", "w1/softbits", "w1/step", "w2/softbits", "w2/step", "x/act_step"]


def test_softbit_init_reproduces_weights():
    _, weights = _block()
    plan = _plan(weights)
    wq = plan.weights["conv1"]
    base, v = init_softbits(weights["w1"], wq.scale, 0)
    s = wq.scale[:, None, None, None]
    np.testing.assert_allclose(s * (base + rectified_sigmoid(v)), weights["w1"], rtol=1e-5, atol=1e-6)
    # hard rounding of the initial V is round-to-nearest
    np.testing.assert_array_equal(hard_round(base, v, wq.zero_point, 0, wq.qrange), wq.wint)


def test_gradients_match_finite_differences(setup):
    model, plan, tm, names, gg, data, params = setup
    gg.set_params(params)
    loss, _ = _step(gg, *_feeds(names, data))
    grads = gg.grads()
    base = {node: names.bases[node].astype(np.float64) for node in names.bases}
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    ref, frozen = _reference_loss(p64, base, None, data, plan)
    assert loss == pytest.approx(ref, rel=1e-4)
    eps = 1e-6
    for name, value in p64.items():
        fd = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            up, down = dict(p64), dict(p64)
            up[name], down[name] = value.copy(), value.copy()
            up[name][i] += eps
            down[name][i] -= eps
            fd[i] = (_reference_loss(up, base, frozen, data, plan)[0]
                     - _reference_loss(down, base, frozen, data, plan)[0]) / (2 * eps)
        scale = np.abs(fd).max()
        assert scale > 0, name
        np.testing.assert_allclose(grads[name], fd, atol=2e-3 * scale, rtol=2e-3, err_msg=name)


def test_adaround_keeps_weight_steps_constant():
    model, weights = _block()
    _, names = training_model(model, _plan(weights), "adaround")
    assert not names.weight_steps and sorted(names.softbits) == ["conv1", "conv2"]
    assert sorted(names.init) == ["r1/act_step", "w1/softbits", "w2/softbits", "x/act_step"]


def _lsq_model(qrange, shape) -> onnx.ModelProto:
    b = GraphBuilder()
    xq = lsq_quantize(b, "x", "s", qrange)
    loss = b.op("ReduceSum", b.op("Mul", xq, "g"), keepdims=0, out="loss")
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(b.nodes, "lsq", [vi("g", TensorProto.FLOAT, list(shape))],
                              [vi(loss, TensorProto.FLOAT, []), vi(xq, TensorProto.FLOAT, list(shape))],
                              b.inits + [numpy_helper.from_array(np.zeros(shape, np.float32), "x"),
                                         numpy_helper.from_array(np.ones(1, np.float32), "s")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("qrange", [(0, 15), (-8, 7)])
def test_lsq_gradient_is_the_lsq_formula(qrange):
    shape = (64,)
    rng = np.random.default_rng(3)
    s = np.float32(0.2)
    x = (rng.normal(0, 1.2, shape)).astype(np.float32)
    g = rng.normal(0, 1, shape).astype(np.float32)
    gg = GradientGraph(_lsq_model(qrange, shape), ["x", "s"], threads=1)
    gg.set_params({"x": x, "s": np.array([s], np.float32)})
    gg.step(g)
    grads = gg.grads()
    v = x / s
    inside = (v >= qrange[0]) & (v <= qrange[1])
    lsq = np.where(inside, np.round(v) - v, np.clip(v, *qrange))
    np.testing.assert_allclose(grads["s"][0], (g * lsq).sum(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["x"], g * inside, atol=1e-6)        # STE: 1 inside, 0 outside
    assert inside.any() and (~inside).any()


def test_lsq_forward_is_hard_rounding_and_qdrop_selects():
    b = GraphBuilder()
    xq = lsq_quantize(b, "x", "s", (0, 15))
    out = qdrop(b, "x", xq, "m")
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(b.nodes, "q", [vi("x", TensorProto.FLOAT, [50]), vi("m", TensorProto.FLOAT, [50])],
                              [vi(out, TensorProto.FLOAT, [50])],
                              b.inits + [numpy_helper.from_array(np.array([0.3], np.float32), "s")])
    sess = inference_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    rng = np.random.default_rng(4)
    x = rng.normal(1, 2, 50).astype(np.float32)
    m = (rng.random(50) < 0.5).astype(np.float32)
    got = sess.run(None, {"x": x, "m": m})[0]
    hard = lsq_numpy(x, 0.3, (0, 15))
    np.testing.assert_allclose(got, np.where(m > 0, hard, x), atol=1e-6)
    assert (m > 0).any() and (m == 0).any() and not np.allclose(hard, x)


def test_without_qdrop_the_graph_is_the_qdrop_graph_with_every_element_quantized(setup):
    """qdrop=False drops the mask inputs; its loss and gradients are those of the QDrop graph fed
    all-ones masks (every element takes its quantized value), and differ from random masks'."""
    model, plan, _, names, gg, data, params = setup
    tm, plain_names = training_model(model, plan, "genie", qdrop=False)
    assert plain_names.mask_tensors == [] and plain_names.inputs == names.inputs[:4]
    assert sorted(plain_names.init) == sorted(names.init)
    plain = GradientGraph(tm, list(plain_names.init), threads=1)
    plain.set_params(params)
    loss, _ = _step(plain, *_feeds(plain_names, data))
    grads = plain.grads()
    gg.set_params(params)
    ones = _feeds(names, {**data, "m0": np.ones_like(data["m0"]), "m1": np.ones_like(data["m1"])})
    loss_ones, _ = _step(gg, *ones)
    assert loss == pytest.approx(loss_ones, rel=1e-6)
    for name, grad in gg.grads().items():
        np.testing.assert_allclose(grads[name], grad, rtol=1e-5, atol=1e-7, err_msg=name)
    loss_random, _ = _step(gg, *_feeds(names, data))
    assert abs(loss_random - loss) > 1e-4 * abs(loss)
