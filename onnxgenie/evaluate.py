"""Top-1 accuracy on a labelled ``.npz`` and top-1 agreement with a reference model.

Data format (``../shared/data``): ``images`` uint8 [N, H, W, C] (RGB) with ``labels`` int [N];
preprocessing x / 255, then (x - mean) / std per channel. Float32 NCHW ``images`` are taken as
already preprocessed. An NHWC model (a leading Transpose) is given the images NHWC.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from .errors import BadInputError
from .graph.load import image_io, load_model, to_input_layout
from .runtime import predict


def preprocess(images: np.ndarray, chw: tuple[int, int, int], mean=None, std=None) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW normalised; float32 NCHW passes through. Checked against ``chw``."""
    c = chw[0]
    if images.dtype == np.uint8:
        if images.ndim != 4 or images.shape[3] != c:
            raise BadInputError(f"uint8 images have shape {list(images.shape)}; expected [N, H, W, {c}] (NHWC) "
                                "for this model")
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255)
        mean = np.zeros(c, np.float32) if mean is None else np.asarray(mean, np.float32)
        std = np.ones(c, np.float32) if std is None else np.asarray(std, np.float32)
        if mean.shape != (c,) or std.shape != (c,) or not np.isfinite([*mean, *std]).all() or np.any(std <= 0):
            raise BadInputError(f"--mean/--std need {c} finite values each (std > 0); got {list(mean)} / {list(std)}")
        x = (x - mean.reshape(1, c, 1, 1)) / std.reshape(1, c, 1, 1)
    elif images.dtype in (np.float32, np.float64):
        if mean is not None or std is not None:
            raise BadInputError("float images are taken as already preprocessed; drop --mean/--std, "
                                "or store uint8 NHWC images")
        x = images.astype(np.float32)
        if x.ndim != 4 or x.shape[1] != c:
            raise BadInputError(f"float images have shape {list(x.shape)}; expected [N, {c}, H, W] (NCHW, "
                                "preprocessed)")
        if not np.isfinite(x).all():
            raise BadInputError("the images contain NaN/Inf values; fix the data file")
    else:
        raise BadInputError(f"images of dtype {images.dtype}; use uint8 NHWC or float32 NCHW")
    if tuple(x.shape[1:]) != tuple(chw):
        raise BadInputError(f"images are {list(x.shape[1:])} (C, H, W) but the model takes {list(chw)}; "
                            "resize the data to the model's input size")
    return np.ascontiguousarray(x, dtype=np.float32)


def load_npz(path: str | os.PathLike, need_labels: bool = True,
             input_name: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``images`` (and ``labels``) of an .npz; without ``images``, the array named ``input_name`` (the
    model's input, as onnxruntime's calibration files key it), returned as stored. The images must be a
    non-empty 4-D batch and the labels integer classes, one per image; anything unreadable (damaged,
    pickled objects, not an .npz) is refused in one line."""
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"{path} is a directory; give an .npz file with 'images'" + (" and 'labels'" if need_labels
                                                                                         else ""))
    if not path.is_file():
        raise BadInputError(f"{path}: no such file; give an .npz with 'images' (and 'labels')")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise BadInputError(f"{path} holds one array, not an .npz archive; save it with "
                                "numpy.savez(path, images=..., labels=...)")
        with data:
            keys = set(data.files)
            key = "images" if "images" in keys or input_name not in keys else input_name
            if key not in keys or (need_labels and "labels" not in keys):
                raise BadInputError(f"{path} has arrays {sorted(keys)}; it needs 'images'"
                                    + (f" (or the model's input name {input_name!r})" if input_name else "")
                                    + (" and 'labels'" if need_labels else ""))
            images = data[key]
            labels = data["labels"] if "labels" in keys else None
    except BadInputError:
        raise
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise BadInputError(f"{path} holds object arrays (pickled Python objects), which are not loaded; save "
                                "plain numeric arrays with numpy.savez") from None
        raise BadInputError(f"{path} is not a readable .npz file ({err}); save it again with numpy.savez") from None
    except Exception as err:   # a damaged zip (CRC error, truncated), not a zip at all
        raise BadInputError(f"{path} is not a readable .npz file ({type(err).__name__}: {err}); save it again "
                            "with numpy.savez") from None
    if images.ndim != 4 or len(images) == 0:
        raise BadInputError(f"{path}: '{key}' has shape {list(images.shape)}; expected a non-empty batch of "
                            "images, uint8 [N, H, W, C] or float32 [N, C, H, W]")
    if labels is not None:
        integral = labels.dtype.kind in "iub" or (labels.dtype.kind == "f" and np.isfinite(labels).all()
                                                  and (labels == np.round(labels)).all())
        if not integral:
            raise BadInputError(f"{path}: 'labels' are {labels.dtype}, not class indices; store integer labels "
                                "(0 .. classes - 1)")
        labels = labels.astype(np.int64).ravel()
        if len(labels) != len(images):
            raise BadInputError(f"{path}: {len(images)} images but {len(labels)} labels; they must match")
    return images, labels


def evaluate(model, data: str | os.PathLike, mean=None, std=None, reference=None, batch_size: int = 250,
             threads: int = 1) -> dict:
    """{'top1': %, 'images': N, and with a reference 'reference_top1', 'agreement': %}."""
    model = load_model(model)
    images, labels = load_npz(data)
    x = preprocess(images, _chw(model), mean, std)
    pred = predict(model, to_input_layout(model, x), batch_size, threads).argmax(axis=1)
    result = {"images": int(len(x)), "top1": round(100.0 * float((pred == labels).mean()), 2)}
    if reference is not None:
        reference = load_model(reference)
        ref = predict(reference, to_input_layout(reference, x), batch_size, threads).argmax(axis=1)
        result["reference_top1"] = round(100.0 * float((ref == labels).mean()), 2)
        result["agreement"] = round(100.0 * float((ref == pred).mean()), 2)
    return result


def _chw(model: onnx.ModelProto) -> tuple[int, int, int]:
    """The image input's (C, H, W) from the model's declared input shape."""
    return image_io(model).chw
