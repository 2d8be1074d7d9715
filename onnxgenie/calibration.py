"""The calibration images of a run: distilled with GENIE-D (zero-shot, the default), read from a file
(``calib="data"``), drawn as Gaussian noise (``calib="noise"``, the naive zero-shot baseline), or given
as an array; the checks they pass, and their section of the report."""

from __future__ import annotations

import os

import numpy as np
import onnx

from .config import QuantizeConfig
from .distill import distill
from .errors import BadInputError
from .evaluate import load_npz, preprocess
from .graph.load import _dims, _image_input, image_io, nhwc_transpose, to_input_layout
from .report import check_finite_logits
from .runtime import predict
from .workdir import part


def calibration_images(original: onnx.ModelProto, normal: onnx.ModelProto, config: QuantizeConfig,
                       calib_data: str | os.PathLike | None = None,
                       resume: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """(calibration, held-out, info): float32 images in the model's input space and layout.

    The first ``calib_images`` fit the steps (and reconstruction); the next ``holdout_images`` only
    measure FP32-vs-quantized agreement. From a file, the held-out images are those it has beyond the
    calibration set (none if it has no more)."""
    n, m = config.calib_images, max(config.holdout_images, 0)
    if config.calib == "data":
        return _from_file(normal, config, calib_data, n, m)
    if config.calib == "noise":
        x = np.random.default_rng(config.seed).standard_normal((n + m, *image_io(normal).chw)).astype(np.float32)
        return to_input_layout(normal, x[:n]), to_input_layout(normal, x[n:]), {"source": "noise"}
    batch = min(config.distill_batch, n + m)   # distill lowers the jobs, or chunks, to fit in memory
    work = part(config, "distill")
    x, info = distill(original, n_images=n + m, batch=batch, iters=config.distill_iters, seed=config.seed,
                      mode=config.distill_mode, swing=config.swing, jobs=config.jobs, progress=config.progress,
                      threads=1,  # as in every worker: --jobs and --threads do not change the images
                      workdir=work, resume=resume and work is not None and os.path.exists(work),
                      input_hw=config.input_size)
    x = np.asarray(x, dtype=np.float32)
    return x[:n], x[n:], {"source": "distill", **info}   # a batch rounded up leaves more held-out images


def _from_file(normal: onnx.ModelProto, config: QuantizeConfig, calib_data, n: int,
               m: int) -> tuple[np.ndarray, np.ndarray, dict]:
    if calib_data is None:
        raise BadInputError("calibration from data needs --calib-data FILE.npz")
    images, _ = load_npz(calib_data, need_labels=False, input_name=image_io(normal).input)
    with np.load(calib_data) as f:
        by_input_name = "images" not in f.files  # stored as the model takes it (onnxruntime's convention)
        synthetic = "loss_history" in f.files    # a file written by `onnxgenie distill`
    if by_input_name and images.dtype != np.uint8 and images.ndim == 4 and nhwc_transpose(normal) is not None:
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))   # as NCHW
    # float images are already preprocessed: --mean/--std then only give the image quantizer's range
    x = preprocess(images, image_io(normal).chw,
                   *((config.mean, config.std) if images.dtype == np.uint8 else (None, None)))
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(x)) if len(x) > n else np.arange(len(x))
    calib, held = x[np.sort(order[:n])], x[np.sort(order[n:n + m])]
    return (to_input_layout(normal, calib), to_input_layout(normal, held),
            {"source": "data", "file": str(calib_data), "synthetic": synthetic})


def check_calib_array(normal: onnx.ModelProto, calib) -> np.ndarray:
    """Calibration images given as an array: float32, [N, *the model's input shape], N >= 1, finite."""
    shape = _dims(_image_input(normal))[1:]
    try:
        x = np.asarray(calib)
    except Exception:
        x = None
    if x is None or x.dtype.kind not in "fiu" or x.ndim != 4 or list(x.shape[1:]) != shape or len(x) == 0:
        got = (f"{type(calib).__name__} {list(x.shape)} of {x.dtype}" if x is not None and x.dtype.kind != "O"
               else type(calib).__name__)
        raise BadInputError(f"calib_data is {got}; give a float32 array [N, {', '.join(map(str, shape))}] "
                            "(N >= 1) in the model's input space and layout")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise BadInputError("calib_data contains NaN/Inf values; give finite images")
    return x


def check_fp32_outputs(normal: onnx.ModelProto, x: np.ndarray, threads: int, what: str) -> None:
    """Refuse images on which the FP32 model itself outputs NaN/Inf: no agreement can be measured there."""
    check_finite_logits(predict(normal, x, threads=threads), what)


def calibration_report(calib: np.ndarray, holdout: np.ndarray | None, info: dict) -> dict:
    out = {"source": info.get("source"), "images": int(len(calib)),
           "holdout_images": 0 if holdout is None else int(len(holdout))}
    if info.get("source") == "distill":
        out.update(mode=info["mode"], swing=info["swing"], jobs=info["jobs"], chunk=info["chunk"],
                   final_bns_loss=[round(float(v), 6) for v in info["final_losses"]],
                   loss_history=np.round(np.asarray(info["loss_history"], np.float64), 6).tolist(),
                   seconds_per_step=info["seconds_per_step"], resumed_batches=list(info["resumed_batches"]))
    elif "file" in info:
        out["file"] = info["file"]
    out.update({k: info[k] for k in ("image_range", "image_range_from") if k in info})
    return out
