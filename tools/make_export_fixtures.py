"""Rebuild the exporter compatibility fixtures in tests/data/exporters/ (see tests/data/README.md).

Run it once in a PyTorch environment and once in a TensorFlow one; each run writes the files its
libraries can make and says which it skipped. Neither library is a dependency of onnxgenie; the tests
read only the committed .onnx files.

    python -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch torchvision timm onnxscript keras
    /tmp/venv-torch/bin/python tools/make_export_fixtures.py
    python -m venv /tmp/venv-tf && /tmp/venv-tf/bin/pip install tensorflow-cpu tf2onnx tf-keras
    /tmp/venv-tf/bin/python tools/make_export_fixtures.py

Weights are random (seeded); BN statistics come from a few train-mode passes on N(0, 1) images (PyTorch) or
are drawn at random (Keras), so that every statistic differs from its default.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "exporters"
HW, CLASSES = 16, 10


# PyTorch -------------------------------------------------------------------------------------------

def _import_torchvision():
    """torchvision, also where its compiled ops do not match the installed torch (a CPU-only torch beside
    PyPI's CUDA torchvision): timm needs only its Python parts."""
    import torch.library

    register = torch.library.register_fake
    torch.library.register_fake = lambda *a, **k: (lambda f: f)
    try:
        import torchvision  # noqa: F401
    finally:
        torch.library.register_fake = register


def _tiny_resnet(avg_down: bool, zero_init_last: bool):
    """A timm ResNet with BasicBlocks, 4-8 channels and a three-conv stem (timm's plain stem has 64
    channels); with average-pool shortcuts (resnet18d's) when ``avg_down``."""
    import torch
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = ResNet(BasicBlock, (1, 1, 1, 1), channels=(4, 8, 8, 8), stem_width=4, num_classes=CLASSES,
                   stem_type="deep", avg_down=avg_down, zero_init_last=zero_init_last)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None   # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(16, 3, HW, HW))
    return model.eval()


def _spatial_softmax_net():
    """conv-BN-ReLU, then each channel pooled with softmax weights over its positions, computed on
    ``x.reshape(n * c, -1)``: the batch size takes part in a Reshape target; linear head."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8, CLASSES)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            n, c, h, w = x.shape
            weights = x.reshape(n * c, -1).softmax(-1).reshape(n, c, h, w)
            return self.fc((weights * x).sum((2, 3)))

    torch.manual_seed(0)
    model = Net().train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(16, 3, HW, HW))
    return model.eval()


def torch_fixtures() -> None:
    import torch

    _import_torchvision()
    x = torch.randn(2, 3, HW, HW)
    names = dict(input_names=["input"], output_names=["logits"])
    plain = _tiny_resnet(avg_down=False, zero_init_last=False)
    torch.onnx.export(plain, x, str(OUT / "torchscript_bn.onnx"), dynamo=False, opset_version=17,
                      do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE,
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, **names)
    batch = {"x": {0: torch.export.Dim("N")}}
    common = dict(dynamo=True, external_data=False, verbose=False, **names)
    torch.onnx.export(plain, (x,), str(OUT / "dynamo_bn_dynamic.onnx"), optimize=False, dynamic_shapes=batch,
                      **common)
    torch.onnx.export(plain, (x,), str(OUT / "dynamo_bn_static.onnx"), optimize=False, **common)
    torch.onnx.export(plain, (x,), str(OUT / "dynamo_folded.onnx"), dynamic_shapes=batch, **common)
    for name in ("dynamo_bn_dynamic", "dynamo_bn_static", "dynamo_folded"):
        _strip_node_metadata(OUT / f"{name}.onnx")
    softmax = _spatial_softmax_net()
    torch.onnx.export(softmax, (x,), str(OUT / "dynamo_batch_arith_static.onnx"), optimize=False, **common)
    torch.onnx.export(softmax, (x,), str(OUT / "dynamo_batch_arith_dynamic.onnx"), optimize=False,  # as the
                      dynamic_shapes=({0: torch.export.Dim("N")},), **common)  # refusal of the static one advises
    for name in ("dynamo_batch_arith_static", "dynamo_batch_arith_dynamic"):
        _strip_node_metadata(OUT / f"{name}.onnx")
    torch.onnx.export(softmax, x, str(OUT / "torchscript_batch_arith.onnx"), dynamo=False, opset_version=17,
                      do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE,
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, **names)
    timm_d = _tiny_resnet(avg_down=True, zero_init_last=True)   # timm's default init: last BN of each block gamma 0
    torch.onnx.export(timm_d, x, str(OUT / "timm_zero_gamma.onnx"), dynamo=False, opset_version=17,
                      do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE,
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, **names)


KEPT_METADATA = ("pkg.onnxscript.rewriter.rule_name",)   # the trace of BN folded by torch.export's optimiser


def _strip_node_metadata(path: Path) -> None:
    """Drop torch.export's per-node provenance (the FX node, module stack: two thirds of the file) but the
    optimiser's rewrite-rule names; the graph is untouched."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key in KEPT_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(model, str(path))


# TensorFlow ----------------------------------------------------------------------------------------

def _keras_net(keras):
    """conv-BN-ReLU, a residual conv-BN, a strided conv-BN-ReLU, global pool, dense; NHWC."""
    layers = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((HW, HW, 3), name="input")
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same", use_bias=False)(inp)))
    y = layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same", use_bias=False)(x))
    x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(x)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    out = layers.Dense(CLASSES, name="logits")(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.2, c),
                               rng.uniform(0.5, 2.0, c)])
    return model


def keras3_fixture() -> None:
    """Keras 3 SavedModel -> `python -m tf2onnx.convert --saved-model` (the documented route)."""
    import subprocess

    import keras

    model = _keras_net(keras)
    with tempfile.TemporaryDirectory() as tmp:
        model.export(f"{tmp}/saved", format="tf_saved_model", verbose=False)
        subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", f"{tmp}/saved", "--opset", "17",
                        "--output", str(OUT / "keras3_tf2onnx.onnx")], check=True, capture_output=True)


def keras3_torch_fixture() -> None:
    """Keras 3 on its torch backend (KERAS_BACKEND=torch) -> the TorchScript exporter without constant
    folding: BN stays the arithmetic Keras writes, on its constants; NHWC."""
    import keras
    import torch

    assert keras.backend.backend() == "torch"
    torch.onnx.export(_keras_net(keras), (torch.randn(2, HW, HW, 3),), str(OUT / "keras3_torch.onnx"), dynamo=False,
                      opset_version=17, do_constant_folding=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})


def tf_keras_fixtures() -> None:
    """tf-keras (Keras 2) -> tf2onnx.convert.from_keras, with its default optimisers (BN folded) and
    without remove_back_to_back, the one that folds BN into Conv (BN kept)."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf
    import tf2onnx
    import tf_keras
    from tf2onnx import optimizer

    model = _keras_net(tf_keras)
    spec = (tf.TensorSpec((None, HW, HW, 3), tf.float32, name="input"),)
    keep_bn = {k: v for k, v in optimizer._get_optimizers().items() if k != "remove_back_to_back"}
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, optimizers=keep_bn,
                               output_path=str(OUT / "tfkeras_bn.onnx"))
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=str(OUT / "tfkeras_folded.onnx"))


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    OUT.mkdir(parents=True, exist_ok=True)
    if sys.argv[1:] == ["keras3-torch"]:   # Keras picks its backend once, at import: a process of its own
        keras3_torch_fixture()
        sys.exit()
    have = {m: importlib.util.find_spec(m) is not None for m in ("torch", "timm", "keras", "tf2onnx", "tf_keras")}
    if have["torch"] and have["timm"]:
        torch_fixtures()
    else:
        print("skipped the PyTorch fixtures (needs torch, torchvision, timm, onnxscript)")
    if have["torch"] and have["keras"]:
        import subprocess

        subprocess.run([sys.executable, __file__, "keras3-torch"], env={**os.environ, "KERAS_BACKEND": "torch"},
                       check=True)
    else:
        print("skipped the Keras 3 torch-backend fixture (needs torch, keras 3)")
    if have["tf2onnx"] and have["keras"]:
        keras3_fixture()
    else:
        print("skipped the Keras 3 fixture (needs tensorflow, keras 3, tf2onnx)")
    if have["tf2onnx"] and have["tf_keras"]:
        tf_keras_fixtures()
    else:
        print("skipped the tf-keras fixtures (needs tensorflow, tf-keras, tf2onnx)")
    for path in sorted(OUT.glob("*.onnx")):
        print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB")
