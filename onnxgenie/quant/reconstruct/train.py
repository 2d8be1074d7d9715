"""Learning one block: Adam on its training graph (``graph.training_model``), as the GENIE reference does.

Each step takes a batch of images; each element of the block input is the FP teacher's or the
quantized prefix's (QDrop, p = 0.5), and so is each element under a quantized activation inside the
block (fed masks). λ is 0 during the first ``WARMUP`` of the steps, then β decays linearly from 20 to 2
(the reference's LinearTempDecay); the step sizes' learning rates follow a cosine to 0 (its
CosineAnnealingLR), the softbits' stay constant. A loss that becomes NaN/Inf restarts the block at
halved learning rates once, then keeps round-to-nearest. After the last step the softbits are rounded
(h(V) ≥ 0.5) into the plan's integers.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import onnx

from ...errors import StorageError
from ...optim import Adam, ParamGroup
from ...ortrain import GradientGraph, describe_ort_error
from ...runtime import sample_shapes
from ..softbits import hard_round
from ..spec import QuantPlan
from .graph import TrainNames, training_model
from .status import BlockStatus, Why

LR_WEIGHT_STEP, LR_SOFTBITS, LR_ACT_STEP = 1e-4, 1e-3, 4e-5
BETA_RANGE, WARMUP = (20.0, 2.0), 0.2
GRID_LR_BITS = 4  # the step rates are the reference's for 4-bit (and coarser) grids


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


# Schedules (the reference's LinearTempDecay and CosineAnnealingLR) ----------------------------------

def round_beta(step: int, iters: int) -> float:
    start = WARMUP * iters
    if step < start:
        return BETA_RANGE[0]
    rel = (step - start) / max(iters - start, 1)
    return BETA_RANGE[1] + (BETA_RANGE[0] - BETA_RANGE[1]) * max(0.0, 1.0 - rel)


def cosine(base_lr: float, step: int, iters: int) -> float:
    """Learning rate for 1-based ``step`` (decays to 0 after ``iters`` steps)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / iters))


def grid_lr_factor(bits: int, coarsest_bits: int) -> float:
    """Learning-rate factor for the step of a ``bits`` grid: the finer grid's step is about
    (2^coarsest − 1)/(2^bits − 1) times smaller, so Adam (which moves a parameter by about lr per
    update) moves it by the same fraction of itself as the coarsest grid's step."""
    return (2 ** coarsest_bits - 1) / (2 ** bits - 1)


def optimizer(names: TrainNames, plan: QuantPlan, lr_scale: float = 1.0,
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


# QDrop sampling ------------------------------------------------------------------------------------

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


# The loop ------------------------------------------------------------------------------------------

def _step(gg: GradientGraph, *inputs: np.ndarray) -> tuple[float, float]:
    """Forward+backward; (loss, recon_loss)."""
    loss, recon = gg.step(*inputs)
    return loss, float(np.asarray(recon).reshape(-1)[0])


def _train(gg: GradientGraph, names: TrainNames, plan: QuantPlan, x_fp, x_q, y, mask_shapes, cfg: BlockConfig,
           rng: np.random.Generator, lr_scale: float, progress) -> tuple[dict | None, dict]:
    """Adam steps on one block; returns the final parameters (None if the loss diverged) and stats."""
    params = {k: v.copy() for k, v in names.init.items()}
    gg.set_params(params)
    adam, decays = optimizer(names, plan, lr_scale, cfg.act_lr_scale)
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


def _hard_rounded(names: TrainNames, plan: QuantPlan, params: dict[str, np.ndarray]) -> dict:
    """The learned values as plan updates: {"weights": {node: (wint, scale)}, "acts": {tensor: scale}}."""
    updates = {"weights": {}, "acts": {}}
    for node, v_name in names.softbits.items():
        wq = plan.weights[node]
        s_name = names.weight_steps.get(node)
        scale = params[s_name].reshape(-1) if s_name else wq.scale
        wint = hard_round(names.bases[node], params[v_name], wq.zero_point, wq.axis, wq.qrange)
        updates["weights"][node] = (wint, scale.astype(np.float32))
    for tensor, s_name in names.act_steps.items():
        updates["acts"][tensor] = float(params[s_name].reshape(-1)[0])
    return updates


def reconstruct_block(block_model: onnx.ModelProto, plan: QuantPlan, x_fp: np.ndarray, x_q: np.ndarray,
                      y: np.ndarray, cfg: BlockConfig, rng: np.random.Generator,
                      progress=None) -> tuple[dict, dict]:
    """Learn one block. Returns the updates (``_hard_rounded``; {} when none) and stats, whose "status"
    is a ``BlockStatus``.

    Divergence: restart from the block's start with halved learning rates once, then keep RTN.
    A block whose training graph cannot be built or run keeps RTN too; the reason is in the status.
    """
    try:
        model, names = training_model(block_model, plan, cfg.quantizer, cfg.qdrop)
        mask_shapes = sample_shapes(block_model, names.mask_tensors, x_fp, cfg.threads)
        gg = GradientGraph(model, list(names.init), threads=cfg.threads)
    except StorageError:  # no room for the training graph's files: the run cannot go on
        raise
    except Exception as err:  # an op without gradient, an unexpected graph: keep RTN, say why
        return {}, {"status": BlockStatus.kept(Why.GRAPH_FAILED, describe_ort_error(err))}
    stats: dict = {}
    for attempt, retry_scale in enumerate((1.0, 0.5)):
        try:
            params, stats = _train(gg, names, plan, x_fp, x_q, y, mask_shapes, cfg, rng, cfg.lr_scale * retry_scale,
                                   progress)
        except Exception as err:  # an onnxruntime kernel failing at run time: keep RTN, say why
            return {}, {"status": BlockStatus.kept(Why.STEP_FAILED, describe_ort_error(err))}
        if params is not None:
            stats["status"] = BlockStatus.ok(retried=attempt > 0)
            return _hard_rounded(names, plan, params), stats
        then = "retrying with halved learning rates" if attempt == 0 else "keeping round-to-nearest"
        print(f"onnxgenie: warning: GENIE-M {cfg.name or 'block'}: the loss became NaN/Inf at step "
              f"{stats['diverged_at']}; {then}", file=sys.stderr)
    return {}, {**stats, "status": BlockStatus.kept(Why.DIVERGED)}
