"""Shared test helpers: the real models and images in ../shared (skipped when absent) and fixtures.

Plain functions (``shared_dir``, ``shared_model``, ``model_info``, ``dev_images``, ``train_images``)
can be imported by any test module (``from conftest import dev_images``); the pytest fixtures
below wrap them.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHARED = REPO.parent / "shared"
SHARED_MODELS = ("resnet20_cifar10", "resnet32_cifar10", "shufflenet_g3_cifar10")

if str(TESTS) not in sys.path:  # so that ``import fixtures`` works under any import mode
    sys.path.insert(0, str(TESTS))


def shared_dir() -> Path:
    """The ../shared folder, or skip the calling test."""
    if not (SHARED / "models" / "models.json").is_file():
        pytest.skip("../shared not present: real models/data live there")
    return SHARED


def _stem(name: str) -> str:
    return name[:-5] if name.endswith(".onnx") else name


def shared_model_path(name: str) -> Path:
    """Path of ``../shared/models/<name>.onnx`` (``name`` with or without ``.onnx``)."""
    path = shared_dir() / "models" / f"{_stem(name)}.onnx"
    if not path.is_file():
        pytest.skip(f"../shared/models/{path.name} not present")
    return path


def shared_model(name: str):
    """The shared model as a ModelProto (a fresh copy each call)."""
    import onnx

    return onnx.load(str(shared_model_path(name)))


def model_info(name: str) -> dict:
    """The model's entry in models.json: input, output, mean, std, size, fp32_top1_dev, ..."""
    info = json.loads((shared_dir() / "models" / "models.json").read_text())
    return info[f"{_stem(name)}.onnx"]


@lru_cache(maxsize=4)
def _npz(file: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(SHARED / "data" / file) as data:
        return data["images"], data["labels"]


def preprocess(images: np.ndarray, model_name: str) -> np.ndarray:
    """uint8 NHWC RGB → float32 NCHW, /255 then the model's per-channel (x - mean) / std."""
    info = model_info(model_name)
    mean = np.asarray(info["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(info["std"], np.float32).reshape(1, 3, 1, 1)
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def _images(file: str, model_name: str, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    if not (shared_dir() / "data" / file).is_file():
        pytest.skip(f"../shared/data/{file} not present")
    images, labels = _npz(file)
    images, labels = images[:n], labels[:n]
    return preprocess(images, model_name), labels.astype(np.int64)


def dev_images(model_name: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` CIFAR-10 dev test images preprocessed for ``model_name``: (x NCHW float32, labels)."""
    return _images("cifar10_dev_test.npz", model_name, n)


def train_images(model_name: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` of the 1,000 CIFAR-10 training images (few-shot / calibration only)."""
    return _images("cifar10_train_1k.npz", model_name, n)


@pytest.fixture
def shared() -> Path:
    """The ../shared folder; skips the test when it is absent."""
    return shared_dir()


@pytest.fixture(params=SHARED_MODELS)
def shared_model_name(request) -> str:
    """Parametrises a test over the three shared models (skips without ../shared)."""
    shared_dir()
    return request.param


DEFAULT_MODEL = REPO / "models" / "digits_resnet8.onnx"


def default_model_info() -> dict:
    """models/digits_resnet8.json (input, output, mean, std, size, fp32_top1_test, ...)."""
    return json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())


def digits_split():
    """onnxgenie.datasets.load_digits_split(), or skip when scikit-learn is not installed."""
    pytest.importorskip("sklearn", reason="scikit-learn not installed: pip install -e '.[test]'")
    from onnxgenie.datasets import load_digits_split

    return load_digits_split()
