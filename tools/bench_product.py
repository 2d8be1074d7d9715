"""End-to-end benchmark of `onnxgenie quantize` as a user runs it, and the ablation of GENIE's Table 2.

Each run is the CLI in a fresh process (distillation workers included) on a shared model; the written QDQ
model is scored on the model's dev split (CIFAR-10: 5,000 images; ImageNet sample: 500). Per run: top-1, Δ to
FP32, wall time of the whole command, the stage times from its report, the peak RSS of the largest process
(main process, distillation worker or reconstruction candidate), and the FP32-agreement the report gives.
Results are appended to benchmarks/bench_product.jsonl (tracked); the tables (CIFAR-10 and ImageNet in
BENCHMARKS.md, the headline table in README.md) are rebuilt from every row there. The written models and
run reports stay under out/bench_product/.

A variant is a set of flags added to `onnxgenie quantize MODEL --wbits W --abits A --seed S` (``VARIANTS``):
``fast`` is the preset as it is; ``fast-*`` differ from it as their flags say; ``fewshot`` (256 real training
images: not zero-shot) and ``noise`` (Gaussian noise: the naive zero-shot baseline) change the calibration
images only; M1-M5 are the paper's Table 2 ablation at the fast budget, one reconstruction at the reference
activation-step rate: M1 ZeroQ pixels, no swing + adaround; M2 pixels + swing + adaround; M3 generator, no
swing + adaround; M4 generator + swing + adaround; M5 generator + swing + GENIE-M.

    .venv/bin/python tools/bench_product.py --bits 4/4 2/4 --seeds 0 1 2
    .venv/bin/python tools/bench_product.py --variants M1 M2 M3 M4 M5 --bits 2/4 --seeds 0 1 2
    .venv/bin/python tools/bench_product.py --table-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import README, RESULTS_DIR, ROOT, SHARED, bits_pairs, dev_split, model_info, publish, read_rows, stale
from onnxgenie.quant.augment import COPIES

OUT = ROOT / "out" / "bench_product"
RESULTS = RESULTS_DIR / "bench_product.jsonl"
QUANT_RESULTS = RESULTS_DIR / "bench_quant.json"
SECTIONS = {"cifar10": ("<!-- bench_product -->", "<!-- /bench_product -->"),
            "imagenet": ("<!-- bench_product_imagenet -->", "<!-- /bench_product_imagenet -->")}
HEADLINE = ("<!-- results -->", "<!-- /results -->")  # README.md
ONE_RECON = ["--recon-candidates", "1"]
ACT1 = ["--recon-act-lr-scale", "1"]
ABLATION = [*ONE_RECON, *ACT1]
VARIANTS = {
    "fast": [],
    "fast-act1": ACT1,  # W4A4 at the reference activation-step rate
    "fast-act4": ["--recon-act-lr-scale", "4"],
    "fast-copies": ["--recon-augment", "flip-shift", *ACT1],  # W4A4 on the mirrored and shifted copies
    "fast-1cand": ONE_RECON,  # W2A4 with one reconstruction
    "fast-nocopies": ["--recon-augment", "none", *ONE_RECON],  # W2A4 on the 256 images alone
    "fast-b64": ["--recon-batch", "64", "--recon-iters", "250"],  # the same compute in half as many, twice as big steps
    "fast-b160": ["--distill-batch", "160", "--holdout-images", "64", "--recon-augment", "none", *ABLATION],
    "fast-r1000": ["--recon-iters", "1000", "--recon-lr-scale", "4", *ABLATION],  # twice the steps at half the rate
    "fast-r1000-nocopies": ["--recon-iters", "1000", "--recon-lr-scale", "4", "--recon-augment", "none", *ABLATION],
    "fast-512x100": ["--calib-images", "512", "--distill-iters", "100", *ONE_RECON],  # twice the images, half the steps
    "paper": ["--preset", "paper"],
    "fewshot": ["--calib-data", "{train}", "--calib-images", "256", "--mean", "{mean}", "--std", "{std}"],
    "noise": ["--calib", "noise"],
    "M1": ["--distill-mode", "zeroq", "--no-swing", "--quantizer", "adaround", *ABLATION],
    "M1-nocopies": ["--distill-mode", "zeroq", "--no-swing", "--quantizer", "adaround", "--recon-augment", "none",
                    *ABLATION],
    "M2": ["--distill-mode", "zeroq", "--quantizer", "adaround", *ABLATION],
    "M3": ["--no-swing", "--quantizer", "adaround", *ABLATION],
    "M4": ["--quantizer", "adaround", *ABLATION],
    "M4-nocopies": ["--quantizer", "adaround", "--recon-augment", "none", *ABLATION],
    "M5": ABLATION,
}
ORDER = list(VARIANTS)
# Measured with the official GENIE code (PyTorch), not by this tool: the comparison every table quotes.
OFFICIAL = {"model": "resnet20_cifar10", "W4A4": (80.62, 79.82), "W2A4": (77.60, 77.30), "minutes": 11}
def command(model: str, variant: str, wbits: int, abits: int, seed: int, out: Path, report: Path,
            machine_flags: tuple[str, ...] = ()) -> list[str]:
    info = model_info(model)
    if variant == "fewshot" and info.get("dataset", "cifar10") != "cifar10":
        raise SystemExit(f"bench_product: fewshot needs training images; there are none for {model}")
    fill = {"train": str(SHARED / "data" / "cifar10_train_1k.npz")}
    flags = []
    for flag in VARIANTS[variant]:
        if flag in ("{mean}", "{std}"):
            flags += [str(v) for v in info[flag[1:-1]]]
        else:
            flags.append(flag.format(**fill))
    return [sys.executable, "-m", "onnxgenie.cli", "quantize", str(SHARED / "models" / f"{model}.onnx"),
            "-o", str(out), "--wbits", str(wbits), "--abits", str(abits), "--seed", str(seed), "--overwrite",
            "--quiet", "--report", str(report), *flags, *machine_flags]


def dev_top1(model_path: Path, model: str, limit: int) -> tuple[float, int]:
    """Top-1 (%) of the written model on the first ``limit`` dev images, and how many there were."""
    import onnx

    from onnxgenie.runtime import predict

    x, y = dev_split(model, limit)
    pred = predict(onnx.load(str(model_path)), x).argmax(1)
    return round(float((pred == y).mean() * 100), 2), len(y)


def _peak_rss_mib(stages: dict) -> int:
    """The largest process of the run: the main one, a distillation worker or a GENIE-M candidate (its report)."""
    return max(max(v.get("peak_rss_mib", 0), v.get("distilling_process_peak_rss_mib", 0),
                   v.get("candidate_process_peak_rss_mib", 0)) for v in stages.values())


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip()


def run_one(model: str, variant: str, wbits: int, abits: int, seed: int, eval_images: int,
            machine_flags: tuple[str, ...] = ()) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    stem = f"{model}_{variant}_w{wbits}a{abits}_s{seed}"
    out, report_file = OUT / f"{stem}.onnx", OUT / f"{stem}.json"
    argv = command(model, variant, wbits, abits, seed, out, report_file, machine_flags)
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench_product: {stem} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    report = json.loads(report_file.read_text())
    top1, scored = dev_top1(out, model, eval_images)
    recon = report.get("reconstruction", {})
    return {"model": model, "variant": variant, "wbits": wbits, "abits": abits, "seed": seed,
            "top1": top1, "fp32": model_info(model)["fp32_top1_dev"],
            "wall_s": round(wall, 1), "stages_s": {k: v["wall_s"] for k, v in report["stages"].items()},
            "rss_mib": _peak_rss_mib(report["stages"]),
            "threads": report["config"].get("threads"), "jobs": report["config"].get("jobs"), "commit": _commit(),
            "agreement": report["agreement"], "eval_images": scored, "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "config": {**{k: report["config"][k] for k in ("calib_images", "holdout_images", "distill_iters",
                                                            "distill_batch", "recon_iters", "recon_batch",
                                                            "recon_lr_scale")},
                       "recon_augment": recon.get("augment", "none"),
                       "act_lr_scale": recon.get("act_lr_scale", 1.0),
                       "candidates": len(recon.get("candidates", [])) or 1}}


def _dataset(row: dict) -> str:
    return "imagenet" if "imagenet" in row["model"] else "cifar10"


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return (f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} "
            f"({' / '.join(f'{v:.2f}' for v in values)})")


def groups(rows: list[dict]) -> dict:
    """{(model, bits, variant): {seed: [runs, oldest first]}}."""
    out: dict = {}
    for r in rows:
        key = (r["model"], f"W{r['wbits']}A{r['abits']}", r["variant"])
        out.setdefault(key, {}).setdefault(r["seed"], []).append(r)
    return out


def _budget(variant: str, c: dict) -> str:
    images = {"fewshot": f"{c['calib_images']} real", "noise": f"{c['calib_images']} noise"}.get(
        variant, f"{c['calib_images']}+{c['holdout_images']} × {c['distill_iters']}")
    augment = c.get("recon_augment") or "none"
    budget = f"{images}, {c['recon_iters']} × {c['recon_batch']}"
    budget += f" on ×{COPIES[augment]} ({augment})" if augment != "none" else ""
    budget += f", act. lr ×{c.get('act_lr_scale', 1.0):g}"
    budget += f", best of {c['candidates']}" if c.get("candidates", 1) > 1 else ""
    return budget


def _threads(r: dict) -> str:
    return f"{r.get('threads') or 1}/{r.get('jobs') or 'auto'}"


def reference(quant: dict) -> str:
    """The comparison line: the official code (measured outside this tool) and onnxruntime's quantize_static."""
    fp32 = quant.get(OFFICIAL["model"], {}).get("fp32", {}).get("top1", 81.02)
    text = (f"Official GENIE code (PyTorch; measured outside this tool), {OFFICIAL['model']}, the same 2-core CPU, "
            "512 distilled images × 200 distillation steps, 2,000 reconstruction steps per block, about "
            f"{OFFICIAL['minutes']} minutes a run: "
            + ", ".join(f"{bits} {' / '.join(f'{v:.2f}' for v in vals)} "
                        f"({' / '.join(f'{v - fp32:+.2f}' for v in vals)})"
                        for bits, vals in OFFICIAL.items() if bits.startswith("W")) + ".")
    ort = quant.get(OFFICIAL["model"], {}).get("W4A4", {})
    if ort:
        text += (" onnxruntime `quantize_static` with 1,000 real images (the init-only table), W4A4: "
                 f"MinMax {ort['ort_MinMax']['top1']:.2f}, Percentile {ort['ort_Percentile']['top1']:.2f}.")
    return text


METHOD = ("Method: `onnxgenie quantize` as a user runs it (`--quiet`, the CLI's default `--jobs` and `--threads` "
          "unless the threads/jobs column says otherwise), one fresh process per run, one run after another on a "
          "2-core x86-64 machine shared with other work: compare wall times within a group, not across. The "
          "written QDQ model is scored on onnxruntime. A variant's flags are added to `onnxgenie quantize MODEL "
          "--wbits W --abits A --seed S`; the budget column gives what the run used (calibration + held-out "
          "images × distillation steps, reconstruction steps × batch, copies, activation-step rate factor, "
          "candidates). Top-1: mean ± standard deviation over seeds (the latest run of each seed); where a seed "
          "ran more than once with the same flags, the other runs are under *repeats*. Agreement: FP32 vs "
          "quantized top-1 on the held-out distilled images, or on the calibration images where none are "
          "held out (the report says which). Rows marked † were transcribed from a published table, not "
          "written by the tool (their stage times, agreement and RSS are the group's mean / max). "
          "Reports with stage times and per-block errors: `out/bench_product/*.json`.")


def table(rows: list[dict], dataset: str, quant: dict, command: str) -> str:
    begin, end = SECTIONS[dataset]
    title = {"cifar10": "## End to end on CIFAR-10: `onnxgenie quantize` (`tools/bench_product.py`)",
             "imagenet": "## ImageNet (EfficientNet-Lite0, 224x224)"}[dataset]
    mine = [r for r in rows if _dataset(r) == dataset]
    lines = [begin, title, ""]
    if dataset == "imagenet":
        lines += ["`onnxgenie quantize` end to end on `efficientnet_lite0_imagenet` (FP32 89.20 % on the 500-image "
                  "ImageNet sample; one image per class, so compare drops and agreement, not absolute top-1). "
                  "Method as for the CIFAR-10 table.", ""]
        if not mine:
            lines += ["No rows yet: `.venv/bin/python tools/bench.py --only imagenet` adds them "
                      f"(`{command}`).", end]
            return "\n".join(lines)
    else:
        lines += [METHOD, "", f"Reference: {reference(quant)}", "",
                  f"Regenerate: `{command}` (the runs; `tools/bench.py --tables` rebuilds the table from the raw "
                  "rows).", ""]
    lines += ["| model | bits | variant | flags beyond the preset | budget | top-1 (seeds) | Δ FP32 | repeats | "
              "wall s | distill s | recon s | agreement % | peak RSS MiB | threads/jobs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    grouped = groups(mine)
    for key in sorted(grouped, key=lambda k: (k[0], k[1], ORDER.index(k[2]))):
        by_seed = grouped[key]
        rs = [by_seed[s][-1] for s in sorted(by_seed)]
        repeats = [r["top1"] for s in sorted(by_seed) for r in by_seed[s][:-1]]
        flags = " ".join(f for f in VARIANTS[key[2]] if not f.startswith("{"))
        flags = flags.replace("--calib-data", "--calib-data TRAIN_1K.npz").replace("--mean", "--mean M") \
            .replace("--std", "--std S") if key[2] == "fewshot" else flags
        tops = [r["top1"] for r in rs]
        mean = lambda k: statistics.mean(r["stages_s"].get(k, 0.0) for r in rs)  # noqa: E731
        walls = " / ".join(f"{r['wall_s']:.0f}" for r in rs)
        mark = " †" if any("reconstructed" in r for r in rs) else ""
        threads = " ".join(dict.fromkeys(_threads(r) for r in rs))
        lines.append(f"| {key[0]} | {key[1]} | {key[2]}{mark} | {f'`{flags}`' if flags else '–'} | "
                     f"{_budget(key[2], rs[0]['config'])} | {_cell(tops)} | "
                     f"{statistics.mean(tops) - rs[0]['fp32']:+.2f} | "
                     f"{' / '.join(f'{v:.2f}' for v in repeats) or '–'} | {walls} | "
                     f"{mean('distill'):.0f} | {mean('reconstruct'):.0f} | "
                     f"{statistics.mean(r['agreement']['top1_agreement'] for r in rs):.1f} | "
                     f"{max(r['rss_mib'] for r in rs)} | {threads} |")
    lines.append(end)
    return "\n".join(lines)


# The README's headline table: per model and bit width the preset's row, else the variant named here.
HEADLINE_MODELS = {"resnet20_cifar10": "ResNet-20", "resnet32_cifar10": "ResNet-32",
                   "shufflenet_g3_cifar10": "ShuffleNet v1 g3", "efficientnet_lite0_imagenet": "EfficientNet-Lite0"}
HEADLINE_BITS = ("W8A8", "W4A4", "W2A4")
HEADLINE_FALLBACK = {"W4A4": "fast-act1", "W2A4": "fast-1cand"}


def headline(rows: list[dict], quant: dict) -> str:
    grouped = groups(rows)
    begin, end = HEADLINE
    lines = [begin, "<!-- generated by tools/bench_product.py from benchmarks/; do not edit by hand -->", "",
             "| model (dataset, FP32 top-1) | " + " | ".join(HEADLINE_BITS) + " | minutes per run |",
             "|---" * (len(HEADLINE_BITS) + 2) + "|"]
    notes = {}
    for model, name in HEADLINE_MODELS.items():
        cells, walls, fp32 = [], [], None
        for bits in HEADLINE_BITS:
            variant = "fast" if (model, bits, "fast") in grouped else HEADLINE_FALLBACK.get(bits)
            by_seed = grouped.get((model, bits, variant))
            if not by_seed:
                cells.append("–")
                continue
            rs = [by_seed[s][-1] for s in sorted(by_seed)]
            fp32 = rs[0]["fp32"]
            top = statistics.mean(r["top1"] for r in rs)
            mark = ""
            if variant != "fast":
                mark = "¹" if variant == "fast-act1" else "²"
                notes[mark] = variant
            seeds = f", {len(rs)} seeds" if len(rs) > 1 else ""
            cells.append(f"{top:.2f} ({top - fp32:+.2f}{seeds}){mark}")
            walls += [r["wall_s"] / 60 for r in rs]
        if fp32 is None:
            if "imagenet" in model:
                planned = ("W8A8", "W4A4")  # tools/bench.py --only imagenet
                lines.append(f"| {name} (ImageNet, 224x224) | " + " | ".join(
                    "to be measured" if b in planned else "–" for b in HEADLINE_BITS) + " | – |")
            continue
        dataset = "ImageNet" if "imagenet" in model else "CIFAR-10"
        lines.append(f"| {name} ({dataset}, {fp32:.2f}) | " + " | ".join(cells) +
                     f" | {min(walls):.0f}–{max(walls):.0f} |")
    fp32 = quant.get(OFFICIAL["model"], {}).get("fp32", {}).get("top1", 81.02)
    lines.append("| official GENIE code, ResNet-20, 4× the reconstruction steps | – | " +
                 " | ".join(f"{statistics.mean(OFFICIAL[b]):.2f} ({statistics.mean(OFFICIAL[b]) - fp32:+.2f}, "
                            f"{len(OFFICIAL[b])} seeds)" for b in HEADLINE_BITS[1:]) +
                 f" | ~{OFFICIAL['minutes']} |")
    ort = quant.get(OFFICIAL["model"], {})
    if ort:
        best = lambda b: max(ort[b][k]["top1"] for k in ("ort_MinMax", "ort_Percentile"))  # noqa: E731
        lines.append("| onnxruntime `quantize_static`, ResNet-20, 1,000 real images (better of MinMax / "
                     f"Percentile) | {best('W8A8'):.2f} ({best('W8A8') - fp32:+.2f}) | "
                     f"{best('W4A4'):.2f} ({best('W4A4') - fp32:+.2f}) | – | – |")
    explain = {"fast-act1": "activation-step rate ×1 (the `fast-act1` row; ×64 is level on the ResNets)",
               "fast-1cand": "one reconstruction (the `fast-1cand` row)"}
    text = [f"{m} {explain[v]}." for m, v in sorted(notes.items(), key=lambda n: "¹²".index(n[0]))]
    if any("imagenet" in k[0] for k in grouped):
        text.append("ImageNet: a 500-image sample, one image per class (compare drops, not absolute top-1).")
    else:
        text.append("The EfficientNet-Lite0 row (ImageNet, a 500-image sample) is filled by "
                    "`python tools/bench.py --only imagenet`.")
    lines += ["", " ".join(text)]
    lines.append(end)
    return "\n".join(lines)


def load_quant() -> dict:
    return json.loads(QUANT_RESULTS.read_text()) if QUANT_RESULTS.exists() else {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20_cifar10"])
    parser.add_argument("--variants", nargs="+", default=["fast"], choices=ORDER)
    parser.add_argument("--bits", nargs="+", default=["4/4", "2/4"], help="W/A pairs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--eval-images", type=int, default=5000, help="at most this many dev images")
    parser.add_argument("--threads", type=int, help="the CLI's --threads (default: its own)")
    parser.add_argument("--jobs", type=int, help="the CLI's --jobs (default: its own); with --threads, for two runs side by side")
    parser.add_argument("--table-only", action="store_true", help="rebuild the tables from the results file")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    parser.add_argument("--check", action="store_true", help="exit 1 if BENCHMARKS.md / README.md differ from the rows")
    return parser


def planned(args: argparse.Namespace) -> set[tuple]:
    """The (model, bits, variant, seed) rows a run with ``args`` writes."""
    return {(m, f"W{w}A{a}", v, s) for m in args.models for w, a in bits_pairs(args.bits) for v in args.variants
            for s in args.seeds}


def row_key(row: dict) -> tuple:
    return row["model"], f"W{row['wbits']}A{row['abits']}", row["variant"], row["seed"]


def sections(rows: list[dict]) -> list[tuple[str, str, str, Path]]:
    """(begin, end, text, file) of every section this tool writes."""
    quant = load_quant()
    out = []
    for dataset, command in (("imagenet", "python tools/bench_product.py --models efficientnet_lite0_imagenet "
                                          "--variants fast --bits 8/8 4/4 --seeds 0"),
                             ("cifar10", "python tools/bench.py --only product variants ablation")):
        begin, end = SECTIONS[dataset]
        out.append((begin, end, table(rows, dataset, quant, command), Path("BENCHMARKS.md")))
    out.append((*HEADLINE, headline(rows, quant), README))
    return out


def main() -> int:
    args = build_parser().parse_args()
    if not args.table_only and not args.check:
        if not (SHARED / "models").is_dir():
            print(f"bench_product: {SHARED / 'models'} not found; the shared models and data are needed",
                  file=sys.stderr)
            return 2
        machine_flags = tuple(f for name in ("threads", "jobs") if getattr(args, name)
                              for f in (f"--{name}", str(getattr(args, name))))
        RESULTS.parent.mkdir(exist_ok=True)
        for model in args.models:
            for wbits, abits in bits_pairs(args.bits):
                for variant in args.variants:
                    for seed in args.seeds:
                        row = run_one(model, variant, wbits, abits, seed, args.eval_images, machine_flags)
                        print(json.dumps(row), flush=True)
                        with RESULTS.open("a") as fh:
                            fh.write(json.dumps(row) + "\n")
    code = 0
    for begin, end, text, path in sections(read_rows(RESULTS)):
        path = path if path.is_absolute() else ROOT / path
        if args.check:
            if stale(begin, end, text, path):
                print(f"bench_product: {path.name} {begin} is stale; run tools/bench.py --tables", file=sys.stderr)
                code = 1
            continue
        publish(begin, end, text, write=not args.no_write, path=path)
    return code


if __name__ == "__main__":
    sys.exit(main())
