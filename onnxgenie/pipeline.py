"""``onnxgenie quantize``: the stages from a float model to a QDQ model, one plain call each.

    normalize -> fold BN -> plan -> weight steps -> calibration images -> activation steps
    -> [GENIE-M reconstruction] -> QDQ export -> parity check -> atomic write

Calibration images are distilled with GENIE-D (zero-shot, the default), read from a file
(``calib="data"``) or drawn as Gaussian noise (``calib="noise"``, the naive zero-shot baseline).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import BadInputError, DivergenceError, OnnxGenieError, ResumeMismatchError
from .export.qdq import EXPORT_OPSET, export_qdq
from .graph.bn import fold_bn
from .graph.load import image_io, load_model, normalize
from .quant.fakequant import fakequant_model
from .quant.init import init_activations, init_weights
from .quant.plan import build_plan, check_bits
from .quant.spec import QuantPlan

CALIB_SOURCES = ("distill", "data", "noise")
PARITY_TOLERANCE = 1e-4  # of the logit range
PARITY_IMAGES = 16
# The simulation and the export agree bit for bit at this level; ORT_ENABLE_ALL re-lays-out the float
# convolutions of the simulation (NCHWc), which changes float sums and so a few rounding decisions.
PARITY_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


@dataclass(frozen=True)
class QuantizeConfig:
    wbits: int = 4
    abits: int = 4
    first_last_bits: int = 8
    target: str = "ort"
    exclude: tuple[str, ...] = ()
    calib: str = "distill"
    calib_images: int = 256
    distill_iters: int = 500
    distill_batch: int = 128
    jobs: int = 1                       # distillation worker processes
    act_batch: int = 64
    reconstruct: bool = False
    recon_iters: int = 2000
    recon_batch: int = 32
    quantizer: str = "genie"           # GENIE-M (learned weight steps) or "adaround" (fixed steps)
    lam: float | None = None            # rounding-loss weight; None: 1.0 genie / 0.1 adaround
    seed: int = 0
    threads: int = 1
    workdir: str | None = None
    progress: bool = True
    mean: tuple[float, ...] | None = None  # preprocessing of uint8 calibration files
    std: tuple[float, ...] | None = None


@dataclass
class QuantizeResult:
    model: onnx.ModelProto            # the exported QDQ model
    plan: QuantPlan
    simulation: onnx.ModelProto       # the float fake-quant model (opset 21) the export reproduces
    info: dict = field(default_factory=dict)


def prepare(model) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(normal form, BN-folded normal form)."""
    normal = normalize(load_model(model))
    return normal, fold_bn(normal)


def calibration_images(original: onnx.ModelProto, normal: onnx.ModelProto, config: QuantizeConfig,
                       calib_data: str | os.PathLike | None = None, resume: bool = False) -> np.ndarray:
    """float32 NCHW images in the model's input space for the activation steps (and reconstruction)."""
    chw = image_io(normal).chw
    rng = np.random.default_rng(config.seed)
    n = config.calib_images
    if config.calib == "data":
        from .evaluate import load_npz, preprocess

        if calib_data is None:
            raise BadInputError("calibration from data needs --calib-data FILE.npz")
        images, _ = load_npz(calib_data, need_labels=False)
        x = preprocess(images, chw, config.mean, config.std)
        x = x if len(x) <= n else x[np.sort(rng.choice(len(x), n, replace=False))]
        return _input_layout(normal, x)
    if config.calib == "noise":
        return _input_layout(normal, rng.standard_normal((n, *chw)).astype(np.float32))
    if config.calib == "distill":
        from .distill import distill
        from .resources import fit_jobs

        batch = min(config.distill_batch, n)
        jobs = fit_jobs(normal, batch, min(config.jobs, -(-n // batch)), notify=config.progress)
        x, _ = distill(original, n_images=n, batch=batch, iters=config.distill_iters, seed=config.seed, jobs=jobs,
                       progress=config.progress, threads=config.threads,
                       workdir=None if config.workdir is None else str(Path(config.workdir) / "distill"),
                       resume=resume and (Path(config.workdir) / "distill").exists())
        return np.asarray(x, dtype=np.float32)[:n]
    raise BadInputError(f"unknown calibration source {config.calib!r}; use one of {', '.join(CALIB_SOURCES)}")


def _input_layout(normal: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """NCHW images as the model takes them: NHWC models (a leading Transpose) get NHWC."""
    from .graph.load import nhwc_transpose

    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if nhwc_transpose(normal) is not None else x


def reconstruct_stage(folded: onnx.ModelProto, plan: QuantPlan, calib: np.ndarray,
                      config: QuantizeConfig) -> tuple[QuantPlan, dict]:
    """GENIE-M (``quant.reconstruct``): learned softbits and steps, block by block."""
    from .quant.reconstruct import reconstruct

    workdir = None if config.workdir is None else str(Path(config.workdir) / "reconstruct")
    return reconstruct(folded, plan, calib, iters=config.recon_iters, batch=config.recon_batch,
                       quantizer=config.quantizer, lam=config.lam, seed=config.seed,
                       workdir=workdir, progress=config.progress, threads=config.threads)


def parity(exported: onnx.ModelProto, simulation: onnx.ModelProto, x: np.ndarray) -> float:
    """max |exported - simulated logits| / logit range on ``x``."""
    from .evaluate import predict

    a = predict(simulation, x, level=PARITY_LEVEL)
    b = predict(exported, x, level=PARITY_LEVEL)
    return float(np.abs(a - b).max() / max(float(np.ptp(a)), 1e-12))


RUN_FILE = "run.json"
# Settings that do not change the result: a resumed run may differ in them.
_NOT_HASHED = ("workdir", "progress", "jobs")


def check_workdir(model: onnx.ModelProto, config: QuantizeConfig, resume: bool,
                  calib: np.ndarray | None = None) -> None:
    """Record the run (model hash, config, seed, given calibration images) in ``config.workdir``,
    or check it on ``resume``."""
    if config.workdir is None:
        if resume:
            raise BadInputError("--resume continues a run kept in a work directory; "
                                "add the interrupted run's --workdir")
        return
    work = Path(config.workdir)
    if work.exists() and not work.is_dir():
        raise BadInputError(f"--workdir {work} is a file; give a folder")
    run = {"model_sha256": hashlib.sha256(model.SerializeToString()).hexdigest(),
           **{k: v for k, v in asdict(config).items() if k not in _NOT_HASHED}}
    if calib is not None:
        run["calib_sha256"] = hashlib.sha256(np.ascontiguousarray(calib, np.float32).tobytes()).hexdigest()
    run = json.loads(json.dumps(run))  # tuples as lists, as read back
    saved_file = work / RUN_FILE
    started = saved_file.exists() or (work / "distill").exists() or (work / "reconstruct").exists()
    if started and not resume:
        raise BadInputError(f"{work} holds an earlier run; add --resume to continue it, or choose an empty --workdir")
    if started:
        saved = json.loads(saved_file.read_text()) if saved_file.exists() else {}
        differ = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
        if differ:
            what = ", ".join(d.replace("model_sha256", "model").replace("calib_sha256", "calibration images")
                             for d in differ)
            raise ResumeMismatchError(f"{work} was made with a different {what}; resume with the same model and "
                                      "flags, or choose a new --workdir")
        return
    if resume and config.progress:
        print(f"onnxgenie: note: {work} holds no earlier run; starting a new one", file=sys.stderr)
    try:
        work.mkdir(parents=True, exist_ok=True)
        tmp = work / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(run, indent=1))
        os.replace(tmp, saved_file)
    except OSError as err:
        raise BadInputError(f"cannot write in --workdir {work} ({err.strerror}); choose a writable folder") from None


def check_finite(model: onnx.ModelProto) -> None:
    """Refuse to export a model with NaN/Inf in any float initializer."""
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            if not np.isfinite(numpy_helper.to_array(t)).all():
                raise DivergenceError(f"the quantized model has NaN/Inf in {t.name}, so it is not written; "
                                      "rerun with another --seed or fewer bits, and report it with the model")


def quantize(model, config: QuantizeConfig, calib_data: str | os.PathLike | None = None,
             calib: np.ndarray | None = None, resume: bool = False) -> QuantizeResult:
    """The whole pipeline in memory. ``calib`` (float32 NCHW) overrides ``config.calib``.

    With ``config.workdir`` finished distillation batches and blocks are kept there; ``resume``
    continues such a run (refused when the model, config or seed differ)."""
    check_bits(config.wbits, config.abits, config.first_last_bits, config.target)
    if config.reconstruct:
        from .quant.reconstruct import check_args

        check_args(config.recon_iters, config.recon_batch, config.quantizer,
                   len(calib) if calib is not None else config.calib_images)
    original = load_model(model)
    normal, folded = prepare(original)
    plan = build_plan(folded, config.wbits, config.abits, config.first_last_bits, config.target, config.exclude)
    init_weights(folded, plan)
    if calib is None and config.calib != "distill":  # bad data is refused before the work dir is written
        calib = calibration_images(original, normal, config, calib_data)
    check_workdir(original, config, resume, calib)
    if calib is None:
        calib = calibration_images(original, normal, config, calib_data, resume)
    init_activations(folded, plan, calib, batch_size=config.act_batch, threads=config.threads, seed=config.seed)
    info: dict = {"config": asdict(config), "calib_images": int(len(calib))}
    if config.reconstruct:
        plan, info["reconstruction"] = reconstruct_stage(folded, plan, calib, config)
    exported = export_qdq(folded, plan)
    check_finite(exported)
    simulation = fakequant_model(folded, plan, opset=EXPORT_OPSET)
    info["parity"] = parity(exported, simulation, calib[:PARITY_IMAGES])
    if not info["parity"] <= PARITY_TOLERANCE:
        raise OnnxGenieError(f"the exported model differs from its simulation by {info['parity']:.2e} of the "
                             "logit range; this is a bug, please report it with the model")
    meta = {"wbits": config.wbits, "abits": config.abits, "first_last_bits": config.first_last_bits,
            "target": config.target, "calib": config.calib, "reconstruct": config.reconstruct}
    exported.metadata_props.add(key="onnxgenie", value=json.dumps(meta))
    return QuantizeResult(exported, plan, simulation, info)


def check_output(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse, before any work, an output that would clobber the input or an existing file."""
    out = Path(out)
    if Path(src).exists() and out.exists() and os.path.samefile(src, out):
        raise BadInputError(f"the output {out} is the input model; write the quantized model to another path")
    if out.is_dir():
        raise BadInputError(f"{out} is a directory; give the output .onnx file path")
    if out.exists() and not overwrite:
        raise BadInputError(f"{out} exists; pass --overwrite to replace it, or choose another path")
    if out.parent.exists() and not out.parent.is_dir():
        raise BadInputError(f"{out.parent} is a file, not a folder; give an output path inside a folder")
    if not out.parent.is_dir():
        raise BadInputError(f"the folder {out.parent} does not exist; create it first")
    try:  # the same kind of file write_model makes, so that a read-only folder is refused before the work
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise BadInputError(f"cannot write in the folder {out.parent} ({err.strerror}); "
                            "choose a writable output folder") from None
    return out


def write_model(model: onnx.ModelProto, out: str | os.PathLike) -> None:
    """Write atomically: a temporary file in the same folder, checked (onnx.checker, no NaN/Inf) and
    renamed over ``out`` only then; nothing is left behind on failure."""
    out = Path(out)
    check_finite(model)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(model.SerializeToString())
        onnx.checker.check_model(tmp)
        os.replace(tmp, out)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):  # disk full, folder removed meanwhile: not a bug
            raise BadInputError(f"cannot write {out} ({err.strerror or err}); free some space or choose "
                                "another output folder") from None
        raise


def run_quantize(src: str | os.PathLike, out: str | os.PathLike, config: QuantizeConfig,
                 calib_data: str | os.PathLike | None = None, overwrite: bool = False, resume: bool = False) -> dict:
    """CLI entry: checks the output path first, quantizes, writes atomically; returns the info dict."""
    out = check_output(src, out, overwrite)
    result = quantize(src, config, calib_data, resume=resume)
    write_model(result.model, out)
    if config.progress:
        print(f"onnxgenie: wrote {out} (W{config.wbits}A{config.abits}, target {config.target}, "
              f"parity {result.info['parity']:.1e})", file=sys.stderr)
    return result.info
