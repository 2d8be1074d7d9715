"""Python API, in onnxruntime's quantizer conventions (``quantize_static(model_input, model_output, ...)``).

    import onnxgenie
    result = onnxgenie.quantize("model.onnx", "model_w4a4.onnx", wbits=4, abits=4)
    result.model, result.report["agreement"]

The stages for composing a pipeline of one's own: ``distill`` (GENIE-D images), ``reconstruct``
(GENIE-M on a BN-folded model and an initialised plan), ``export_qdq`` (plan -> QDQ ModelProto).
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from .config import preset_config
from .errors import BadInputError, BadSettingError
from .graph.load import _image_input, load_model
from .pipeline import QuantizationResult, run_quantize


def calibration_array(data, model_input) -> np.ndarray:
    """The images of an onnxruntime ``CalibrationDataReader`` (``get_next()`` gives ``{input_name: array}``
    until None) or of any iterable of such dicts, concatenated: float32 in the model's input layout."""
    if hasattr(data, "get_next"):
        reader, data = data, iter(lambda: reader.get_next(), None)
    try:
        feeds = list(data)
    except TypeError:
        raise BadInputError(f"calib_data of type {type(data).__name__}; give an .npz path, an array, an "
                            "onnxruntime CalibrationDataReader or an iterable of {input_name: array}") from None
    name = _image_input(load_model(model_input)).name
    arrays = []
    for feed in feeds:
        if not isinstance(feed, dict) or (name not in feed and len(feed) != 1):
            keys = sorted(feed) if isinstance(feed, dict) else type(feed).__name__
            raise BadInputError(f"calib_data gave {keys}; each item must be {{{name!r}: array}}, "
                                "as onnxruntime's CalibrationDataReader gives them")
        try:
            arrays.append(np.asarray(feed[name] if name in feed else next(iter(feed.values())), np.float32))
        except (TypeError, ValueError) as err:
            raise BadInputError(f"calib_data gave an array that is not numbers ({err}); give float32 images") \
                from None
    if not arrays:
        raise BadInputError("calib_data gave no images; give at least one batch")
    return np.concatenate([a if a.ndim == 4 else a[None] for a in arrays])


def quantize(model_input: str | os.PathLike | onnx.ModelProto, model_output: str | os.PathLike | None = None, *,
             wbits: int = 4, abits: int = 4, preset: str = "fast",
             calib_data: str | os.PathLike | np.ndarray | None = None, target: str = "ort", seed: int = 0,
             workdir: str | os.PathLike | None = None, progress: bool = True, resume: bool = False,
             overwrite: bool = False, min_agreement: float | None = None, **settings) -> QuantizationResult:
    """Quantize ``model_input`` (path or ModelProto; never modified) to a QDQ model.

    ``calib_data``: None (zero-shot, GENIE-D), an ``.npz`` path (``images`` uint8 NHWC + ``mean``/``std``
    settings, or float32 NCHW preprocessed; or an array named as the model's input, as the model takes
    it), a float32 array in the model's input space and layout, or an onnxruntime
    ``CalibrationDataReader`` / any iterable of ``{input_name: array}`` (``calibration_array``).
    ``settings``: any other ``QuantizeConfig`` field (``recon_iters``, ``calib_images``, ``input_size``,
    ``jobs``, ...); ``jobs`` 0 (the default) is one distillation process per core and batch.
    Writes ``model_output`` (atomically) when given; it may not exist unless ``overwrite``, nor be an
    input. Every refusal of the input is an ``onnxgenie.errors.BadInputError`` (``BadSettingError`` for
    a setting of the wrong type or range, also a ``TypeError``; ``OutputExistsError``;
    ``UnsupportedModelError``), raised before any work; ``QualityGateError`` (with ``.report``) when
    ``min_agreement`` is missed.
    """
    if not isinstance(model_input, (str, os.PathLike, onnx.ModelProto)):
        raise BadSettingError(f"model_input is a {type(model_input).__name__}; give a path or an onnx.ModelProto")
    if not isinstance(model_output, (str, os.PathLike, type(None))):
        raise BadSettingError(f"model_output is a {type(model_output).__name__}; give a path or None")
    for name, value in (("progress", progress), ("resume", resume), ("overwrite", overwrite)):
        if not isinstance(value, bool):
            raise BadSettingError(f"{name} must be True or False (got {value!r}); pass a bool")
    if calib_data is not None and not isinstance(calib_data, (str, os.PathLike, np.ndarray)):
        calib_data = calibration_array(calib_data, model_input)
    array = calib_data if isinstance(calib_data, np.ndarray) else None
    path = None if array is not None or calib_data is None else calib_data
    calib = settings.pop("calib", None)   # "distill" / "noise" without data, as --calib
    if calib is not None and calib_data is not None and calib != "data":
        raise BadInputError(f"calib={calib!r} and calib_data both given; pass one of them")
    if not isinstance(preset, str):
        raise BadSettingError(f"preset must be a string (got {preset!r}); use 'fast' or 'paper'")
    config = preset_config(preset, wbits=wbits, abits=abits, target=target, seed=seed,
                           workdir=None if workdir is None else str(workdir), progress=progress,
                           min_agreement=min_agreement, calib="data" if calib_data is not None else calib, **settings)
    return run_quantize(model_input, model_output, config, path, overwrite, resume, calib=array)
