"""Paired reconstruction experiments: GENIE-M at the fast preset on one fixed set of distilled images.

A W2A4 result moves by up to 1.8 pt between two reconstructions of the same images, so a change to
reconstruction is judged on the same images over several reconstruction seeds, one arm after the
other. The images come from `onnxgenie distill` (or any .npz with float32 NCHW ``images`` in the
model's input space); each run is the in-memory pipeline (`onnxgenie.pipeline.quantize`, the same
plan, reconstruction, export and parity check as the CLI) with the package this script is run from,
so two checkouts give the two arms. The exported model is scored on the dev split; one JSON line per
run is printed and appended to ``--log``.

    .venv/bin/onnxgenie distill ../shared/models/resnet20_cifar10.onnx -o out/r20_256x200_s0.npz \\
        --images 256 --iters 200 --seed 0
    .venv/bin/python tools/exp_recon_fixed.py resnet20_cifar10 out/r20_256x200_s0.npz --bits 4/4 \\
        --seeds 0 1 2 3 --tag main
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchlib import ROOT, SHARED, fixed_images_setup

sys.path.insert(0, str(ROOT))

from onnxgenie import pipeline  # noqa: E402
from onnxgenie.evaluate import predict  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a shared model's name, without .onnx")
    parser.add_argument("calib", help=".npz with float32 NCHW 'images' (e.g. from `onnxgenie distill`)")
    parser.add_argument("--bits", default="4/4", help="W/A")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3], help="reconstruction seeds")
    parser.add_argument("--tag", default="", help="names the arm in the output rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dev-images", type=int, default=5000)
    parser.add_argument("--high-bits", nargs="+", default=[], metavar="NODE", help="as `quantize --high-bits`")
    parser.add_argument("--auto-high-bits", type=int, default=0, metavar="K", help="as `quantize --auto-high-bits`")
    parser.add_argument("--recon-act-lr-scale", type=float, default=None, metavar="F",
                        help="as `quantize --recon-act-lr-scale` (default: the preset's rule)")
    parser.add_argument("--recon-iters", type=int, default=None, help="as `quantize --recon-iters` (default: the preset's)")
    parser.add_argument("--recon-lr-scale", type=float, default=None, help="as `quantize --recon-lr-scale`")
    parser.add_argument("--recon-batch", type=int, default=None, help="as `quantize --recon-batch`")
    parser.add_argument("--recon-candidates", type=int, default=None, metavar="N",
                        help="as `quantize --recon-candidates` (default: the preset's rule)")
    parser.add_argument("--save", type=Path, help="folder for the exported models")
    parser.add_argument("--log", type=Path, default=ROOT / "out" / "exp_recon_fixed.jsonl")
    args = parser.parse_args()
    wbits, abits, info, calib, x, y = fixed_images_setup(args.model, args.calib, args.bits, args.dev_images)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        cfg = pipeline.preset_config("fast", wbits=wbits, abits=abits, seed=seed, calib="distill",
                                     calib_images=len(calib), threads=args.threads, progress=False,
                                     high_bits=tuple(args.high_bits), auto_high_bits=args.auto_high_bits,
                                     recon_act_lr_scale=args.recon_act_lr_scale, recon_iters=args.recon_iters,
                                     recon_lr_scale=args.recon_lr_scale, recon_candidates=args.recon_candidates,
                                     recon_batch=args.recon_batch)
        start = time.perf_counter()
        result = pipeline.quantize(str(SHARED / "models" / f"{args.model}.onnx"), cfg, calib=calib)
        top1 = 100 * float((predict(result.model, x).argmax(1) == y).mean())
        row = {"tag": args.tag, "model": args.model, "bits": args.bits, "seed": seed, "calib": str(args.calib),
               "top1": round(top1, 2), "fp32": info["fp32_top1_dev"], "wall_s": round(time.perf_counter() - start),
               "act_quantizers": sum(n.op_type == "QuantizeLinear" for n in result.model.graph.node),
               "high_bits": len(args.high_bits),
               "auto_high_bits": result.report.get("high_bits", {}).get("chosen", []),
               "size_ratio": result.report["size"]["ratio"],
               "act_lr_scale": pipeline.act_lr_scale_for(cfg),
               "recon_iters": cfg.recon_iters, "recon_batch": cfg.recon_batch, "recon_lr_scale": cfg.recon_lr_scale,
               "candidates": [(c["seed"], round(c["calibration_kl"], 5), c["chosen"])
                              for c in result.report.get("reconstruction", {}).get("candidates", [])]}
        if args.save:
            import onnx

            args.save.mkdir(parents=True, exist_ok=True)
            onnx.save(result.model, str(args.save / f"{args.model}_w{wbits}a{abits}_{args.tag or 'run'}_s{seed}.onnx"))
        print(json.dumps(row), flush=True)
        with args.log.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
