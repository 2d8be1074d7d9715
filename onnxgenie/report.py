"""The run report of ``onnxgenie quantize``: plain functions that measure, and two writers (JSON, HTML).

Measured here: per-layer weight SQNR of the quantized weights (dB), top-1 agreement of the quantized
model with the FP32 one, the serialized model sizes and the library/platform versions. The pipeline
gathers those with its own timings, peak memory, GENIE-D loss curves and reconstruction stats into
one dict; ``write_json`` stores it as strict JSON and ``write_html`` renders a self-contained page
(inline CSS, plots as base64 PNG, no external resources). The keys ``write_html`` reads are listed
in its docstring; a section whose data is missing is left out.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import importlib.metadata
import io
import json
import math
import os
import platform
from pathlib import Path

import numpy as np
import onnx

from .distill.preview import grid_png
from .errors import UnsupportedModelError
from .files import atomic_write
from .graph.bn import initializers
from .ortrain import engine_version
from .runtime import predict

SQNR_CAP_DB = 200.0   # reported when the quantization error is exactly zero (keeps the JSON finite)
MIB = 2 ** 20
# said wherever agreement is measured on the images the steps were fitted to
OPTIMISTIC = "optimistic: the quantized model was fitted to these images; --holdout-images N measures on others"


# ---------------------------------------------------------------- measurements

def weight_sqnr(folded: onnx.ModelProto, plan) -> dict[str, float]:
    """Per quantized layer (node name) 10*log10(sum W^2 / sum (W - W_q)^2) in dB, rounded to 2 decimals.

    ``folded`` is the BN-folded model the plan was built on (``wq.weight`` names its initializer);
    layers whose quantizer has no integer weights yet are left out. Clipped to +-``SQNR_CAP_DB``."""
    inits = initializers(folded)
    out: dict[str, float] = {}
    for node, wq in plan.weights.items():
        if wq.wint is None or wq.weight not in inits:
            continue
        w = inits[wq.weight].astype(np.float64)
        signal = float(np.sum(w * w))
        noise = float(np.sum((w - wq.dequantized().astype(np.float64)) ** 2))
        if noise == 0.0:
            db = SQNR_CAP_DB
        elif signal == 0.0:
            db = -SQNR_CAP_DB
        else:
            db = float(np.clip(10.0 * math.log10(signal / noise), -SQNR_CAP_DB, SQNR_CAP_DB))
        out[node] = round(db, 2)
    return out


def check_finite_logits(logits: np.ndarray, what: str = "calibration") -> None:
    """Refuse FP32 logits with NaN/Inf: the model itself is broken on these images (UnsupportedModelError)."""
    bad = int((~np.isfinite(logits.reshape(len(logits), -1))).any(axis=1).sum())
    if bad:
        raise UnsupportedModelError(
            f"the FP32 model outputs NaN/Inf on {bad} of {len(logits)} {what} images, so its predictions (and any "
            "agreement with them) mean nothing; fix the model's weights or the images' range, and check it with "
            "onnxgenie eval")


def top1_agreement(fp_model: onnx.ModelProto, q_model: onnx.ModelProto, x: np.ndarray, threads: int = 1,
                   what: str = "calibration") -> float:
    """Percent of the images ``x`` (float32 NCHW, preprocessed) on which both models pick the same class.
    FP32 logits with NaN/Inf are refused (``check_finite_logits``); an image on which the quantized model
    outputs NaN/Inf counts as a disagreement."""
    if len(x) == 0:
        raise ValueError("top1_agreement needs at least one image")
    fp_logits = predict(fp_model, x, threads=threads)
    check_finite_logits(fp_logits, what)
    q_logits = predict(q_model, x, threads=threads)
    same = fp_logits.argmax(axis=1) == q_logits.argmax(axis=1)
    same &= np.isfinite(q_logits.reshape(len(x), -1)).all(axis=1)
    return round(100.0 * float(same.mean()), 2)


def versions() -> dict:
    """Versions of onnxgenie and its runtime stack, and the machine it ran on."""
    try:
        own = importlib.metadata.version("onnxgenie")
    except importlib.metadata.PackageNotFoundError:
        own = "unknown"
    return {"onnxgenie": own, "python": platform.python_version(), "numpy": np.__version__,
            "onnx": onnx.__version__, "onnxruntime": engine_version(),
            "platform": f"{platform.machine()} {platform.processor()}".strip(), "cpu_count": os.cpu_count()}


def _serialized_bytes(model: onnx.ModelProto | str | os.PathLike) -> int:
    if isinstance(model, onnx.ModelProto):
        return int(model.ByteSize())
    return int(os.path.getsize(model))


def model_sizes(fp_path_or_model: onnx.ModelProto | str | os.PathLike,
                q_model: onnx.ModelProto | str | os.PathLike) -> dict:
    """{'fp32_bytes', 'quantized_bytes', 'ratio' (fp32 / quantized)}: a file's size on disk, or a
    ModelProto's serialized size."""
    fp, q = _serialized_bytes(fp_path_or_model), _serialized_bytes(q_model)
    return {"fp32_bytes": fp, "quantized_bytes": q, "ratio": round(fp / q, 3) if q else None}


# ---------------------------------------------------------------- JSON

def to_jsonable(obj):
    """``obj`` with NumPy scalars/arrays, tuples, sets, paths and dataclasses turned into plain JSON values.

    Non-finite floats become None (strict JSON has no NaN/Infinity); dict keys become strings."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    raise TypeError(f"the report holds a {type(obj).__name__}, which has no JSON form")


def write_json(report: dict, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """``report`` as strict JSON (indent 1), written atomically (``files.atomic_write``)."""
    text = json.dumps(to_jsonable(report), indent=1, allow_nan=False)
    return atomic_write(path, (text + "\n").encode("utf-8"), overwrite=overwrite)


# ---------------------------------------------------------------- HTML

def _png_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, without pyplot (no global state, no GUI backend)."""
    # imported here: matplotlib costs about half a second, and only an HTML report draws
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _loss_plot(history) -> bytes | None:
    """GENIE-D BNS loss per step, one line per distillation batch (log scale when all positive)."""
    if all(np.ndim(h) == 0 for h in history):   # a single flat curve
        history = [history]
    curves = [np.asarray(h, np.float64).ravel() for h in history if h is not None and np.size(h)]
    if not curves:
        return None
    fig = _figure(7, 3.5)
    ax = fig.add_subplot()
    for i, c in enumerate(curves):
        ax.plot(np.arange(1, len(c) + 1), c, lw=1, label=f"batch {i}")
    finite = np.concatenate([c[np.isfinite(c)] for c in curves])
    if finite.size and finite.min() > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("BNS loss")
    ax.set_title("GENIE-D distillation loss")
    if 1 < len(curves) <= 10:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _fig_png(fig)


def _heights(values: list) -> np.ndarray:
    """Bar heights: None and non-finite values (skipped or diverged blocks) as 0, i.e. no bar."""
    v = np.array([np.nan if x is None else float(x) for x in values], np.float64)
    return np.where(np.isfinite(v), v, 0.0)


def _recon_plot(blocks: list[dict]) -> bytes | None:
    """Each block's deployed error before (round-to-nearest) and after learning; None gets no bar."""
    names = [str(b.get("name", i)) for i, b in enumerate(blocks)]
    first = [b.get("recon_first") for b in blocks]
    last = [b.get("recon_last") for b in blocks]
    values = [float(v) for v in first + last if v is not None and math.isfinite(float(v))]
    if not values:
        return None
    first_v, last_v = _heights(first), _heights(last)
    idx = np.arange(len(blocks))
    fig = _figure(max(6.0, 0.45 * len(blocks) + 2), 4)
    ax = fig.add_subplot()
    ax.bar(idx - 0.2, first_v, 0.4, label="round-to-nearest")
    ax.bar(idx + 0.2, last_v, 0.4, label="reconstructed")
    if min(values) > 0:
        ax.set_yscale("log")
    ax.set_xticks(idx)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize="small")
    ax.set_ylabel("block output error, Σ(y - ŷ)² per image")
    ax.set_title("GENIE-M reconstruction per block")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return _fig_png(fig)


def _sqnr_plot(sqnr: dict[str, float]) -> bytes | None:
    """Horizontal bars of the weight SQNR per layer, in graph order."""
    items = [(str(k), float(v)) for k, v in sqnr.items() if v is not None]
    if not items:
        return None
    fig = _figure(7, 0.9 + 0.22 * len(items))
    ax = fig.add_subplot()
    idx = np.arange(len(items))
    ax.barh(idx, [v for _, v in items], color="tab:green")
    ax.set_yticks(idx)
    ax.set_yticklabels([k for k, _ in items], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("weight SQNR (dB)")
    ax.set_title("Quantized weights: signal-to-quantization-noise ratio per layer")
    ax.grid(axis="x", alpha=0.3)
    return _fig_png(fig)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return html.escape(json.dumps(to_jsonable(value)))
    return html.escape(str(value))


def _table(rows: list[tuple[str, object]], head: tuple[str, ...] | None = None) -> str:
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _bits(report: dict) -> str | None:
    """report['bits'] as given, else 'W4A4, first/last 8' from report['config']."""
    if report.get("bits") is not None:
        bits = report["bits"]
        return bits if isinstance(bits, str) else json.dumps(to_jsonable(bits))
    cfg = report.get("config") or {}
    if "wbits" in cfg and "abits" in cfg:
        text = f"W{cfg['wbits']}A{cfg['abits']}"
        return text + (f", first/last {cfg['first_last_bits']}" if cfg.get("first_last_bits") is not None else "")
    return None


def _summary_rows(report: dict) -> list[tuple[str, object]]:
    """model, bits, preset, calibration, agreement, parity, sizes (the pipeline's report keys)."""
    cfg = report.get("config") or {}
    rows: list[tuple[str, object]] = [(k, report[k]) for k in ("model", "output") if report.get(k) is not None]
    bits = _bits(report)
    if bits is not None:
        rows.append(("bits", bits))
    for key in ("preset", "target", "quantizer"):
        if cfg.get(key) is not None:
            rows.append((key, cfg[key]))
    if cfg.get("high_bits"):
        rows.append(("layers at high bits (given)", ", ".join(cfg["high_bits"])))
    high = report.get("high_bits") or {}
    if high.get("chosen") is not None:
        rows.append(("layers at high bits (--auto-high-bits)", ", ".join(high["chosen"]) or "none helped"))
    calib = report.get("calibration") or {}
    if calib.get("images") is not None:
        rows.append(("calibration images", f"{calib['images']} ({calib.get('source')}), "
                                           f"{calib.get('holdout_images', 0)} held out"))
    agree = report.get("agreement") or {}
    if agree.get("top1_agreement") is not None:
        rows.append(("top-1 agreement with FP32 (%)", f"{agree['top1_agreement']:.2f} on {agree['images']} "
                                                      f"{agree['on']} images"))
    if report.get("gate"):
        rows.append(("quality gate", f"min {report['gate']['min_agreement']} %: "
                                     f"{'passed' if report['gate']['passed'] else 'FAILED'}"))
    if report.get("parity") is not None:
        rows.append(("export vs simulation (of logit range)", report["parity"]))
    size = report.get("size") or {}
    if size.get("fp32_bytes") is not None:
        rows.append(("FP32 model (MiB)", size["fp32_bytes"] / MIB))
    if size.get("quantized_bytes") is not None:
        rows.append(("quantized model (MiB)", size["quantized_bytes"] / MIB))
    if size.get("ratio") is not None:
        rows.append(("size ratio FP32 / quantized", size["ratio"]))
    return rows


def _stage_rows(report: dict) -> list[tuple[str, object, object]]:
    """(stage, seconds, peak MiB so far) from report['stages']."""
    stages = report.get("stages") or {}
    return [(name, st.get("wall_s", ""), st.get("peak_rss_mib", "")) for name, st in stages.items()]


_CSS = """body{font-family:sans-serif;max-width:1000px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
th{background:#f0f0f0}img{max-width:100%;display:block;margin:.5em 0 1.5em}h2{border-bottom:1px solid #ddd}"""


def write_html(report: dict, path: str | os.PathLike, images: np.ndarray | None = None,
               overwrite: bool = True) -> Path:
    """A self-contained HTML page of ``report``, written atomically. Every section is optional.

    Keys read (those of ``pipeline.quantize``'s report): ``model``, ``output``, ``config``, ``calibration``
    (``loss_history``: per batch, the BNS loss per step), ``agreement``, ``gate``, ``parity``, ``size``,
    ``stages``, ``reconstruction.blocks`` (``name``, ``recon_first``, ``recon_last``; None when skipped),
    ``reconstruction.candidates`` (``seed``, ``calibration_kl``, ``chosen``),
    ``weight_sqnr_db``, ``versions``. ``images`` (float32 NCHW): the first 64 shown in a grid."""
    title = "onnxgenie quantize report" + (f": {report['model']}" if report.get("model") is not None else "")
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    rows = _summary_rows(report)
    if rows:
        parts += ["<h2>Summary</h2>", _table(rows)]
    stages = _stage_rows(report)
    if stages:
        parts += ["<h2>Stages</h2>", _table(stages, ("stage", "wall time (s)", "peak RSS so far (MiB)"))]

    history = (report.get("calibration") or {}).get("loss_history")
    png = _loss_plot(history) if history is not None and len(history) else None
    if png:
        parts += ["<h2>Distillation (GENIE-D)</h2>", _png_tag(png, "GENIE-D BNS loss per step")]
    blocks = (report.get("reconstruction") or {}).get("blocks")
    png = _recon_plot(blocks) if blocks else None
    if png:
        parts += ["<h2>Reconstruction (GENIE-M)</h2>", _png_tag(png, "reconstruction loss per block")]
    candidates = (report.get("reconstruction") or {}).get("candidates")
    if candidates:
        parts += ["<h3>Candidates (the lowest KL kept)</h3>",
                  _table([(c["seed"], f"{c['calibration_kl']:.5f}", "kept" if c["chosen"] else "")
                          for c in candidates], ("seed", "KL(FP32 || quantized), calibration images", ""))]
    sqnr = report.get("weight_sqnr_db")
    png = _sqnr_plot(sqnr) if sqnr else None
    if png:
        parts += ["<h2>Weight SQNR</h2>", _png_tag(png, "weight SQNR per layer")]
    if images is not None and len(images):
        parts += [f"<h2>Distilled images (first {min(64, len(images))} of {len(images)})</h2>",
                  _png_tag(grid_png(images, limit=64), "distilled images")]
    versions_ = report.get("versions")
    if versions_:
        parts += ["<h2>Versions</h2>", _table([(k, v) for k, v in versions_.items()])]
    parts.append("</body></html>\n")
    return atomic_write(path, "\n".join(parts).encode("utf-8"), overwrite=overwrite)
