"""The embedded demo model's data: scikit-learn's handwritten digits, split the same way everywhere.

1,797 grey 8x8 images with pixel values 0..16, ten classes. Preprocessing for
``models/digits_resnet8.onnx``: pixel / 16, bilinear upsampling to 16x16 (half-pixel centres,
as ONNX Resize 'linear'), then (x - DIGITS_MEAN) / DIGITS_STD; float32 NCHW [N, 1, 16, 16].
The split is stratified, 30 % test, ``random_state=0``: ``load_digits_split()`` returns the same
images on every machine. scikit-learn is an optional dependency (``pip install onnxgenie[train]``).
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np

from .errors import OnnxGenieError

DIGITS_SIZE = 16
# mean / std of the training split after pixel/16 and upsampling (tools/train_default_model.py checks them)
DIGITS_MEAN = 0.3056
DIGITS_STD = 0.3190
TEST_FRACTION = 0.3
SPLIT_SEED = 0


class DigitsSplit(NamedTuple):
    x_train: np.ndarray  # float32 [N, 1, 16, 16], preprocessed
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray


def _linear_resize_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] weights of 1-D linear interpolation with half-pixel centres, edges clamped."""
    pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    frac = pos - lo
    m = np.zeros((dst, src))
    m[np.arange(dst), lo] += 1 - frac
    m[np.arange(dst), hi] += frac
    return m


def upsample(images8: np.ndarray, size: int = DIGITS_SIZE) -> np.ndarray:
    """[N, 8, 8] pixel values 0..16 → float32 [N, 1, size, size] in [0, 1]."""
    m = _linear_resize_matrix(images8.shape[-1], size)
    x = np.einsum("ij,njk,lk->nil", m, images8.astype(np.float64) / 16.0, m)
    return x[:, None].astype(np.float32)


def preprocess_digits(images8: np.ndarray) -> np.ndarray:
    """Raw 8x8 digits (0..16) → the model's input: float32 NCHW, normalised."""
    return ((upsample(images8) - DIGITS_MEAN) / DIGITS_STD).astype(np.float32)


def _sklearn_digits():
    try:  # imported here: scikit-learn is an optional dependency (the train extra)
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise OnnxGenieError("the digits data set needs scikit-learn, which is not installed; "
                             "pip install 'onnxgenie[train]' (or scikit-learn)") from None
    digits = load_digits()
    return digits.images, digits.target.astype(np.int64), train_test_split


def load_digits_raw() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The split before preprocessing: (train 8x8 images 0..16, train labels, test images, test labels)."""
    images, labels, train_test_split = _sklearn_digits()
    tr_x, te_x, tr_y, te_y = train_test_split(images, labels, test_size=TEST_FRACTION, stratify=labels,
                                              random_state=SPLIT_SEED)
    return tr_x, tr_y, te_x, te_y


def load_digits_split() -> DigitsSplit:
    """The deterministic train/test split, preprocessed for ``models/digits_resnet8.onnx``."""
    tr_x, tr_y, te_x, te_y = load_digits_raw()
    return DigitsSplit(preprocess_digits(tr_x), tr_y, preprocess_digits(te_x), te_y)


def write_digits_npz(path, part: str = "test") -> int:
    """Save one part of the split as ``.npz`` (float32 NCHW ``images``, preprocessed, and ``labels``),
    the form ``onnxgenie eval --data`` reads. Returns the number of images."""
    split = load_digits_split()
    images, labels = {"test": (split.x_test, split.y_test), "train": (split.x_train, split.y_train)}[part]
    np.savez(path, images=images, labels=labels)
    return len(images)


if __name__ == "__main__":  # python -m onnxgenie.datasets OUT.npz [test|train]
    out, which = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "test")
    print(f"{write_digits_npz(out, which)} {which} images written to {out}")
