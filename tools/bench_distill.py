"""Benchmark GENIE-D on the shared CIFAR-10 models and write the table into BENCHMARKS.md.

Per model and mode: final BNS loss after the same number of steps, seconds per step, images/s,
peak RSS, and the ratio of the step time to plain onnxruntime inference of the same batch through
the same teacher at the same thread count (both measured in the same process). Also the argmax
class histogram of the FP32 model over the distilled images. Results are appended to
benchmarks/bench_distill.jsonl (tracked); the table is rebuilt from the latest row of each model and mode.

    .venv/bin/python tools/bench_distill.py --modes genie genie-noswing noise zeroq --profile   # the table (~1 h)
    .venv/bin/python tools/bench_distill.py --images 1024 --batch 128 --iters 500 --modes genie
    .venv/bin/python tools/bench_distill.py --table-only
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

from benchlib import RESULTS_DIR, ROOT, SHARED, publish, read_rows, stale

MODELS = ("resnet20_cifar10", "shufflenet_g3_cifar10")
RUNS = {"genie": ("genie", True), "genie-noswing": ("genie", False), "noise": ("noise", True),
        "zeroq": ("zeroq", True)}
BEGIN, END = "<!-- bench_distill -->", "<!-- /bench_distill -->"
RESULTS = RESULTS_DIR / "bench_distill.jsonl"
TEACHER_CONVS = ("Conv", "ConvGrad", "FusedConv")
PREVIEWS = ROOT / "out" / "bench_distill"
READING = ("Reading the ratio: the teacher's convolutions alone cost about 4× the plain inference on "
           "ResNet-20 (the training graph's Conv gets no fused NCHWc kernels; ConvGrad computes only dX); the rest "
           "is the BNS loss (largest on ShuffleNet, with 49 BN layers and cheap depthwise convs) and, in genie and "
           "noise modes, the generator. The graph forms chosen for speed, with their measurements, are in "
           "docs/design.md.")


def _paired_ratio(model, mode: str, swing: bool, batch: int, threads: int, steps: int = 30) -> tuple[float, float]:
    """Median distillation step time and median inference time, measured alternately (one inference
    after every step), so that both see the same load on a shared machine."""
    from onnxgenie.distill.genie_d import BatchDistiller, DistillConfig, training_model
    from onnxgenie.graph.load import normalize
    from onnxgenie.ortrain import inference_session

    cfg = DistillConfig(1, batch, steps, mode, swing)
    train, groups = training_model(normalize(model), cfg)
    distiller = BatchDistiller(train, groups, cfg, threads=threads)
    sess = inference_session(model, threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    sess.run(None, {name: x})
    step_times, infer_times, mark = [], [], [0.0]

    def on_step(step, loss):
        now = time.perf_counter()
        if step > 0:
            step_times.append(now - mark[0])
        sess.run(None, {name: x})
        infer_times.append(time.perf_counter() - now)
        mark[0] = time.perf_counter()

    distiller.run(0, on_step)
    return statistics.median(step_times), statistics.median(infer_times)


def profile_step(model, mode: str, swing: bool, batch: int, threads: int, steps: int = 5) -> dict[str, float]:
    """Milliseconds per step by op type, from onnxruntime's profiler on the distillation graph."""
    import collections

    from onnxgenie.distill.genie_d import DistillConfig, initial_values, training_model
    from onnxgenie.graph.load import normalize
    from onnxgenie.graph.swing import swing_feed
    from onnxgenie.ortrain import GradientGraph

    cfg = DistillConfig(1, batch, steps, mode, swing)
    train, groups = training_model(normalize(model), cfg)
    graph = GradientGraph(train, [n for names in groups.values() for n in names], threads, profile=True)
    values = initial_values(train, cfg, np.random.default_rng(0))
    feeds = {"latents": values.pop("latents")} if mode == "noise" else {}
    graph.set_params(values)
    feeds.update(swing_feed(1, 1) if swing else {})
    for _ in range(steps):
        graph.step(*[feeds[n] for n in graph.input_names])
    events = graph.end_profiling()
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            part = " (generator)" if e["name"].startswith("generator.") else ""
            per_op[e["args"]["op_name"] + part] += e["dur"] / 1000 / steps
    return dict(per_op.most_common())


def _one_run(args: tuple) -> dict:
    """In a fresh process, so that the peak RSS is this configuration's own peak."""
    model_name, run, images, batch, iters, threads, jobs, profile = args
    import onnx

    from onnxgenie.distill import distill
    from onnxgenie.ortrain import inference_session
    from onnxgenie.resources import peak_rss

    model = onnx.load(str(SHARED / "models" / f"{model_name}.onnx"))
    mode, swing = RUNS[run]
    start = time.perf_counter()
    data, info = distill(model, n_images=images, batch=batch, iters=iters, mode=mode, swing=swing, seed=0,
                         jobs=jobs, threads=threads, progress=False)
    wall = time.perf_counter() - start
    paired_step, paired_infer = _paired_ratio(model, mode, swing, batch, threads)
    from onnxgenie.distill.preview import save_grid

    PREVIEWS.mkdir(parents=True, exist_ok=True)
    save_grid(data, PREVIEWS / f"{model_name}_{run}.png")
    sess = inference_session(model, threads)
    logits = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: data[i:i + batch]})[0]
                             for i in range(0, len(data), batch)])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    profiled = profile_step(model, mode, swing, batch, threads) if profile else {}
    return {"profile": profiled, "profile_total_ms": sum(profiled.values()),
            "teacher_conv_ms": sum(profiled.get(op, 0.0) for op in TEACHER_CONVS),
            "images": images, "batch": batch, "iters": iters, "threads": threads, "jobs": jobs,
            "cpu": platform.processor() or platform.machine(), "cpus": mp.cpu_count(),
            "model": model_name, "run": run, "final_loss": float(info["final_losses"].mean()),
            "s_per_step": info["seconds_per_step"], "images_per_s": len(data) / wall,
            "rss_mib": peak_rss() / 2 ** 20,
            "paired_step_s": paired_step, "infer_s": paired_infer, "ratio": paired_step / paired_infer,
            "hist": np.bincount(logits.argmax(1), minlength=logits.shape[1]).tolist(),
            "confidence": float(probs.max(1).mean())}


def _table(rows: list[dict]) -> str:
    latest = {(r["model"], r["run"]): r for r in rows}
    rows = [latest[k] for k in sorted(latest, key=lambda k: (k[0], list(RUNS).index(k[1])))]
    settings = sorted({(r["images"], r["batch"], r["iters"], r["threads"], r["jobs"], r["cpu"], r["cpus"])
                       for r in rows})
    runs = "; ".join(f"{i} images in batches of {b}, {n} steps per batch, {t} onnxruntime thread(s), {j} "
                     f"process(es), {cpu}, {c} cores" for i, b, n, t, j, cpu, c in settings)
    lines = [BEGIN, "## GENIE-D distillation (`tools/bench_distill.py`)", "",
             f"Method: {runs}, seed 0, on a machine shared with other work (times are indicative). s/step: mean "
             "over the run (Adam and parameter copies included). Ratio: median step time / median plain "
             "onnxruntime inference time of the same batch through the same (unmodified) teacher at the same "
             "thread count, measured alternately over 30 extra steps (one inference after each step) so that both "
             "see the same load. Histogram: argmax class of the FP32 model over the distilled images (classes "
             "0–9); confidence: mean max softmax. Rows marked † were transcribed from a published table, not "
             "written by the tool. Previews: `out/bench_distill/MODEL_MODE.png`. Regenerate: "
             "`python tools/bench.py --only distill`.", "",
             "| model | mode | final BNS loss | s/step | images/s | peak RSS MiB | paired step s | inference s | "
             "ratio | argmax histogram | confidence |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " †" if "reconstructed" in r else ""
        lines.append(f"| {r['model']} | {r['run']}{mark} | {r['final_loss']:.4f} | {r['s_per_step']:.3f} | "
                     f"{r['images_per_s']:.2f} | {r['rss_mib']:.0f} | {r['paired_step_s']:.3f} | {r['infer_s']:.4f} | "
                     f"{r['ratio']:.2f} | "
                     f"{r['hist']} | {r['confidence']:.2f} |")
    lines += ["", READING]
    profiled = [r for r in rows if r["profile"]]
    if profiled:
        lines += ["", "Where a step goes (onnxruntime profiler, kernel ms per step, mean of 5 steps including the "
                  "first; `--profile`): the total, the teacher's Conv + ConvGrad in units of the paired inference "
                  "time, and the eight largest op types:", ""]
        for r in profiled:
            top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(r["profile"].items())[:8])
            conv = r["teacher_conv_ms"]
            lines.append(f"- {r['model']} {r['run']}: total {r['profile_total_ms']:.1f} ms; teacher convs "
                         f"{conv:.1f} ms = {conv / 1000 / r['infer_s']:.1f}× inference; {top}")
    lines.append(END)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=["genie", "noise", "zeroq"], choices=list(RUNS))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--profile", action="store_true", help="also profile 5 steps by op type")
    parser.add_argument("--table-only", action="store_true", help="rebuild the table from the results file")
    parser.add_argument("--check", action="store_true", help="exit 1 if BENCHMARKS.md differs from the rows")
    return parser


def planned(args: argparse.Namespace) -> set[tuple]:
    return {(m, r) for m in args.models for r in args.modes}


def row_key(row: dict) -> tuple:
    return row["model"], row["run"]


def sections(rows: list[dict]) -> list[tuple[str, str, str, Path]]:
    return [(BEGIN, END, _table(rows), Path("BENCHMARKS.md"))]


def main() -> int:
    args = build_parser().parse_args()
    if not args.table_only and not args.check:
        if not (SHARED / "models").is_dir():
            print(f"bench_distill: {SHARED / 'models'} not found; the shared models are needed", file=sys.stderr)
            return 2
        ctx = mp.get_context("spawn")
        for model in args.models:
            for run in args.modes:
                with ctx.Pool(1) as pool:
                    row = pool.apply(_one_run, ((model, run, args.images, args.batch, args.iters, args.threads,
                                                 args.jobs, args.profile),))
                print({k: v for k, v in row.items() if k != "profile"}, flush=True)
                with RESULTS.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    code = 0
    for begin, end, text, path in sections(read_rows(RESULTS)):
        path = ROOT / path
        if args.check:
            if stale(begin, end, text, path):
                print(f"bench_distill: {path.name} {begin} is stale; run tools/bench.py --tables", file=sys.stderr)
                code = 1
            continue
        publish(begin, end, text, write=not args.no_write, path=path)
    return code


if __name__ == "__main__":
    sys.exit(main())
