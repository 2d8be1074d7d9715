"""The experiment behind ``--weight-grid auto``: which per-channel weight grid, for which layers.

Init-only (no reconstruction) on one shared model with cached GENIE-D images as calibration, scored
on the first dev images with the fake-quant simulation (onnxruntime-training's CPU provider). Rows:
asymmetric (the paper's) or symmetric grid on all layers or on depthwise convs only, with the L2.4
step search or plain min/max ranges. Prints one line per row; BENCHMARKS.md quotes the figures.

    .venv/bin/python tools/exp_weight_grid.py shufflenet_g3_cifar10 \
        out/calib_shufflenet_g3_cifar10_distill_256_0_200.npz --bits 4/8 4/4   # cached by bench_recon.py
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from benchlib import ROOT, SHARED, model_info

sys.path.insert(0, str(ROOT))

import onnxgenie.quant.init as qinit  # noqa: E402
from onnxgenie.evaluate import predict, preprocess  # noqa: E402
from onnxgenie.pipeline import prepare  # noqa: E402
from onnxgenie.quant.fakequant import fakequant_model  # noqa: E402
from onnxgenie.quant.plan import build_plan, is_depthwise  # noqa: E402
from onnxgenie.quant.spec import QuantPlan  # noqa: E402

ROWS = [("asym", "all", "L2.4"), ("asym", "all", "minmax"), ("sym", "all", "L2.4"), ("sym", "all", "minmax"),
        ("sym", "depthwise", "L2.4"), ("sym", "depthwise", "minmax")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("calib", help=".npz with float32 NCHW 'images' (e.g. a cached GENIE-D set)")
    parser.add_argument("--bits", nargs="+", default=["4/8", "4/4"])
    parser.add_argument("--dev-images", type=int, default=2000)
    args = parser.parse_args()
    info = model_info(args.model)
    _, folded = prepare(str(SHARED / "models" / f"{args.model}.onnx"))
    calib = np.load(args.calib)["images"][:256]
    dev = np.load(SHARED / "data" / "cifar10_dev_test.npz")
    x = preprocess(dev["images"][:args.dev_images], (3, 32, 32), info["mean"], info["std"])
    y = dev["labels"][:args.dev_images]
    nodes = {n.name: n for n in folded.graph.node}
    shapes = {t.name: tuple(t.dims) for t in folded.graph.initializer}
    for bits in args.bits:
        wbits, abits = (int(b) for b in bits.split("/"))
        for grid, where, search in ROWS:
            t = time.perf_counter()
            plan = build_plan(folded, wbits, abits, weight_grid="asym")
            chosen = {w.node for w in plan.weights.values()
                      if where == "all" or is_depthwise(nodes[w.node], shapes[w.weight])}
            for w in plan.weights.values():
                w.symmetric = grid == "sym" and w.node in chosen
            qinit.init_weights(folded, plan)
            if search == "minmax":  # the chosen layers again, from their full range (no clipping search)
                only = QuantPlan(target=plan.target, weights={n: plan.weights[n] for n in chosen})
                qinit.init_weights(folded, only, ratios=np.ones(1, np.float32))
            qinit.init_activations(folded, plan, calib)
            top1 = 100 * float((predict(fakequant_model(folded, plan), x, threads=0).argmax(1) == y).mean())
            print(f"{args.model} W{wbits}A{abits} {grid:4} on {where:9} {search:6}: {top1:.2f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
