"""Benchmark GENIE-M reconstruction on the shared CIFAR-10 models and write the table into BENCHMARKS.md.

Each run goes through the real pipeline (plan → L2.4 step init → reconstruction → QDQ export with its
parity check) in a fresh process, and the *exported* QDQ model is scored on the dev split. Per run:
top-1, init-only (round-to-nearest) top-1 of the same plan, reconstruction wall time total and per
block, the share of that time spent inside onnxruntime training calls, peak RSS.

Calibration: ``--calib real`` uses the first images of a seeded shuffle of cifar10_train_1k.npz (few-shot);
``--calib distill`` distils them with GENIE-D first (cached under out/).
Results are appended to benchmarks/bench_recon.jsonl (tracked); the table is built from every row in that file
(the latest run of each setting and seed).

    .venv/bin/python tools/bench_recon.py --bits 4/4 --iters 500 --quantizers genie adaround
    .venv/bin/python tools/bench_recon.py --bits 2/4 4/4 --iters 500 --lr-scales 1 3 6 12 --no-rtn   # a rate sweep
    .venv/bin/python tools/bench_recon.py --table-only
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchlib import RESULTS_DIR, ROOT, SHARED, bits_pairs, model_info, publish, read_rows, stale

RESULTS = RESULTS_DIR / "bench_recon.jsonl"
BEGIN, END = "<!-- bench_recon -->", "<!-- /bench_recon -->"
REFERENCE = ("Official GENIE code (PyTorch; measured outside this tool) on resnet20_cifar10, 512 distilled images "
             "× 200 distillation steps, 2,000 reconstruction steps per block, same CPU: W4A4 80.62 / 79.82, "
             "W2A4 77.60 / 77.30 (2 seeds; FP32 81.02).")
METHOD = ("Method: GENIE-M alone on fixed calibration images, through `onnxgenie.pipeline.quantize` (plan, L2.4 "
          "init, reconstruction, QDQ export, parity check), one fresh process per run on a 2-core x86-64 machine "
          "shared with other work (wall times are upper bounds); the exported QDQ model is scored on the 5,000 "
          "CIFAR-10 dev images. The calibration images are distilled once per model and seed with GENIE-D (256 or "
          "512 images × 200 steps, cached under out/) and every row of a model reconstructs the same ones, so the "
          "rows of one model are paired. `lr ×`: the factor on GENIE-M's three learning rates (`--recon-lr-scale`); "
          "the other settings are `QuantizeConfig`'s defaults (one reconstruction, no copies, the reference "
          "activation-step rate). RTN: the same plan at its initial steps (round to nearest). threads: onnxruntime "
          "threads (per core = one per core). Rows marked † were transcribed from a published table, not written "
          "by the tool (their per-block times are the mean). ")


MEMORY_NOTE = (
    "Memory: per block the loop holds four float32 arrays of N images × the largest block tensor (teacher "
    "input and output, quantized-prefix input and output) besides the calibration images. For ResNet-20 at "
    "32×32 that is 4 × 64 KiB per image; the rows above include the 5,000 preprocessed dev images (59 MiB) "
    "and the onnxruntime sessions. For a ResNet-18 at 224×224 (largest block tensor 64×56×56 = 784 KiB per "
    "image) 1,024 images would need 4 × 784 MiB + 588 MiB of images ≈ 3.6 GiB; above `mem_budget_mb` "
    "(2 GiB by default) `reconstruct` memory-maps the arrays in the work directory instead (tested: same "
    "plan bit for bit), so RAM holds the images, the batch and the page cache. Not measured at 224×224.")



def calibration(model: str, source: str, n: int, seed: int, distill_iters: int, threads: int) -> Path:
    """Calibration images as an .npz under out/ (made once, reused)."""
    path = ROOT / "out" / f"calib_{model}_{source}_{n}_{seed}" \
        f"{'_' + str(distill_iters) if source == 'distill' else ''}.npz"
    if path.exists():
        return path
    path.parent.mkdir(exist_ok=True)
    if source == "real":
        from onnxgenie.evaluate import preprocess

        info = model_info(model)
        with np.load(SHARED / "data" / "cifar10_train_1k.npz") as d:
            images = d["images"]
        pick = np.random.default_rng(seed).permutation(len(images))[:n]
        x = preprocess(images[np.sort(pick)], (3, 32, 32), info["mean"], info["std"])
    else:
        import onnx

        from onnxgenie.distill import distill
        from onnxgenie.resources import default_jobs

        x, _ = distill(onnx.load(str(SHARED / "models" / f"{model}.onnx")), n_images=n, iters=distill_iters,
                       seed=seed, progress=True, threads=threads, jobs=default_jobs(-(-n // 128)))
    np.savez(path, images=np.asarray(x, np.float32))
    return path


def _one_run(cfg: dict) -> dict:
    """In a fresh process, so that the peak RSS is this configuration's own peak."""
    from onnxgenie.evaluate import preprocess
    from onnxgenie.runtime import predict
    from onnxgenie.pipeline import QuantizeConfig, quantize
    from onnxgenie.resources import peak_rss

    info = model_info(cfg["model"])
    with np.load(cfg["calib_file"]) as d:
        x = d["images"]
    with np.load(SHARED / "data" / "cifar10_dev_test.npz") as d:
        dev, labels = d["images"][:cfg["eval_images"]], d["labels"][:cfg["eval_images"]]
    dev = preprocess(dev, (3, 32, 32), info["mean"], info["std"])
    recon = cfg["quantizer"] != "rtn"
    config = QuantizeConfig(wbits=cfg["wbits"], abits=cfg["abits"], calib="data" if cfg["calib"] == "real" else "distill",
                            reconstruct=recon,
                            recon_iters=cfg["iters"], recon_batch=cfg["batch"],
                            recon_lr_scale=cfg.get("lr_scale", 1.0),
                            quantizer=cfg["quantizer"] if recon else "genie", seed=cfg["seed"],
                            threads=cfg["threads"], progress=False)
    start = time.perf_counter()
    result = quantize(str(SHARED / "models" / f"{cfg['model']}.onnx"), config, calib=x)
    wall = time.perf_counter() - start
    top1 = float((predict(result.model, dev, threads=cfg["threads"]).argmax(1) == labels).mean() * 100)
    row = {**cfg, "top1": round(top1, 2), "fp32": info["fp32_top1_dev"], "pipeline_s": round(wall, 1),
           "rss_mib": round(peak_rss() / 2 ** 20),
           "cpu": platform.processor() or platform.machine()}
    rep = result.report.get("reconstruction")
    if rep:
        blocks = rep["blocks"]
        row.update(recon_s=rep["wall_s"], ort_fraction=rep["ort_fraction"], blocks=len(blocks),
                   block_s=[b["wall_s"] for b in blocks], rtn_blocks=rep["rtn_blocks"])
    return row


def _fmt_mean(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ({' / '.join(f'{v:.2f}' for v in values)})"


def row_key(r: dict) -> tuple:
    return (r["model"], f"W{r['wbits']}A{r['abits']}", r["calib"], r["images"], r["quantizer"], r["iters"],
            float(r.get("lr_scale", 1.0)), r["seed"])


def _threads(r: dict) -> str:
    return {None: "1", 0: "per core"}.get(r.get("threads"), str(r.get("threads")))


def table(rows: list[dict], command: str) -> str:
    latest = {row_key(r): r for r in rows}  # the latest run of each setting and seed counts
    groups: dict = {}
    for key, r in latest.items():
        groups.setdefault(key[:-1], []).append(r)
    lines = [BEGIN, "## GENIE-M reconstruction on fixed images (`tools/bench_recon.py`)", "", METHOD +
             f"Regenerate: `{command}`.", "", f"Reference: {REFERENCE}", "",
             "| model | bits | data | quantizer | steps/block | lr × | top-1 (seeds) | Δ FP32 | RTN top-1 | "
             "recon s | s/block | ORT train share | peak RSS MiB | threads |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rtn = {(r["model"], r["wbits"], r["abits"], r["calib"], r["images"], r["seed"]): r["top1"]
           for r in latest.values() if r["quantizer"] == "rtn"}
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[4] == "rtn", k[4], k[5], k[6])):
        rs = sorted(groups[key], key=lambda r: r["seed"])
        model, bits, calib, images, quantizer, iters, lr_scale = key
        tops = [r["top1"] for r in rs]
        base = [rtn.get((r["model"], r["wbits"], r["abits"], r["calib"], r["images"], r["seed"])) for r in rs]
        base = [b for b in base if b is not None]
        drop = statistics.mean(tops) - rs[0]["fp32"]
        mark = " †" if any("reconstructed" in r for r in rs) else ""
        threads = " ".join(dict.fromkeys(_threads(r) for r in rs))
        if quantizer == "rtn":
            lines.append(f"| {model} | {bits} | {calib} {images} | init only{mark} | – | – | {_fmt_mean(tops)} | "
                         f"{drop:+.2f} | – | – | – | – | {max(r['rss_mib'] for r in rs)} | {threads} |")
            continue
        recon = statistics.mean(r["recon_s"] for r in rs)
        per_block = statistics.mean(statistics.mean(r["block_s"]) for r in rs)
        share = statistics.mean(r["ort_fraction"] for r in rs)
        lines.append(f"| {model} | {bits} | {calib} {images} | {quantizer}{mark} | {iters} | {lr_scale:g} | "
                     f"{_fmt_mean(tops)} | "
                     f"{drop:+.2f} | {_fmt_mean(base) if base else '–'} | {recon:.0f} | {per_block:.1f} | "
                     f"{share * 100:.0f} % | {max(r['rss_mib'] for r in rs)} | {threads} |")
    lines += ["", MEMORY_NOTE, END]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20_cifar10"])
    parser.add_argument("--bits", nargs="+", default=["4/4", "2/4"], help="W/A pairs")
    parser.add_argument("--quantizers", nargs="+", default=["genie"], choices=("genie", "adaround"))
    parser.add_argument("--iters", nargs="+", type=int, default=[500])
    parser.add_argument("--lr-scales", nargs="+", type=float, default=[1.0], help="GENIE-M learning-rate factors")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--calib", choices=("real", "distill"), default="real")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--distill-iters", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-images", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: one per core)")
    parser.add_argument("--no-rtn", action="store_true", help="skip the init-only baseline runs")
    parser.add_argument("--table-only", action="store_true", help="rebuild the table from the results file")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--check", action="store_true", help="exit 1 if BENCHMARKS.md differs from the rows")
    return parser


def _runs(args: argparse.Namespace) -> list[tuple[str, int, float]]:
    return ([] if args.no_rtn else [("rtn", 0, 1.0)]) + \
        [(q, it, lr) for q in args.quantizers for it in args.iters for lr in args.lr_scales]


def planned(args: argparse.Namespace) -> set[tuple]:
    """The row keys a run with ``args`` writes."""
    return {(m, f"W{w}A{a}", args.calib, args.images, q, it, float(lr), s) for m in args.models
            for s in args.seeds for w, a in bits_pairs(args.bits) for q, it, lr in _runs(args)}


def sections(rows: list[dict]) -> list[tuple[str, str, str, Path]]:
    return [(BEGIN, END, table(rows, "python tools/bench.py --only recon"), Path("BENCHMARKS.md"))]


def main() -> int:
    args = build_parser().parse_args()
    if not args.table_only and not args.check:
        if not (SHARED / "models").is_dir():
            print(f"bench_recon: {SHARED / 'models'} not found; the shared models and data are needed", file=sys.stderr)
            return 2
        RESULTS.parent.mkdir(exist_ok=True)
        ctx = mp.get_context("spawn")
        for model in args.models:
            for seed in args.seeds:
                calib_file = calibration(model, args.calib, args.images, seed, args.distill_iters, args.threads)
                for wbits, abits in bits_pairs(args.bits):
                    for quantizer, iters, lr_scale in _runs(args):
                        cfg = {"model": model, "wbits": wbits, "abits": abits, "quantizer": quantizer, "iters": iters,
                               "lr_scale": lr_scale,
                               "seed": seed, "calib": args.calib, "images": args.images, "batch": args.batch,
                               "eval_images": args.eval_images, "threads": args.threads,
                               "calib_file": str(calib_file)}
                        with ctx.Pool(1) as pool:
                            row = pool.apply(_one_run, (cfg,))
                        print(json.dumps({k: v for k, v in row.items() if k != "block_s"}), flush=True)
                        with RESULTS.open("a") as fh:
                            fh.write(json.dumps(row) + "\n")
    code = 0
    for begin, end, text, path in sections(read_rows(RESULTS)):
        path = ROOT / path
        if args.check:
            if stale(begin, end, text, path):
                print(f"bench_recon: {path.name} {begin} is stale; run tools/bench.py --tables", file=sys.stderr)
                code = 1
            continue
        publish(begin, end, text, write=not args.no_write, path=path)
    return code


if __name__ == "__main__":
    sys.exit(main())
