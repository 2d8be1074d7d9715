"""Swing convolution rewrite: exact at offsets (1, 1), equal to NumPy reflect-pad + crop + conv elsewhere."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import conv_bn_net, random_input
from onnxgenie.graph.load import normalize
from onnxgenie.graph.swing import SWING_INPUTS, swing_feed, swing_rewrite
from onnxgenie.ortrain import GradientGraph, inference_session


def reflect_index(size: int) -> np.ndarray:
    """Indices of reflect_pad(range(size), 1): [1, 0, 1, ..., size-1, size-2]."""
    return np.concatenate([[1], np.arange(size), [size - 2]]).astype(np.int64)


def _run(model: onnx.ModelProto, x: np.ndarray, offsets=None) -> np.ndarray:
    sess = inference_session(model, threads=1)
    feeds = {sess.get_inputs()[0].name: x}
    if offsets is not None:
        feeds.update(swing_feed(*offsets))
    return sess.run(None, feeds)[0]


def _strided_conv_model(hw: tuple[int, int], stride: int, kernel: int,
                        seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3, kernel, kernel)).astype(np.float32)
    pad = kernel // 2
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", strides=[stride, stride],
                            pads=[pad] * 4, kernel_shape=[kernel, kernel])
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, *hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model), w


def _numpy_conv(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    ho, wo = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i, j in itertools.product(range(ho), range(wo)):
        patch = x[:, :, i * stride:i * stride + k, j * stride:j * stride + k]
        out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w)
    return out


def test_reflect_index_matches_numpy_reflect_pad():
    for size in (2, 3, 7, 8):
        assert np.array_equal(reflect_index(size), np.pad(np.arange(size), 1, mode="reflect"))


def test_offsets_one_one_reproduce_the_original_exactly():
    model = normalize(conv_bn_net())
    swung = swing_rewrite(model)
    assert [i.name for i in swung.graph.input][-2:] == list(SWING_INPUTS)
    x = random_input(model, 3)
    assert np.array_equal(_run(swung, x, (1, 1)), _run(model, x))
    assert not np.array_equal(_run(swung, x, (0, 2)), _run(model, x))


def test_only_strided_convs_are_rewritten():
    model = normalize(conv_bn_net())
    swung = swing_rewrite(model)
    strided = [n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith("down")]
    assert len(strided) == 1
    crops = [n for n in swung.graph.node if n.output[0].endswith("_crop")]
    assert len(crops) == 1 and crops[0].op_type == "Reshape"   # the Slice's output, its shape pinned
    conv = next(n for n in swung.graph.node if n.name == strided[0].name)
    assert conv.input[0] == crops[0].output[0]
    other = [n for n in swung.graph.node if n.op_type == "Conv" and n.name != conv.name]
    assert all(not n.input[0].startswith("swing") for n in other)


@pytest.mark.parametrize("hw,stride,kernel", [((8, 8), 2, 3), ((7, 9), 2, 3), ((8, 6), 2, 1), ((9, 9), 3, 3)])
def test_every_offset_equals_numpy_reflect_pad_crop_conv(hw, stride, kernel):
    model, w = _strided_conv_model(hw, stride, kernel)
    swung = swing_rewrite(model)
    x = np.random.default_rng(1).standard_normal((2, 3, *hw)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    for oh, ow in itertools.product(range(3), range(3)):
        shifted = padded[:, :, oh:oh + hw[0], ow:ow + hw[1]]
        want = _numpy_conv(shifted, w, stride, kernel // 2)
        np.testing.assert_allclose(_run(swung, x, (oh, ow)), want, rtol=1e-5, atol=1e-4)


def test_swing_graph_has_input_gradients():
    """The rewrite is differentiable (Pad in reflect mode would not be): d sum(y)/dx through Gather+Slice."""
    model, w = _strided_conv_model((6, 6), 2, 3)
    x = np.random.default_rng(2).standard_normal((2, 3, 6, 6)).astype(np.float32)
    swung = swing_rewrite(model)
    swung.graph.initializer.append(numpy_helper.from_array(x, "x"))
    del swung.graph.input[0]
    swung.graph.node.append(helper.make_node("ReduceSum", ["y"], ["loss"], keepdims=0))
    del swung.graph.output[:]
    swung.graph.output.append(helper.make_tensor_value_info("loss", TensorProto.FLOAT, []))
    gg = GradientGraph(swung, ["x"])
    offsets = swing_feed(0, 2)
    gg.step(offsets[SWING_INPUTS[0]], offsets[SWING_INPUTS[1]])
    # NumPy: sum(conv(crop(pad(x)))) is linear in x; its gradient is the adjoint of crop∘pad applied
    # to the gradient w.r.t. the shifted input, which is the conv's input gradient of sum(y).
    ones = np.ones((2, 4, 3, 3))
    xp = np.zeros((2, 3, 8, 8))
    for i, j in itertools.product(range(3), range(3)):
        xp[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3] += np.einsum("no,ochw->nchw", ones[:, :, i, j], w)
    grad_shifted = xp[:, :, 1:7, 1:7]
    idx_h, idx_w = reflect_index(6)[0:6], reflect_index(6)[2:8]
    want = np.zeros((2, 3, 6, 6))
    for a, src_h in enumerate(idx_h):
        for b, src_w in enumerate(idx_w):
            want[:, :, src_h, src_w] += grad_shifted[:, :, a, b]
    np.testing.assert_allclose(gg.grads()["x"], want, rtol=1e-5, atol=1e-4)


def _loss_of_x(model: onnx.ModelProto, x: np.ndarray, tail: list[onnx.NodeProto]) -> onnx.ModelProto:
    """``model`` with input x as an initializer and ``tail`` ending in a scalar ``loss``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.initializer.append(numpy_helper.from_array(x, "x"))
    del out.graph.input[0]
    out.graph.node.extend(tail)
    del out.graph.output[:]
    out.graph.output.append(helper.make_tensor_value_info("loss", TensorProto.FLOAT, []))
    return out


def test_strided_conv_then_maxpool_has_the_original_gradient_at_the_centre_offset():
    """A MaxPool after a swung strided conv: its gradient came back empty (shape unknown after the
    crop) and the Relu's gradient failed; at offsets (1, 1) the gradient must equal the original's."""
    model, _ = _strided_conv_model((8, 8), 2, 3)
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    tail = [helper.make_node("Relu", ["y"], ["r"]),
            helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Mul", ["p", "p"], ["p2"]),
            helper.make_node("ReduceSum", ["p2"], ["loss"], keepdims=0)]
    plain = GradientGraph(_loss_of_x(model, x, tail), ["x"])
    plain.step()
    swung = GradientGraph(_loss_of_x(swing_rewrite(model), x, tail), ["x"])
    offsets = swing_feed(1, 1)
    swung.step(offsets[SWING_INPUTS[0]], offsets[SWING_INPUTS[1]])
    want = plain.grads()["x"]
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(swung.grads()["x"], want, rtol=1e-5, atol=1e-6)


def test_a_strided_conv_without_static_size_is_refused_in_one_line():
    from onnxgenie.errors import UnsupportedModelError

    model = conv_bn_net()
    strided = next(n for n in model.graph.node if n.op_type == "Conv" and
                   any(a.name == "strides" and max(a.ints) > 1 for a in n.attribute))
    image = model.graph.input[0].type.tensor_type.shape
    image.dim[2].dim_param, image.dim[3].dim_param = "H", "W"
    with pytest.raises(UnsupportedModelError, match=f"strided conv .*{strided.input[0]}.*--no-swing"):
        swing_rewrite(model)
