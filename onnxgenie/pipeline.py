"""``onnxgenie quantize``: from a float model to a QDQ model, one call per stage.

    prepare (normal form, BN folded) -> plan -> weight steps -> calibration images -> activation steps
    -> [high bits] -> [GENIE-M reconstruction] -> QDQ export + parity check -> report

``quantize`` runs them in memory; ``run_quantize``, the command line's and the API's entry, checks the
files first and writes them last (``outputs``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from . import report as rep
from . import stages, status
from .calibration import calibration_images, calibration_report, check_calib_array, check_fp32_outputs
from .config import ModelFacts, QuantizeConfig, check_config, fit_to_machine, settle
from .distill.memory import fit_distill
from .graph.bn import fold_bn, require_bn
from .graph.load import load_model, normalize
from .outputs import check_gate, check_outputs, write_model, write_reports
from .quant.init import P_NORM, init_activations, init_weights
from .quant.spec import QuantPlan
from .workdir import check_workdir


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


def quantize(model, config: QuantizeConfig, calib_data: str | os.PathLike | None = None,
             calib: np.ndarray | None = None, resume: bool = False) -> QuantizationResult:
    """The whole pipeline in memory. ``calib`` (float32, the model's layout) overrides ``config.calib``,
    which then says what the images are: real (``"data"``) or synthetic (``"distill"``, ``"noise"``).

    With ``config.workdir`` finished distillation batches and blocks are kept there; ``resume``
    continues such a run (refused when the model, config or seed differ). The result's report holds
    what ``report.py`` describes; the quality gate (``min_agreement``) is the caller's to apply."""
    check_config(config)
    log = status.StageLog(config.progress)
    original = load_model(model)
    normal, folded = prepare(original, config.input_size)
    if calib is not None:
        calib = check_calib_array(normal, calib)
    asked = config   # the run record keeps the settings as given: the rules follow from them and the model
    config = settle(config, ModelFacts(normal))
    stages.check_run(config, normal, len(calib) if calib is not None else config.calib_images)
    distilling = calib is None and config.calib == "distill"
    config = fit_to_machine(config, distilling)
    if distilling:
        require_bn(normal, original)  # before the weight steps, which take a minute on a large model
        fit_distill(normal, min(config.distill_batch, config.calib_images + config.holdout_images), 1,
                    notify=False)   # a model too large for this machine is refused now
    plan = stages.plan_of(folded, config)
    init_weights(folded, plan)
    holdout, calib_info = None, {"source": "given"}
    if calib is None and not distilling:  # bad data is refused before the work dir is written
        calib, holdout, calib_info = calibration_images(original, normal, config, calib_data)
    if calib is not None:
        check_fp32_outputs(normal, calib, config.threads, "calibration")
    check_workdir(original, asked, resume, calib)
    log.done("prepare")  # silent: a refusal of the input may still come, and it must be the only line
    if calib is None:
        calib, holdout, calib_info = calibration_images(original, normal, config, calib_data, resume)
        check_fp32_outputs(normal, calib, config.threads, "distilled")
        losses = calib_info["final_losses"]
        if config.verbose and config.progress:
            status.distill_batches(losses)
        log.done("distill", status.distill_line(len(calib) + len(holdout), losses), jobs=calib_info["jobs"],
                 distilling_process_peak_rss_mib=calib_info["process_peak_rss_mib"])
    init_activations(folded, plan, calib, batch_size=config.act_batch, threads=config.threads, seed=config.seed)
    high_bits_report = None
    if config.auto_high_bits:
        plan, high_bits_report = stages.high_bits(folded, plan, calib, config)
    calib_info = stages.image_steps(normal, plan, calib, config, calib_info)
    log.done("init", status.init_line(plan, len(calib), P_NORM))
    report: dict = {"model": str(model) if isinstance(model, (str, os.PathLike)) else original.graph.name,
                    "versions": rep.versions(), "config": asdict(config), "seed": config.seed,
                    "calibration": calibration_report(calib, holdout, calib_info)}
    if high_bits_report is not None:
        report["high_bits"] = high_bits_report
    if config.reconstruct:
        plan, report["reconstruction"] = stages.reconstruction(folded, plan, calib, config)
        candidates = report["reconstruction"].get("candidates", [])
        log.done("reconstruct", status.reconstruct_line(report["reconstruction"], config.recon_iters),
                 **({"candidate_process_peak_rss_mib": max(c["peak_rss_mib"] for c in candidates)}
                    if candidates else {}))
    exported, simulation, report["parity"] = stages.export(folded, plan, calib, config)
    report.update(stages.measure(original, normal, folded, plan, exported, calib, holdout, config))
    log.done("export", status.export_line(report))
    report["stages"] = log.table
    return QuantizationResult(exported, plan, simulation, report, calib)


def run_quantize(src: str | os.PathLike | onnx.ModelProto, out: str | os.PathLike | None, config: QuantizeConfig,
                 calib_data: str | os.PathLike | None = None, overwrite: bool = False, resume: bool = False,
                 report_json: str | os.PathLike | None = None, report_html: str | os.PathLike | None = None,
                 calib: np.ndarray | None = None) -> QuantizationResult:
    """The command line's and the API's run: checks every output path first, quantizes, writes the
    reports (and a copy in the work dir), applies the quality gate (``QualityGateError`` with the
    report), then writes the model atomically when ``out`` is given. A missed gate writes no model."""
    if calib is not None:
        config = replace(config, holdout_images=0)   # given images: none are held out
    check_config(config)
    check_outputs(src, out, config, overwrite, calib_data, report_json, report_html)
    result = quantize(src, config, calib_data, calib=calib, resume=resume)
    gate = check_gate(result.report, config.min_agreement)
    write_reports(result.report, config, None if out is None else Path(out), report_json, report_html,
                  result.calibration if config.calib == "distill" else None, overwrite)
    if gate is not None:
        gate.report = result.report
        raise gate
    if out is not None:
        write_model(result.model, out, overwrite)
    return result
