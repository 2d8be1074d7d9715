"""A contact sheet of distilled images (Pillow), for a quick look at what GENIE-D produced."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def grid_array(images: np.ndarray, columns: int = 8, limit: int = 64) -> np.ndarray:
    """The first ``limit`` NCHW images, each stretched to its own 1st–99th percentile, as one uint8 HWC sheet
    (C is 1 or 3) with a 1-pixel white border around every image. NHWC images (those of an NHWC model:
    1 or 3 channels last, not first) are read as such."""
    x = np.asarray(images[:limit], np.float32)
    if x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    lo = np.percentile(x, 1, axis=(1, 2, 3), keepdims=True)
    hi = np.percentile(x, 99, axis=(1, 2, 3), keepdims=True)
    x = np.clip((x - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    x = (x * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)  # NHWC
    if x.shape[-1] not in (1, 3):
        x = x[..., :3] if x.shape[-1] > 3 else x[..., :1]
    n, h, w, c = x.shape
    rows = -(-n // columns)
    sheet = np.full((rows * (h + 2), min(n, columns) * (w + 2), c), 255, np.uint8)
    for i, img in enumerate(x):
        r, col = divmod(i, columns)
        sheet[r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = img
    return sheet


def _grid_image(images: np.ndarray, columns: int, limit: int, zoom: int):
    sheet = grid_array(images, columns, limit)
    pic = Image.fromarray(sheet[..., 0] if sheet.shape[-1] == 1 else sheet)
    return pic.resize((pic.width * zoom, pic.height * zoom), Image.NEAREST)


def grid_png(images: np.ndarray, columns: int = 8, limit: int = 64, zoom: int = 2) -> bytes:
    """The grid of ``save_grid`` as PNG bytes, in memory."""
    buf = io.BytesIO()
    _grid_image(images, columns, limit, zoom).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images: np.ndarray, path: str | Path, columns: int = 8, limit: int = 64, zoom: int = 2) -> Path:
    """The first ``limit`` NCHW images, each stretched to its own 1st–99th percentile, in a grid."""
    path = Path(path)
    _grid_image(images, columns, limit, zoom).save(path)
    return path
