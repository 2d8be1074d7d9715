"""Regenerate BENCHMARKS.md and README.md's results table: every benchmark tool with the settings its rows were
made with.

Each tool appends its runs to its raw-results file in benchmarks/ (tracked: bench_product.jsonl,
bench_recon.jsonl, bench_distill.jsonl, bench_quant.json) and rebuilds its own sections from every row there.
``--tables`` rebuilds every section from those rows without running anything (seconds); ``--check`` says
whether the published sections equal what the rows give (tests/test_docs.py runs it). The runs take hours on
2 cores (distillation and 2,000-step reconstructions dominate); ``--list`` shows the commands, ``--only``
runs some of them. Models, caches and run reports stay under out/ (not tracked).

    .venv/bin/python tools/bench.py --tables              # the tables from the raw rows
    .venv/bin/python tools/bench.py --list
    .venv/bin/python tools/bench.py                       # every run, then the tables
    .venv/bin/python tools/bench.py --only product recon  # some of it
    .venv/bin/python tools/bench.py --only imagenet --smoke  # the ImageNet commands on a tiny budget (minutes)
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
SEEDS = ["0", "1", "2"]
R20 = "resnet20_cifar10"
R32 = "resnet32_cifar10"
SHUFFLE = "shufflenet_g3_cifar10"
LITE0 = "efficientnet_lite0_imagenet"
# Every published row comes from one of these commands (tests/test_docs.py checks it against the raw rows).
STEPS = {
    "distill": [["bench_distill.py", "--modes", "genie", "genie-noswing", "noise", "zeroq", "--profile"]],
    "quant": [["bench_quant.py", "--distill-iters", "200"]],
    "recon": [  # GENIE-M alone on fixed distilled images: the official code's budget, the rate factor, the quantizers
        ["bench_recon.py", "--calib", "distill", "--images", "512", "--bits", "4/4", "2/4", "--iters", "500", "2000",
         "--quantizers", "genie"],
        ["bench_recon.py", "--calib", "distill", "--images", "512", "--bits", "2/4", "--iters", "500",
         "--quantizers", "genie", "adaround", "--lr-scales", "8", "--no-rtn"],
        ["bench_recon.py", "--models", R32, "--calib", "distill", "--images", "256", "--bits", "2/4",
         "--quantizers", "genie", "adaround", "--lr-scales", "8", "--no-rtn", "--threads", "1"],
        ["bench_recon.py", "--models", SHUFFLE, "--calib", "distill", "--images", "256", "--bits", "2/4",
         "--quantizers", "genie", "adaround", "--lr-scales", "8", "--no-rtn"],
        ["bench_recon.py", "--models", SHUFFLE, "--calib", "distill", "--images", "256", "--bits", "4/4",
         "--quantizers", "genie", "--lr-scales", "8", "--no-rtn"],
    ],
    "product": [  # the fast preset end to end, and the calibration-data comparison
        ["bench_product.py", "--variants", "fast", "fewshot", "noise", "--bits", "4/4", "2/4", "--seeds", *SEEDS],
        ["bench_product.py", "--models", R20, R32, SHUFFLE, "--variants", "fast", "--bits", "8/8"],
        ["bench_product.py", "--models", SHUFFLE, "--variants", "fast", "--bits", "4/4", "2/4"],
        ["bench_product.py", "--models", R32, "--variants", "fast-act1", "--bits", "4/4"],
        ["bench_product.py", "--models", R32, "--variants", "fast-1cand", "--bits", "2/4"],
    ],
    "variants": [  # the preset's settings against their alternatives (docs/design.md)
        ["bench_product.py", "--variants", "fast-act1", "fast-act4", "fast-copies", "--bits", "4/4",
         "--seeds", *SEEDS],
        ["bench_product.py", "--variants", "fast-1cand", "fast-nocopies", "fast-b64", "fast-512x100",
         "fast-r1000-nocopies", "--bits", "2/4", "--seeds", *SEEDS],
        ["bench_product.py", "--variants", "fast-r1000", "--bits", "4/4", "2/4", "--seeds", *SEEDS],
        ["bench_product.py", "--variants", "fast-b160", "--bits", "4/4", "2/4", "--seeds", "0", "1"],
    ],
    "ablation": [  # the paper's Table 2 at the fast budget
        ["bench_product.py", "--variants", "M1", "M2", "M3", "M4", "M5", "--bits", "4/4", "2/4", "--seeds", *SEEDS],
        ["bench_product.py", "--variants", "M1-nocopies", "M4-nocopies", "--bits", "2/4"],
    ],
    "imagenet": [  # Lite0 on the ImageNet sample's seeded 250/250 split: the baselines, zero-shot, few-shot
        ["bench_product.py", "--models", LITE0, "--variants", "fp32", "ort-minmax", "ort-percentile",
         "--bits", "8/8", "4/8", "4/4"],
        ["bench_product.py", "--models", LITE0, "--variants", "fast", "--bits", "8/8", "4/8", "4/4"],
        ["bench_product.py", "--models", LITE0, "--variants", "fast", "--bits", "4/4", "--seeds", "1", "2"],
        ["bench_product.py", "--models", LITE0, "--variants", "fewshot", "--bits", "4/4", "8/8"],
    ],
}
SMOKE_STEPS = ("imagenet",)  # the groups whose commands take --smoke
# Each tool that owns a raw-results file, with the flags its table text is made with.
TABLES = [("bench_distill", []), ("bench_quant", ["--distill-iters", "200"]), ("bench_recon", []),
          ("bench_product", [])]


def tool(name: str):
    """A benchmark tool as a module (tools/ on the import path)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


def planned_rows() -> dict[str, set[tuple]]:
    """{tool: the row keys the commands of STEPS write}."""
    out: dict[str, set[tuple]] = {}
    for commands in STEPS.values():
        for argv in commands:
            name = argv[0].removesuffix(".py")
            module = tool(name)
            out.setdefault(name, set()).update(module.planned(module.build_parser().parse_args(argv[1:])))
    return out


def _run(argv: list[str], listing: bool) -> int:
    print("$ " + " ".join(["python", f"tools/{argv[0]}", *argv[1:]]), flush=True)
    if listing:
        return 0
    start = time.perf_counter()
    code = subprocess.call([sys.executable, str(TOOLS / argv[0]), *argv[1:]], cwd=ROOT)
    print(f"# {argv[0]}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--list", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--tables", action="store_true", help="only rebuild the tables from the raw rows")
    parser.add_argument("--check", action="store_true", help="exit 1 if a published table differs from the rows")
    parser.add_argument("--smoke", action="store_true",
                        help=f"with --only {' '.join(SMOKE_STEPS)}: every command with a tiny budget, to check the "
                             "plumbing in minutes; rows and tables go to out/, the published files stay as they are")
    args = parser.parse_args()
    if args.smoke and (args.tables or args.check or set(args.only) - set(SMOKE_STEPS)):
        parser.error(f"--smoke runs the commands of {', '.join(SMOKE_STEPS)} only: add --only "
                     f"{' '.join(SMOKE_STEPS)}")
    if not (args.tables or args.check):
        for step in args.only:
            for argv in STEPS[step]:
                code = _run([*argv, "--smoke"] if args.smoke else argv, args.list)
                if code != 0:
                    return code
        if args.list or args.smoke:
            return 0
    code = 0
    for name, flags in TABLES:  # each tool rebuilds (or checks) its sections from its raw rows
        mode = "--check" if args.check else "--table-only"
        code |= subprocess.call([sys.executable, str(TOOLS / f"{name}.py"), mode, *flags], cwd=ROOT,
                                stdout=subprocess.DEVNULL)
    return code


if __name__ == "__main__":
    sys.exit(main())
