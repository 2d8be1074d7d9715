"""QDQ export (opset 21, IR 10): integer weights + per-channel DequantizeLinear, Q->DQ on activations.

The exported model computes exactly what ``quant.fakequant.fakequant_model`` simulates:
DequantizeLinear(wint) == WeightQuant.dequantized(), and Q->DQ == Div/Round/Clip/Mul.
``target="tensorrt"`` follows TensorRT's explicit-quantization rules: zero points 0, int8 storage
only (lower-bit weights are int8 values inside the narrow b-bit range), weights in [-127, 127],
per-tensor activations, int32 biases with scale s_x * s_w, Q/DQ on both inputs of residual Adds.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..builder import GraphBuilder
from ..errors import BadInputError, UnsupportedModelError
from ..graph.load import _dims
from ..ortrain import SUB_BYTE
from ..quant.fakequant import at_opset, bias_scale, insert_acts, insert_weights, quantize_bias
from ..quant.spec import ActQuant, QuantPlan, WeightQuant

EXPORT_OPSET = 21
EXPORT_IR = 10


def storage_type(bits: int, signed: bool, target: str) -> int:
    """Smallest ONNX integer type holding the grid (int8 only for TensorRT)."""
    if bits <= 4 and target != "tensorrt":
        return TensorProto.INT4 if signed else TensorProto.UINT4
    return TensorProto.INT8 if signed else TensorProto.UINT8


def _int_tensor(name: str, values: np.ndarray, dtype: int) -> onnx.TensorProto:
    values = np.asarray(values)
    if dtype in (TensorProto.INT4, TensorProto.UINT4):  # two 4-bit values per byte, low nibble first
        flat = np.concatenate([values.astype(np.int32).ravel(), np.zeros(values.size % 2, np.int32)]) & 0xF
        packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
        return helper.make_tensor(name, dtype, values.shape, packed.tobytes(), raw=True)
    np_type = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT32: np.int32}[dtype]
    return numpy_helper.from_array(values.astype(np_type), name)


def check_target(plan: QuantPlan) -> None:
    if plan.target != "tensorrt":
        return
    for a in plan.acts.values():
        if a.bits != 8 or not a.signed or a.zero_point != 0:
            raise BadInputError(f"activation {a.tensor} is {a.bits}-bit {'signed' if a.signed else 'unsigned'}; "
                                "TensorRT runs signed int8 activations only: use --abits 8 or --target ort")
    for w in plan.weights.values():
        if not (w.symmetric and w.narrow) or np.any(w.zero_point != 0):
            raise BadInputError(f"weight of {w.node} is not symmetric narrow-range; TensorRT needs zero points 0: "
                                "build the plan with target='tensorrt'")


def weight_offset(wq: WeightQuant, target: str) -> int:
    """128 where a signed 8-bit weight grid is stored as uint8 with zero point + 128 (the same values):
    for ``ort``, whose u8s8 int8 kernels saturate on CPUs without VNNI (AVX2: ShuffleNet W8A8 loses
    4 pt) where its u8u8 ones do not; 0 otherwise."""
    return 128 if target == "ort" and storage_type(wq.bits, wq.signed, target) == TensorProto.INT8 else 0


def _weight_dq(b: GraphBuilder, wq: WeightQuant, target: str) -> None:
    """DequantizeLinear of the stored integers into the weight's own name."""
    dtype = storage_type(wq.bits, wq.signed, target)
    offset = weight_offset(wq, target)
    if offset:
        dtype = TensorProto.UINT8
    p = wq.weight
    grid = [b.tensor(_int_tensor(f"{p}_quantized", wq.wint + offset, dtype)),
            b.const(wq.scale.astype(np.float32), f"{p}_scale"),
            b.tensor(_int_tensor(f"{p}_zero_point", wq.zero_point + offset, dtype))]
    b.op("DequantizeLinear", *grid, out=p, name=f"{p}_DequantizeLinear", axis=wq.axis)


def _bias_dq(b: GraphBuilder, bias: str, values: np.ndarray, scale: np.ndarray) -> None:
    """The int32 bias of the tensorrt target (step s_x * s_w) dequantized into the bias's own name."""
    grid = [b.tensor(_int_tensor(f"{bias}_quantized", quantize_bias(values, scale), TensorProto.INT32)),
            b.const(scale, f"{bias}_scale"),
            b.tensor(_int_tensor(f"{bias}_zero_point", np.zeros(scale.shape, np.int32), TensorProto.INT32))]
    b.op("DequantizeLinear", *grid, out=bias, name=f"{bias}_DequantizeLinear", axis=0)


# onnxruntime (1.19 and 1.32) moves a per-tensor 4-bit Q/DQ pair across MaxPool, which has no 4-bit kernel
# (the model no longer loads above ORT_ENABLE_BASIC), and its Clip+QuantizeLinear fusion cannot read a 4-bit
# zero point (it throws). Both only take per-tensor pairs: such a pair is written per channel instead, with
# the same scale and zero point in every channel (the same values).
SUB_BYTE_TRAPS = {"producer": {"MaxPool", "Clip"}, "consumer": {"MaxPool"}}


def sub_byte_traps(model: onnx.ModelProto, plan: QuantPlan) -> dict[str, int]:
    """{tensor: channels} of the activations whose per-tensor 4-bit Q/DQ pair onnxruntime's graph
    optimiser would break (``SUB_BYTE_TRAPS``); a tensor without a static channel count is left out."""
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    op_of = {n.name: n.op_type for n in model.graph.node}
    trapped = [a.tensor for a in plan.acts.values()
               if storage_type(a.bits, a.signed, plan.target) in SUB_BYTE
               and (producer.get(a.tensor) in SUB_BYTE_TRAPS["producer"]
                    or any(op_of.get(c) in SUB_BYTE_TRAPS["consumer"] for c in a.consumers))]
    if not trapped:
        return {}
    graph = onnx.shape_inference.infer_shapes(model).graph
    dims = {vi.name: _dims(vi) for vi in list(graph.value_info) + list(graph.input) + list(graph.output)}
    return {t: dims[t][1] for t in trapped if len(dims.get(t, [])) >= 2 and isinstance(dims[t][1], int)}


def _act_qdq(b: GraphBuilder, act: ActQuant, target: str, channels: int | None = None) -> str:
    """Q->DQ of ``act``; per channel (axis 1, the same value in each) when ``channels`` is given."""
    qmin, qmax = act.qrange
    dtype = storage_type(act.bits, act.signed, target)
    zero_point = act.zero_point
    if dtype == TensorProto.INT8 and target == "ort":
        # the same grid as uint8 with zero point 128: onnxruntime's int8 kernels want one type throughout
        dtype, zero_point = TensorProto.UINT8, zero_point + 128
    p = act.tensor
    shape, axis = ((), {}) if channels is None else ((channels,), {"axis": 1})
    grid = [b.const(np.full(shape, act.scale, np.float32), f"{p}_scale"),
            b.tensor(_int_tensor(f"{p}_zero_point", np.full(shape, zero_point), dtype))]
    x = p
    if act.bits not in (4, 8):  # a 5-7 bit grid in an 8-bit container: clip to the grid's range first
        low = b.const(np.float32(qmin * np.float32(act.scale)), f"{p}_clip_min")
        high = b.const(np.float32(qmax * np.float32(act.scale)), f"{p}_clip_max")
        x = b.op("Clip", p, low, high, out=f"{p}_clipped", name=f"{p}_Clip")
    q = b.op("QuantizeLinear", x, *grid, out=f"{p}_quantized", name=f"{p}_QuantizeLinear", **axis)
    return b.op("DequantizeLinear", q, *grid, out=f"{p}_dequantized", name=f"{p}_DequantizeLinear", **axis)


def export_qdq(folded: onnx.ModelProto, plan: QuantPlan, check: bool = True) -> onnx.ModelProto:
    """The deployable QDQ model of ``plan`` (scales must be initialised). ``folded`` is not changed."""
    check_target(plan)
    model = at_opset(folded, EXPORT_OPSET)
    model.ir_version = EXPORT_IR
    nodes = {n.name: n for n in model.graph.node}
    params = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def weight_and_bias(b: GraphBuilder, wq: WeightQuant) -> None:
        _weight_dq(b, wq, plan.target)
        node = nodes[wq.node]
        scale = bias_scale(plan, node)
        if scale is not None:
            _bias_dq(b, node.input[2], params[node.input[2]], scale)

    b = GraphBuilder()
    insert_weights(model, plan, weight_and_bias, b)
    traps = sub_byte_traps(model, plan)
    insert_acts(model, plan, lambda b, act: _act_qdq(b, act, plan.target, traps.get(act.tensor)), b)
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    if check:
        check_export(model)
    return model


def check_export(model: onnx.ModelProto) -> None:
    """Full ONNX check and finite parameters; raises on failure."""
    onnx.checker.check_model(model, full_check=True)
    for t in model.graph.initializer:
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            if not np.isfinite(numpy_helper.to_array(t)).all():
                raise UnsupportedModelError(f"exported parameter {t.name} has NaN/Inf values; check the input "
                                            "model's weights and BN statistics")


def weight_grid_errors(model: onnx.ModelProto, plan: QuantPlan) -> dict[str, float]:
    """Max |exported dequantized weight - plan.dequantized()| per weight (0.0 means exactly on its grid)."""
    params = {t.name: t for t in model.graph.initializer}
    out = {}
    for wq in plan.weights.values():
        q = numpy_helper.to_array(params[f"{wq.weight}_quantized"]).astype(np.int64)
        z = numpy_helper.to_array(params[f"{wq.weight}_zero_point"]).astype(np.int64)
        s = numpy_helper.to_array(params[f"{wq.weight}_scale"]).astype(np.float32)
        offset = weight_offset(wq, plan.target)
        qmin, qmax = wq.qrange
        if q.min() < qmin + offset or q.max() > qmax + offset:
            out[wq.node] = float("inf")
            continue
        shape = wq.bshape(q.ndim)
        deq = ((q - z.reshape(shape)).astype(np.float32) * s.reshape(shape)).astype(np.float32)
        out[wq.node] = float(np.abs(deq - wq.dequantized()).max())
    return out
