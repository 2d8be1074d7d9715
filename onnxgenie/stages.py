"""The stages of ``pipeline.quantize`` that are more than one call: the checks that need the model, the
image quantizer's range, the high-bits choice, GENIE-M reconstruction, the export with its parity check,
and the measurements of the report."""

from __future__ import annotations

import json

import numpy as np
import onnx

from . import report as rep
from . import status
from .config import QuantizeConfig
from .errors import BadSettingError, OnnxGenieError
from .export.qdq import EXPORT_OPSET, export_qdq
from .graph.load import image_io, image_tensors, nhwc_transpose
from .ortrain import buffer_reuse_hazard
from .outputs import check_finite
from .quant.augment import augment
from .quant.candidates import reconstruct_candidates
from .quant.fakequant import fakequant_model
from .quant.init import IMAGE_SIGMAS, image_range, init_activations, init_weights, set_image_step
from .quant.plan import build_plan
from .quant.reconstruct import check_args, reconstruct
from .quant.sensitivity import choose, high_bits_gains, plan_kl, with_high_node
from .quant.spec import QuantPlan
from .runtime import predict
from .workdir import part

PARITY_TOLERANCE = 1e-4  # of the logit range
PARITY_IMAGES = 16
SENSITIVITY_IMAGES = 256   # calibration images that rank layers for --auto-high-bits
# The simulation and the export agree bit for bit at this level; "all" re-lays-out the float
# convolutions of the simulation (NCHWc), which changes float sums and so a few rounding decisions.
PARITY_LEVEL = "basic"


def check_run(config: QuantizeConfig, normal: onnx.ModelProto, images: int) -> None:
    """The settings that the model or the number of calibration images can refuse: one --mean/--std value
    per channel, a reconstruction batch no larger than the images."""
    channels = image_io(normal).chw[0]
    if config.mean is not None and len(config.mean) != channels:
        raise BadSettingError(f"--mean/--std have {len(config.mean)} values but the model takes {channels} "
                              "channels; give one value per channel")
    if config.reconstruct:
        check_args(config.recon_iters, config.recon_batch, config.quantizer, images)


def plan_of(folded: onnx.ModelProto, config: QuantizeConfig, high_bits: tuple[str, ...] | None = None) -> QuantPlan:
    """The quantization plan the settings ask for (``high_bits``: instead of ``config.high_bits``)."""
    return build_plan(folded, config.wbits, config.abits, config.first_last_bits, config.target, config.exclude,
                      config.weight_grid, config.high_bits if high_bits is None else high_bits, config.op_types)


def image_steps(normal: onnx.ModelProto, plan: QuantPlan, calib: np.ndarray, config: QuantizeConfig,
                info: dict) -> dict:
    """The image quantizer's range (where the image is quantized): synthetic images do not span a real
    image's range, so it is ±``IMAGE_SIGMAS`` std of the images, or exactly --mean/--std's; ``info``
    with the range recorded."""
    for image in image_tensors(normal):  # an NHWC model's image is quantized after its Transpose
        if image in plan.acts and (config.calib != "data" or info.get("synthetic") or config.mean):
            lo, hi = image_range(calib, config.mean, config.std)
            set_image_step(plan.acts[image], lo, hi, plan.target == "tensorrt")
            info = {**info, "image_range": [round(lo, 4), round(hi, 4)],
                    "image_range_from": "--mean/--std" if config.mean else f"±{IMAGE_SIGMAS:g} std of the images"}
    return info


def high_bits(folded: onnx.ModelProto, plan: QuantPlan, calib: np.ndarray,
              config: QuantizeConfig) -> tuple[QuantPlan, dict]:
    """``config.auto_high_bits`` more layers at ``first_last_bits``: those whose high bits lower the
    FP32-vs-quantized KL divergence on the calibration images most (``quant.sensitivity``). ``plan``
    is initialised with ``config.high_bits``; returns the new initialised plan and what was chosen."""
    high = plan_of(folded, config, high_bits=tuple(plan.weights))
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
        status.say(status.high_bits_line(chosen, len(gains), config.first_last_bits, len(images), base,
                                         report["kl_after"]))
    return plan, report


def reconstruction(folded: onnx.ModelProto, plan: QuantPlan, calib: np.ndarray,
                   config: QuantizeConfig) -> tuple[QuantPlan, dict]:
    """GENIE-M (``quant.reconstruct``): learned softbits and steps, block by block, on the calibration
    images and their copies (``quant.augment``), in ``config.recon_candidates`` runs (the closest to FP32
    kept)."""
    workdir = part(config, "reconstruct")
    h_axis, w_axis = (1, 2) if nhwc_transpose(folded) is not None else (2, 3)
    images = augment(calib, config.recon_augment, h_axis, w_axis)
    settings = dict(iters=config.recon_iters, batch=config.recon_batch, quantizer=config.quantizer, lam=config.lam,
                    lr_scale=config.recon_lr_scale, act_lr_scale=config.recon_act_lr_scale,
                    qdrop=config.recon_qdrop)
    verbose = config.verbose and config.progress
    if config.recon_candidates == 1:
        plan, report = reconstruct(folded, plan, images, seed=config.seed, workdir=workdir, progress=config.progress,
                                   threads=config.threads, verbose=verbose, **settings)
    else:
        plan, report = reconstruct_candidates(folded, plan, images, calib, config.recon_candidates, config.seed,
                                              workdir, config.progress, config.threads, verbose, **settings)
    return plan, {**report, "augment": config.recon_augment}


def parity(exported: onnx.ModelProto, simulation: onnx.ModelProto, x: np.ndarray) -> float:
    """max |exported - simulated logits| / logit range on ``x``."""
    a = predict(simulation, x, level=PARITY_LEVEL)
    b = predict(exported, x, level=PARITY_LEVEL)
    return float(np.abs(a - b).max() / max(float(np.ptp(a)), 1e-12))


def export(folded: onnx.ModelProto, plan: QuantPlan, calib: np.ndarray,
           config: QuantizeConfig) -> tuple[onnx.ModelProto, onnx.ModelProto, float]:
    """(QDQ model, its fake-quant simulation, their parity on the first calibration images). An export
    that does not reproduce its simulation is a bug (OnnxGenieError). The QDQ model records the settings
    that made it in its metadata."""
    exported = export_qdq(folded, plan)
    check_finite(exported)
    simulation = fakequant_model(folded, plan, opset=EXPORT_OPSET)
    error = parity(exported, simulation, calib[:PARITY_IMAGES])
    if not error <= PARITY_TOLERANCE:
        raise OnnxGenieError(f"the exported model differs from its simulation by {error:.2e} of the "
                             "logit range; this is a bug, please report it with the model")
    meta = {"wbits": config.wbits, "abits": config.abits, "first_last_bits": config.first_last_bits,
            "target": config.target, "weight_grid": config.weight_grid, "calib": config.calib,
            "reconstruct": config.reconstruct}
    exported.metadata_props.add(key="onnxgenie", value=json.dumps(meta))
    return exported, simulation, error


def measure(original: onnx.ModelProto, normal: onnx.ModelProto, folded: onnx.ModelProto, plan: QuantPlan,
            exported: onnx.ModelProto, calib: np.ndarray, holdout: np.ndarray | None,
            config: QuantizeConfig) -> dict:
    """The report's measurements of the exported model: weight SQNR, top-1 agreement with FP32 (on the
    held-out images, on the calibration images without any), sizes, and the tensors onnxruntime 1.19
    could overflow a buffer on (said in a note)."""
    held = holdout is not None and len(holdout) > 0
    x, on = (holdout, "held-out") if held else (calib, "calibration")
    measured = {"weight_sqnr_db": rep.weight_sqnr(folded, plan),
                "agreement": {"top1_agreement": round(rep.top1_agreement(normal, exported, x, config.threads, on), 2),
                              "images": int(len(x)), "on": on},
                "size": rep.model_sizes(original, exported), "buffer_reuse_hazard": buffer_reuse_hazard(exported)}
    if measured["buffer_reuse_hazard"] and config.progress:
        status.buffer_reuse_note(measured["buffer_reuse_hazard"])
    return measured
