"""The files a quantize run writes, checked before any work and written only at the end: the quality
gate's verdict, the reports (--report, --report-html, the work dir's copy) and the model (atomically,
checked, never with NaN/Inf)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from . import report as rep
from .config import QuantizeConfig
from .errors import BadInputError, DivergenceError, OutputExistsError, QualityGateError
from .files import atomic_write, check_distinct, check_writes, storage_error
from .graph.load import external_data_files
from .workdir import owns_report, report_path


def check_outputs(src, out: str | os.PathLike | None, config: QuantizeConfig, overwrite: bool,
                  calib_data: str | os.PathLike | None = None, report_json: str | os.PathLike | None = None,
                  report_html: str | os.PathLike | None = None) -> None:
    """Every file the run will write (``files.check_writes``), before any work: none may exist without
    ``overwrite``, be an input (the model, its external data, ``calib_data``) or another output. The
    work dir's report.json may be replaced when it belongs to the run there (its run.json exists)."""
    inputs = []
    if isinstance(src, (str, os.PathLike)):
        inputs.append(("the input model", src))
        inputs += [("the model's external data file", f) for f in external_data_files(src)]
    if isinstance(calib_data, (str, os.PathLike)):
        inputs.append(("the --calib-data file", calib_data))
    outputs = [("-o", out), ("--report", report_json), ("--report-html", report_html)]
    check_writes(outputs, inputs, overwrite)
    report = report_path(config)
    if report is not None:
        check_distinct([*outputs, ("the work dir's report.json", report)], inputs)
        if (report.exists() or report.is_symlink()) and not overwrite and not owns_report(config.workdir):
            raise OutputExistsError(f"{report} exists and the run would write its report there; pass --overwrite to "
                                    "replace it, or choose another --workdir")


def check_gate(report: dict, min_agreement: float | None) -> QualityGateError | None:
    """The gate's verdict, recorded in the report: None when passed (or not asked for)."""
    if min_agreement is None:
        return None
    got = report["agreement"]["top1_agreement"]
    on = report["agreement"]["on"]
    report["gate"] = {"min_agreement": min_agreement, "passed": got >= min_agreement, "on": on}
    if on == "calibration":
        report["gate"]["note"] = rep.OPTIMISTIC
    if got >= min_agreement:
        return None
    return QualityGateError(f"top-1 agreement with the FP32 model is {got:.2f} % on {report['agreement']['images']} "
                            f"{on} images, below --min-agreement {min_agreement:g}; no model written (try more "
                            "bits, --preset paper, or --exclude the layers with the lowest SQNR in the report)")


def write_reports(report: dict, config: QuantizeConfig, out: Path | None, report_json: str | os.PathLike | None,
                  report_html: str | os.PathLike | None, images: np.ndarray | None = None,
                  overwrite: bool = True) -> None:
    """The reports ``check_outputs`` cleared: --report, --report-html (with ``images``, the distilled
    ones), and report.json in the work dir (the run's own folder, replaced on resume)."""
    report["output"] = None if out is None else str(out)
    try:
        if report_json:
            rep.write_json(report, report_json, overwrite)
        if config.workdir is not None:
            rep.write_json(report, report_path(config))
        if report_html:
            rep.write_html(report, report_html, images, overwrite)
    except OSError as err:
        raise storage_error(err, "the report") or err from None


def check_finite(model: onnx.ModelProto) -> None:
    """Refuse to export a model with NaN/Inf in any float initializer."""
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            if not np.isfinite(numpy_helper.to_array(t)).all():
                raise DivergenceError(f"the quantized model has NaN/Inf in {t.name}, so it is not written; "
                                      "rerun with another --seed or fewer bits, and report it with the model")


def write_model(model: onnx.ModelProto, out: str | os.PathLike, overwrite: bool = True) -> None:
    """Write atomically: a temporary file in the same folder, checked (onnx.checker, no NaN/Inf) and
    renamed over ``out`` only then; nothing is left behind on failure."""
    out = Path(out)
    check_finite(model)
    try:
        atomic_write(out, model.SerializeToString(), check=onnx.checker.check_model, overwrite=overwrite)
    except OSError as err:  # disk full, folder removed meanwhile: not a bug
        raise storage_error(err, str(out)) or BadInputError(
            f"cannot write {out} ({err.strerror or err}); free some space or choose another output folder") from None
