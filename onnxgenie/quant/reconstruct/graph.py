"""The training graph of one GENIE-M block: the block with the plan's quantizers inserted as in the
simulation (``fakequant.insert_weights``/``insert_acts``), in their learnable forms, and the loss.

- weights: softbits with a learned step (GENIE Eq. 13, ``softbits.softbit_weight``; the step fixed for
  AdaRound);
- activations: LSQ with a learned step, each element mixed with its float value through a fed mask
  (QDrop; ``lsq``);
- the loss (``genie_m_loss``) as the first output, the reconstruction term as the second.

Inputs: the block input, ``INPUT_TARGET`` (the FP block output), ``INPUT_BETA`` and ``INPUT_LAMBDA``
(the rounding regulariser's schedule), then one QDrop mask per quantized activation. Biases stay float
(the tensorrt target's int32 biases are applied in the simulation and the export only).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...builder import GraphBuilder, value_infos
from ...engine_forms import add_all, trainable_form
from ..fakequant import fakequant_model, insert_acts, insert_weights
from ..lsq import lsq_quantize
from ..lsq import qdrop as qdrop_mix
from ..softbits import init_softbits, softbit_weight
from ..spec import ActQuant, QuantPlan, WeightQuant

INPUT_TARGET, INPUT_BETA, INPUT_LAMBDA = "recon_target", "round_beta", "round_lambda"
LOSS, RECON_LOSS = "loss", "recon_loss"


@dataclass
class TrainNames:
    """What the training graph expects and learns, for one block."""

    inputs: list[str]                                  # x, target, beta, lambda, masks...
    mask_tensors: list[str]                            # activation tensor under each mask
    weight_steps: dict[str, str] = field(default_factory=dict)   # node -> s initializer
    softbits: dict[str, str] = field(default_factory=dict)       # node -> V initializer
    bases: dict[str, np.ndarray] = field(default_factory=dict)   # node -> B
    act_steps: dict[str, str] = field(default_factory=dict)      # tensor -> s_a initializer
    init: dict[str, np.ndarray] = field(default_factory=dict)    # initial value of every trainable
    soft: list[str] = field(default_factory=list)                # h(V) of every weight, for the regulariser


def genie_m_loss(b: GraphBuilder, output: str, target: str, soft: list[str], beta: str, lam: str) -> str:
    """The GENIE-M (BRECQ / AdaRound) loss of a block:

        L = mean_{batch, positions} Σ_channels (ŷ − y)²  +  λ · Σ_layers Σ (1 − |2h(V) − 1|^β)

    The reconstruction term sums over the channel axis and averages the rest, as the reference code does
    (written to ``RECON_LOSS``); ``soft`` are the h(V) tensors, β and λ graph inputs (``train.round_beta``:
    λ is 0 during the warm-up, then β decays from 20 to 2). Written to ``LOSS``."""
    diff = b.op("Sub", output, target)
    per_position = b.op("ReduceSum", b.op("Mul", diff, diff), b.const(np.array([1], np.int64)), keepdims=0)
    total = recon = b.op("ReduceMean", per_position, keepdims=0, out=RECON_LOSS)
    if soft:
        sharp = [b.op("Pow", b.op("Abs", b.op("Sub", b.op("Mul", h, b.const(2.0)), b.const(1.0))), beta) for h in soft]
        rounding = add_all(b, [b.op("ReduceSum", b.op("Sub", b.const(1.0), s), keepdims=0) for s in sharp])
        total = b.op("Add", recon, b.op("Mul", lam, rounding))
    return b.op("Identity", total, out=LOSS)


def _typed_like(model: onnx.ModelProto, tensor: str, name: str) -> onnx.ValueInfoProto:
    """A value info named ``name`` with ``tensor``'s type and shape (batch axis symbolic)."""
    found = value_infos(model)
    if tensor not in found or not found[tensor].type.tensor_type.HasField("shape"):
        found = value_infos(onnx.shape_inference.infer_shapes(model))
    vi = onnx.ValueInfoProto()
    vi.CopyFrom(found[tensor])
    vi.name = name
    return vi


def training_model(block_model: onnx.ModelProto, plan: QuantPlan, quantizer: str = "genie",
                   qdrop: bool = True) -> tuple[onnx.ModelProto, TrainNames]:
    """The block with softbit weights, LSQ activations and the GENIE-M loss as first output. With
    ``qdrop`` each activation quantizer mixes in its float input through a mask input (QDrop);
    without, it always quantizes and the graph has no masks."""
    model = copy.deepcopy(block_model)
    trainable_form(model)
    floats = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x_in, y_out = model.graph.input[0], model.graph.output[0]
    names = TrainNames(inputs=[x_in.name, INPUT_TARGET, INPUT_BETA, INPUT_LAMBDA], mask_tensors=[])
    masks = []

    def softbits(b: GraphBuilder, wq: WeightQuant) -> None:
        w = floats[wq.weight]
        base, v0 = init_softbits(w, wq.scale, wq.axis)
        s0 = wq.scale.astype(np.float32).reshape(wq.bshape(w.ndim))
        s_name, v_name = b.const(s0, f"{wq.weight}/step"), b.const(v0, f"{wq.weight}/softbits")
        _, h = softbit_weight(b, base, wq.zero_point, wq.axis, wq.qrange, s_name, v_name, out=wq.weight)
        names.soft.append(h)
        names.softbits[wq.node], names.bases[wq.node], names.init[v_name] = v_name, base, v0
        if quantizer == "genie":
            names.weight_steps[wq.node], names.init[s_name] = s_name, s0

    def lsq(b: GraphBuilder, aq: ActQuant) -> str:
        s_name = b.const(np.array([aq.scale], np.float32), f"{aq.tensor}/act_step")
        names.act_steps[aq.tensor], names.init[s_name] = s_name, np.array([aq.scale], np.float32)
        x_q = lsq_quantize(b, aq.tensor, s_name, aq.qrange)
        if not qdrop:
            return x_q
        mask = f"qdrop_mask_{len(masks)}"
        names.inputs.append(mask)
        names.mask_tensors.append(aq.tensor)
        masks.append(_typed_like(block_model, aq.tensor, mask))
        return qdrop_mix(b, aq.tensor, x_q, mask)

    b = GraphBuilder("recon/")
    insert_weights(model, plan, softbits, b)
    insert_acts(model, plan, lsq, b)
    genie_m_loss(b, y_out.name, INPUT_TARGET, names.soft, INPUT_BETA, INPUT_LAMBDA)
    g = model.graph
    g.node.extend(b.nodes)
    g.initializer.extend(b.inits)
    del g.input[:], g.output[:], g.value_info[:]
    g.input.extend([x_in, _typed_like(block_model, y_out.name, INPUT_TARGET),
                    helper.make_tensor_value_info(INPUT_BETA, TensorProto.FLOAT, []),
                    helper.make_tensor_value_info(INPUT_LAMBDA, TensorProto.FLOAT, []), *masks])
    g.output.extend([helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, []),
                     helper.make_tensor_value_info(RECON_LOSS, TensorProto.FLOAT, [])])
    return model, names


def quantized_block_model(block_model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """The block as deployed, as far as its learning goes: the simulation of ``plan`` on it (hard-rounded
    weights, every activation quantizer on), biases float as in ``training_model``."""
    return fakequant_model(block_model, plan, int_biases=False)
