"""Train the embedded demo model, models/digits_resnet8.onnx, on scikit-learn's handwritten digits.

    .venv/bin/python tools/train_default_model.py [--epochs 40] [--out models]

ResNet-8 for 16x16 grey digits (stem conv; three basic blocks of two 3x3 convs, the last two with
stride 2 and a 1x1 stride-2 projection shortcut; global average pool; Gemm head), every conv
followed by BatchNormalization. Training runs on onnxruntime-training through onnxgenie.ortrain
(GradientGraph + NumPy Adam), with BN written out as batch statistics (ReduceMean/Sub/Mul/Sqrt/Div),
because ORT would otherwise turn BatchNormalization nodes into its own training-mode op with hidden
running-statistic updates. After training, every BN's running mean/var is the statistic of its
input over the whole training set (one full-batch forward pass, so the exported eval model
reproduces that pass exactly), and the clean inference model is written with real
BatchNormalization nodes (training_mode=0). Preprocessing: see onnxgenie/datasets.py.
Deterministic (fixed seeds, one ORT thread).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxgenie.datasets import DIGITS_MEAN, DIGITS_SIZE, DIGITS_STD, load_digits_raw, load_digits_split
from onnxgenie.optim import Adam, ParamGroup
from onnxgenie.ortrain import GradientGraph, inference_session

CLASSES = 10
WIDTHS = (8, 16, 32)
EPS = 1e-5
BN_AXES = [0, 2, 3]


class Net:
    """Builds the same ResNet-8 as a training graph (batch-statistics BN) or an eval graph (BN nodes)."""

    def __init__(self, params: dict[str, np.ndarray], train: bool, stats: dict | None = None):
        self.params, self.train, self.stats = params, train, stats or {}
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.bn_outputs: list[str] = []  # batch mean / var tensors of every BN (training graph)

    def node(self, op, inputs, output, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def param(self, name: str) -> str:
        self.inits[name] = self.params[name]
        return name

    def const(self, name: str, value) -> str:
        self.inits[name] = np.asarray(value)
        return name

    def conv(self, x, name, stride=1, k=3) -> str:
        return self.node("Conv", [x, self.param(f"{name}.weight")], name, kernel_shape=[k, k],
                         pads=[k // 2] * 4, strides=[stride, stride])

    def bn(self, x, name) -> str:
        if not self.train:
            mean, var = self.stats[name]
            return self.node("BatchNormalization", [x, self.param(f"{name}.weight"), self.param(f"{name}.bias"),
                                                    self.const(f"{name}.running_mean", mean),
                                                    self.const(f"{name}.running_var", var)], name, epsilon=EPS)
        mean = self.node("ReduceMean", [x], f"{name}.batch_mean", axes=BN_AXES, keepdims=1)
        centred = self.node("Sub", [x, mean], f"{name}.centred")
        var = self.node("ReduceMean", [self.node("Mul", [centred, centred], f"{name}.sq")], f"{name}.batch_var",
                        axes=BN_AXES, keepdims=1)
        std = self.node("Sqrt", [self.node("Add", [var, self.const("bn.eps", np.float32(EPS))], f"{name}.var_eps")],
                        f"{name}.std")
        shape = self.const("bn.shape", np.array([1, -1, 1, 1], np.int64))
        gamma = self.node("Reshape", [self.param(f"{name}.weight"), shape], f"{name}.gamma")
        beta = self.node("Reshape", [self.param(f"{name}.bias"), shape], f"{name}.beta")
        scaled = self.node("Mul", [self.node("Div", [centred, std], f"{name}.xhat"), gamma], f"{name}.scaled")
        self.bn_outputs += [mean, var]
        return self.node("Add", [scaled, beta], name)

    def relu(self, x, name) -> str:
        return self.node("Relu", [x], name)

    def block(self, x, name, stride) -> str:
        y = self.relu(self.bn(self.conv(x, f"{name}.conv1", stride), f"{name}.bn1"), f"{name}.relu1")
        y = self.bn(self.conv(y, f"{name}.conv2"), f"{name}.bn2")
        if stride != 1:
            x = self.bn(self.conv(x, f"{name}.shortcut.conv", stride, k=1), f"{name}.shortcut.bn")
        return self.relu(self.node("Add", [y, x], f"{name}.add"), f"{name}.relu2")

    def forward(self, x: str) -> str:
        y = self.relu(self.bn(self.conv(x, "stem.conv"), "stem.bn"), "stem.relu")
        y = self.block(y, "layer1", 1)
        y = self.block(y, "layer2", 2)
        y = self.block(y, "layer3", 2)
        y = self.node("Flatten", [self.node("GlobalAveragePool", [y], "pool")], "flatten", axis=1)
        return self.node("Gemm", [y, self.param("fc.weight"), self.param("fc.bias")], "logits", transB=1)


def init_params(seed: int) -> dict[str, np.ndarray]:
    """He-normal convs, BN gamma 1 / beta 0, a small uniform head (as PyTorch's defaults roughly do)."""
    rng = np.random.default_rng(seed)
    shapes = {"stem.conv": (WIDTHS[0], 1, 3, 3)}
    cin = WIDTHS[0]
    for i, cout in enumerate(WIDTHS, 1):
        shapes[f"layer{i}.conv1"] = (cout, cin, 3, 3)
        shapes[f"layer{i}.conv2"] = (cout, cout, 3, 3)
        if cin != cout:
            shapes[f"layer{i}.shortcut.conv"] = (cout, cin, 1, 1)
        cin = cout
    params = {}
    for conv, shape in shapes.items():
        fan_in = int(np.prod(shape[1:]))
        params[f"{conv}.weight"] = rng.normal(0, math.sqrt(2.0 / fan_in), shape).astype(np.float32)
        bn = conv.replace("conv", "bn") if not conv.endswith("shortcut.conv") else conv[:-4] + "bn"
        params[f"{bn}.weight"] = np.ones(shape[0], np.float32)
        params[f"{bn}.bias"] = np.zeros(shape[0], np.float32)
    bound = 1 / math.sqrt(WIDTHS[-1])
    params["fc.weight"] = rng.uniform(-bound, bound, (CLASSES, WIDTHS[-1])).astype(np.float32)
    params["fc.bias"] = rng.uniform(-bound, bound, CLASSES).astype(np.float32)
    return params


def _model(net: Net, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(net.nodes, "digits_resnet8", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in net.inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxgenie")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _image_input(name="input"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 1, DIGITS_SIZE, DIGITS_SIZE])


def training_graph(params: dict[str, np.ndarray]) -> onnx.ModelProto:
    """loss = mean softmax cross-entropy (first output), logits (second)."""
    net = Net(params, train=True)
    logits = net.forward("input")
    logp = net.node("LogSoftmax", [logits], "logp", axis=1)
    picked = net.node("Mul", [logp, "onehot"], "picked")
    # mean over N*10 entries of onehot*logp, times -10 = mean cross-entropy over the batch
    net.node("Mul", [net.node("ReduceMean", [picked], "picked_mean", keepdims=0),
                     net.const("loss.scale", np.float32(-CLASSES))], "loss")
    return _model(net, [_image_input(), helper.make_tensor_value_info("onehot", TensorProto.FLOAT, ["N", CLASSES])],
                  [helper.make_tensor_value_info("loss", TensorProto.FLOAT, []),
                   helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])])


def batch_stats_graph(params: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, list[str]]:
    """Forward with batch-statistics BN; outputs logits and every BN's batch mean and variance."""
    net = Net(params, train=True)
    net.forward("input")
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])]
    outputs += [helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, None, 1, 1]) for t in net.bn_outputs]
    return _model(net, [_image_input()], outputs), net.bn_outputs


def eval_model(params: dict[str, np.ndarray], stats: dict[str, tuple]) -> onnx.ModelProto:
    net = Net(params, train=False, stats=stats)
    net.forward("input")
    model = _model(net, [_image_input()], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])])
    model.doc_string = (f"ResNet-8 on scikit-learn digits. Input: pixel/16 (0..16 → 0..1), bilinear upsample 8→"
                        f"{DIGITS_SIZE} (half-pixel), then (x - {DIGITS_MEAN}) / {DIGITS_STD}; NCHW float32.")
    return model


def shift_batch(x: np.ndarray, rng: np.random.Generator, max_shift: int = 1) -> np.ndarray:
    """Random translation by up to ``max_shift`` pixels, background filled in."""
    background = np.float32((0.0 - DIGITS_MEAN) / DIGITS_STD)
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (max_shift,) * 2, (max_shift,) * 2), constant_values=background)
    out = np.empty_like(x)
    offsets = rng.integers(0, 2 * max_shift + 1, (n, 2))
    for i, (dy, dx) in enumerate(offsets):
        out[i] = padded[i, :, dy:dy + h, dx:dx + w]
    return out


def train(epochs: int = 40, batch: int = 64, lr: float = 3e-3, weight_decay: float = 5e-4, seed: int = 0,
          log=print) -> tuple[onnx.ModelProto, dict]:
    data = load_digits_split()
    rng = np.random.default_rng(seed)
    params = init_params(seed)
    gg = GradientGraph(training_graph(params), sorted(params), threads=1)
    adam = Adam([ParamGroup(sorted(params), lr)])
    decayed = [k for k, v in params.items() if v.ndim > 1]  # conv and fc weights, not BN
    steps_per_epoch = len(data.x_train) // batch
    total = epochs * steps_per_epoch
    onehot = np.eye(CLASSES, dtype=np.float32)
    step, start = 0, time.time()
    for epoch in range(epochs):
        order = rng.permutation(len(data.x_train))
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            x = shift_batch(data.x_train[idx], rng)
            losses.append(gg.step(x, onehot[data.y_train[idx]])[0])
            adam.groups[0].lr = lr * 0.5 * (1 + math.cos(math.pi * step / total))  # cosine schedule
            current = gg.params()
            new = adam.step(current, gg.grads())
            for k in decayed:  # decoupled weight decay (AdamW)
                new[k] = new[k] - adam.groups[0].lr * weight_decay * current[k]
            gg.set_params(new)
            step += 1
        if epoch % 10 == 9 or epoch == epochs - 1:
            log(f"epoch {epoch + 1}: train loss {np.mean(losses):.4f} ({time.time() - start:.0f} s)")
    params = gg.params()

    # running statistics = statistics of each BN input over the whole training set, in one pass
    stats_model, names = batch_stats_graph(params)
    sess = inference_session(stats_model, threads=1)
    out = sess.run(None, {"input": data.x_train})
    train_logits, values = out[0], dict(zip(names, out[1:]))
    bn_names = [n[:-len(".batch_mean")] for n in names if n.endswith(".batch_mean")]
    stats = {bn: (values[f"{bn}.batch_mean"].reshape(-1).astype(np.float32),
                  values[f"{bn}.batch_var"].reshape(-1).astype(np.float32)) for bn in bn_names}
    model = eval_model(params, stats)
    sess = inference_session(model, threads=1)
    parity = float(np.abs(sess.run(None, {"input": data.x_train})[0] - train_logits).max())
    test_logits = sess.run(None, {"input": data.x_test})[0]
    report = {
        "train_top1": float((train_logits.argmax(1) == data.y_train).mean() * 100),
        "test_top1": float((test_logits.argmax(1) == data.y_test).mean() * 100),
        "eval_vs_batch_stats_max_abs": parity,
        "seconds": time.time() - start,
        "params": int(sum(v.size for v in params.values())),
        "bn_layers": len(bn_names),
        "train_images": len(data.x_train), "test_images": len(data.x_test),
    }
    return model, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models")
    args = parser.parse_args()
    load_digits_raw()  # fail early without scikit-learn
    model, report = train(epochs=args.epochs)
    print(json.dumps(report, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(args.out / "digits_resnet8.onnx"))
    meta = {
        "input": "input", "output": "logits", "layout": "NCHW", "size": [DIGITS_SIZE, DIGITS_SIZE],
        "mean": [DIGITS_MEAN], "std": [DIGITS_STD],
        "fp32_top1_test": round(report["test_top1"], 2),
        "dataset": "scikit-learn load_digits (1,797 8x8 images, 10 classes); onnxgenie.datasets.load_digits_split(): "
                   f"stratified split, {report['train_images']} train / {report['test_images']} test, random_state=0",
        "notes": (f"ResNet-8 (widths {list(WIDTHS)}, {report['bn_layers']} BatchNormalization, 2 stride-2 blocks with "
                  f"1x1 projection shortcuts, residual Adds, Gemm head), {report['params']} parameters. Preprocessing: "
                  f"pixel/16, bilinear upsample 8->16 (half-pixel centres), (x - mean) / std. Trained by "
                  "tools/train_default_model.py with onnxruntime-training (Adam, cosine lr, 1-pixel shifts); "
                  "BN running stats = full training-set statistics."),
    }
    (args.out / "digits_resnet8.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
