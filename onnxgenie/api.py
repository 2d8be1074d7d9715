"""Python API, in onnxruntime's quantizer conventions (``quantize_static(model_input, model_output, ...)``).

    import onnxgenie
    result = onnxgenie.quantize("model.onnx", "model_w4a4.onnx", wbits=4, abits=4)
    result.model, result.report["agreement"]

The stages for composing a pipeline of one's own: ``distill`` (GENIE-D images), ``reconstruct``
(GENIE-M on a BN-folded model and an initialised plan), ``export_qdq`` (plan -> QDQ ModelProto).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from .errors import BadInputError
from .pipeline import (QuantizationResult, auto_jobs, check_gate, check_output, preset_config, quantize as _run,
                       write_model, write_reports)


def quantize(model_input: str | os.PathLike | onnx.ModelProto, model_output: str | os.PathLike | None = None, *,
             wbits: int = 4, abits: int = 4, preset: str = "fast",
             calib_data: str | os.PathLike | np.ndarray | None = None, target: str = "ort", seed: int = 0,
             workdir: str | os.PathLike | None = None, progress: bool = True, resume: bool = False,
             overwrite: bool = False, min_agreement: float | None = None, **settings) -> QuantizationResult:
    """Quantize ``model_input`` (path or ModelProto; never modified) to a QDQ model.

    ``calib_data``: None (zero-shot, GENIE-D), an ``.npz`` path (``images`` uint8 NHWC + ``mean``/``std``
    settings, or float32 NCHW preprocessed) or a float32 array in the model's input space and layout.
    ``settings``: any other ``QuantizeConfig`` field (``recon_iters``, ``calib_images``, ``jobs``, ...);
    ``jobs`` defaults to one distillation process per core, as on the command line.
    Writes ``model_output`` (atomically) when given. Raises ``onnxgenie.errors.BadInputError`` for
    unusable input and ``QualityGateError`` (with ``.report``) when ``min_agreement`` is missed.
    """
    array = calib_data if isinstance(calib_data, np.ndarray) else None
    path = None if array is not None or calib_data is None else calib_data
    calib = settings.pop("calib", None)   # "distill" / "noise" without data, as --calib
    if calib is not None and calib_data is not None and calib != "data":
        raise BadInputError(f"calib={calib!r} and calib_data both given; pass one of them")
    config = preset_config(preset, wbits=wbits, abits=abits, target=target, seed=seed,
                           workdir=None if workdir is None else str(workdir), progress=progress,
                           min_agreement=min_agreement, calib="data" if calib_data is not None else calib, **settings)
    if "jobs" not in settings:
        config = replace(config, jobs=auto_jobs(config))
    if isinstance(model_input, (str, os.PathLike)) and model_output is not None:
        check_output(model_input, model_output, overwrite)
    if array is not None:
        config = replace(config, holdout_images=0)
    result = _run(model_input, config, path, calib=None if array is None else np.asarray(array, np.float32),
                  resume=resume)
    gate = check_gate(result.report, min_agreement)
    write_reports(result, config, None if model_output is None else Path(model_output), None, None)
    if gate is not None:
        gate.report = result.report
        raise gate
    if model_output is not None:
        write_model(result.model, model_output)
    return result
