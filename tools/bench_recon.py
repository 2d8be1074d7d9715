"""Benchmark GENIE-M reconstruction on the shared CIFAR-10 models and write the table into BENCHMARKS.md.

Each run goes through the real pipeline (plan → L2.4 step init → reconstruction → QDQ export with its
parity check) in a fresh process, and the *exported* QDQ model is scored on the dev split. Per run:
top-1, init-only (round-to-nearest) top-1 of the same plan, reconstruction wall time total and per
block, the share of that time spent inside onnxruntime training calls, peak RSS.

Calibration: ``--calib real`` uses the first images of a seeded shuffle of cifar10_train_1k.npz (few-shot);
``--calib distill`` distils them with GENIE-D first (cached under out/).
Results are appended to benchmarks/bench_recon.jsonl (tracked); the table is built from every row in that file.

    .venv/bin/python tools/bench_recon.py --bits 4/4 --iters 500 --quantizers genie adaround
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

from benchlib import RESULTS_DIR, ROOT, SHARED, model_info, publish, read_rows
from onnxgenie.resources import peak_rss

RESULTS = RESULTS_DIR / "bench_recon.jsonl"
BEGIN, END = "<!-- bench_recon -->", "<!-- /bench_recon -->"
REFERENCE = ("Official GENIE code (PyTorch) on resnet20_cifar10, 512 distilled images × 200 distillation steps, "
             "2,000 reconstruction steps per block, same CPU: W4A4 80.62 / 79.82, W2A4 77.60 / 77.30 "
             "(2 seeds; FP32 81.02).")


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
    from onnxgenie.evaluate import predict, preprocess
    from onnxgenie.pipeline import QuantizeConfig, quantize

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


def table(rows: list[dict]) -> str:
    latest: dict = {}
    for r in rows:  # the latest run of each setting and seed counts (earlier code versions stay in the file)
        latest[(r["model"], r["wbits"], r["abits"], r["calib"], r["images"], r["quantizer"], r["iters"],
                r.get("lr_scale", 1.0), r["seed"])] = r
    groups: dict = {}
    for r in latest.values():
        key = (r["model"], f"W{r['wbits']}A{r['abits']}", r["calib"], r["images"], r["quantizer"], r["iters"],
               r.get("lr_scale", 1.0))
        groups.setdefault(key, []).append(r)
    lines = [BEGIN, "## GENIE-M reconstruction (`tools/bench_recon.py`)", "",
             "Exported QDQ model scored on the 5,000-image dev split (`cifar10_dev_test.npz`); every run through "
             "`onnxgenie.pipeline.quantize` (plan, L2.4 init, reconstruction, export, parity check), one fresh "
             "process per run, on the shared 2-core machine (other jobs running: wall times are upper bounds); "
             "ShuffleNet rows and later ones with one onnxruntime thread per core (`--threads 0`, about 1.1× "
             "faster than one thread), the earlier ones with one. `real` = few-shot calibration with training images (not zero-shot).",
             "", f"Reference: {REFERENCE}", "",
             "| model | bits | data | quantizer | steps/block | lr × | top-1 (seeds) | Δ FP32 | RTN top-1 | "
             "recon s | s/block | ORT train share | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rtn = {(r["model"], r["wbits"], r["abits"], r["calib"], r["images"], r["seed"]): r["top1"]
           for r in rows if r["quantizer"] == "rtn"}
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[4] == "rtn", k[4], k[5], k[6])):
        rs = sorted(groups[key], key=lambda r: r["seed"])
        model, bits, calib, images, quantizer, iters, lr_scale = key
        tops = [r["top1"] for r in rs]
        base = [rtn.get((r["model"], r["wbits"], r["abits"], r["calib"], r["images"], r["seed"])) for r in rs]
        base = [b for b in base if b is not None]
        drop = statistics.mean(tops) - rs[0]["fp32"]
        if quantizer == "rtn":
            lines.append(f"| {model} | {bits} | {calib} {images} | init only | – | – | {_fmt_mean(tops)} | "
                         f"{drop:+.2f} "
                         f"| – | – | – | – | {max(r['rss_mib'] for r in rs)} |")
            continue
        recon = statistics.mean(r["recon_s"] for r in rs)
        per_block = statistics.mean(statistics.mean(r["block_s"]) for r in rs)
        share = statistics.mean(r["ort_fraction"] for r in rs)
        lines.append(f"| {model} | {bits} | {calib} {images} | {quantizer} | {iters} | {lr_scale:g} | "
                     f"{_fmt_mean(tops)} | "
                     f"{drop:+.2f} | {_fmt_mean(base) if base else '–'} | {recon:.0f} | {per_block:.1f} | "
                     f"{share * 100:.0f} % | {max(r['rss_mib'] for r in rs)} |")
    lines += ["", MEMORY_NOTE, END]
    return "\n".join(lines)


def main() -> int:
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
    args = parser.parse_args()
    if not (SHARED / "models").is_dir():
        print(f"bench_recon: {SHARED / 'models'} not found; the shared models and data are needed", file=sys.stderr)
        return 2
    RESULTS.parent.mkdir(exist_ok=True)
    if not args.table_only:
        ctx = mp.get_context("spawn")
        for model in args.models:
            for seed in args.seeds:
                calib_file = calibration(model, args.calib, args.images, seed, args.distill_iters, args.threads)
                for bits in args.bits:
                    wbits, abits = (int(b) for b in bits.split("/"))
                    runs = ([] if args.no_rtn else [("rtn", 0)]) + \
                        [(q, it, lr) for q in args.quantizers for it in args.iters for lr in args.lr_scales]
                    for quantizer, iters, lr_scale in [(r[0], r[1], 1.0) if r[0] == "rtn" else r for r in runs]:
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
    rows = read_rows(RESULTS)
    return publish(BEGIN, END, table(rows), write=not args.no_write)


if __name__ == "__main__":
    sys.exit(main())
