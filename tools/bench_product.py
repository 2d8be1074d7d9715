"""End-to-end benchmark of `onnxgenie quantize` as a user runs it, and the ablation of GENIE's Table 2.

Each run is the CLI in a fresh process (distillation workers included) on a shared model; the written QDQ
model is scored on the model's dev split (CIFAR-10: 5,000 images). Per run: top-1, Δ to FP32, wall time of the
whole command, the stage times from its report, the peak RSS of the largest process (main process,
distillation worker or reconstruction candidate), the FP32-agreement the report gives, the machine's load
meanwhile and the code's version. Results are appended to benchmarks/bench_product.jsonl (tracked); the tables
(CIFAR-10 and ImageNet in BENCHMARKS.md, the headline table in README.md) are rebuilt from every row there.
The written models and run reports stay under out/bench_product/.

ImageNet (the 500-image sample) is split once, by a seeded permutation (``SPLIT_SEED``), into 250 calibration
and 250 evaluation images (the split and the calibration images: out/bench_product/). Every ImageNet row is
scored on the 250 evaluation images in the plain-onnxruntime venv, with its top-1 agreement with FP32 there;
zero-shot rows and FP32 also on all 500. Besides onnxgenie's variants it runs the baselines ``fp32`` (the
model as it is) and ``ort-minmax`` / ``ort-percentile`` (onnxruntime's ``quantize_static``, from
tools/bench_quant.py, calibrated on the 250 calibration images); ``fewshot`` calibrates on those same images.
``--smoke`` runs the same commands with a tiny budget (minutes): its rows and table stay under
out/bench_product/smoke/.

A variant is a set of flags added to `onnxgenie quantize MODEL --wbits W --abits A --seed S` (``VARIANTS``):
``fast`` is the preset as it is; ``fast-*`` differ from it as their flags say; ``fewshot`` (256 real training
images: not zero-shot) and ``noise`` (Gaussian noise: the naive zero-shot baseline) change the calibration
images only; M1-M5 are the paper's Table 2 ablation at the fast budget, one reconstruction at the reference
activation-step rate: M1 ZeroQ pixels, no swing + adaround; M2 pixels + swing + adaround; M3 generator, no
swing + adaround; M4 generator + swing + adaround; M5 generator + swing + GENIE-M.

    .venv/bin/python tools/bench_product.py --bits 4/4 2/4 --seeds 0 1 2
    .venv/bin/python tools/bench_product.py --variants M1 M2 M3 M4 M5 --bits 2/4 --seeds 0 1 2
    .venv/bin/python tools/bench_product.py --models efficientnet_lite0_imagenet --variants fp32 ort-minmax --bits 8/8
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

from benchlib import (ALONE_OTHERS_PCT, README, RESULTS_DIR, ROOT, SHARED, MachineLoad, bits_pairs, calib_eval_split,
                      code_version, dev_split, model_info, publish, read_rows, stale)
from onnxgenie.quant.augment import COPIES

OUT = ROOT / "out" / "bench_product"
RESULTS = RESULTS_DIR / "bench_product.jsonl"
SMOKE_OUT = OUT / "smoke"  # --smoke: rows, models, reports and the table, never BENCHMARKS.md
# A tiny budget on top of any variant's flags: the plumbing of every run in minutes, not a measurement.
SMOKE_FLAGS = ["--calib-images", "8", "--distill-iters", "2", "--distill-batch", "8", "--recon-iters", "2",
               "--recon-batch", "4"]
SMOKE_ORT_CALIB = 8  # onnxruntime's calibration images in a smoke run
SMOKE_EVAL = 32  # images scored in a smoke run (half evaluation, half calibration images)
SPLIT_CALIB, SPLIT_SEED = 250, 0  # ImageNet: calibration images of the seeded split; the rest evaluate
# onnxruntime's calibration batch at 224x224: Lite0 with Percentile peaked at 6.6 GB in batches of 100, 3.8 GB
# in batches of 50 (MinMax at 5.5 GB either way).
ORT_BATCH = 50
# Not onnxgenie runs: the model as it is, and onnxruntime's quantize_static with this calibration method.
BASELINES = {"fp32": None, "ort-minmax": "MinMax", "ort-percentile": "Percentile"}
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
    "fewshot": ["--calib-data", "{train}", "--calib-images", "{calib_n}", "--mean", "{mean}", "--std", "{std}"],
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
ORDER = list(BASELINES) + list(VARIANTS)
# Measured with the official GENIE code (PyTorch), not by this tool: the comparison every table quotes.
OFFICIAL = {"model": "resnet20_cifar10", "W4A4": (80.62, 79.82), "W2A4": (77.60, 77.30), "minutes": 11}
# Each dataset's real calibration images for fewshot (file, count; ImageNet's come from the split), as the
# tables name them.
REAL_CALIB_NAMES = {"cifar10": ("TRAIN_1K.npz", 256), "imagenet": (f"CALIB_{SPLIT_CALIB}.npz", SPLIT_CALIB)}


def dataset_of(model: str) -> str:
    return model_info(model).get("dataset", "cifar10")


def split_of(model: str, folder: Path = OUT) -> dict | None:
    """The seeded calibration/evaluation split of an ImageNet model's dev images (written to ``folder`` once);
    None for CIFAR-10, whose real calibration images are a separate training file."""
    return calib_eval_split(model, folder, SPLIT_CALIB, SPLIT_SEED) if dataset_of(model) == "imagenet" else None


def command(model: str, variant: str, wbits: int, abits: int, seed: int, out: Path, report: Path,
            machine_flags: tuple[str, ...] = (), split: dict | None = None) -> list[str]:
    info = model_info(model)
    if "--calib-data" in VARIANTS[variant] and split is None and dataset_of(model) != "cifar10":
        raise SystemExit(f"bench_product: {variant} needs real calibration images; give the split of {model}")
    fill = ({"train": str(split["calib_file"]), "calib_n": str(len(split["calib"]))} if split is not None else
            {"train": str(SHARED / "data" / "cifar10_train_1k.npz"), "calib_n": str(REAL_CALIB_NAMES["cifar10"][1])})
    flags = []
    for flag in VARIANTS[variant]:
        if flag in ("{mean}", "{std}"):
            flags += [str(v) for v in info[flag[1:-1]]]
        else:
            flags.append(flag.format(**fill))
    return [sys.executable, "-m", "onnxgenie.cli", "quantize", str(SHARED / "models" / f"{model}.onnx"),
            "-o", str(out), "--wbits", str(wbits), "--abits", str(abits), "--seed", str(seed), "--overwrite",
            "--quiet", "--report", str(report), *flags, *machine_flags]


def shown_flags(variant: str, dataset: str = "cifar10") -> str:
    """A variant's flags as the tables print them (placeholders for the files and the preprocessing)."""
    name, count = REAL_CALIB_NAMES[dataset]
    return " ".join(VARIANTS[variant]).format(train=name, calib_n=count, mean="M", std="S")


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


class SplitScorer:
    """Scores models of one ImageNet model's split in the plain-onnxruntime venv (one thread, batches of 100):
    top-1 on the evaluation images, and on all of them where the model saw no real image; top-1 agreement with
    the FP32 model (its predictions computed once). ``limit``: at most this many images (half evaluation, half
    calibration)."""

    def __init__(self, model: str, split: dict, limit: int):
        import numpy as np

        from onnxgenie.export.plain_ort import plain_ort_python

        self.python, why = plain_ort_python(packages=("onnxruntime", "numpy", "onnx"))
        if self.python is None:
            raise SystemExit(f"bench_product: {why}")
        self.src = SHARED / "models" / f"{model}.onnx"
        x, self.labels = dev_split(model, len(split["calib"]) + len(split["eval"]))
        self.eval_idx = split["eval"][:(limit + 1) // 2]
        self.all_idx = np.sort(np.concatenate([self.eval_idx, split["calib"][:limit // 2]]))
        self.x = x
        self.runtime = ""
        self._fp32 = None

    def predictions(self, path: Path, indices):
        import numpy as np

        from onnxgenie.export.plain_ort import run_plain_ort

        out = []
        for i in range(0, len(indices), 100):
            logits, self.runtime = run_plain_ort(path, self.x[indices[i:i + 100]], python=self.python)
            out.append(logits.argmax(1))
        return dict(zip(indices.tolist(), np.concatenate(out).tolist()))

    def fp32(self) -> dict:
        if self._fp32 is None:
            self._fp32 = self.predictions(self.src, self.all_idx)
        return self._fp32

    def score(self, path: Path, zero_shot: bool) -> dict:
        """top1 / fp32 / agreement (%) on the evaluation images; the same as *_all on all scored images where
        ``zero_shot``."""
        fp32 = self.fp32()
        pred = fp32 if path == self.src else self.predictions(path, self.all_idx if zero_shot else self.eval_idx)
        row = {"runtime": f"onnxruntime {self.runtime}"}
        for suffix, indices in (("", self.eval_idx), ("_all", self.all_idx if zero_shot else None)):
            if indices is None:
                continue
            n = len(indices)
            share = lambda hits: round(float(sum(hits)) / n * 100, 2)  # noqa: E731
            row[f"top1{suffix}"] = share(pred[i] == self.labels[i] for i in indices)
            row[f"fp32{suffix}"] = share(fp32[i] == self.labels[i] for i in indices)
            row[f"agreement{suffix}"] = {"top1_agreement": share(pred[i] == fp32[i] for i in indices),
                                         "images": n, "on": "evaluation" if not suffix else "all"}
            row[f"eval_images{suffix}"] = n
        return row


def _machine_fields(load: MachineLoad) -> dict:
    return {"machine": load.result, "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine()}


def run_baseline(model: str, variant: str, wbits: int, abits: int, scorer: SplitScorer, split: dict,
                 folder: Path, calib_images: int) -> dict:
    """FP32 as it is, or onnxruntime's quantize_static calibrated on the split's first ``calib_images``."""
    import numpy as np

    import bench_quant

    row = {"model": model, "variant": variant, "wbits": wbits, "abits": abits, "seed": 0,
           "version": code_version(), "split": {"seed": split["seed"], "calib": len(split["calib"]),
                                                "eval": len(split["eval"])}}
    if variant == "fp32":
        with MachineLoad() as load:
            scores = scorer.score(scorer.src, zero_shot=True)
        return {**row, **scores, **_machine_fields(load), "stages": {}}
    folder.mkdir(parents=True, exist_ok=True)
    calib = folder / f"{model}_calib{calib_images}.npy"
    np.save(calib, scorer.x[split["calib"][:calib_images]])
    out = folder / f"{model}_{variant}_w{wbits}a{abits}.onnx"
    start = time.perf_counter()
    with MachineLoad() as load:
        try:
            done = bench_quant.ort_quantize(scorer.python, scorer.src, out, calib, wbits, abits, BASELINES[variant],
                                            ORT_BATCH)
        except RuntimeError as err:
            raise SystemExit(f"bench_product: {variant} W{wbits}A{abits} failed: {err}") from None
    wall = round(time.perf_counter() - start, 1)
    stages = {"quantize_static": {"wall_s": wall, "peak_rss_mib": done["peak_rss_mib"]}}
    return {**row, **scorer.score(out, zero_shot=False), **_machine_fields(load), "wall_s": wall, "stages": stages,
            "stages_s": {"quantize_static": wall}, "rss_mib": done["peak_rss_mib"],
            "quantizer": f"onnxruntime {done['onnxruntime']}",
            "config": {"calib_images": calib_images, "method": BASELINES[variant], "batch": ORT_BATCH}}


def run_one(model: str, variant: str, wbits: int, abits: int, seed: int, eval_images: int,
            machine_flags: tuple[str, ...] = (), smoke: bool = False, scorer: SplitScorer | None = None,
            split: dict | None = None) -> dict:
    folder = SMOKE_OUT if smoke else OUT
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{model}_{variant}_w{wbits}a{abits}_s{seed}"
    out, report_file = folder / f"{stem}.onnx", folder / f"{stem}.json"
    argv = command(model, variant, wbits, abits, seed, out, report_file, machine_flags, split)
    argv += SMOKE_FLAGS if smoke else []
    start = time.perf_counter()
    with MachineLoad() as load:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench_product: {stem} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    report = json.loads(report_file.read_text())
    if scorer is not None:
        scores = scorer.score(out, zero_shot="--calib-data" not in VARIANTS[variant])
    else:
        top1, scored = dev_top1(out, model, eval_images)
        scores = {"top1": top1, "fp32": model_info(model)["fp32_top1_dev"], "agreement": report["agreement"],
                  "eval_images": scored}
    recon = report.get("reconstruction", {})
    config = report["config"]
    version = code_version()
    row = {"model": model, "variant": variant, "wbits": wbits, "abits": abits, "seed": seed, **scores,
           "wall_s": round(wall, 1), "stages_s": {k: v["wall_s"] for k, v in report["stages"].items()},
           "stages": report["stages"], "rss_mib": _peak_rss_mib(report["stages"]),
           "threads": config.get("threads"), "jobs": config.get("jobs"), "commit": version["commit"],
           "version": {**report.get("versions", {}), **version}, **_machine_fields(load),
           "config": {**{k: config.get(k) for k in ("calib_images", "holdout_images", "distill_iters",
                                                     "distill_batch", "recon_iters", "recon_batch", "recon_lr_scale")},
                      "recon_augment": recon.get("augment", "none"),
                      "act_lr_scale": recon.get("act_lr_scale", 1.0),
                      "candidates": len(recon.get("candidates", [])) or 1}}
    if scorer is not None:
        row["report_agreement"] = report["agreement"]
    if split is not None:
        row["split"] = {"seed": split["seed"], "calib": len(split["calib"]), "eval": len(split["eval"])}
    return row


def _dataset(row: dict) -> str:
    return "imagenet" if "imagenet" in row["model"] else "cifar10"


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return (f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} "
            f"({' / '.join(f'{v:.2f}' for v in values)})")


def bits_label(wbits: int, abits: int) -> str:
    return "FP32" if wbits >= 32 else f"W{wbits}A{abits}"


def groups(rows: list[dict]) -> dict:
    """{(model, bits, variant): {seed: [runs, oldest first]}}."""
    out: dict = {}
    for r in rows:
        key = (r["model"], bits_label(r["wbits"], r["abits"]), r["variant"])
        out.setdefault(key, {}).setdefault(r["seed"], []).append(r)
    return out


def _latest(by_seed: dict) -> list[dict]:
    """The latest run of each seed of a group, by seed."""
    return [by_seed[s][-1] for s in sorted(by_seed)]


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
    if dataset == "imagenet":
        return imagenet_table(rows, command)
    begin, end = SECTIONS[dataset]
    mine = [r for r in rows if _dataset(r) == dataset]
    lines = [begin, "## End to end on CIFAR-10: `onnxgenie quantize` (`tools/bench_product.py`)", "", METHOD, "",
             f"Reference: {reference(quant)}", "",
             f"Regenerate: `{command}` (the runs; `tools/bench.py --tables` rebuilds the table from the raw rows).",
             ""]
    lines += ["| model | bits | variant | flags beyond the preset | budget | top-1 (seeds) | Δ FP32 | repeats | "
              "wall s | distill s | recon s | agreement % | peak RSS MiB | threads/jobs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    grouped = groups(mine)
    for key in sorted(grouped, key=lambda k: (k[0], k[1], ORDER.index(k[2]))):
        by_seed = grouped[key]
        rs = _latest(by_seed)
        repeats = [r["top1"] for s in sorted(by_seed) for r in by_seed[s][:-1]]
        flags = shown_flags(key[2])
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


IMAGENET_COMMAND = "python tools/bench.py --only imagenet"
# The group's runs on 2 idle cores: seven onnxgenie runs of 15-45 minutes, the baselines about 10 minutes.
IMAGENET_ESTIMATE = "four to five hours"
METHOD_NAMES = {"fp32": "FP32", "ort-minmax": "onnxruntime MinMax", "ort-percentile": "onnxruntime Percentile",
                "fast": "onnxgenie zero-shot", "fewshot": "onnxgenie few-shot"}


def _method_name(variant: str) -> str:
    name = METHOD_NAMES.get(variant, "onnxgenie")
    return name + (f" (`{variant}`)" if variant not in BASELINES else "")


def _bits_order(bits: str) -> tuple:
    return (0, 0, 0) if bits == "FP32" else (1, -int(bits[1:].split("A")[0]), -int(bits.split("A")[1]))


def _calibration(variant: str, r: dict) -> str:
    if variant == "fp32":
        return "–"
    c = r["config"]
    if variant in BASELINES:
        return f"{c['calib_images']} real ({c['method']}, batches of {c['batch']})"
    return _budget(variant, c)


def _machine(r: dict) -> str:
    m = r.get("machine")
    if not m or m.get("others_cpu_pct") is None:
        return "–"
    return f"{'alone' if m['alone'] else '**shared**'} ({m['others_cpu_pct']:.0f} %, load {m['load_mean']:.1f})"


def _stage(st: dict | None) -> str:
    if not st:
        return "–"
    text = f"{st['wall_s']:.0f} s / {st['peak_rss_mib']}"
    workers = [f"{who} {st[key]}" for who, key in (("workers", "distilling_process_peak_rss_mib"),
                                                  ("candidates", "candidate_process_peak_rss_mib")) if st.get(key)]
    return text + (f" ({', '.join(workers)})" if workers else "")


def _code(variant: str, r: dict) -> str:
    if variant == "fp32":
        return "–"
    if variant in BASELINES:
        return r.get("quantizer", "–")
    return f"onnxgenie {r['version']['onnxgenie']}" if r.get("version") else "–"


def imagenet_method(rows: list[dict], command: str) -> str:
    """The method paragraph of the ImageNet table: what ran, where, with how many seeds, and the command."""
    grouped = groups(rows)
    models = sorted({r["model"] for r in rows})
    split = rows[0].get("split", {})
    n_eval = max(r.get("eval_images", 0) for r in rows)
    n_all = max(r.get("eval_images_all", 0) for r in rows)
    seeded = [f"{bits} {METHOD_NAMES.get(v, v)}: {len(by_seed)} seeds ({', '.join(map(str, sorted(by_seed)))})"
              for (_, bits, v), by_seed in sorted(grouped.items()) if len(by_seed) > 1]
    runtimes = sorted({r["runtime"] for r in rows if r.get("runtime")})
    quantizers = sorted({r["quantizer"] for r in rows if r.get("quantizer")})
    versions = sorted({r["version"]["onnxgenie"] for r in rows if r.get("version") and r["variant"] not in BASELINES})
    machines = sorted({f"{r.get('cpus', '?')}-core {r.get('cpu', '?')}" for r in rows})
    latest = [r for by_seed in grouped.values() for r in _latest(by_seed)]
    timed = [r for r in latest if r.get("wall_s") is not None]
    alone = sum(1 for r in timed if r.get("machine", {}).get("alone"))
    p = statistics.mean(r["fp32"] for r in rows) / 100  # the standard error of a top-1 near FP32's
    return (f"Method: {', '.join(f'`{m}`' for m in models)} on the ImageNet sample (`imagenet_sample_dev_224.npz`, "
            f"one image per even class), split once by a seeded permutation (seed {split.get('seed', '?')}; "
            f"`out/bench_product/`) into {split.get('calib', '?')} calibration and {split.get('eval', '?')} "
            f"evaluation images. Every row is scored on the same {n_eval} evaluation images; rows that see no real "
            f"image (FP32, zero-shot) also on all {n_all}. Scoring: {' / '.join(runtimes) or 'onnxruntime'} (plain, "
            "CPU, one thread); agreement: the share of images on which the row's top-1 class is FP32's. "
            "*onnxgenie zero-shot*: `onnxgenie quantize MODEL --wbits W --abits A --seed S` (`--quiet`, the CLI's "
            "default `--jobs` and `--threads`), no real image, at the budget its calibration column gives "
            "(calibration + held-out images × distillation steps, reconstruction steps × batch); *few-shot*: the "
            f"same with `{shown_flags('fewshot', 'imagenet')}`, the calibration images. *onnxruntime*: "
            f"{' / '.join(quantizers) or 'onnxruntime'} `quant_pre_process` + `quantize_static` (QDQ, per-channel, "
            "int8/int4 weights, uint8/uint4 activations, every layer at the stated bits, Percentile histograms "
            "merged batch by batch) on the calibration images, in a plain-onnxruntime venv; it has no seed. "
            f"Seeds: {'; '.join(seeded) + '; every other row' if seeded else 'every row'} one seed (0); top-1 is "
            "the mean ± standard deviation over seeds (the latest run of each). With one image per class the top-1 "
            f"of {n_eval} images has a standard error of about {100 * (p * (1 - p) / max(n_eval, 1)) ** 0.5:.1f} "
            "points: compare rows by Δ FP32 and agreement. Cost: the wall time of the whole command and, per stage "
            "of its `--report`, wall seconds / the process's peak RSS in MiB at the stage's end (with the "
            "distillation workers' and reconstruction candidates' own peaks). The runs went one after another on a "
            f"{' / '.join(machines)} machine shared with other work; each row records the 1-minute load average "
            "(mean over the run) and the share of the CPUs that other processes used meanwhile: *alone* where "
            f"that share was at most {ALONE_OTHERS_PCT:.0f} % (the wall time is the run's own; {alone} of "
            f"{len(timed)} runs), **shared** otherwise (an upper bound). Code: onnxgenie "
            f"{', '.join(versions) or '–'}; the raw rows (`benchmarks/bench_product.jsonl`) hold the commit. "
            f"Regenerate: `{command}` (these runs took {sum(r['wall_s'] for r in timed) / 3600:.1f} h of wall "
            "time, scoring not counted; `--list` prints the commands, `--smoke` runs them with a tiny budget in "
            "minutes, its rows kept out of this file; `tools/bench.py --tables` rebuilds the tables from the raw "
            "rows).")


def imagenet_table(rows: list[dict], command: str = IMAGENET_COMMAND) -> str:
    """The ImageNet section: accuracy per bit width and method, then the cost of every run."""
    begin, end = SECTIONS["imagenet"]
    mine = [r for r in rows if _dataset(r) == "imagenet"]
    smoke = any(r.get("smoke") for r in mine)
    lines = [begin, "## ImageNet (EfficientNet-Lite0, 224x224): `onnxgenie quantize` against onnxruntime's "
             "`quantize_static` (`tools/bench_product.py`)" + (" — SMOKE RUN: tiny budget, not a measurement"
                                                              if smoke else ""), ""]
    if not mine:
        return "\n".join(lines + [f"No rows yet: `{command}` adds them ({IMAGENET_ESTIMATE} on 2 cores; "
                                   "`--smoke` checks the plumbing in minutes).", end])
    grouped = groups(mine)
    keys = sorted(grouped, key=lambda k: (k[0], _bits_order(k[1]), ORDER.index(k[2])))
    n_eval = max(r.get("eval_images", 0) for r in mine)
    n_all = max(r.get("eval_images_all", 0) for r in mine)
    lines += [imagenet_method(mine, command), "",
              f"| model | bits | method | calibration | seeds | top-1 % ({n_eval} eval.) | Δ FP32 | agreement % "
              f"({n_eval} eval.) | top-1 % (all {n_all}) | Δ FP32 (all {n_all}) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        rs = _latest(grouped[key])
        tops = [r["top1"] for r in rs]
        first = key[2] == "fp32"
        delta = "–" if first else f"{statistics.mean(tops) - rs[0]['fp32']:+.2f}"
        agree = "–" if first else f"{statistics.mean(r['agreement']['top1_agreement'] for r in rs):.2f}"
        alls = [r["top1_all"] for r in rs if "top1_all" in r]
        all_cell = _cell(alls) if len(alls) == len(rs) else "–"
        all_delta = f"{statistics.mean(alls) - rs[0]['fp32_all']:+.2f}" if all_cell != "–" and not first else "–"
        seeds = "–" if key[2] in BASELINES else ", ".join(str(r["seed"]) for r in rs)
        lines.append(f"| {key[0]} | {key[1]} | {_method_name(key[2])} | {_calibration(key[2], rs[0])} | {seeds} | "
                     f"{_cell(tops)} | {delta} | {agree} | {all_cell} | {all_delta} |")
    stages = list(dict.fromkeys(name for r in mine for name in r.get("stages", {})))
    lines += ["", "Cost of each run (stage cells: wall s / peak RSS MiB at the stage's end; machine: alone or "
              "**shared**, the other processes' share of the CPUs during the run, the mean 1-minute load average):",
              "", "| model | bits | method | seed | wall s | machine | " + " | ".join(stages) +
              " | peak RSS MiB | code |", "|---" * (8 + len(stages)) + "|"]
    for key in keys:
        if key[2] == "fp32":
            continue
        for r in _latest(grouped[key]):
            wall = f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "–"
            cells = [_stage(r.get("stages", {}).get(name)) for name in stages]
            lines.append(f"| {key[0]} | {key[1]} | {_method_name(key[2])} | "
                         f"{'–' if key[2] in BASELINES else r['seed']} | {wall} | {_machine(r)} | "
                         + " | ".join(cells) + f" | {r.get('rss_mib', '–')} | {_code(key[2], r)} |")
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
            rs = _latest(by_seed)
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
        text.append(f"ImageNet: the {SPLIT_CALIB} evaluation images of a 500-image sample, one image per class "
                    "(compare drops, not absolute top-1).")
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
    parser.add_argument("--variants", nargs="+", default=["fast"], choices=ORDER,
                        help=f"onnxgenie's flags (VARIANTS) or, on ImageNet models, a baseline: {', '.join(BASELINES)}")
    parser.add_argument("--bits", nargs="+", default=["4/4", "2/4"], help="W/A pairs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--eval-images", type=int, default=5000,
                        help="at most this many dev images (ImageNet: half from each side of the split)")
    parser.add_argument("--threads", type=int, help="the CLI's --threads (default: its own)")
    parser.add_argument("--jobs", type=int, help="the CLI's --jobs (default: its own); with --threads, for two runs side by side")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny budget (SMOKE_FLAGS; onnxruntime on 8 images; 32 images scored) to check the "
                             "plumbing in minutes; rows and tables go to out/bench_product/smoke/, never to the "
                             "published files")
    parser.add_argument("--table-only", action="store_true", help="rebuild the tables from the results file")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    parser.add_argument("--check", action="store_true", help="exit 1 if BENCHMARKS.md / README.md differ from the rows")
    return parser


def runs(args: argparse.Namespace) -> list[tuple]:
    """(model, variant, wbits, abits, seed) of every run ``args`` asks for, in order: onnxgenie's variants per
    seed, onnxruntime's once per bit width (no seed), FP32 once."""
    out = []
    for model in args.models:
        for wbits, abits in bits_pairs(args.bits):
            for variant in args.variants:
                bits, seeds = {"fp32": ((32, 32), [0])}.get(
                    variant, ((wbits, abits), [0] if variant in BASELINES else args.seeds))
                out += [(model, variant, *bits, seed) for seed in seeds]
    return list(dict.fromkeys(out))


def planned(args: argparse.Namespace) -> set[tuple]:
    """The (model, bits, variant, seed) rows a run with ``args`` writes."""
    return {(m, bits_label(w, a), v, s) for m, v, w, a, s in runs(args)}


def row_key(row: dict) -> tuple:
    return row["model"], bits_label(row["wbits"], row["abits"]), row["variant"], row["seed"]


def sections(rows: list[dict]) -> list[tuple[str, str, str, Path]]:
    """(begin, end, text, file) of every section this tool writes."""
    quant = load_quant()
    out = []
    for dataset, command in (("imagenet", IMAGENET_COMMAND),
                             ("cifar10", "python tools/bench.py --only product variants ablation")):
        begin, end = SECTIONS[dataset]
        out.append((begin, end, table(rows, dataset, quant, command), Path("BENCHMARKS.md")))
    out.append((*HEADLINE, headline(rows, quant), README))
    return out


def main() -> int:
    args = build_parser().parse_args()
    results, folder = (SMOKE_OUT / "bench_product.jsonl", SMOKE_OUT) if args.smoke else (RESULTS, OUT)
    if not args.table_only and not args.check:
        if not (SHARED / "models").is_dir():
            print(f"bench_product: {SHARED / 'models'} not found; the shared models and data are needed",
                  file=sys.stderr)
            return 2
        machine_flags = tuple(f for name in ("threads", "jobs") if getattr(args, name)
                              for f in (f"--{name}", str(getattr(args, name))))
        results.parent.mkdir(parents=True, exist_ok=True)
        scorers: dict = {}
        for model, variant, wbits, abits, seed in runs(args):
            split = split_of(model)
            if split is None and variant in BASELINES:
                print(f"bench_product: {variant} runs on ImageNet models (their split's calibration images); "
                      "CIFAR-10's baselines are tools/bench_quant.py's", file=sys.stderr)
                return 2
            if split is not None and model not in scorers:
                scorers[model] = SplitScorer(model, split, SMOKE_EVAL if args.smoke else args.eval_images)
            if variant in BASELINES:
                row = run_baseline(model, variant, wbits, abits, scorers[model], split, folder,
                                   SMOKE_ORT_CALIB if args.smoke else len(split["calib"]))
            else:
                row = run_one(model, variant, wbits, abits, seed, args.eval_images, machine_flags, args.smoke,
                              scorers.get(model), split)
            if args.smoke:
                row["smoke"] = True
            print(json.dumps(row), flush=True)
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    code = 0
    for begin, end, text, path in sections(read_rows(results)):
        path = SMOKE_OUT / path.name if args.smoke else path if path.is_absolute() else ROOT / path
        if args.check:
            if stale(begin, end, text, path):
                print(f"bench_product: {path.name} {begin} is stale; run tools/bench.py --tables", file=sys.stderr)
                code = 1
            continue
        publish(begin, end, text, write=not args.no_write, path=path,
                quiet=args.smoke and begin != SECTIONS["imagenet"][0])  # a smoke run shows its ImageNet table
    if args.smoke:
        print(f"bench_product: smoke rows in {results.relative_to(ROOT)}, tables in "
              f"{(SMOKE_OUT / 'BENCHMARKS.md').relative_to(ROOT)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
