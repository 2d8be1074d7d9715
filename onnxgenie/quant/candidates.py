"""Several GENIE-M reconstructions of the same images, the one closest to FP32 kept: ``--recon-candidates N``.

At 2-bit weights one reconstruction of a fixed image set in 8-16 falls ~4 pt below the others
(ResNet-20 W2A4, 16 seeds, docs/design.md), and its block losses do not show it. The mean KL
divergence between the FP32 and the quantized model's outputs on the calibration images does: it was
highest for that run. Among normal runs it (and every other signal tried) ranks no better than chance
out of sample, so this is insurance, not a higher mean. Candidates differ only in the reconstruction
seed (candidate 0 uses the run's own, so N = 1 is the plain run); each runs in its own process, so on a
multi-core CPU they cost little more wall time than one (onnxruntime's second thread gives GENIE-M only
~1.1x).
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_EXCEPTION, wait
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import onnx

from ..errors import OnnxGenieError
from ..resources import cores, peak_rss, process_pool
from ..runtime import predict
from .reconstruct import reconstruct
from .sensitivity import plan_kl

SEED_STRIDE = 1000   # candidate k reconstructs with seed + k * SEED_STRIDE


def candidate_seeds(seed: int, n: int) -> list[int]:
    return [seed + k * SEED_STRIDE for k in range(n)]


def _candidate(folded_bytes: bytes, plan, images: np.ndarray, score_images: np.ndarray, reference: np.ndarray,
               seed: int, settings: dict) -> tuple[object, dict, dict]:
    """One reconstruction: its plan, its report, and its own entry for the candidates list."""
    folded = onnx.load_from_string(folded_bytes)
    start = time.perf_counter()
    plan, report = reconstruct(folded, plan, images, seed=seed, **settings)
    entry = {"seed": seed, "calibration_kl": plan_kl(folded, plan, score_images, reference, settings["threads"]),
             "wall_s": round(time.perf_counter() - start, 3), "peak_rss_mib": round(peak_rss() / 2 ** 20)}
    return plan, report, entry


def reconstruct_candidates(folded: onnx.ModelProto, plan, images: np.ndarray, score_images: np.ndarray, n: int,
                           seed: int, workdir: str | None, progress: bool, threads: int, verbose: bool = False,
                           **settings) -> tuple[object, dict]:
    """``n`` reconstructions (``quant.reconstruct`` with ``settings``) on ``images``, at most one process per
    core; returns the plan and report of the one with the lowest calibration KL on ``score_images``, the
    report listing every candidate. Candidate k keeps its blocks in ``workdir/candidate_k`` (resume)."""
    seeds = candidate_seeds(seed, n)
    workers = min(n, cores())
    per_threads = max(1, threads // workers)
    reference = predict(folded, score_images, threads=threads)
    folded_bytes = folded.SerializeToString()

    def args(k: int) -> tuple:
        return (folded_bytes, plan, images, score_images, reference, seeds[k],
                {**settings, "threads": per_threads, "progress": progress and k == 0, "verbose": verbose and k == 0,
                 "workdir": None if workdir is None else f"{workdir}/candidate_{k}"})

    if workers == 1:
        results = [_candidate(*args(k)) for k in range(n)]
    else:
        try:
            with process_pool(workers) as pool:
                futures = [pool.submit(_candidate, *args(k)) for k in range(n)]
                wait(futures, return_when=FIRST_EXCEPTION)
                results = [f.result() for f in futures]
        except BrokenProcessPool:
            raise OnnxGenieError("a GENIE-M candidate process died (a crash inside onnxruntime); finished blocks are "
                                 "kept with --workdir; rerun with --recon-candidates 1 to see the error") from None
    entries = [entry for _, _, entry in results]
    best = int(np.argmin([e["calibration_kl"] for e in entries]))
    chosen_plan, report, _ = results[best]
    candidates = [{**e, "chosen": k == best} for k, e in enumerate(entries)]
    return chosen_plan, {**report, "candidates": candidates, "chosen_seed": seeds[best]}
