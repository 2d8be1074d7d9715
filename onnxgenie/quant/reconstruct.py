"""GENIE-M: block-wise reconstruction of a quantized model (GENIE Sec. 3.3, BRECQ's blocks, QDrop).

For each block, in order: the block's ops with softbit weights (``softbits``) and LSQ + QDrop
activations (``lsq``) form a training graph whose loss is

    L = mean_{batch, positions} Σ_channels (ŷ − y)²  +  λ · Σ_layers Σ (1 − |2h(V) − 1|^β)

(the reconstruction term sums over the channel axis and averages the rest, as the reference code
does; λ is 0 during the first 20 % of the steps, then β decays linearly from 20 to 2). The input
is, per element, the FP teacher's block input or the already-quantized prefix's (QDrop); the target
is the teacher's block output, computed once with onnxruntime inference. Gradients come from
onnxruntime-training, the Adam steps from NumPy. After a block the soft bits are rounded and the
plan's integers and steps updated; the block's result is saved so that a rerun resumes after it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import BadInputError, ResumeMismatchError, StorageError
from ..graph.blocks import Block, extract_block_model, partition_blocks
from ..engine_forms import trainable_form
from ..graph.builder import GraphBuilder, rewire
from ..optim import Adam, ParamGroup
from ..ortrain import GradientGraph, describe_ort_error
from ..runtime import run_into, sample_shapes, with_outputs
from .lsq import lsq_quantize
from .lsq import qdrop as qdrop_mix
from .softbits import hard_round, init_softbits, softbit_weight
from .spec import ActQuant, QuantPlan, WeightQuant

QUANTIZERS = ("genie", "adaround")
DEFAULT_LAMBDA = {"genie": 1.0, "adaround": 0.1}
LR_WEIGHT_STEP, LR_SOFTBITS, LR_ACT_STEP = 1e-4, 1e-3, 4e-5
BETA_RANGE, WARMUP = (20.0, 2.0), 0.2
RECON_VERSION = 2  # part of the resume key: 2 = step learning rates relative to the grid
INPUT_TARGET, INPUT_BETA, INPUT_LAMBDA = "recon_target", "round_beta", "round_lambda"
TRAINING_FAILED = ("rtn (training graph failed", "rtn (training step failed")  # statuses learned layer by layer


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


# ----------------------------------------------------------------------------------------------
# Graphs

def _block_acts(block_model: onnx.ModelProto, plan: QuantPlan) -> list[tuple[ActQuant, list[onnx.NodeProto]]]:
    """Activation quantizers with consumers inside the block, with those consumers."""
    nodes = list(block_model.graph.node)
    out = []
    for aq in plan.acts.values():
        users = [n for n in nodes if aq.tensor in n.input and (not aq.consumers or n.name in aq.consumers)]
        if users:
            out.append((aq, users))
    return out


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    done, ordered, todo = set(available), [], list(nodes)
    while todo:
        ready = [n for n in todo if all(not i or i in done for i in n.input)]
        if not ready:
            raise ValueError("cycle or missing tensor while inserting quantizers")
        for n in ready:
            ordered.append(n)
            done.update(n.output)
        todo = [n for n in todo if n not in ready]
    return ordered


def _finish(model: onnx.ModelProto, b: GraphBuilder, inputs: list[onnx.ValueInfoProto],
            outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    g = model.graph
    inits = list(g.initializer) + b.inits
    available = {t.name for t in inits} | {i.name for i in inputs}
    nodes = _toposort(list(g.node) + b.nodes, available)
    graph = helper.make_graph(nodes, g.name, inputs, outputs, inits)
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def _typed_like(model: onnx.ModelProto, tensor: str, name: str) -> onnx.ValueInfoProto:
    """A value info named ``name`` with ``tensor``'s type and shape (batch axis symbolic)."""
    g = model.graph
    found = {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}
    if tensor not in found or not found[tensor].type.tensor_type.HasField("shape"):
        g = onnx.shape_inference.infer_shapes(model).graph
        found = {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}
    vi = onnx.ValueInfoProto()
    vi.CopyFrom(found[tensor])
    vi.name = name
    return vi


def _weights_of(block_model: onnx.ModelProto, plan: QuantPlan) -> list[tuple[onnx.NodeProto, WeightQuant]]:
    return [(n, plan.weights[n.name]) for n in block_model.graph.node if n.name in plan.weights]


def training_model(block_model: onnx.ModelProto, plan: QuantPlan, quantizer: str = "genie",
                   qdrop: bool = True) -> tuple[onnx.ModelProto, TrainNames]:
    """The block with softbit weights, LSQ activations and the GENIE-M loss as first output. With
    ``qdrop`` each activation quantizer mixes in its float input through a mask input (QDrop);
    without, it always quantizes and the graph has no masks."""
    model = copy.deepcopy(block_model)
    trainable_form(model)
    g = model.graph
    b = GraphBuilder("recon/")
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    x_in, y_out = g.input[0], g.output[0]
    names = TrainNames(inputs=[x_in.name, INPUT_TARGET, INPUT_BETA, INPUT_LAMBDA], mask_tensors=[])
    beta, lam = INPUT_BETA, INPUT_LAMBDA

    round_terms = []
    for node, wq in _weights_of(model, plan):
        w = inits[node.input[1]]
        base, v0 = init_softbits(w, wq.scale, wq.axis)
        shape = [1] * w.ndim
        shape[wq.axis] = -1
        s_name, v_name = f"{wq.weight}/step", f"{wq.weight}/softbits"
        s0 = wq.scale.astype(np.float32).reshape(shape)
        b.const(s0, s_name)
        b.const(v0, v_name)
        w_q, h = softbit_weight(b, base, wq.zero_point, wq.axis, wq.qrange, s_name, v_name)
        node.input[1] = w_q
        names.softbits[node.name] = v_name
        names.bases[node.name] = base
        names.init[v_name] = v0
        if quantizer == "genie":
            names.weight_steps[node.name] = s_name
            names.init[s_name] = s0
        # rounding regulariser: Σ(1 − |2h − 1|^β)
        sharp = b.op("Pow", b.op("Abs", b.op("Sub", b.op("Mul", h, b.const(2.0)), b.const(1.0))), beta)
        round_terms.append(b.op("ReduceSum", b.op("Sub", b.const(1.0), sharp), keepdims=0))

    mask_inputs = []
    for k, (aq, users) in enumerate(_block_acts(model, plan)):
        s_name = f"{aq.tensor}/act_step"
        b.const(np.array([aq.scale], np.float32), s_name)
        names.act_steps[aq.tensor] = s_name
        names.init[s_name] = np.array([aq.scale], np.float32)
        x_q = lsq_quantize(b, aq.tensor, s_name, aq.qrange)
        if not qdrop:
            rewire(users, aq.tensor, x_q)
            continue
        mask = f"qdrop_mask_{k}"
        rewire(users, aq.tensor, qdrop_mix(b, aq.tensor, x_q, mask))
        names.inputs.append(mask)
        names.mask_tensors.append(aq.tensor)
        mask_inputs.append(_typed_like(block_model, aq.tensor, mask))

    diff = b.op("Sub", y_out.name, INPUT_TARGET)
    per_position = b.op("ReduceSum", b.op("Mul", diff, diff), b.const(np.array([1], np.int64), dtype=np.int64),
                        keepdims=0)
    recon = b.op("ReduceMean", per_position, keepdims=0, out="recon_loss")
    total = recon
    if round_terms:
        rounding = round_terms[0]
        for term in round_terms[1:]:
            rounding = b.op("Add", rounding, term)   # n-ary Sum has no gradient
        total = b.op("Add", recon, b.op("Mul", lam, rounding))
    b.op("Identity", total, out="loss")

    inputs = [x_in, _typed_like(block_model, y_out.name, INPUT_TARGET),
              helper.make_tensor_value_info(beta, TensorProto.FLOAT, []),
              helper.make_tensor_value_info(lam, TensorProto.FLOAT, []), *mask_inputs]
    outputs = [helper.make_tensor_value_info("loss", TensorProto.FLOAT, []),
               helper.make_tensor_value_info("recon_loss", TensorProto.FLOAT, [])]
    out = _finish(model, b, inputs, outputs)
    return out, names


def quantized_block_model(block_model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """Inference form of the block with the plan's hard-rounded weights and activation steps."""
    model = copy.deepcopy(block_model)
    b = GraphBuilder("quant/")
    for node, wq in _weights_of(model, plan):
        node.input[1] = b.const(wq.dequantized(), f"{wq.weight}/dequantized")
    for aq, users in _block_acts(model, plan):
        s = b.const(np.float32(aq.scale))
        c = b.op("Clip", b.op("Div", aq.tensor, s), b.const(float(aq.qrange[0])), b.const(float(aq.qrange[1])))
        rewire(users, aq.tensor, b.op("Mul", b.op("Round", c), s))
    return _finish(model, b, list(model.graph.input), list(model.graph.output))


# ----------------------------------------------------------------------------------------------
# Schedules (the reference's LinearTempDecay and CosineAnnealingLR)

def round_beta(step: int, iters: int) -> float:
    start = WARMUP * iters
    if step < start:
        return BETA_RANGE[0]
    rel = (step - start) / max(iters - start, 1)
    return BETA_RANGE[1] + (BETA_RANGE[0] - BETA_RANGE[1]) * max(0.0, 1.0 - rel)


def cosine(base_lr: float, step: int, iters: int) -> float:
    """Learning rate for 1-based ``step`` (decays to 0 after ``iters`` steps)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / iters))


# ----------------------------------------------------------------------------------------------
# Data

def _output_shape(model: onnx.ModelProto, x: np.ndarray, threads: int) -> tuple[int, ...]:
    return sample_shapes(model, [model.graph.output[0].name], x, threads)[0]


def _inner_values(block_model: onnx.ModelProto, tensor: str, x: np.ndarray, store: "_Store",
                  threads: int) -> np.ndarray:
    """The values of one of the block's tensors (its input included) on ``x``."""
    if tensor == block_model.graph.input[0].name:
        return x
    model = with_outputs(block_model, [tensor], only=True)
    return run_into(model, x, store.empty((len(x), *_output_shape(model, x, threads))), threads)


class _Store:
    """Block inputs/targets: in RAM under the budget, memory-mapped files in the work dir above it."""

    def __init__(self, folder: Path, budget_bytes: int):
        self.folder, self.budget, self.count = folder, budget_bytes, 0

    def empty(self, shape: tuple[int, ...], live_arrays: int = 3) -> np.ndarray:
        nbytes = int(np.prod(shape)) * 4
        if nbytes * live_arrays <= self.budget:
            return np.empty(shape, np.float32)
        self.count += 1
        path = self.folder / f"stream_{self.count % 4}.npy"   # at most 4 files alive
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


# ----------------------------------------------------------------------------------------------
# One block

@dataclass
class BlockConfig:
    iters: int
    batch: int
    quantizer: str
    lam: float
    threads: int = 1
    name: str = ""      # the block's name, for messages
    lr_scale: float = 1.0  # on all three learning rates (the reference's are for 20k steps)
    act_lr_scale: float = 1.0  # on the activation steps only, on top of lr_scale
    qdrop: bool = True  # QDrop at the block's activation quantizers (the block input is mixed either way)


GRID_LR_BITS = 4  # the step rates are the reference's for 4-bit (and coarser) grids


def grid_lr_factor(bits: int, coarsest_bits: int) -> float:
    """Learning-rate factor for the step of a ``bits`` grid: the finer grid's step is about
    (2^coarsest − 1)/(2^bits − 1) times smaller, so Adam (which moves a parameter by about lr per
    update) moves it by the same fraction of itself as the coarsest grid's step."""
    return (2 ** coarsest_bits - 1) / (2 ** bits - 1)


def _optimizer(names: TrainNames, plan: QuantPlan, lr_scale: float = 1.0,
               act_lr_scale: float = 1.0) -> tuple[Adam, list[bool]]:
    """Adam with one group per (kind, bit width); the second value says which groups decay (steps)."""
    groups, decays = [], []

    def add(params: dict[str, str], bits_of, base_lr: float, coarsest: int | None, decay: bool,
            scale: float = 1.0) -> None:
        by_bits: dict[int, list[str]] = {}
        for key, param in params.items():
            by_bits.setdefault(bits_of(key), []).append(param)
        for bits, members in sorted(by_bits.items()):
            factor = grid_lr_factor(bits, coarsest) if coarsest is not None else 1.0
            groups.append(ParamGroup(members, base_lr * lr_scale * scale * factor))
            decays.append(decay)

    # the rates are made for grids of GRID_LR_BITS or fewer: a plan of 8-bit grids only scales down too
    wbits = min(GRID_LR_BITS, *(w.bits for w in plan.weights.values()))
    abits = min(GRID_LR_BITS, *(a.bits for a in plan.acts.values()))
    add(names.weight_steps, lambda node: plan.weights[node].bits, LR_WEIGHT_STEP, wbits, True)
    add(names.softbits, lambda node: 0, LR_SOFTBITS, None, False)
    add(names.act_steps, lambda tensor: plan.acts[tensor].bits, LR_ACT_STEP, abits, True, act_lr_scale)
    return Adam(groups=groups), decays


def coin_flips(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A {0, 1} float32 array, each element 1 with probability 0.5 (one random bit per element)."""
    n = int(np.prod(shape))
    bits = np.unpackbits(np.frombuffer(rng.bytes((n + 7) // 8), np.uint8), count=n)
    return bits.reshape(shape).astype(np.float32)


def mix_inputs(mask: np.ndarray, x_q: np.ndarray, x_fp: np.ndarray) -> np.ndarray:
    """Per element x_q where mask is 1, else x_fp: exactly np.where(mask > 0, x_q, x_fp) for finite
    inputs, in a few vectorised passes (np.where's per-element select is 6x slower here)."""
    out = np.multiply(x_q, mask)
    keep = np.subtract(np.float32(1), mask)
    keep *= x_fp
    out += keep
    return out


def _step(gg: GradientGraph, *inputs: np.ndarray) -> tuple[float, float]:
    """Forward+backward; (loss, recon_loss)."""
    loss, recon = gg.step(*inputs)
    return loss, float(np.asarray(recon).reshape(-1)[0])


def _train(gg: GradientGraph, names: TrainNames, plan: QuantPlan, x_fp, x_q, y, mask_shapes, cfg: BlockConfig,
           rng: np.random.Generator, lr_scale: float, progress) -> tuple[dict | None, dict]:
    """Adam steps on one block; returns the final parameters (None if the loss diverged) and stats."""
    params = {k: v.copy() for k, v in names.init.items()}
    gg.set_params(params)
    adam, decays = _optimizer(names, plan, lr_scale, cfg.act_lr_scale)
    base_lrs = [g.lr for g in adam.groups]
    n = len(x_fp)
    order, pos = rng.permutation(n), 0
    t_ort, losses, recon_first, recon_last = 0.0, [], None, None
    for step in range(1, cfg.iters + 1):
        if pos + cfg.batch > n:
            order, pos = rng.permutation(n), 0
        idx = np.sort(order[pos:pos + cfg.batch])
        pos += cfg.batch
        xb, xqb = x_fp[idx], x_q[idx]
        x_mix = mix_inputs(coin_flips(rng, xb.shape), xqb, xb)
        masks = [coin_flips(rng, (len(idx), *s)) for s in mask_shapes]
        warm = step >= WARMUP * cfg.iters
        beta = np.array(round_beta(step, cfg.iters), np.float32)
        lam = np.array(cfg.lam if warm else 0.0, np.float32)
        t0 = time.perf_counter()
        loss, recon = _step(gg, x_mix, y[idx], beta, lam, *masks)
        grads = gg.grads()
        t_ort += time.perf_counter() - t0
        if not (np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())):
            return None, {"diverged_at": step}
        for group, base_lr, decay in zip(adam.groups, base_lrs, decays):
            if decay:
                group.lr = cosine(base_lr, step + 1, cfg.iters)
        params = adam.step(params, grads)
        t0 = time.perf_counter()
        gg.set_params(params)
        t_ort += time.perf_counter() - t0
        recon_first = recon if recon_first is None else recon_first
        recon_last = recon
        losses.append(loss)
        if progress is not None:
            progress.update(1)
    return params, {"train_recon_first": recon_first, "train_recon_last": recon_last,
                    "loss_last": losses[-1] if losses else None,
                    "ort_s": t_ort}


def reconstruct_block(block_model: onnx.ModelProto, plan: QuantPlan, x_fp: np.ndarray, x_q: np.ndarray,
                      y: np.ndarray, cfg: BlockConfig, rng: np.random.Generator,
                      progress=None) -> tuple[dict, dict]:
    """Learn one block. Returns (updates: {node: (wint, scale)}, {tensor: scale}) and stats.

    Divergence: restart from the block's start with halved learning rates once, then keep RTN.
    A block whose training graph cannot be built or run keeps RTN too; the reason is in the stats.
    """
    try:
        model, names = training_model(block_model, plan, cfg.quantizer, cfg.qdrop)
        mask_shapes = sample_shapes(block_model, names.mask_tensors, x_fp, cfg.threads)
        gg = GradientGraph(model, list(names.init), threads=cfg.threads)
    except StorageError:  # no room for the training graph's files: the run cannot go on
        raise
    except Exception as err:  # an op without gradient, an unexpected graph: keep RTN, say why
        return {}, {"status": f"rtn (training graph failed: {describe_ort_error(err)})"}
    stats: dict = {}
    for attempt, retry_scale in enumerate((1.0, 0.5)):
        try:
            params, stats = _train(gg, names, plan, x_fp, x_q, y, mask_shapes, cfg, rng, cfg.lr_scale * retry_scale,
                                   progress)
        except Exception as err:  # an onnxruntime kernel failing at run time: keep RTN, say why
            return {}, {"status": f"rtn (training step failed: {describe_ort_error(err)})"}
        if params is None:
            then = "retrying with halved learning rates" if attempt == 0 else "keeping round-to-nearest"
            print(f"onnxgenie: warning: GENIE-M {cfg.name or 'block'}: the loss became NaN/Inf at step "
                  f"{stats['diverged_at']}; {then}", file=sys.stderr)
        if params is not None:
            stats["status"] = "ok" if attempt == 0 else "ok (retried with halved learning rates)"
            break
    else:
        return {}, {**stats, "status": "rtn (loss diverged twice)"}
    updates = {"weights": {}, "acts": {}}
    for node, v_name in names.softbits.items():
        wq = plan.weights[node]
        s_name = names.weight_steps.get(node)
        scale = params[s_name].reshape(-1) if s_name else wq.scale
        wint = hard_round(names.bases[node], params[v_name], wq.zero_point, wq.axis, wq.qrange)
        updates["weights"][node] = (wint, scale.astype(np.float32))
    for tensor, s_name in names.act_steps.items():
        updates["acts"][tensor] = float(params[s_name].reshape(-1)[0])
    return updates, stats


def apply_updates(plan: QuantPlan, updates: dict) -> dict:
    """Write ``updates`` into ``plan``; returns the updates that restore the values it replaced."""
    previous: dict = {"weights": {}, "acts": {}}
    for node, (wint, scale) in updates.get("weights", {}).items():
        previous["weights"][node] = (plan.weights[node].wint, plan.weights[node].scale)
        plan.weights[node].wint, plan.weights[node].scale = wint, scale
    for tensor, scale in updates.get("acts", {}).items():
        previous["acts"][tensor] = plan.acts[tensor].scale
        plan.acts[tensor].scale = scale
    return previous


EVAL_IMAGES = 256   # images on which a block's hard-rounded error is compared before / after learning


def block_error(fp_model: onnx.ModelProto, plan: QuantPlan, x_q: np.ndarray, y: np.ndarray, threads: int) -> float:
    """Mean over images of Σ(y - ŷ)², ŷ the block as deployed (hard-rounded, every quantizer on)."""
    n = min(len(x_q), EVAL_IMAGES)
    y_hat = run_into(quantized_block_model(fp_model, plan), x_q[:n], np.empty((n, *y.shape[1:]), np.float32), threads)
    return float(np.mean(np.sum(np.square(y_hat - y[:n]).reshape(n, -1), axis=1, dtype=np.float64)))


def keep_if_better(fp_model: onnx.ModelProto, plan: QuantPlan, updates: dict, x_q: np.ndarray, y: np.ndarray,
                   threads: int) -> tuple[dict, dict]:
    """Apply ``updates`` to ``plan`` only if they lower the block's deployed error (``block_error``).

    Learning at a short budget with large learning rates can end worse than round-to-nearest; such a
    block keeps its starting point. Returns the updates kept ({} if none) and the two errors."""
    before = block_error(fp_model, plan, x_q, y, threads)
    if not updates.get("weights") and not updates.get("acts"):
        return {}, {"recon_first": before, "recon_last": before}
    previous = apply_updates(plan, updates)
    after = block_error(fp_model, plan, x_q, y, threads)
    if not after < before:
        apply_updates(plan, previous)
        return {}, {"recon_first": before, "recon_last": before, "recon_learned": after,
                    "status": "rtn (learning raised the block's error)"}
    return updates, {"recon_first": before, "recon_last": after}


def learn_block(folded: onnx.ModelProto, block: Block, fp_model: onnx.ModelProto, plan: QuantPlan,
                x_fp: np.ndarray, x_q: np.ndarray, y: np.ndarray, cfg: BlockConfig, rng: np.random.Generator,
                store: "_Store", progress=None) -> tuple[dict, dict]:
    """Reconstruct one block and apply what it learned to ``plan`` (if it lowers the block's error).

    A block whose training graph cannot be built or run (an op without a gradient between its layers,
    a gradient kernel failing) is learned layer by layer instead: each quantized layer alone, from its
    own input to its own output, in order, each kept only if it lowers that layer's error; a layer that
    fails too stays at round-to-nearest. Returns the updates kept and the stats."""
    updates, stats = reconstruct_block(fp_model, plan, x_fp, x_q, y, cfg, rng, progress)
    if not stats["status"].startswith(TRAINING_FAILED) or len(block.quantized_nodes) < 2:
        updates, errors = keep_if_better(fp_model, plan, updates, x_q, y, cfg.threads)
        return updates, {**stats, **errors}
    before = block_error(fp_model, plan, x_q, y, cfg.threads)
    nodes = {n.name: n for n in folded.graph.node}
    kept: dict = {"weights": {}, "acts": {}}
    layers, ort_s = [], 0.0
    for name in block.quantized_nodes:
        node = nodes[name]
        layer = Block(f"{block.name}/{name}", [name], node.input[0], node.output[0], [name])
        layer_model = extract_block_model(folded, layer)
        q_model = quantized_block_model(fp_model, plan)  # with the layers before this one learned
        lx_fp = _inner_values(fp_model, layer.input, x_fp, store, cfg.threads)
        lx_q = _inner_values(q_model, layer.input, x_q, store, cfg.threads)
        ly = _inner_values(fp_model, layer.output, x_fp, store, cfg.threads)
        upd, lstats = reconstruct_block(layer_model, plan, lx_fp, lx_q, ly, replace(cfg, name=layer.name), rng)
        upd, errors = keep_if_better(layer_model, plan, upd, lx_q, ly, cfg.threads)
        for kind in kept:
            kept[kind].update(upd.get(kind, {}))
        ort_s += lstats.get("ort_s", 0.0)
        layers.append({"name": name, "status": errors.get("status", lstats["status"]),
                       "recon_first": errors["recon_first"], "recon_last": errors["recon_last"]})
        del lx_fp, lx_q, ly
    if progress is not None:
        progress.update(cfg.iters)
    after = block_error(fp_model, plan, x_q, y, cfg.threads)
    learned = sum(layer["status"].startswith("ok") for layer in layers)
    status = (f"{'ok' if learned else 'rtn'} (layer by layer, {learned} of {len(layers)} layers learned; "
              f"block {stats['status']})")
    return kept, {"status": status, "per_layer": layers, "ort_s": ort_s, "recon_first": before, "recon_last": after}


# ----------------------------------------------------------------------------------------------
# Checkpoints

def _save_block(path: Path, key: str, updates: dict, stats: dict) -> None:
    arrays, meta = {}, {"key": key, "stats": stats, "weights": [], "acts": updates.get("acts", {})}
    for j, (node, (wint, scale)) in enumerate(updates.get("weights", {}).items()):
        meta["weights"].append(node)
        arrays[f"w{j}_wint"], arrays[f"w{j}_scale"] = wint, scale
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)


def _load_block(path: Path, key: str) -> tuple[dict, dict] | None:
    """A saved block's updates and stats; None for a file damaged on disk (to be learned again)."""
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            if meta["key"] != key:
                raise ResumeMismatchError(
                    f"{path} was written for another model, plan or reconstruction setting; "
                    "use a fresh work directory or rerun with the same settings")
            weights = {node: (data[f"w{j}_wint"], data[f"w{j}_scale"]) for j, node in enumerate(meta["weights"])}
            acts = {tensor: float(scale) for tensor, scale in meta["acts"].items()}
            return {"weights": weights, "acts": acts}, dict(meta["stats"])
    except ResumeMismatchError:
        raise
    except Exception:
        return None


def _config_key(folded: onnx.ModelProto, plan: QuantPlan, calib: np.ndarray, cfg: BlockConfig, seed: int) -> str:
    h = hashlib.sha256(folded.SerializeToString())
    meta, arrays = plan.to_arrays()
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for k in sorted(arrays):
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    h.update(np.ascontiguousarray(calib[: min(len(calib), 64)]).tobytes())
    h.update(json.dumps([RECON_VERSION, len(calib), cfg.iters, cfg.batch, cfg.quantizer, cfg.lam, seed]
                        + ([cfg.lr_scale] if cfg.lr_scale != 1.0 else [])
                        + ([["act", cfg.act_lr_scale]] if cfg.act_lr_scale != 1.0 else [])
                        + ([] if cfg.qdrop else ["no-qdrop"])).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The loop

def _log_block(row: dict, bar) -> None:
    first, last = row.get("recon_first"), row.get("recon_last")
    losses = f"output error {first:.4g} -> {last:.4g}" if first is not None and last is not None else ""
    _note(f"onnxgenie: GENIE-M {row['name']} ({row['layers']} layers): {losses} "
          f"[{row['status']}, {row['wall_s']:.1f} s]", bar)


def _note(line: str, bar) -> None:
    """A line on stderr, above the progress bar when there is one."""
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)


def check_lr_scale(lr_scale: float, flag: str = "--recon-lr-scale") -> None:
    if not lr_scale > 0 or not math.isfinite(lr_scale):
        raise BadInputError(f"{flag} must be a positive number (got {lr_scale})")


def check_args(iters: int, batch: int, quantizer: str, images: int) -> None:
    """Refuse unusable settings before any work (the pipeline calls this before distillation)."""
    if quantizer not in QUANTIZERS:
        raise BadInputError(f"unknown quantizer {quantizer!r}; use one of {', '.join(QUANTIZERS)}")
    if iters < 1 or batch < 1:
        raise BadInputError(f"--recon-iters ({iters}) and --recon-batch ({batch}) must be positive")
    if images < batch:
        raise BadInputError(f"{images} calibration images are fewer than the reconstruction batch {batch}; "
                            "give more images (--calib-images) or lower --recon-batch")


def reconstruct(folded: onnx.ModelProto, plan: QuantPlan, calib: np.ndarray, iters: int = 2000,
                batch: int = 32, quantizer: str = "genie", lam: float | None = None, seed: int = 0,
                workdir: str | Path | None = None, progress: bool = True, threads: int = 1,
                mem_budget_mb: int = 2048, verbose: bool = False,
                lr_scale: float = 1.0, act_lr_scale: float = 1.0, qdrop: bool = True) -> tuple[QuantPlan, dict]:
    """GENIE-M over all blocks of ``folded`` (BN folded, normal form); returns a new plan and a report.

    ``plan`` must carry initial steps (weights and activations) and round-to-nearest integers;
    ``calib`` are preprocessed NCHW images (distilled or real). With ``workdir`` finished blocks are
    saved as ``block_007.npz`` and skipped by a rerun with the same settings.
    """
    calib = np.asarray(calib, dtype=np.float32)
    check_args(iters, batch, quantizer, len(calib))
    missing = [n for n, w in plan.weights.items() if w.scale is None or w.zero_point is None] + \
        [t for t, a in plan.acts.items() if a.scale is None]
    if missing:
        raise ValueError(f"plan has quantizers without initial steps: {missing[:3]}")
    check_lr_scale(lr_scale)
    check_lr_scale(act_lr_scale, "--recon-act-lr-scale")
    cfg = BlockConfig(iters, batch, quantizer, DEFAULT_LAMBDA[quantizer] if lam is None else float(lam), threads,
                      lr_scale=float(lr_scale), act_lr_scale=float(act_lr_scale), qdrop=bool(qdrop))
    plan = copy.deepcopy(plan)
    key = _config_key(folded, plan, calib, cfg, seed)
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="onnxgenie-recon-")
        folder = Path(tmp.name)
    else:
        folder = Path(workdir)
        folder.mkdir(parents=True, exist_ok=True)
    store = _Store(folder, mem_budget_mb * 2 ** 20)
    blocks = partition_blocks(folded, quantized=list(plan.weights))
    bar = None
    if progress:
        from ..progress import progress_bar
        bar = progress_bar(iters * len(blocks), desc="reconstruct", unit="step", leave=False)
    report = {"blocks": [], "quantizer": quantizer, "lambda": cfg.lam, "lr_scale": cfg.lr_scale,
              "act_lr_scale": cfg.act_lr_scale, "qdrop": cfg.qdrop, "iters": iters,
              "batch": batch,
              "images": len(calib)}
    t_start = time.perf_counter()
    x_fp = x_q = calib
    try:
        for i, block in enumerate(blocks):
            t0 = time.perf_counter()
            fp_model = extract_block_model(folded, block)
            y = store.empty((len(calib), *_output_shape(fp_model, x_fp, threads)))
            run_into(fp_model, x_fp, y, threads)
            path = folder / f"{block.name}.npz"
            saved = _load_block(path, key) if workdir is not None and path.exists() else None
            if saved is None and workdir is not None and path.exists() and progress:
                _note(f"onnxgenie: note: {path} is damaged; reconstructing that block again", bar)
            if saved is not None:
                updates, stats = saved
                stats = {**stats, "status": "resumed"}
                apply_updates(plan, updates)
                if bar is not None:
                    bar.update(iters)
            else:
                rng = np.random.default_rng([seed, i])
                cfg.name = block.name
                updates, stats = learn_block(folded, block, fp_model, plan, x_fp, x_q, y, cfg, rng, store, bar)
                if workdir is not None:
                    _save_block(path, key, updates, stats)
            x_q_next = store.empty(y.shape)
            run_into(quantized_block_model(fp_model, plan), x_q, x_q_next, threads)
            x_fp, x_q = y, x_q_next
            report["blocks"].append({"name": block.name, "layers": len(block.quantized_nodes),
                                     "wall_s": round(time.perf_counter() - t0, 3), **stats})
            if verbose:
                _log_block(report["blocks"][-1], bar)
    finally:
        if bar is not None:
            bar.close()
        del x_fp, x_q
        report["streamed_arrays"] = store.count
        for path in folder.glob("stream_*.npy"):
            path.unlink()
        if tmp is not None:
            tmp.cleanup()
    wall = time.perf_counter() - t_start
    ort = sum(b.get("ort_s", 0.0) for b in report["blocks"])
    report.update(wall_s=round(wall, 3), ort_train_s=round(ort, 3), ort_fraction=round(ort / wall, 3) if wall else 0.0,
                  rtn_blocks=[b["name"] for b in report["blocks"] if str(b.get("status", "")).startswith("rtn")])
    return plan, report
