"""Regenerate BENCHMARKS.md: every benchmark tool with the settings its table was made with.

Each tool adds its runs to its raw-results file in benchmarks/ (tracked: bench_product.jsonl, bench_recon.jsonl,
bench_quant.json) and rebuilds its own section of BENCHMARKS.md from every row there, so the steps can also be
run one at a time (``--only``); bench_distill keeps no file, its table is its latest run. Models, caches and run
reports stay under out/ (not tracked). The whole set takes hours on 2 cores (distillation and 2,000-step
reconstructions dominate); ``--list`` shows the commands.

    .venv/bin/python tools/bench.py --list
    .venv/bin/python tools/bench.py                       # everything
    .venv/bin/python tools/bench.py --only product recon  # some of it
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ["0", "1", "2"]
STEPS = {
    "distill": [["bench_distill.py", "--modes", "genie", "genie-noswing", "noise", "zeroq", "--profile"]],
    "quant": [["bench_quant.py"]],
    "recon": [  # the official code's budget on ResNet-20: fidelity, then the quantizer comparison
        ["bench_recon.py", "--calib", "distill", "--images", "512", "--distill-iters", "200", "--bits", "4/4", "2/4",
         "--iters", "2000", "--quantizers", "genie", "adaround", "--seeds", *SEEDS],
        ["bench_recon.py", "--calib", "real", "--images", "512", "--bits", "4/4", "2/4", "--iters", "500",
         "--quantizers", "genie", "adaround"],
        ["bench_recon.py", "--models", "shufflenet_g3_cifar10", "resnet32_cifar10", "--calib", "distill",
         "--images", "512", "--bits", "4/4", "2/4", "--iters", "500", "--quantizers", "genie", "adaround"],
    ],
    "product": [
        ["bench_product.py", "--variants", "fast", "fewshot", "noise", "--bits", "8/8", "4/4", "2/4",
         "--seeds", *SEEDS],
        ["bench_product.py", "--variants", "M1", "M2", "M3", "M4", "--bits", "4/4", "2/4", "--seeds", *SEEDS],
        ["bench_product.py", "--models", "shufflenet_g3_cifar10", "resnet32_cifar10", "--variants", "fast",
         "--bits", "8/8", "4/4", "2/4"],
    ],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--list", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    for step in args.only:
        for argv in STEPS[step]:
            cmd = [sys.executable, str(ROOT / "tools" / argv[0]), *argv[1:]]
            print("$ " + " ".join(["python", f"tools/{argv[0]}", *argv[1:]]), flush=True)
            if args.list:
                continue
            start = time.perf_counter()
            code = subprocess.call(cmd, cwd=ROOT)
            print(f"# {argv[0]}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
            if code != 0:
                return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
