"""More reconstruction images for free: mirror and shifted copies of the calibration images.

GENIE-M fits millions of soft bits to a few hundred images (the fast preset: 256 images, 500 steps of
32, so every image is seen about 60 times per block). Mirrored and slightly shifted copies are images
a classifier trained with the usual flip-and-crop augmentation treats alike, so they widen the set that
the block outputs are matched on without distilling more. Measured on ResNet-20 W2A4 (fast preset,
the same 256 distilled images, reconstruction seeds 0-3, 5,000 dev images): 75.84 % on average
without, 77.13 with mirrors (x2), 77.11 with mirrors and shifts (x4, better on all four seeds).
End to end (fast preset, seeds 0-2) mirrors and shifts lift W2A4 from 75.38 to 77.47 % but lower W4A4
from 80.13 to 79.67 %: ``"auto"`` uses them below 4-bit weights only.
"""

from __future__ import annotations

import numpy as np

COPIES = {"none": 1, "flip": 2, "flip-shift": 4}   # images per calibration image
AUGMENTS = ("auto", *COPIES)
SHIFT_FRACTION = 1 / 16   # of the image's height / width: 2 pixels at 32 x 32


def shifted(images: np.ndarray, axis: int, step: int) -> np.ndarray:
    """``images`` moved by ``step`` pixels along ``axis``, the uncovered border filled by reflection."""
    n = images.shape[axis]
    pad = [(0, 0)] * images.ndim
    pad[axis] = (max(step, 0), max(-step, 0))
    padded = np.pad(images, pad, mode="reflect")
    start = max(-step, 0)
    return np.take(padded, np.arange(start, start + n), axis=axis)


def resolve(mode: str, wbits: int) -> str:
    """The copies ``mode`` asks for at ``wbits``: ``"auto"`` is flip-shift below 4-bit weights, else none."""
    if mode == "auto":
        return "flip-shift" if wbits < 4 else "none"
    return mode


def augment(images: np.ndarray, mode: str, h_axis: int = 2, w_axis: int = 3) -> np.ndarray:
    """The images followed by their copies: ``"flip"`` mirrors them along the width; ``"flip-shift"``
    adds a copy moved right and a mirrored copy moved up, by ``SHIFT_FRACTION`` of the size."""
    if mode == "none":
        return images
    if mode == "auto":
        raise ValueError("'auto' depends on the weight bits: resolve(mode, wbits) first")
    if mode not in AUGMENTS:
        raise ValueError(f"unknown augmentation {mode!r}; use one of {', '.join(AUGMENTS)}")
    mirror = np.flip(images, axis=w_axis)
    copies = [images, mirror]
    if mode == "flip-shift":
        dh = max(1, round(images.shape[h_axis] * SHIFT_FRACTION))
        dw = max(1, round(images.shape[w_axis] * SHIFT_FRACTION))
        copies += [shifted(images, w_axis, dw), shifted(mirror, h_axis, -dh)]
    return np.ascontiguousarray(np.concatenate(copies), dtype=np.float32)
