"""GENIE-M: block-wise reconstruction of a quantized model (GENIE Sec. 3.3, BRECQ's blocks, QDrop).

For each block, in order: the block's training graph (``graph``: softbit weights, LSQ + QDrop
activations, the GENIE-M loss) is learned with Adam (``train``) on the FP teacher's block inputs and
outputs, computed once with onnxruntime inference, and the quantized prefix's block inputs (``store``).
After a block the soft bits are rounded and the plan's integers and steps updated, where that lowers
the block's error (``fallback``); the block's result is saved so that a rerun resumes after it
(``checkpoint``). Each block's report row says what became of it (``status``).
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from ...errors import BadInputError
from ...graph.blocks import extract_block_model, partition_blocks
from ...progress import progress_bar
from ...runtime import run_into
from ..spec import QuantPlan
from .checkpoint import config_key, load_block, save_block
from .fallback import apply_updates, learn_block
from .graph import quantized_block_model
from .status import RESUMED, Outcome, as_text
from .store import BlockStore
from .train import BlockConfig

QUANTIZERS = ("genie", "adaround")
DEFAULT_LAMBDA = {"genie": 1.0, "adaround": 0.1}


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
    key = config_key(folded, plan, calib, cfg, seed)
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="onnxgenie-recon-")
        folder = Path(tmp.name)
    else:
        folder = Path(workdir)
        folder.mkdir(parents=True, exist_ok=True)
    store = BlockStore(folder, mem_budget_mb * 2 ** 20)
    blocks = partition_blocks(folded, quantized=list(plan.weights))
    bar = None
    if progress:
        bar = progress_bar(iters * len(blocks), desc="reconstruct", unit="step", leave=False)
    report = {"blocks": [], "quantizer": quantizer, "lambda": cfg.lam, "lr_scale": cfg.lr_scale,
              "act_lr_scale": cfg.act_lr_scale, "qdrop": cfg.qdrop, "iters": iters,
              "batch": batch,
              "images": len(calib)}
    t_start = time.perf_counter()
    x_fp = x_q = calib
    rtn: list[str] = []
    try:
        for i, block in enumerate(blocks):
            t0 = time.perf_counter()
            fp_model = extract_block_model(folded, block)
            y = store.output(fp_model, x_fp, threads)
            path = folder / f"{block.name}.npz"
            saved = load_block(path, key) if workdir is not None and path.exists() else None
            if saved is None and workdir is not None and path.exists() and progress:
                _note(f"onnxgenie: note: {path} is damaged; reconstructing that block again", bar)
            if saved is not None:
                updates, stats = saved
                stats = {**stats, "status": RESUMED}
                apply_updates(plan, updates)
                if bar is not None:
                    bar.update(iters)
            else:
                rng = np.random.default_rng([seed, i])
                cfg.name = block.name
                updates, stats = learn_block(folded, block, fp_model, plan, x_fp, x_q, y, cfg, rng, store, bar)
                if workdir is not None:
                    save_block(path, key, updates, stats)
            x_q_next = store.empty(y.shape)
            run_into(quantized_block_model(fp_model, plan), x_q, x_q_next, threads)
            x_fp, x_q = y, x_q_next
            report["blocks"].append(as_text({"name": block.name, "layers": len(block.quantized_nodes),
                                             "wall_s": round(time.perf_counter() - t0, 3), **stats}))
            if stats["status"].outcome is Outcome.ROUND_TO_NEAREST:
                rtn.append(block.name)
            if verbose:
                _log_block(report["blocks"][-1], bar)
    finally:
        if bar is not None:
            bar.close()
        del x_fp, x_q
        report["streamed_arrays"] = store.count
        store.remove_files()
        if tmp is not None:
            tmp.cleanup()
    wall = time.perf_counter() - t_start
    ort = sum(b.get("ort_s", 0.0) for b in report["blocks"])
    report.update(wall_s=round(wall, 3), ort_train_s=round(ort, 3), ort_fraction=round(ort / wall, 3) if wall else 0.0,
                  rtn_blocks=rtn)
    return plan, report
