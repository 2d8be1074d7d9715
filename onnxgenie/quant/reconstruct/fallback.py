"""What a block keeps: the learned values only where they lower the block's deployed error, and a
block whose training graph cannot be built or run learned layer by layer instead."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx

from ...graph.blocks import Block, extract_block_model
from ...runtime import run_into
from ..spec import QuantPlan
from .graph import quantized_block_model
from .status import BlockStatus, Why
from .store import BlockStore
from .train import BlockConfig, reconstruct_block

EVAL_IMAGES = 256   # images on which a block's hard-rounded error is compared before / after learning


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


def block_error(fp_model: onnx.ModelProto, plan: QuantPlan, x_q: np.ndarray, y: np.ndarray, threads: int) -> float:
    """Mean over images of Σ(y - ŷ)², ŷ the block as deployed (hard-rounded, every quantizer on)."""
    n = min(len(x_q), EVAL_IMAGES)
    y_hat = run_into(quantized_block_model(fp_model, plan), x_q[:n], np.empty((n, *y.shape[1:]), np.float32), threads)
    return float(np.mean(np.sum(np.square(y_hat - y[:n]).reshape(n, -1), axis=1, dtype=np.float64)))


def keep_if_better(fp_model: onnx.ModelProto, plan: QuantPlan, updates: dict, x_q: np.ndarray, y: np.ndarray,
                   threads: int) -> tuple[dict, dict]:
    """Apply ``updates`` to ``plan`` only if they lower the block's deployed error (``block_error``).

    Learning at a short budget with large learning rates can end worse than round-to-nearest; such a
    block keeps its starting point. Returns the updates kept ({} if none) and the two errors (and the
    status, where learning raised the error)."""
    before = block_error(fp_model, plan, x_q, y, threads)
    if not updates.get("weights") and not updates.get("acts"):
        return {}, {"recon_first": before, "recon_last": before}
    previous = apply_updates(plan, updates)
    after = block_error(fp_model, plan, x_q, y, threads)
    if not after < before:
        apply_updates(plan, previous)
        return {}, {"recon_first": before, "recon_last": before, "recon_learned": after,
                    "status": BlockStatus.kept(Why.RAISED_ERROR)}
    return updates, {"recon_first": before, "recon_last": after}


def learn_block(folded: onnx.ModelProto, block: Block, fp_model: onnx.ModelProto, plan: QuantPlan,
                x_fp: np.ndarray, x_q: np.ndarray, y: np.ndarray, cfg: BlockConfig, rng: np.random.Generator,
                store: BlockStore, progress=None) -> tuple[dict, dict]:
    """Reconstruct one block and apply what it learned to ``plan`` (if it lowers the block's error).

    A block whose training graph cannot be built or run (an op without a gradient between its layers,
    a gradient kernel failing) is learned layer by layer instead: each quantized layer alone, from its
    own input to its own output, in order, each kept only if it lowers that layer's error; a layer that
    fails too stays at round-to-nearest. Returns the updates kept and the stats ("status": a
    ``BlockStatus``; "per_layer": each layer's, when learned layer by layer)."""
    updates, stats = reconstruct_block(fp_model, plan, x_fp, x_q, y, cfg, rng, progress)
    if not stats["status"].training_failed or len(block.quantized_nodes) < 2:
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
        lx_fp = store.tensor(fp_model, layer.input, x_fp, cfg.threads)
        lx_q = store.tensor(q_model, layer.input, x_q, cfg.threads)
        ly = store.tensor(fp_model, layer.output, x_fp, cfg.threads)
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
    status = BlockStatus.by_layer(sum(layer["status"].learned for layer in layers), len(layers), stats["status"])
    return kept, {"status": status, "per_layer": layers, "ort_s": ort_s, "recon_first": before, "recon_last": after}
