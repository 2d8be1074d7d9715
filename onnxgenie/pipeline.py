"""``onnxgenie quantize``: the stages from a float model to a QDQ model, one plain call each.

    normalize -> fold BN -> plan -> weight steps -> calibration images -> activation steps
    -> [GENIE-M reconstruction] -> QDQ export -> parity check -> atomic write

Calibration images are distilled with GENIE-D (zero-shot, the default), read from a file
(``calib="data"``) or drawn as Gaussian noise (``calib="noise"``, the naive zero-shot baseline).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import (BadInputError, BadSettingError, DivergenceError, OnnxGenieError, OutputExistsError,
                     QualityGateError, ResumeMismatchError)
from .evaluate import buffer_reuse_hazard
from .export.qdq import EXPORT_OPSET, export_qdq
from .graph.bn import fold_bn, require_bn
from .graph.load import image_io, image_tensors, load_model, normalize
from .quant.augment import AUGMENTS
from .quant.fakequant import fakequant_model
from .quant.init import IMAGE_SIGMAS, P_NORM, image_range, init_activations, init_weights, set_image_step
from .quant.plan import build_plan, check_bits, check_weight_grid
from .quant.spec import QuantPlan
from .resources import cap_to_cores, default_threads

CALIB_SOURCES = ("distill", "data", "noise")
PARITY_TOLERANCE = 1e-4  # of the logit range
PARITY_IMAGES = 16
SENSITIVITY_IMAGES = 256   # calibration images that rank layers for --auto-high-bits
# The simulation and the export agree bit for bit at this level; ORT_ENABLE_ALL re-lays-out the float
# convolutions of the simulation (NCHWc), which changes float sums and so a few rounding decisions.
PARITY_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


@dataclass(frozen=True)
class QuantizeConfig:
    """Every setting of a run. ``QuantizeConfig()`` is init-only; ``preset_config`` gives the presets."""

    wbits: int = 4
    abits: int = 4
    first_last_bits: int = 8
    target: str = "ort"
    weight_grid: str = "auto"           # asym | sym | auto (symmetric for depthwise convs only)
    exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] | None = None  # only these op types quantized (onnxruntime's op_types_to_quantize)
    high_bits: tuple[str, ...] = ()     # nodes at first_last_bits (weights and input), like the first/last layer
    auto_high_bits: int = 0             # this many more, chosen on the calibration images (quant.sensitivity)
    calib: str = "distill"
    calib_images: int = 256
    holdout_images: int = 0             # distilled beside the calibration set, only to measure agreement
    distill_iters: int = 500
    distill_batch: int = 128
    distill_mode: str = "genie"         # genie | zeroq | noise (the paper's Table 2 ablation)
    swing: bool = True
    jobs: int = 1                       # distillation worker processes
    act_batch: int = 64
    reconstruct: bool = False
    recon_iters: int = 2000
    recon_batch: int = 32
    recon_lr_scale: float = 1.0         # on GENIE-M's three learning rates (the reference's suit 2k-20k steps)
    recon_augment: str = "none"         # auto | none | flip | flip-shift: mirrored / shifted copies for GENIE-M
    recon_act_lr_scale: float | None = 1.0  # on the activation steps' rate only; None: auto (act_lr_scale_for)
    recon_qdrop: bool = True            # QDrop at the activation quantizers inside each block (the reference's)
    recon_candidates: int | None = 1    # reconstructions with different seeds, the closest to FP32 kept; None: auto
    quantizer: str = "genie"           # GENIE-M (learned weight steps) or "adaround" (fixed steps)
    lam: float | None = None            # rounding-loss weight; None: 1.0 genie / 0.1 adaround
    seed: int = 0
    threads: int = 0                    # onnxruntime threads of this process; 0: one per core
    workdir: str | None = None
    progress: bool = True
    mean: tuple[float, ...] | None = None  # the input's preprocessing: uint8 calibration files, image range
    std: tuple[float, ...] | None = None
    preset: str | None = None           # the preset the values came from (for the report)
    input_size: tuple[int, int] | None = None   # fixes a dynamic image height/width (--input-size H W)
    min_agreement: float | None = None  # quality gate: FP32 vs quantized top-1 agreement, %, on held-out images
    verbose: bool = False               # per-batch / per-block lines and reconstruction losses


# fast: ResNet-20 on 2 cores in minutes: two distillation batches of 128 (one round on two cores), 500
# GENIE-M steps with learning rates x8 (docs/design.md). No held-out images: 64 more would cost a second
# distillation round there, and batches of 160 (to fit them in one) cost 1.9 pt at W2A4. paper: GENIE's own.
PRESETS: dict[str, dict] = {
    "fast": dict(calib_images=256, holdout_images=0, distill_iters=200, distill_batch=128, reconstruct=True,
                 recon_iters=500, recon_batch=32, recon_lr_scale=8.0, recon_augment="auto", recon_act_lr_scale=None,
                 recon_candidates=None),
    "paper": dict(calib_images=1024, holdout_images=128, distill_iters=4000, distill_batch=128, reconstruct=True,
                  recon_iters=20000, recon_batch=32, recon_lr_scale=1.0),
}


def preset_config(preset: str = "fast", **overrides) -> QuantizeConfig:
    """The preset's budget with ``overrides`` (any QuantizeConfig field) on top; None values are ignored."""
    if preset not in PRESETS:
        raise BadInputError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    fields = {k for k in QuantizeConfig.__dataclass_fields__}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise BadSettingError(f"unknown settings {unknown}; use QuantizeConfig's fields: {', '.join(sorted(fields))}")
    config = QuantizeConfig(**{**PRESETS[preset], "preset": preset,
                               **{k: v for k, v in overrides.items() if v is not None}})
    check_config(config)
    return config


_FLAGS = {"lam": "--lambda", "recon_qdrop": "--qdrop", "swing": "--no-swing", "reconstruct": "--no-reconstruct"}
# field: (smallest value (None: check_bits says), whether None is allowed)
_WHOLE = {"wbits": (None, False), "abits": (None, False), "first_last_bits": (None, False), "auto_high_bits": (0, False),
          "calib_images": (1, False), "holdout_images": (0, False), "distill_iters": (1, False),
          "distill_batch": (1, False), "jobs": (1, False), "act_batch": (1, False), "recon_iters": (1, False),
          "recon_batch": (1, False), "recon_candidates": (1, True), "seed": (0, False), "threads": (0, False)}
# field: (lowest, highest, lowest excluded, whether None is allowed)
_REAL = {"recon_lr_scale": (0.0, math.inf, True, False), "recon_act_lr_scale": (0.0, math.inf, True, True),
         "lam": (0.0, math.inf, False, True), "min_agreement": (0.0, 100.0, False, True)}
_FLAGS_ON_OFF = ("swing", "reconstruct", "recon_qdrop", "progress", "verbose")
SEED_LIMIT = 2 ** 63


def _choices() -> dict[str, tuple[str, ...]]:
    """The settings that take one of a few words, with those words."""
    from .distill.genie_d import MODES
    from .quant.plan import TARGETS, WEIGHT_GRIDS
    from .quant.reconstruct import QUANTIZERS

    return {"target": TARGETS, "weight_grid": WEIGHT_GRIDS, "calib": CALIB_SOURCES, "distill_mode": MODES,
            "recon_augment": AUGMENTS, "quantizer": QUANTIZERS}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _is_whole(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_config(config: QuantizeConfig) -> None:
    """Refuse, before any work, a setting of the wrong type or out of range: counts that are not whole
    numbers >= their minimum, NaN/Inf or negative rates and weights, a gate outside 0-100 %, a
    non-finite --mean or a --std <= 0 (BadSettingError, one line naming the flag)."""
    for name, (low, optional) in _WHOLE.items():
        v = getattr(config, name)
        if (v is None and not optional) or (v is not None and (not _is_whole(v) or (low is not None and v < low)
                                                                   or (name == "seed" and v >= SEED_LIMIT))):
            rule = "a whole number" + ("" if low is None else f" >= {low}")
            raise BadSettingError(f"{_flag(name)} must be {rule} (got {v!r}); pass one, or leave it out for the "
                                  "preset's value")
    for name, (low, high, open_low, optional) in _REAL.items():
        v = getattr(config, name)
        if v is None and optional:
            continue
        if not _is_real(v) or not math.isfinite(v) or v < low or (open_low and v == low) or v > high:
            bound = f"> {low:g}" if open_low else f">= {low:g}"
            rule = f"{bound}" + (f" and <= {high:g}" if math.isfinite(high) else "")
            raise BadSettingError(f"{_flag(name)} must be a finite number {rule} (got {v!r}); pass one, or leave "
                                  "it out for the default")
    for name in _FLAGS_ON_OFF:
        if not isinstance(getattr(config, name), (bool, np.bool_)):
            raise BadSettingError(f"{name} must be True or False (got {getattr(config, name)!r}); pass a bool")
    for name, choices in _choices().items():
        if getattr(config, name) not in choices:
            raise BadSettingError(f"{_flag(name)} {getattr(config, name)!r} is not one of {', '.join(choices)}; "
                                  "pass one of those")
    for name in ("exclude", "high_bits", "op_types"):
        v = getattr(config, name)
        if v is None and name == "op_types":
            continue
        if isinstance(v, str) or not isinstance(v, (tuple, list)) or not all(isinstance(n, str) for n in v):
            what = "op types (Conv, Gemm, ...)" if name == "op_types" else "node names"
            raise BadSettingError(f"{_flag(name)} must be a list of {what} (got {v!r}); names are in "
                                  "`onnxgenie inspect --plan`")
    if config.workdir is not None and not isinstance(config.workdir, (str, os.PathLike)):
        raise BadSettingError(f"--workdir must be a folder path (got {config.workdir!r}); pass a str or a Path")
    if config.input_size is not None and (not isinstance(config.input_size, (tuple, list))
                                          or len(config.input_size) != 2
                                          or not all(_is_whole(v) and v > 0 for v in config.input_size)):
        raise BadSettingError(f"--input-size needs two positive whole numbers H W (got {config.input_size!r}); "
                              "pass the height and width the model was trained at")
    check_preprocessing(config.mean, config.std)


# 4-bit activation steps at 64x the rate in the fast preset's 500 steps (beside 4-bit weights or more):
# ShuffleNet W4A4 74.84 -> 78.54 (cached images, three seeds; x4 76.51, x16 77.79); ResNet-20/32 level at
# x4, x16 and x64. At 2-bit weights x64 cost ShuffleNet W2A4 3.9 pt (two seeds), so it stays 1 (docs/design.md).
FAST_ACT_LR_SCALE = 64.0


def act_lr_scale_for(config: QuantizeConfig) -> float:
    """The activation-step learning-rate factor: the config's, or for ``None`` (the fast preset's auto)
    ``FAST_ACT_LR_SCALE`` for activations of 4 bits or fewer beside weights of 4 bits or more, else 1."""
    if config.recon_act_lr_scale is not None:
        return config.recon_act_lr_scale
    return FAST_ACT_LR_SCALE if config.wbits >= 4 and config.abits <= 4 else 1.0


# Two reconstructions below 4-bit weights, the one with the lower calibration KL kept: ResNet-20 W2A4, eight
# paired seeds on one image set, 76.72 against 76.52 (level), s.d. 0.38 against 1.62: the run about one in 16
# that falls ~4 pt is replaced; among normal runs the KL picks no better than chance (held-out seeds). W4A4's
# spread (s.d. ~0.25) leaves nothing to insure (docs/design.md).
FAST_CANDIDATES_BELOW_4_BIT = 2


def candidates_for(config: QuantizeConfig) -> int:
    """GENIE-M reconstructions to run: the config's, or for ``None`` (the fast preset's auto)
    ``FAST_CANDIDATES_BELOW_4_BIT`` below 4-bit weights, else 1. The same on every machine (on one core
    the candidates run one after another)."""
    if config.recon_candidates is not None:
        return config.recon_candidates
    return FAST_CANDIDATES_BELOW_4_BIT if config.wbits < 4 else 1


def auto_jobs(config: QuantizeConfig) -> int:
    """Distillation processes for ``config``: one per core and batch (1 when nothing is distilled)."""
    from .resources import default_jobs

    if config.calib != "distill":
        return 1
    images = config.calib_images + max(config.holdout_images, 0)
    return default_jobs(-(-images // max(config.distill_batch, 1)))


@dataclass
class QuantizationResult:
    model: onnx.ModelProto            # the exported QDQ model
    plan: QuantPlan
    simulation: onnx.ModelProto       # the float fake-quant model (opset 21) the export reproduces
    report: dict = field(default_factory=dict)
    calibration: np.ndarray | None = None  # the images the steps were fitted on (NCHW or the model's layout)

    @property
    def agreement(self) -> float | None:
        return self.report.get("agreement", {}).get("top1_agreement")


def prepare(model, input_hw: tuple[int, int] | None = None) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(normal form, BN-folded normal form); ``input_hw`` fixes a dynamic height/width."""
    normal = normalize(load_model(model), input_hw)
    return normal, fold_bn(normal)


def calibration_images(original: onnx.ModelProto, normal: onnx.ModelProto, config: QuantizeConfig,
                       calib_data: str | os.PathLike | None = None,
                       resume: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """(calibration, held-out, info): float32 images in the model's input space and layout.

    The first ``calib_images`` fit the steps (and reconstruction); the next ``holdout_images`` only
    measure FP32-vs-quantized agreement. From a file, the held-out images are those it has beyond the
    calibration set (none if it has no more)."""
    chw = image_io(normal).chw
    rng = np.random.default_rng(config.seed)
    n, m = config.calib_images, max(config.holdout_images, 0)
    if config.calib == "data":
        from .evaluate import load_npz, preprocess

        if calib_data is None:
            raise BadInputError("calibration from data needs --calib-data FILE.npz")
        input_name = image_io(normal).input
        images, _ = load_npz(calib_data, need_labels=False, input_name=input_name)
        with np.load(calib_data) as f:
            by_input_name = "images" not in f.files  # stored as the model takes it (onnxruntime's convention)
        if by_input_name and images.dtype != np.uint8 and images.ndim == 4:
            images = _nchw(normal, images)
        # float images are already preprocessed: --mean/--std then only give the image quantizer's range
        x = preprocess(images, chw, *((config.mean, config.std) if images.dtype == np.uint8 else (None, None)))
        order = rng.permutation(len(x)) if len(x) > n else np.arange(len(x))
        calib, held = x[np.sort(order[:n])], x[np.sort(order[n:n + m])]
        with np.load(calib_data) as f:  # a file written by `onnxgenie distill` holds synthetic images
            synthetic = "loss_history" in f.files
        return (_input_layout(normal, calib), _input_layout(normal, held),
                {"source": "data", "file": str(calib_data), "synthetic": synthetic})
    if config.calib == "noise":
        x = rng.standard_normal((n + m, *chw)).astype(np.float32)
        return _input_layout(normal, x[:n]), _input_layout(normal, x[n:]), {"source": "noise"}
    if config.calib == "distill":
        from .distill import distill

        batch = min(config.distill_batch, n + m)   # distill lowers the jobs, or chunks, to fit in memory
        x, info = distill(original, n_images=n + m, batch=batch, iters=config.distill_iters, seed=config.seed,
                          mode=config.distill_mode, swing=config.swing, jobs=config.jobs, progress=config.progress,
                          threads=1,  # as in every worker: --jobs and --threads do not change the images
                          workdir=None if config.workdir is None else str(Path(config.workdir) / "distill"),
                          resume=resume and (Path(config.workdir) / "distill").exists(), input_hw=config.input_size)
        x = np.asarray(x, dtype=np.float32)
        info = {"source": "distill", **info}
        return x[:n], x[n:], info   # a batch rounded up leaves more held-out images
    raise BadInputError(f"unknown calibration source {config.calib!r}; use one of {', '.join(CALIB_SOURCES)}")


def _nchw(normal: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Images in the model's input layout as NCHW (the inverse of ``_input_layout``)."""
    from .graph.load import nhwc_transpose

    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if nhwc_transpose(normal) is not None else x


def _input_layout(normal: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from .graph.load import to_input_layout

    return to_input_layout(normal, x)


def auto_high_bits_stage(folded: onnx.ModelProto, plan: QuantPlan, calib: np.ndarray,
                         config: QuantizeConfig) -> tuple[QuantPlan, dict]:
    """``config.auto_high_bits`` more layers at ``first_last_bits``: those whose high bits lower the
    FP32-vs-quantized KL divergence on the calibration images most (``quant.sensitivity``). ``plan``
    is initialised with ``config.high_bits``; returns the new initialised plan and what was chosen."""
    from .evaluate import predict
    from .quant.sensitivity import choose, high_bits_gains, plan_kl, with_high_node

    high = build_plan(folded, config.wbits, config.abits, config.first_last_bits, config.target, config.exclude,
                      config.weight_grid, tuple(plan.weights), config.op_types)
    init_weights(folded, high)
    init_activations(folded, high, calib, batch_size=config.act_batch, threads=config.threads, seed=config.seed)
    images = calib[:SENSITIVITY_IMAGES]
    reference = predict(folded, images, threads=config.threads)
    gains, base = high_bits_gains(folded, plan, high, images, config.threads, reference)
    chosen = choose(gains, config.auto_high_bits)
    report = {"given": list(config.high_bits), "chosen": chosen, "images": len(images), "kl_before": base,
              "gains": {n: round(g, 6) for n, g in sorted(gains.items(), key=lambda kv: -kv[1])}}
    if not chosen:
        return plan, report
    for node in chosen:   # each quantizer is initialised on its own: the same as a plan built with them high
        plan = with_high_node(plan, high, node)
    report["kl_after"] = plan_kl(folded, plan, images, reference, config.threads)
    if config.progress:
        print(f"onnxgenie: high bits: {len(chosen)} of {len(gains)} low-bit layers at {config.first_last_bits} bits "
              f"(KL to FP32 on {len(images)} calibration images {base:.4f} -> {report['kl_after']:.4f} before "
              f"reconstruction): {', '.join(chosen)}", file=sys.stderr)
    return plan, report


FALLBACK_NAMES_SHOWN = 4


def _names(names: list[str]) -> str:
    more = len(names) - FALLBACK_NAMES_SHOWN
    return ", ".join(names[:FALLBACK_NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _fallbacks(blocks: list[dict]) -> str:
    """The blocks GENIE-M did not learn whole, grouped by why (status strings of ``reconstruct``); a few
    names per reason (the report has them all)."""
    rtn: dict[str, list[str]] = {}
    for b in blocks:
        if str(b.get("status", "")).startswith("rtn ("):
            rtn.setdefault(b["status"][5:-1], []).append(b["name"])
    by_layer = [b["name"] for b in blocks if "layer by layer" in str(b.get("status", ""))]
    text = "".join(f"; kept at round-to-nearest ({reason}): {_names(names)}" for reason, names in rtn.items())
    if by_layer:
        reason = next(b["status"] for b in blocks if b["name"] == by_layer[0]).split("block rtn (", 1)[-1].rstrip(")")
        text += f"; learned layer by layer: {_names(by_layer)} ({reason})"
    return text


def reconstruct_stage(folded: onnx.ModelProto, plan: QuantPlan, calib: np.ndarray,
                      config: QuantizeConfig) -> tuple[QuantPlan, dict]:
    """GENIE-M (``quant.reconstruct``): learned softbits and steps, block by block."""
    from .graph.load import nhwc_transpose
    from .quant.augment import augment, resolve
    from .quant.candidates import reconstruct_candidates
    from .quant.reconstruct import reconstruct

    workdir = None if config.workdir is None else str(Path(config.workdir) / "reconstruct")
    h_axis, w_axis = (1, 2) if nhwc_transpose(folded) is not None else (2, 3)
    mode = resolve(config.recon_augment, config.wbits)
    images = augment(calib, mode, h_axis, w_axis)
    settings = dict(iters=config.recon_iters, batch=config.recon_batch, quantizer=config.quantizer, lam=config.lam,
                    lr_scale=config.recon_lr_scale, act_lr_scale=act_lr_scale_for(config), qdrop=config.recon_qdrop)
    verbose = config.verbose and config.progress
    n = candidates_for(config)
    if n == 1:
        plan, report = reconstruct(folded, plan, images, seed=config.seed, workdir=workdir, progress=config.progress,
                                   threads=config.threads, verbose=verbose, **settings)
    else:
        plan, report = reconstruct_candidates(folded, plan, images, calib, n, config.seed, workdir, config.progress,
                                              config.threads, verbose, **settings)
    return plan, {**report, "augment": mode}


def _candidates_line(candidates: list[dict]) -> str:
    """'; best of 2 by calibration KL: seed 1000 (0.40; others 0.57)' for a multi-candidate reconstruction."""
    if not candidates:
        return ""
    chosen = next(c for c in candidates if c["chosen"])
    others = ", ".join(f"{c['calibration_kl']:.4g}" for c in candidates if not c["chosen"])
    return (f"; best of {len(candidates)} by calibration KL: seed {chosen['seed']} "
            f"({chosen['calibration_kl']:.4g}; others {others})")


def parity(exported: onnx.ModelProto, simulation: onnx.ModelProto, x: np.ndarray) -> float:
    """max |exported - simulated logits| / logit range on ``x``."""
    from .evaluate import predict

    a = predict(simulation, x, level=PARITY_LEVEL)
    b = predict(exported, x, level=PARITY_LEVEL)
    return float(np.abs(a - b).max() / max(float(np.ptp(a)), 1e-12))


RUN_FILE = "run.json"
# Settings that do not change the result: a resumed run may differ in them.
_NOT_HASHED = ("workdir", "progress", "jobs", "threads", "preset", "min_agreement", "verbose")


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
        try:
            saved = json.loads(saved_file.read_text()) if saved_file.exists() else {}
            if not isinstance(saved, dict):
                raise ValueError(type(saved).__name__)
        except (ValueError, UnicodeDecodeError, OSError):
            raise ResumeMismatchError(f"{saved_file} is damaged (not the JSON this tool writes), so the finished "
                                      f"work cannot be checked; remove {work} to start again, or choose a new "
                                      "--workdir") from None
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


def check_preprocessing(mean, std) -> None:
    """--mean and --std come together, one finite value per channel each (the count is checked on use),
    std > 0."""
    if (mean is None) != (std is None):
        raise BadInputError("--mean and --std go together; give both (per channel, after /255) or neither")
    if mean is None:
        return
    if not all(isinstance(v, (tuple, list, np.ndarray)) for v in (mean, std)) \
            or not all(_is_real(v) for v in (*mean, *std)):
        raise BadSettingError(f"--mean/--std must be lists of numbers (got {mean!r} / {std!r}); give one per "
                              "channel, after /255")
    if len(std) != len(mean) or not all(math.isfinite(v) for v in (*mean, *std)) or any(not v > 0 for v in std):
        raise BadSettingError(f"--mean/--std need the same number of finite values, std > 0 (got {list(mean)} / "
                              f"{list(std)}); give the model's per-channel normalisation, after /255")


def check_finite(model: onnx.ModelProto) -> None:
    """Refuse to export a model with NaN/Inf in any float initializer."""
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            if not np.isfinite(numpy_helper.to_array(t)).all():
                raise DivergenceError(f"the quantized model has NaN/Inf in {t.name}, so it is not written; "
                                      "rerun with another --seed or fewer bits, and report it with the model")


class _Stages:
    """Wall time and peak memory (this process's high-water mark so far) of each stage, in order."""

    def __init__(self, progress: bool):
        self.progress, self.table, self._t0 = progress, {}, time.perf_counter()

    def done(self, name: str, summary: str = "", **extra) -> None:
        from .resources import peak_rss

        now = time.perf_counter()
        self.table[name] = {"wall_s": round(now - self._t0, 3), "peak_rss_mib": round(peak_rss() / 2 ** 20), **extra}
        if self.progress and summary:
            print(f"onnxgenie: {name}: {summary} ({now - self._t0:.1f} s)", file=sys.stderr)
        self._t0 = now


def quantize(model, config: QuantizeConfig, calib_data: str | os.PathLike | None = None,
             calib: np.ndarray | None = None, resume: bool = False) -> QuantizationResult:
    """The whole pipeline in memory. ``calib`` (float32, the model's layout) overrides ``config.calib``,
    which then says what the images are: real (``"data"``) or synthetic (``"distill"``, ``"noise"``).

    With ``config.workdir`` finished distillation batches and blocks are kept there; ``resume``
    continues such a run (refused when the model, config or seed differ). The result's report holds
    what ``report.py`` describes; the quality gate (``min_agreement``) is the caller's to apply."""
    from . import report as rep

    check_config(config)
    check_bits(config.wbits, config.abits, config.first_last_bits, config.target)
    check_weight_grid(config.weight_grid, config.target)
    stages = _Stages(config.progress)
    original = load_model(model)
    normal, folded = prepare(original, config.input_size)
    if calib is not None:
        calib = check_calib_array(normal, calib)
    channels = image_io(normal).chw[0]
    if config.mean is not None and len(config.mean) != channels:
        raise BadSettingError(f"--mean/--std have {len(config.mean)} values but the model takes {channels} "
                              "channels; give one value per channel")
    if config.reconstruct:
        from .quant.reconstruct import check_args, check_lr_scale

        check_args(config.recon_iters, config.recon_batch, config.quantizer,
                   len(calib) if calib is not None else config.calib_images)
        check_lr_scale(config.recon_lr_scale)
        check_lr_scale(act_lr_scale_for(config), "--recon-act-lr-scale")
        if candidates_for(config) < 1:
            raise BadInputError(f"--recon-candidates must be at least 1 (got {config.recon_candidates})")
        if config.recon_augment not in AUGMENTS:
            raise BadInputError(f"unknown --recon-augment {config.recon_augment!r}; use one of {', '.join(AUGMENTS)}")
    config = replace(config, threads=default_threads(config.threads, notify=config.progress))
    if config.calib == "distill" and calib is None:
        config = replace(config, jobs=cap_to_cores(config.jobs, "--jobs", notify=config.progress))
    if calib is None and config.calib == "distill":
        require_bn(normal, original)  # before the weight steps, which take a minute on a large model
        from .distill.memory import fit_distill

        fit_distill(normal, min(config.distill_batch, config.calib_images + max(config.holdout_images, 0)), 1,
                    notify=False)   # a model too large for this machine is refused now
    plan = build_plan(folded, config.wbits, config.abits, config.first_last_bits, config.target, config.exclude,
                      config.weight_grid, config.high_bits, config.op_types)
    init_weights(folded, plan)
    holdout, calib_info = None, {"source": "given"}
    if calib is None and config.calib != "distill":  # bad data is refused before the work dir is written
        calib, holdout, calib_info = calibration_images(original, normal, config, calib_data)
    if calib is not None:
        check_fp32_outputs(normal, calib, config.threads, "calibration")
    check_workdir(original, config, resume, calib)
    stages.done("prepare")  # silent: a refusal of the input may still come, and it must be the only line
    if calib is None:
        calib, holdout, calib_info = calibration_images(original, normal, config, calib_data, resume)
        check_fp32_outputs(normal, calib, config.threads, "distilled")
        losses = calib_info["final_losses"]
        if config.verbose and config.progress:
            for b, loss in enumerate(losses):
                print(f"onnxgenie: GENIE-D batch {b}: final BNS loss {loss:.4f}", file=sys.stderr)
        stages.done("distill", f"{len(calib) + len(holdout)} images, final BNS loss {np.mean(losses):.4f} "
                    f"(batches {np.min(losses):.4f}-{np.max(losses):.4f})", jobs=calib_info["jobs"],
                    distilling_process_peak_rss_mib=calib_info["process_peak_rss_mib"])
    init_activations(folded, plan, calib, batch_size=config.act_batch, threads=config.threads, seed=config.seed)
    high_bits_report = None
    if config.auto_high_bits:
        plan, high_bits_report = auto_high_bits_stage(folded, plan, calib, config)
    for image in image_tensors(normal):  # an NHWC model's image is quantized after its Transpose
        if image in plan.acts and (config.calib != "data" or calib_info.get("synthetic") or config.mean):
            # synthetic images do not span a real image's range; --mean/--std give it exactly
            lo, hi = image_range(calib, config.mean, config.std)
            set_image_step(plan.acts[image], lo, hi, plan.target == "tensorrt")
            calib_info = {**calib_info, "image_range": [round(lo, 4), round(hi, 4)],
                          "image_range_from": "--mean/--std" if config.mean else f"±{IMAGE_SIGMAS:g} std of the images"}
    stages.done("init", f"steps of {len(plan.weights)} weights (L{P_NORM} search) and {len(plan.acts)} activations "
                f"from {len(calib)} images")
    report: dict = {"model": str(model) if isinstance(model, (str, os.PathLike)) else original.graph.name,
                    "versions": rep.versions(), "config": asdict(config), "seed": config.seed,
                    "calibration": _calibration_report(calib, holdout, calib_info)}
    if high_bits_report is not None:
        report["high_bits"] = high_bits_report
    if config.reconstruct:
        plan, report["reconstruction"] = reconstruct_stage(folded, plan, calib, config)
        blocks = report["reconstruction"]["blocks"]
        candidates = report["reconstruction"].get("candidates", [])
        stages.done("reconstruct", f"{len(blocks)} blocks, {config.recon_iters} steps each" + _fallbacks(blocks)
                    + _candidates_line(candidates),
                    **({"candidate_process_peak_rss_mib": max(c["peak_rss_mib"] for c in candidates)}
                       if candidates else {}))
    exported = export_qdq(folded, plan)
    check_finite(exported)
    simulation = fakequant_model(folded, plan, opset=EXPORT_OPSET)
    report["parity"] = parity(exported, simulation, calib[:PARITY_IMAGES])
    if not report["parity"] <= PARITY_TOLERANCE:
        raise OnnxGenieError(f"the exported model differs from its simulation by {report['parity']:.2e} of the "
                             "logit range; this is a bug, please report it with the model")
    meta = {"wbits": config.wbits, "abits": config.abits, "first_last_bits": config.first_last_bits,
            "target": config.target, "weight_grid": config.weight_grid, "calib": config.calib,
            "reconstruct": config.reconstruct}
    exported.metadata_props.add(key="onnxgenie", value=json.dumps(meta))
    report["weight_sqnr_db"] = rep.weight_sqnr(folded, plan)
    report["agreement"] = _agreement(normal, exported, calib, holdout, config.threads)
    report["size"] = rep.model_sizes(original, exported)
    report["buffer_reuse_hazard"] = buffer_reuse_hazard(exported)
    if report["buffer_reuse_hazard"] and config.progress:
        print(f"onnxgenie: note: {len(report['buffer_reuse_hazard'])} 8-bit activation(s) follow 4-bit ones of the "
              "same shape; onnxruntime 1.19 (and other releases before its PR 32611) can overflow a buffer on "
              "this model: run it on a current onnxruntime (1.32 is right) or with "
              "SessionOptions.enable_mem_reuse = False", file=sys.stderr)
    stages.done("export", f"QDQ opset {EXPORT_OPSET}, parity {report['parity']:.1e}, top-1 agreement "
                f"{report['agreement']['top1_agreement']:.2f} % on {report['agreement']['images']} "
                f"{report['agreement']['on']} images"
                + (f" ({OPTIMISTIC})" if report["agreement"]["on"] == "calibration" else ""))
    report["stages"] = stages.table
    return QuantizationResult(exported, plan, simulation, report, calib)



def _calibration_report(calib: np.ndarray, holdout: np.ndarray | None, info: dict) -> dict:
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


def _agreement(normal: onnx.ModelProto, exported: onnx.ModelProto, calib: np.ndarray,
               holdout: np.ndarray | None, threads: int) -> dict:
    """FP32 vs quantized top-1 agreement on the held-out images (on the calibration images without any)."""
    from .report import top1_agreement

    held = holdout is not None and len(holdout) > 0
    x = holdout if held else calib
    on = "held-out" if held else "calibration"
    return {"top1_agreement": round(top1_agreement(normal, exported, x, threads, on), 2), "images": int(len(x)),
            "on": on}


def check_fp32_outputs(normal: onnx.ModelProto, x: np.ndarray, threads: int, what: str) -> None:
    """Refuse images on which the FP32 model itself outputs NaN/Inf: no agreement can be measured there."""
    from .evaluate import predict
    from .report import check_finite_logits

    check_finite_logits(predict(normal, x, threads=threads), what)


def check_calib_array(normal: onnx.ModelProto, calib) -> np.ndarray:
    """Calibration images given as an array: float32, [N, *the model's input shape], N >= 1, finite."""
    from .graph.load import _dims, _image_input

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


def check_outputs(src, out: str | os.PathLike | None, config: QuantizeConfig, overwrite: bool,
                  calib_data: str | os.PathLike | None = None, report_json: str | os.PathLike | None = None,
                  report_html: str | os.PathLike | None = None) -> None:
    """Every file the run will write (``files.check_writes``), before any work: none may exist without
    ``overwrite``, be an input (the model, its external data, ``calib_data``) or another output. The
    work dir's report.json may be replaced when it belongs to the run there (its run.json exists)."""
    from .files import check_distinct, check_writes
    from .graph.load import external_data_files

    inputs = []
    if isinstance(src, (str, os.PathLike)):
        inputs.append(("the input model", src))
        inputs += [("the model's external data file", f) for f in external_data_files(src)]
    if isinstance(calib_data, (str, os.PathLike)):
        inputs.append(("the --calib-data file", calib_data))
    outputs = [("-o", out), ("--report", report_json), ("--report-html", report_html)]
    check_writes(outputs, inputs, overwrite)
    if config.workdir is not None:
        report = Path(config.workdir) / "report.json"
        check_distinct([*outputs, ("the work dir's report.json", report)], inputs)
        if (report.exists() or report.is_symlink()) and not overwrite and not (Path(config.workdir) / RUN_FILE).exists():
            raise OutputExistsError(f"{report} exists and the run would write its report there; pass --overwrite to "
                                    "replace it, or choose another --workdir")


def write_model(model: onnx.ModelProto, out: str | os.PathLike, overwrite: bool = True) -> None:
    """Write atomically: a temporary file in the same folder, checked (onnx.checker, no NaN/Inf) and
    renamed over ``out`` only then; nothing is left behind on failure."""
    from .files import atomic_write, storage_error

    out = Path(out)
    check_finite(model)
    try:
        atomic_write(out, model.SerializeToString(), check=onnx.checker.check_model, overwrite=overwrite)
    except OSError as err:  # disk full, folder removed meanwhile: not a bug
        raise storage_error(err, str(out)) or BadInputError(
            f"cannot write {out} ({err.strerror or err}); free some space or choose another output folder") from None


def run_quantize(src: str | os.PathLike, out: str | os.PathLike, config: QuantizeConfig,
                 calib_data: str | os.PathLike | None = None, overwrite: bool = False, resume: bool = False,
                 report_json: str | os.PathLike | None = None,
                 report_html: str | os.PathLike | None = None) -> QuantizationResult:
    """CLI entry: checks the output paths first, quantizes, writes the report (and a copy in the work
    dir), applies the quality gate, then writes the model atomically. A missed gate writes no model."""
    check_config(config)
    check_outputs(src, out, config, overwrite, calib_data, report_json, report_html)
    out = Path(out)
    result = quantize(src, config, calib_data, resume=resume)
    gate = check_gate(result.report, config.min_agreement)
    write_reports(result, config, out, report_json, report_html, overwrite)
    if gate is not None:
        raise gate
    write_model(result.model, out, overwrite)
    if config.progress:
        print(f"onnxgenie: wrote {out} (W{config.wbits}A{config.abits}, target {config.target}, "
              f"parity {result.report['parity']:.1e}, {result.report['size']['quantized_bytes'] / 1024:.0f} KiB)",
              file=sys.stderr)
    return result


def check_gate(report: dict, min_agreement: float | None) -> QualityGateError | None:
    """The gate's verdict, recorded in the report: None when passed (or not asked for)."""
    if min_agreement is None:
        return None
    got = report["agreement"]["top1_agreement"]
    on = report["agreement"]["on"]
    report["gate"] = {"min_agreement": min_agreement, "passed": got >= min_agreement, "on": on}
    if on == "calibration":
        report["gate"]["note"] = OPTIMISTIC
    if got >= min_agreement:
        return None
    return QualityGateError(f"top-1 agreement with the FP32 model is {got:.2f} % on {report['agreement']['images']} "
                            f"{on} images, below --min-agreement {min_agreement:g}; no model written (try more "
                            "bits, --preset paper, or --exclude the layers with the lowest SQNR in the report)")


# said wherever agreement is measured on the images the steps were fitted to
OPTIMISTIC = "optimistic: the quantized model was fitted to these images; --holdout-images N measures on others"


def write_reports(result: QuantizationResult, config: QuantizeConfig, out: Path | None,
                  report_json: str | os.PathLike | None, report_html: str | os.PathLike | None,
                  overwrite: bool = True) -> None:
    """The reports ``check_outputs`` cleared: --report, --report-html, and report.json in the work dir
    (the run's own folder, replaced on resume)."""
    from . import report as rep
    from .files import storage_error

    result.report["output"] = None if out is None else str(out)
    try:
        if report_json:
            rep.write_json(result.report, report_json, overwrite)
        if config.workdir is not None:
            rep.write_json(result.report, Path(config.workdir) / "report.json")
        if report_html:
            rep.write_html(result.report, report_html, result.calibration if config.calib == "distill" else None,
                           overwrite)
    except OSError as err:
        raise storage_error(err, "the report") or err from None
