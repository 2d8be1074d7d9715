"""onnxruntime-training glue: gradients against float64 finite differences of a NumPy reference,
and the NumPy Adam against torch's Adam formula."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxgenie.optim import Adam, ParamGroup
from onnxgenie.ortrain import GradientGraph

STRIDE = 2


def _conv_loss_model(w: np.ndarray, b: np.ndarray, x_shape, t_shape):
    """loss = mean((tanh(conv(x, W, b)) - target)^2); second output: the conv output."""
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[STRIDE, STRIDE]),
        helper.make_node("Tanh", ["y"], ["t"]),
        helper.make_node("Sub", ["t", "target"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["loss"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "conv_loss",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
         helper.make_tensor_value_info("target", TensorProto.FLOAT, t_shape)],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, t_shape)],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _conv_np(x, w, b):
    """Direct float64 convolution, pad 1, stride STRIDE."""
    n, _, h, wd = x.shape
    cout, cin, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ho, wo = (h + 2 - k) // STRIDE + 1, (wd + 2 - k) // STRIDE + 1
    out = np.zeros((n, cout, ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * STRIDE:i * STRIDE + k, j * STRIDE:j * STRIDE + k]
            out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w)
    return out + b[None, :, None, None]


def _loss_np(x, w, b, target):
    return float(np.mean((np.tanh(_conv_np(x, w, b)) - target) ** 2))


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    w = (rng.standard_normal((3, 2, 3, 3)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(3) * 0.1).astype(np.float32)
    target = rng.uniform(-0.5, 0.5, (2, 3, 3, 3)).astype(np.float32)
    gg = GradientGraph(_conv_loss_model(w, b, x.shape, target.shape), ["W", "b"], threads=1)
    return gg, x, w, b, target


def test_gradients_match_central_differences(problem):
    gg, x, w, b, target = problem
    gg.set_params({"W": w, "b": b})
    loss, y = gg.step(x, target)
    x64, w64, b64, t64 = (a.astype(np.float64) for a in (x, w, b, target))
    assert loss == pytest.approx(_loss_np(x64, w64, b64, t64), rel=1e-5)
    np.testing.assert_allclose(y, _conv_np(x64, w64, b64), rtol=1e-5, atol=1e-5)
    grads, h = gg.grads(), 1e-6
    for name, value in (("W", w64), ("b", b64)):
        fd = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            plus, minus = value.copy(), value.copy()
            plus[idx] += h
            minus[idx] -= h
            args = {"W": w64, "b": b64, name: plus}
            lp = _loss_np(x64, args["W"], args["b"], t64)
            args[name] = minus
            fd[idx] = (lp - _loss_np(x64, args["W"], args["b"], t64)) / (2 * h)
        assert grads[name].shape == value.shape
        np.testing.assert_allclose(grads[name], fd, rtol=1e-3, atol=1e-6)
        assert np.abs(fd).max() > 1e-3  # the check is not vacuous


def test_set_params_evaluate_and_a_few_adam_steps(problem):
    gg, x, w, b, target = problem
    gg.set_params({"W": w, "b": b})
    start = gg.evaluate(x, target)[0]
    np.testing.assert_array_equal(gg.params()["W"], w)
    assert gg.evaluate(x, target)[0] == start  # evaluate changes nothing
    gg.set_params({"b": b + 1.0})
    assert gg.evaluate(x, target)[0] != pytest.approx(start)
    gg.set_params({"b": b})
    adam = Adam([ParamGroup(["W"], 0.05), ParamGroup(["b"], 0.05)])
    for _ in range(20):
        gg.step(x, target)
        gg.set_params(adam.step(gg.params(), gg.grads()))
    assert gg.evaluate(x, target)[0] < 0.5 * start


def test_profile_records_every_step_by_op(problem):
    _, x, w, b, target = problem
    gg = GradientGraph(_conv_loss_model(w, b, x.shape, target.shape), ["W", "b"], threads=1, profile=True)
    for _ in range(3):
        gg.step(x, target)
    events = gg.end_profiling()
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    ops = {e["args"]["op_name"] for e in kernels}
    assert {"Conv", "ConvGrad", "Tanh"} <= ops
    assert sum(e["args"]["op_name"] == "Conv" for e in kernels) == 3   # one forward conv per step


def test_trainable_names_must_be_initializers(problem):
    _, x, w, b, target = problem
    with pytest.raises(ValueError, match="not initializers"):
        GradientGraph(_conv_loss_model(w, b, x.shape, target.shape), ["W", "nope"])


def _torch_adam(params, grads_fn, lrs, steps, betas=(0.9, 0.999), eps=1e-8, lr_at=None):
    """torch.optim.Adam's update written as in its single-tensor implementation."""
    state = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    params = {k: v.copy() for k, v in params.items()}
    for step in range(1, steps + 1):
        grads = grads_fn(params)
        for k in params:
            lr = lr_at(k, step) if lr_at else lrs[k]
            exp_avg, exp_avg_sq = state[k]
            exp_avg = exp_avg * betas[0] + grads[k] * (1 - betas[0])        # exp_avg.lerp_(grad, 1-beta1)
            exp_avg_sq = exp_avg_sq * betas[1] + grads[k] * grads[k] * (1 - betas[1])
            state[k] = (exp_avg, exp_avg_sq)
            bias_correction1 = 1 - betas[0] ** step
            bias_correction2 = 1 - betas[1] ** step
            step_size = lr / bias_correction1
            denom = np.sqrt(exp_avg_sq) / np.sqrt(bias_correction2) + eps
            params[k] = params[k] - step_size * exp_avg / denom             # addcdiv_(exp_avg, denom, -step_size)
    return params


def _quadratic():
    rng = np.random.default_rng(1)
    curvature = {"a": rng.uniform(0.5, 4, (4, 3)), "z": rng.uniform(0.5, 4, 5)}
    centre = {"a": rng.standard_normal((4, 3)), "z": rng.standard_normal(5)}
    start = {"a": rng.standard_normal((4, 3)), "z": rng.standard_normal(5)}
    return start, lambda p: {k: curvature[k] * (p[k] - centre[k]) for k in p}, centre


def test_adam_matches_torch_formula_with_two_groups():
    start, grad, centre = _quadratic()
    lrs = {"a": 0.1, "z": 0.01}
    adam = Adam([ParamGroup(["a"], lrs["a"]), ParamGroup(["z"], lrs["z"])])
    params = {k: v.copy() for k, v in start.items()}
    for _ in range(50):
        params = adam.step(params, grad(params))
    expected = _torch_adam(start, grad, lrs, 50)
    for k in params:
        np.testing.assert_allclose(params[k], expected[k], rtol=1e-12, atol=1e-12)
    # the two groups really moved at their own rates: the small-lr group is further from its optimum
    assert np.abs(params["a"] - centre["a"]).mean() < np.abs(params["z"] - centre["z"]).mean()


def test_adam_lr_schedule_and_state_round_trip():
    start, grad, _ = _quadratic()
    groups = [ParamGroup(["a"], 0.1), ParamGroup(["z"], 0.05)]
    adam = Adam(groups)
    schedule = lambda k, step: (0.1 if k == "a" else 0.05) * (1 - (step - 1) / 40)  # noqa: E731 linear decay
    params = {k: v.copy() for k, v in start.items()}
    for step in range(1, 21):
        groups[0].lr, groups[1].lr = schedule("a", step), schedule("z", step)
        params = adam.step(params, grad(params))
    saved = adam.state_dict()
    resumed = Adam([ParamGroup(["a"], 0.0), ParamGroup(["z"], 0.0)])
    resumed.load_state_dict(saved)
    assert [g.lr for g in resumed.groups] == [g.lr for g in groups]
    for step in range(21, 31):
        for opt in (adam, resumed):
            opt.groups[0].lr, opt.groups[1].lr = schedule("a", step), schedule("z", step)
        new = adam.step(params, grad(params))
        again = resumed.step(params, grad(params))
        for k in new:
            np.testing.assert_array_equal(new[k], again[k])
        params = new
    expected = _torch_adam(start, grad, None, 30, lr_at=schedule)
    for k in params:
        np.testing.assert_allclose(params[k], expected[k], rtol=1e-12, atol=1e-12)


def test_default_model_training_script_smoke():
    """One epoch of tools/train_default_model.py: training runs on ORT, the exported eval model with
    real BatchNormalization nodes reproduces the batch-statistics pass it was calibrated on."""
    import sys
    from pathlib import Path

    pytest.importorskip("sklearn", reason="scikit-learn not installed: pip install -e '.[test]'")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        import train_default_model
    finally:
        sys.path.pop(0)
    model, report = train_default_model.train(epochs=1, log=lambda *_: None)
    assert report["eval_vs_batch_stats_max_abs"] < 1e-4
    assert report["bn_layers"] == 9 and report["test_top1"] > 30  # 10 classes: chance is 10 %
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 9
    again, _ = train_default_model.train(epochs=1, log=lambda *_: None)
    assert again.SerializeToString() == model.SerializeToString(), "training must be deterministic"
