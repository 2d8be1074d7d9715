"""Swing convolution (GENIE-D, Sec. 3.1) as a graph rewrite.

Every Conv with a stride > 1 reads ``crop(reflect_pad(x, 1), offset)`` instead of ``x``: the input
is shifted by up to one pixel in each direction, so a strided conv sees every input position over
the course of distillation instead of the same sub-grid each step. Pad has no gradient in reflect
mode in onnxruntime-training, so the reflection is a Concat of the mirrored border rows/columns
(Slice) around x, first along H then along W; the crop is a Slice whose starts are the two graph
inputs ``SWING_INPUTS`` (int64 [1], each in {0, 1, 2}). Offsets (1, 1) give back the original model
exactly. (Gather with a reflected index vector computes the same thing, but its gradient, a
scatter-add, took 21 % of a ResNet-20 distillation step; Concat's is a Split.)

All rewritten convs share the two offsets (the reference draws them per layer). Strided pooling and
strided Slice are left alone, as in the reference, which swings only Conv modules.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from ..errors import UnsupportedModelError

SWING_INPUTS = ("swing_offset_h", "swing_offset_w")


def _strided(node: onnx.NodeProto) -> bool:
    strides = next((list(a.ints) for a in node.attribute if a.name == "strides"), [])
    return node.op_type == "Conv" and any(s > 1 for s in strides)


def _reflect_pad(nodes: list, inits: list, x: str, name: str, axis: int, size: int) -> str:
    """Concat(x[1], x, x[size-2]) along ``axis``: reflection padding by one, with a gradient."""
    def border(index: int, part: str) -> str:
        consts = {f"{name}_{part}_{k}": np.array([v], np.int64)
                  for k, v in (("start", index), ("end", index + 1), ("axis", axis))}
        inits.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
        nodes.append(helper.make_node("Slice", [x, *consts], [f"{name}_{part}"], name=f"{name}_{part}"))
        return f"{name}_{part}"

    first, last = border(1, "first"), border(size - 2, "last")
    nodes.append(helper.make_node("Concat", [first, x, last], [name], name=name, axis=axis))
    return name


def _static_dims(model: onnx.ModelProto, tensor: str) -> list[int] | None:
    """``tensor``'s 4 dims, 0 where not static; None when its rank is unknown or not 4."""
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == tensor:
            dims = vi.type.tensor_type.shape.dim
            return [d.dim_value if d.HasField("dim_value") else 0 for d in dims] if len(dims) == 4 else None
    return None


def _spatial_shape(model: onnx.ModelProto, tensor: str) -> tuple[int, int]:
    dims = _static_dims(model, tensor)
    if dims is None or 0 in dims[2:]:
        raise UnsupportedModelError(f"the input of a strided conv ({tensor}) has no static height/width, which "
                                    "swing convolution needs; pass --no-swing or export the model with static shapes")
    return dims[2], dims[3]


def swing_rewrite(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose strided convs read a reflect-padded input cropped at the offsets."""
    out = onnx.ModelProto()
    out.CopyFrom(shape_inference.infer_shapes(model))
    offsets = helper.make_node("Concat", list(SWING_INPUTS), ["swing_starts"], name="swing_starts", axis=0)
    nodes, inits, rewritten = [offsets], [numpy_helper.from_array(np.array([2, 3], np.int64), "swing_axes")], 0
    for node in out.graph.node:
        h, w = _spatial_shape(out, node.input[0]) if _strided(node) else (0, 0)
        if min(h, w) < 2:  # not strided, or too small to reflect
            nodes.append(node)
            continue
        x, tag = node.input[0], f"swing{rewritten}"
        inits.append(numpy_helper.from_array(np.array([h, w], np.int64), f"{tag}_hw"))
        padded_h = _reflect_pad(nodes, inits, x, f"{tag}_pad_h", axis=2, size=h)
        padded = _reflect_pad(nodes, inits, padded_h, f"{tag}_pad", axis=3, size=w)
        # the crop's starts are inputs, so its shape is unknown to shape inference; a Reshape to
        # (N, C, h, w) restores it (MaxPool's gradient downstream came back empty without it), with the
        # batch and channels too where known: onnxruntime-training 1.19's AveragePool gradient divides
        # by zero (SIGFPE) on a tensor whose batch is not static
        n, c = _static_dims(out, x)[:2]  # 0: Reshape copies the input's
        inits.append(numpy_helper.from_array(np.array([n, c, h, w], np.int64), f"{tag}_shape"))
        nodes += [helper.make_node("Add", ["swing_starts", f"{tag}_hw"], [f"{tag}_ends"], name=f"{tag}_ends"),
                  helper.make_node("Slice", [padded, "swing_starts", f"{tag}_ends", "swing_axes"],
                                   [f"{tag}_crop_any"], name=f"{tag}_crop"),
                  helper.make_node("Reshape", [f"{tag}_crop_any", f"{tag}_shape"], [f"{tag}_crop"],
                                   name=f"{tag}_crop_shape")]
        node.input[0] = f"{tag}_crop"
        nodes.append(node)
        rewritten += 1
    del out.graph.node[:]
    out.graph.node.extend(nodes if rewritten else nodes[1:])
    if rewritten:
        out.graph.initializer.extend(inits)
        out.graph.input.extend(helper.make_tensor_value_info(n, TensorProto.INT64, [1]) for n in SWING_INPUTS)
    del out.graph.value_info[:]
    return shape_inference.infer_shapes(out)


def swing_feed(offset_h: int, offset_w: int) -> dict[str, np.ndarray]:
    return {SWING_INPUTS[0]: np.array([offset_h], np.int64), SWING_INPUTS[1]: np.array([offset_w], np.int64)}
