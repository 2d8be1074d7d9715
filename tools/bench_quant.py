"""Benchmark of the init-only quantizer (no GENIE-M) on the shared CIFAR-10 models -> BENCHMARKS.md.

For each model and W8A8 / W4A8 / W4A4: FP32 top-1; ours (``onnxgenie.pipeline.quantize``, no
reconstruction) with real calibration images (cifar10_train_1k), with Gaussian noise, and with
GENIE-D distilled images; onnxruntime's ``quantize_static`` (QDQ, per-channel, MinMax and
Percentile) on the same 1,000 real images. Every model is evaluated on the 5,000 dev images and timed
(batch 1, one thread) on the latest plain onnxruntime, in its own venv (.venv-ort, with onnx).
The figures go to benchmarks/bench_quant.json (tracked; ``--results`` for another file): the table is rebuilt
from it, and models and configs not rerun keep their earlier figures. Models, images and distillation caches
stay under ``--out`` (out/bench_quant/).

    .venv/bin/python tools/bench_quant.py --distill-iters 200   # the published table (distillation dominates)
    .venv/bin/python tools/bench_quant.py --models resnet20_cifar10 --no-distill --dev-images 1000
    .venv/bin/python tools/bench_quant.py --table-only --distill-iters 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from benchlib import RESULTS_DIR, ROOT, SHARED, publish, stale

MODELS = ("resnet20_cifar10", "resnet32_cifar10", "shufflenet_g3_cifar10")
CONFIGS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}
MARK = "<!-- bench_quant -->"  # the section starts and ends with it
RESULTS = RESULTS_DIR / "bench_quant.json"  # {model: {"fp32": ..., config: {calibration: ...}}}

# Runs in the plain-onnxruntime venv: top-1 and batch-1 latency of one model.
EVAL_SCRIPT = r"""
import sys, json, time, numpy as np, onnxruntime as ort
model, x_path, y_path = sys.argv[1:4]
x, y = np.load(x_path), np.load(y_path)
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1; opts.inter_op_num_threads = 1
s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
name = s.get_inputs()[0].name
pred = np.concatenate([s.run(None, {name: x[i:i + 250]})[0].argmax(1) for i in range(0, len(x), 250)])
times = []
for i in range(110):
    t = time.perf_counter(); s.run(None, {name: x[i % len(x)][None]}); times.append(time.perf_counter() - t)
print(json.dumps({"top1": float((pred == y).mean() * 100), "ms": float(np.median(times[10:]) * 1000),
                  "ort": ort.__version__}))
"""

# Runs in the plain-onnxruntime venv: onnxruntime's own static quantization (QDQ, per channel); prints its peak
# RSS and onnxruntime's version as JSON.
ORT_QUANT_SCRIPT = r"""
import sys, json, resource, numpy as np, onnxruntime
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process
src, out, calib_path, wbits, abits, method, batch = sys.argv[1:8]
tmp = out + ".pre.onnx"
quant_pre_process(src, tmp, skip_symbolic_shape=True)  # ORT's recommended step; it folds BN into the convs
x = np.load(calib_path)
class Reader(CalibrationDataReader):
    def __init__(self):
        self.batches = iter([{"input": x[i:i + int(batch)]} for i in range(0, len(x), int(batch))])
    def get_next(self):
        return next(self.batches, None)
import onnxruntime.quantization.calibrate as calibrate
collect_all = calibrate.HistogramCalibrater.collect_data
class OneBatch(CalibrationDataReader):
    def __init__(self, batch):
        self.batch = [batch]
    def get_next(self):
        return self.batch.pop() if self.batch else None
def collect_per_batch(self, reader):  # histograms merged batch by batch: ShuffleNet's 1,000 images need > 24 GiB at once
    while (batch := reader.get_next()):
        collect_all(self, OneBatch(batch))
calibrate.HistogramCalibrater.collect_data = collect_per_batch
types = {8: (QuantType.QInt8, QuantType.QUInt8), 4: (QuantType.QInt4, QuantType.QUInt4)}
quantize_static(tmp, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                weight_type=types[int(wbits)][0], activation_type=types[int(abits)][1],
                calibrate_method=getattr(CalibrationMethod, method))
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                  "onnxruntime": onnxruntime.__version__}))
"""


def preprocess(images: np.ndarray, info: dict) -> np.ndarray:
    mean = np.asarray(info["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(info["std"], np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((images.astype(np.float32).transpose(0, 3, 1, 2) / 255 - mean) / std)


def plain(python: Path, script: str, *args) -> str:
    done = subprocess.run([str(python), "-c", script, *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def ort_quantize(python: Path, src: Path, out: Path, calib: Path, wbits: int, abits: int, method: str,
                 batch: int = 100) -> dict:
    """onnxruntime's ``quant_pre_process`` + ``quantize_static`` (QDQ, per channel, ``method`` = MinMax or
    Percentile) on the preprocessed images in ``calib`` (.npy), in batches of ``batch`` (Percentile histograms
    merged batch by batch), run in the plain-onnxruntime venv: {"peak_rss_mib", "onnxruntime"}."""
    return json.loads(plain(python, ORT_QUANT_SCRIPT, src, out, calib, wbits, abits, method, batch))


def evaluate(python: Path, model: Path, work: Path) -> dict:
    return json.loads(plain(python, EVAL_SCRIPT, model, work / "dev_x.npy", work / "dev_y.npy"))


def distilled(model_name: str, src: Path, work: Path, n: int, iters: int, jobs: int) -> np.ndarray:
    """GENIE-D images, cached per (model, n, iters)."""
    cache = work / f"distilled_{model_name}_{n}x{iters}.npy"
    if cache.exists():
        return np.load(cache)
    from onnxgenie.distill import distill

    t = time.perf_counter()
    x, _ = distill(onnx.load(str(src)), n_images=n, iters=iters, jobs=jobs, progress=False)
    print(f"  distilled {len(x)} images in {time.perf_counter() - t:.0f} s", flush=True)
    np.save(cache, x)
    return x


def same_grid(folded: onnx.ModelProto, wbits: int, abits: int) -> bool:
    """True if the default weight grid is the asymmetric one on every layer of this model and bits."""
    from onnxgenie.quant.plan import build_plan

    return not any(w.symmetric for w in build_plan(folded, wbits, abits).weights.values())


def run(args) -> dict:
    from onnxgenie.export.plain_ort import plain_ort_python
    from onnxgenie.pipeline import QuantizeConfig, prepare, quantize

    python, why = plain_ort_python(packages=("onnxruntime", "numpy", "onnx"))
    if python is None:
        sys.exit(f"bench_quant: {why}")
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    infos = json.loads((SHARED / "models" / "models.json").read_text())
    dev, train = np.load(SHARED / "data" / "cifar10_dev_test.npz"), np.load(SHARED / "data" / "cifar10_train_1k.npz")
    store = Path(args.results)  # models measured by earlier runs stay in the table
    results: dict = json.loads(store.read_text()) if store.exists() else {}
    for name in args.models:
        info, src = infos[f"{name}.onnx"], SHARED / "models" / f"{name}.onnx"
        np.save(work / "dev_x.npy", preprocess(dev["images"][:args.dev_images], info))
        np.save(work / "dev_y.npy", dev["labels"][:args.dev_images])
        real = preprocess(train["images"], info)
        np.save(work / "calib_x.npy", real)
        calibs = {"real": real,
                  "noise": np.random.default_rng(0).standard_normal(real.shape).astype(np.float32)}
        if args.distill:
            calibs["distilled"] = distilled(name, src, work, args.distill_images, args.distill_iters, args.jobs)
        folded = prepare(str(src))[1]
        r = results.setdefault(name, {})  # configs not run this time keep their earlier figures
        r["fp32"] = evaluate(python, src, work)
        if args.ort:  # onnxruntime's rows are measured beside ours now
            r.pop("fp32_ort_run", None)
        print(f"{name}: FP32 {r['fp32']['top1']:.2f} %, {r['fp32']['ms']:.2f} ms", flush=True)
        for label, (wbits, abits) in CONFIGS.items():
            if label not in args.configs:
                continue
            earlier = r.get(label, {})
            row = r[label] = {} if args.ort else {k: v for k, v in earlier.items() if k.startswith("ort_")}
            runs = [(calib_name, calib, "auto") for calib_name, calib in calibs.items()]
            if "distilled" in calibs:  # what the default weight grid changes against the paper's asymmetric one
                runs.append(("distilled_asym", calibs["distilled"], "asym"))
            for calib_name, calib, grid in runs:
                if grid == "asym" and same_grid(folded, wbits, abits):
                    row[calib_name] = row["distilled"]
                    continue
                t = time.perf_counter()
                kind = {"real": "data", "noise": "noise"}.get(calib_name, "distill")  # what the images are
                res = quantize(src, QuantizeConfig(wbits=wbits, abits=abits, weight_grid=grid, calib=kind,
                                                   progress=False), calib=calib)
                path = work / f"{name}_{label}_{calib_name}.onnx"
                onnx.save(res.model, str(path))
                row[calib_name] = {**evaluate(python, path, work), "parity": res.report["parity"],
                                   "seconds": round(time.perf_counter() - t, 1)}
            for method in ("MinMax", "Percentile") if args.ort else ():
                path = work / f"{name}_{label}_ort_{method}.onnx"
                try:
                    ort_quantize(python, src, path, work / "calib_x.npy", wbits, abits, method)
                    row[f"ort_{method}"] = evaluate(python, path, work)
                except RuntimeError as err:
                    row[f"ort_{method}"] = {"error": str(err)[:200]}
            print(f"  {label}: " + ", ".join(f"{k} {v.get('top1', float('nan')):.2f}" for k, v in row.items()),
                  flush=True)
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(results, indent=1) + "\n")
    return results


def _cell(entry: dict | None, key: str = "top1") -> str:
    if entry is None or entry.get(key) is None:
        return "–"
    if "error" in entry:
        return "fails"
    return f"{entry[key]:.2f}" + (" †" if "reconstructed" in entry else "")


def markdown(results: dict, args, ort_version: str) -> str:
    flags = ["--distill-iters", str(args.distill_iters)] if args.distill_iters != 500 else []
    command = " ".join(["python tools/bench_quant.py", *flags])
    lines = [MARK, "## Init-only quantization against onnxruntime's `quantize_static` (`tools/bench_quant.py`)", "",
             f"Method: top-1 (%) on the first {args.dev_images} images of `cifar10_dev_test.npz`, every model (FP32, "
             f"ours, onnxruntime's) run on plain onnxruntime {ort_version} (CPU, default optimisations), one seed. "
             "Ours: `quantize --no-reconstruct` (L2.4 step search, first/last layer 8-bit, per-channel weights on the "
             "default `--weight-grid auto`: asymmetric, symmetric for depthwise convs; per-tensor activations incl. "
             "residual shortcuts); *distilled asym*: the same distilled images with the paper's asymmetric grid "
             "everywhere. Calibration: *real* = the 1,000 `cifar10_train_1k` images; *noise* = 1,000 N(0,1) "
             f"images; *distilled* = {args.distill_images} GENIE-D images ({args.distill_iters} steps per batch). "
             "ORT = onnxruntime `quant_pre_process` + `quantize_static` (QDQ, per-channel, Percentile histograms "
             "merged per batch of 100 so that ShuffleNet fits in memory, the same 1,000 real images, all layers at "
             "the stated bits). Cells marked † were transcribed from a published table, not written by the tool; "
             "their latencies were measured in a separate run at a time the machine was slower, so compare them "
             "with that run's FP32 latency (its own column). "
             f"Regenerate: `{command}`.", "",
             "| model | bits | FP32 | ours real | ours noise | ours distilled | ours distilled asym | ORT MinMax | "
             "ORT Percentile |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for label in CONFIGS:
            if label not in r:
                continue
            row = r[label]
            lines.append(f"| {name} | {label} | {r['fp32']['top1']:.2f} | {_cell(row.get('real'))} | "
                         f"{_cell(row.get('noise'))} | {_cell(row.get('distilled'))} | "
                         f"{_cell(row.get('distilled_asym'))} | "
                         f"{_cell(row.get('ort_MinMax'))} | {_cell(row.get('ort_Percentile'))} |")
    lines += ["", "Latency, batch 1, one thread, median of 100 runs (ms; same runtime; ours with real calibration):",
              "", "| model | FP32 | " + " | ".join(f"ours {c}" for c in CONFIGS) + " | FP32 in the ORT run | "
              + " | ".join(f"ORT {c}" for c in CONFIGS) + " |", "|---" * (3 + 2 * len(CONFIGS)) + "|"]
    for name, r in results.items():
        ours = [_cell(r.get(c, {}).get("real"), "ms") if c in r else "–" for c in CONFIGS]
        theirs = [_cell(r.get(c, {}).get("ort_MinMax"), "ms") if c in r else "–" for c in CONFIGS]
        ort_fp32 = _cell(r.get("fp32_ort_run", r["fp32"]), "ms")
        lines.append(f"| {name} | {r['fp32']['ms']:.2f} | " + " | ".join(ours) + f" | {ort_fp32} | "
                     + " | ".join(theirs) + " |")
    lines += ["", MARK]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--dev-images", type=int, default=5000)
    parser.add_argument("--no-distill", dest="distill", action="store_false")
    parser.add_argument("--distill-images", type=int, default=256)
    parser.add_argument("--distill-iters", type=int, default=500)
    parser.add_argument("--jobs", type=int, default=2, help="distillation processes")
    parser.add_argument("--no-ort", dest="ort", action="store_false",
                        help="keep onnxruntime's quantize_static figures from the previous run (they do not depend on "
                             "onnxgenie's code) and rerun only ours")
    parser.add_argument("--out", default=str(ROOT / "out" / "bench_quant"),
                        help="work folder: models, images, distillation caches (the figures go to --results)")
    parser.add_argument("--results", default=str(RESULTS),
                        help="the figures, read first and rewritten after each model (default: the tracked "
                             "benchmarks/bench_quant.json; another path keeps a trial run out of it)")
    parser.add_argument("--no-write", dest="write", action="store_false", help="do not touch BENCHMARKS.md")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from --results")
    parser.add_argument("--check", action="store_true", help="exit 1 if BENCHMARKS.md differs from --results")
    return parser


def planned(args: argparse.Namespace) -> set[tuple]:
    return {(m, c) for m in args.models for c in args.configs}


def row_keys(results: dict) -> set[tuple]:
    return {(m, c) for m, r in results.items() for c in CONFIGS if c in r}


def sections(results: dict, args: argparse.Namespace) -> list[tuple[str, str, str, Path]]:
    version = next(iter(results.values()))["fp32"]["ort"]
    return [(MARK, MARK, markdown(results, args, version), Path("BENCHMARKS.md"))]


def main() -> int:
    args = build_parser().parse_args()
    if args.table_only or args.check:  # the table from the previous (possibly interrupted) runs' figures
        results = json.loads(Path(args.results).read_text())
    else:
        if not (SHARED / "models" / "models.json").is_file():
            sys.exit("bench_quant: ../shared (models and data) is not present")
        results = run(args)
    code = 0
    for begin, end, text, path in sections(results, args):
        path = ROOT / path
        if args.check:
            if stale(begin, end, text, path):
                print(f"bench_quant: {path.name} {begin} is stale; run tools/bench.py --tables", file=sys.stderr)
                code = 1
            continue
        publish(begin, end, text, write=args.write, path=path)
    return code


if __name__ == "__main__":
    sys.exit(main())
