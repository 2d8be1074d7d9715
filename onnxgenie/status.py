"""What a run says while it works: one line per finished stage on stderr (with its wall time), the same
stage's time and peak memory for the report, and the notes between them."""

from __future__ import annotations

import sys
import time

import numpy as np

from .export.qdq import EXPORT_OPSET
from .quant.reconstruct import BlockStatus
from .report import OPTIMISTIC
from .resources import peak_rss

FALLBACK_NAMES_SHOWN = 4


class StageLog:
    """Wall time and peak memory (this process's high-water mark so far) of each stage, in order."""

    def __init__(self, progress: bool):
        self.progress, self.table, self._t0 = progress, {}, time.perf_counter()

    def done(self, name: str, summary: str = "", **extra) -> None:
        now = time.perf_counter()
        self.table[name] = {"wall_s": round(now - self._t0, 3), "peak_rss_mib": round(peak_rss() / 2 ** 20), **extra}
        if self.progress and summary:
            say(f"{name}: {summary} ({now - self._t0:.1f} s)")
        self._t0 = now


def say(line: str) -> None:
    print(f"onnxgenie: {line}", file=sys.stderr)


def distill_batches(losses) -> None:
    for b, loss in enumerate(losses):
        say(f"GENIE-D batch {b}: final BNS loss {loss:.4f}")


def distill_line(images: int, losses) -> str:
    return (f"{images} images, final BNS loss {np.mean(losses):.4f} "
            f"(batches {np.min(losses):.4f}-{np.max(losses):.4f})")


def init_line(plan, images: int, p_norm: float) -> str:
    return (f"steps of {len(plan.weights)} weights (L{p_norm} search) and {len(plan.acts)} activations "
            f"from {images} images")


def high_bits_line(chosen: list[str], layers: int, bits: int, images: int, before: float, after: float) -> str:
    return (f"high bits: {len(chosen)} of {layers} low-bit layers at {bits} bits (KL to FP32 on {images} "
            f"calibration images {before:.4f} -> {after:.4f} before reconstruction): {', '.join(chosen)}")


def reconstruct_line(report: dict, iters: int) -> str:
    blocks = report["blocks"]
    return (f"{len(blocks)} blocks, {iters} steps each" + fallbacks(blocks)
            + candidates_line(report.get("candidates", [])))


def _names(names: list[str]) -> str:
    more = len(names) - FALLBACK_NAMES_SHOWN
    return ", ".join(names[:FALLBACK_NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")


def fallbacks(blocks: list[dict]) -> str:
    """The blocks GENIE-M did not learn whole, grouped by why (``quant.reconstruct.BlockStatus``); a few
    names per reason (the report has them all)."""
    rtn: dict[str, list[str]] = {}
    by_layer: dict[str, list[str]] = {}
    for b in blocks:
        status = BlockStatus.parse(b["status"])
        if status.layers is not None:
            by_layer.setdefault(status.block.reason, []).append(b["name"])
        elif status.reason is not None:
            rtn.setdefault(status.reason, []).append(b["name"])
    text = "".join(f"; kept at round-to-nearest ({reason}): {_names(names)}" for reason, names in rtn.items())
    return text + "".join(f"; learned layer by layer: {_names(names)} ({reason})" for reason, names in by_layer.items())


def candidates_line(candidates: list[dict]) -> str:
    """'; best of 2 by calibration KL: seed 1000 (0.40; others 0.57)' for a multi-candidate reconstruction."""
    if not candidates:
        return ""
    chosen = next(c for c in candidates if c["chosen"])
    others = ", ".join(f"{c['calibration_kl']:.4g}" for c in candidates if not c["chosen"])
    return (f"; best of {len(candidates)} by calibration KL: seed {chosen['seed']} "
            f"({chosen['calibration_kl']:.4g}; others {others})")


def export_line(report: dict) -> str:
    agreement = report["agreement"]
    return (f"QDQ opset {EXPORT_OPSET}, parity {report['parity']:.1e}, top-1 agreement "
            f"{agreement['top1_agreement']:.2f} % on {agreement['images']} {agreement['on']} images"
            + (f" ({OPTIMISTIC})" if agreement["on"] == "calibration" else ""))


def buffer_reuse_note(hazards: list[str]) -> None:
    say(f"note: {len(hazards)} 8-bit activation(s) follow 4-bit ones of the same shape; onnxruntime 1.19 (and "
        "other releases before its PR 32611) can overflow a buffer on this model: run it on a current onnxruntime "
        "(1.32 is right) or with SessionOptions.enable_mem_reuse = False")


def wrote_line(out, config, report: dict) -> None:
    say(f"wrote {out} (W{config.wbits}A{config.abits}, target {config.target}, parity {report['parity']:.1e}, "
        f"{report['size']['quantized_bytes'] / 1024:.0f} KiB)")
