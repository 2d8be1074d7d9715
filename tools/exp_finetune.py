"""Paired experiment: corrections after GENIE-M on fixed distilled images (stop 22: none gained).

Each seed runs the fast preset's pipeline once (as ``exp_recon_fixed.py``), scores its QDQ model on the
dev split, then applies each variant to the same reconstructed plan and scores its simulation (the QDQ
export reproduces it exactly), so every variant is paired with its own baseline. Variants: ``acts``,
``acts+w``, ``acts+w+b`` (network-level tuning on the output KL, below) and ``biascorr`` (empirical
bias correction, layer by layer).

    .venv/bin/python tools/exp_finetune.py resnet20_cifar10 out/exp/r20_256x200_s0.npz --bits 2/4 --seeds 0 1
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchlib import ROOT, SHARED, fixed_images_setup

sys.path.insert(0, str(ROOT))

from onnxgenie import pipeline  # noqa: E402
from onnxgenie.evaluate import predict  # noqa: E402
from onnxgenie.export.qdq import EXPORT_OPSET  # noqa: E402
from onnxgenie.ortrain import Adam, GradientGraph, ParamGroup, trainable_form  # noqa: E402
from onnxgenie.quant.fakequant import fakequant_model  # noqa: E402
from onnxgenie.quant.lsq import lsq_quantize  # noqa: E402
from onnxgenie.quant.reconstruct import _finish, _rewire, cosine  # noqa: E402
from onnxgenie.quant.sensitivity import kl_divergence  # noqa: E402
from onnxgenie.quant.softbits import GraphBuilder  # noqa: E402
from onnxgenie.quant.spec import QuantPlan  # noqa: E402

# What was tried (stop 22): after GENIE-M, every integer fixed, one factor per activation step and per
# weight-channel step (s = s0 * r, r from 1, so one learning rate is relative for all) and optionally a
# correction of each layer's float bias, learned for the whole network on the calibration images with
# L = mean KL(softmax(z_FP32) || softmax(z_quantized)). The QDQ export reproduces the result exactly.
INPUT_TEACHER_P, INPUT_TEACHER_LOGP = "teacher_prob", "teacher_log_prob"


def _softmax(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return np.exp(logp).astype(np.float32), logp.astype(np.float32)


def tuning_model(folded: onnx.ModelProto, plan: QuantPlan, weights: bool = True,
                 biases: bool = False) -> tuple[onnx.ModelProto, dict]:
    """The quantized network with step factors as trainable initializers and the KL loss as first output.
    Returns the model and {"acts": {tensor: r}, "weights": {node: r}, "biases": {node: delta}} names."""
    model = copy.deepcopy(folded)
    trainable_form(model)
    g = model.graph
    b = GraphBuilder("tune/")
    names: dict = {"acts": {}, "weights": {}, "biases": {}}
    nodes = {n.name: n for n in g.node}
    drop = set()
    for node_name, wq in plan.weights.items():
        node = nodes[node_name]
        shape = [1] * wq.wint.ndim
        shape[wq.axis] = len(wq.scale)
        levels = (wq.wint - wq.zero_point.astype(np.int32).reshape(shape)).astype(np.float32)
        s0 = b.const(wq.scale.astype(np.float32).reshape(shape))
        if weights:
            r = b.const(np.ones(shape, np.float32), f"{wq.weight}/step_factor")
            names["weights"][node_name] = r
            scale = b.op("Mul", s0, r)
        else:
            scale = s0
        node.input[1] = b.op("Mul", b.const(levels), scale)
        drop.add(wq.weight)
        if biases and len(node.input) > 2 and node.input[2]:
            delta = b.const(np.zeros(wq.scale.shape, np.float32), f"{node_name}/bias_delta")
            names["biases"][node_name] = delta
            node.input[2] = b.op("Add", node.input[2], delta)
    kept = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(kept)
    for aq in plan.acts.values():
        users = [n for n in g.node if aq.tensor in n.input and (not aq.consumers or n.name in aq.consumers)]
        r = b.const(np.ones([1], np.float32), f"{aq.tensor}/step_factor")
        names["acts"][aq.tensor] = r
        s = b.op("Mul", b.const(np.array([aq.scale], np.float32)), r)
        _rewire(users, aq.tensor, lsq_quantize(b, aq.tensor, s, aq.qrange))
    logits = g.output[0].name
    n_classes = _classes(folded)
    flat = b.op("Flatten", logits, axis=1)
    logq = b.op("LogSoftmax", flat, axis=1)
    per_image = b.op("ReduceSum", b.op("Mul", INPUT_TEACHER_P, b.op("Sub", INPUT_TEACHER_LOGP, logq)),
                     b.const(np.array([1], np.int64), dtype=np.int64), keepdims=0)
    b.op("ReduceMean", per_image, keepdims=0, out="loss")
    inputs = [g.input[0], helper.make_tensor_value_info(INPUT_TEACHER_P, TensorProto.FLOAT, ["N", n_classes]),
              helper.make_tensor_value_info(INPUT_TEACHER_LOGP, TensorProto.FLOAT, ["N", n_classes])]
    outputs = [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])]
    return _finish(model, b, inputs, outputs), names


def _classes(folded: onnx.ModelProto) -> int:
    dims = [d.dim_value for d in folded.graph.output[0].type.tensor_type.shape.dim[1:]]
    return int(np.prod(dims))


def tune_network(folded: onnx.ModelProto, plan: QuantPlan, images: np.ndarray, iters: int = 500, batch: int = 32,
                 lr: float = 1e-3, bias_lr: float = 1e-3, weights: bool = True, biases: bool = False, seed: int = 0,
                 threads: int = 1) -> tuple[QuantPlan, onnx.ModelProto, dict]:
    """Learn the step factors (and bias corrections) on ``images``; returns the new plan, the model with the
    corrected biases (``folded`` itself when ``biases`` is off) and a report."""
    start = time.perf_counter()
    teacher = predict(folded, images, threads=threads).reshape(len(images), -1)
    p, logp = _softmax(teacher)
    model, names = tuning_model(folded, plan, weights, biases)
    trainable = [*names["acts"].values(), *names["weights"].values(), *names["biases"].values()]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    params = {n: inits[n].copy() for n in trainable}
    gg = GradientGraph(model, trainable, threads=threads)
    groups = [ParamGroup([*names["acts"].values(), *names["weights"].values()], lr)]
    if biases:
        groups.append(ParamGroup(list(names["biases"].values()), bias_lr))
    adam = Adam(groups=groups)
    base = [grp.lr for grp in groups]
    rng = np.random.default_rng([seed, 7])
    order, pos, losses = rng.permutation(len(images)), 0, []
    for step in range(1, iters + 1):
        if pos + batch > len(images):
            order, pos = rng.permutation(len(images)), 0
        idx = np.sort(order[pos:pos + batch])
        pos += batch
        gg.set_params(params)
        losses.append(gg(images[idx], p[idx], logp[idx]))
        for grp, lr0 in zip(groups, base):
            grp.lr = cosine(lr0, step + 1, iters)
        params = adam.step(params, gg.grads())
    new_plan = copy.deepcopy(plan)
    for tensor, r in names["acts"].items():
        new_plan.acts[tensor].scale = float(new_plan.acts[tensor].scale * params[r].reshape(-1)[0])
    for node, r in names["weights"].items():
        new_plan.weights[node].scale = (new_plan.weights[node].scale * params[r].reshape(-1)).astype(np.float32)
    new_model = folded
    if biases:
        new_model = copy.deepcopy(folded)
        by_name = {t.name: t for t in new_model.graph.initializer}
        nodes = {n.name: n for n in new_model.graph.node}
        for node, delta in names["biases"].items():
            t = by_name[nodes[node].input[2]]
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + params[delta].reshape(-1), t.name))
    before = kl_divergence(teacher, predict(fakequant_model(folded, plan), images, threads=threads))
    after = kl_divergence(teacher, predict(fakequant_model(new_model, new_plan), images, threads=threads))
    report = {"iters": iters, "batch": batch, "lr": lr, "biases": biases, "weights": weights,
              "kl_before": before, "kl_after": after, "loss_first": losses[0], "loss_last": float(np.mean(losses[-20:])),
              "wall_s": round(time.perf_counter() - start, 3)}
    return new_plan, new_model, report


def _with_outputs(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    out = copy.deepcopy(model)
    del out.graph.output[:]
    out.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors)
    return out


def bias_correct(folded: onnx.ModelProto, plan: QuantPlan, images: np.ndarray, iters: int = 0, seed: int = 0,
                 threads: int = 1, **_) -> tuple[QuantPlan, onnx.ModelProto, dict]:
    """Empirical bias correction (Nagel et al.), layer by layer in graph order: each quantized layer's
    float bias loses the per-channel mean of (quantized − FP32) output on ``images``, the quantized
    output taken with every earlier layer already corrected."""
    start = time.perf_counter()
    nodes = [n for n in folded.graph.node if n.name in plan.weights and len(n.input) > 2 and n.input[2]]
    outs = [n.output[0] for n in nodes]
    fp = dict(zip(outs, predict_many(_with_outputs(folded, outs), images, threads)))
    model = copy.deepcopy(folded)
    inits = {t.name: t for t in model.graph.initializer}
    shifts = []
    for node in nodes:
        q = predict_many(_with_outputs(fakequant_model(model, plan), [node.output[0]]), images, threads)[0]
        axes = tuple(i for i in range(q.ndim) if i != 1)
        delta = (q.astype(np.float64) - fp[node.output[0]]).mean(axis=axes)
        t = inits[node.input[2]]
        t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) - delta).astype(np.float32), t.name))
        shifts.append(float(np.abs(delta).max()))
    teacher = predict(folded, images, threads=threads)
    report = {"kl_before": kl_divergence(teacher, predict(fakequant_model(folded, plan), images, threads=threads)),
              "kl_after": kl_divergence(teacher, predict(fakequant_model(model, plan), images, threads=threads)),
              "max_shift": max(shifts), "wall_s": round(time.perf_counter() - start, 3)}
    return plan, model, report


def predict_many(model: onnx.ModelProto, x: np.ndarray, threads: int, batch: int = 256) -> list[np.ndarray]:
    from onnxgenie.ortrain import inference_session

    sess = inference_session(model, threads)
    name = sess.get_inputs()[0].name
    parts = [sess.run(None, {name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


VARIANTS = {
    "biascorr": dict(fn=bias_correct),
    "acts": dict(weights=False, biases=False),
    "acts+w": dict(weights=True, biases=False),
    "acts+w+b": dict(weights=True, biases=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("calib")
    parser.add_argument("--bits", default="4/4")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bias-lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recon-candidates", type=int, default=1)
    parser.add_argument("--no-recon", action="store_true", help="skip GENIE-M (smoke test)")
    parser.add_argument("--dev-images", type=int, default=5000)
    parser.add_argument("--log", type=Path, default=ROOT / "out" / "exp_finetune.jsonl")
    args = parser.parse_args()
    wbits, abits, info, calib, x, y = fixed_images_setup(args.model, args.calib, args.bits, args.dev_images)
    path = str(SHARED / "models" / f"{args.model}.onnx")
    _, folded = pipeline.prepare(path)
    args.log.parent.mkdir(parents=True, exist_ok=True)

    def top1(model) -> float:
        return round(100 * float((predict(model, x, threads=args.threads).argmax(1) == y).mean()), 2)

    for seed in args.seeds:
        cfg = pipeline.preset_config("fast", wbits=wbits, abits=abits, seed=seed, calib="distill",
                                     calib_images=len(calib), threads=args.threads, progress=False,
                                     recon_candidates=args.recon_candidates, reconstruct=not args.no_recon)
        start = time.perf_counter()
        result = pipeline.quantize(path, cfg, calib=calib)
        row = {"model": args.model, "bits": args.bits, "seed": seed, "fp32": info["fp32_top1_dev"],
               "base": top1(result.model), "recon_s": round(time.perf_counter() - start)}
        for name in args.variants:
            settings = dict(VARIANTS[name])
            fn = settings.pop("fn", tune_network)
            plan, model, rep = fn(folded, result.plan, result.calibration, iters=args.iters, batch=args.batch,
                                            lr=args.lr, bias_lr=args.bias_lr, seed=seed, threads=args.threads,
                                            **settings)
            row[name] = top1(fakequant_model(model, plan, opset=EXPORT_OPSET))
            row[f"{name}_kl"] = [round(rep["kl_before"], 5), round(rep["kl_after"], 5)]
            row[f"{name}_s"] = round(rep["wall_s"])
            print(json.dumps(row), flush=True)
        row.update(iters=args.iters, batch=args.batch, lr=args.lr, bias_lr=args.bias_lr)
        print(json.dumps(row), flush=True)
        with args.log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
