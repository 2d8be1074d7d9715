"""Swing convolution (GENIE-D, Sec. 3.1) as a graph rewrite.

Every Conv with a stride > 1 reads ``crop(reflect_pad(x, 1), offset)`` instead of ``x``: the input
is shifted by up to one pixel in each direction, so a strided conv sees every input position over
the course of distillation instead of the same sub-grid each step. The padding reflects one row and
column on each side, first along H then along W; the crop's starts are the two graph inputs
``SWING_INPUTS`` (int64 [1], each in {0, 1, 2}). Offsets (1, 1) give back the original model exactly.
Both are written in forms onnxruntime-training can differentiate (``engine_forms.reflect_pad``,
``engine_forms.crop``).

All rewritten convs share the two offsets (the reference draws them per layer). Strided pooling and
strided Slice are left alone, as in the reference, which swings only Conv modules.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, shape_inference

from ..builder import GraphBuilder, attr, value_infos
from ..engine_forms import crop, reflect_pad
from ..errors import UnsupportedModelError

SWING_INPUTS = ("swing_offset_h", "swing_offset_w")


def _strided(node: onnx.NodeProto) -> bool:
    return node.op_type == "Conv" and any(s > 1 for s in attr(node, "strides", []))


def _static_dims(model: onnx.ModelProto, tensor: str) -> list[int] | None:
    """``tensor``'s 4 dims, 0 where not static; None when its rank is unknown or not 4."""
    vi = value_infos(model).get(tensor)
    if vi is None:
        return None
    dims = vi.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else 0 for d in dims] if len(dims) == 4 else None


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
    b = GraphBuilder()
    starts = b.op("Concat", *SWING_INPUTS, out="swing_starts", axis=0)
    axes = b.const(np.array([2, 3], np.int64), "swing_axes")
    nodes, inits = b.take()
    rewritten = 0
    for node in out.graph.node:
        h, w = _spatial_shape(out, node.input[0]) if _strided(node) else (0, 0)
        if min(h, w) >= 2:  # strided, and large enough to reflect
            x, tag = node.input[0], f"swing{rewritten}"
            hw = b.const(np.array([h, w], np.int64), f"{tag}_hw")
            padded = reflect_pad(b, reflect_pad(b, x, f"{tag}_pad_h", axis=2, size=h), f"{tag}_pad", axis=3, size=w)
            n, c = _static_dims(out, x)[:2]  # 0: Reshape copies the input's
            shape = b.const(np.array([n, c, h, w], np.int64), f"{tag}_shape")
            ends = b.op("Add", starts, hw, out=f"{tag}_ends")
            node.input[0] = crop(b, padded, starts, ends, axes, shape, f"{tag}_crop")
            new_nodes, new_inits = b.take()
            nodes += new_nodes
            inits += new_inits
            rewritten += 1
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes if rewritten else nodes[1:])
    if rewritten:
        out.graph.initializer.extend(inits)
        out.graph.input.extend(helper.make_tensor_value_info(n, TensorProto.INT64, [1]) for n in SWING_INPUTS)
    del out.graph.value_info[:]
    return shape_inference.infer_shapes(out)


def swing_feed(offset_h: int, offset_w: int) -> dict[str, np.ndarray]:
    return {SWING_INPUTS[0]: np.array([offset_h], np.int64), SWING_INPUTS[1]: np.array([offset_w], np.int64)}
