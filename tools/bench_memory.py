"""Peak memory and the time cost of chunking, for the figures in onnxgenie/distill/memory.py.

Each measurement runs in a fresh process (its VmHWM is its own peak), one onnxruntime thread, and prints
one JSON line.

    # GENIE-D: peak RSS per batch (and chunk; "auto" lets the memory estimate choose), against the estimate
    .venv/bin/python tools/bench_memory.py distill ../shared/models/efficientnet_lite0_imagenet.onnx 16 32 64
    .venv/bin/python tools/bench_memory.py distill MODEL 64 --chunk 8 --iters 2
    # seconds per step with the teacher in chunks against one graph, steps alternated in one process
    .venv/bin/python tools/bench_memory.py paired MODEL --batch 16 --chunk 4 --steps 3
    # peak RSS of the activation-range pass (init) on real images; --budget-mib 65536: batches of 64 as before
    .venv/bin/python tools/bench_memory.py init MODEL --data ../shared/data/imagenet_sample_dev_224.npz --images 256
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import numpy as np


def _distill_run(model_path: str, batch: int, chunk: int | None, iters: int) -> dict:
    import onnx

    from onnxgenie.distill import distill
    from onnxgenie.graph.load import normalize
    from onnxgenie.distill.memory import distill_memory
    from onnxgenie.resources import MIB, peak_rss

    model = onnx.load(model_path)
    start = time.perf_counter()
    _, info = distill(model, n_images=batch, batch=batch, iters=iters, chunk=chunk, progress=False, threads=1)
    chunk = info["chunk"]
    estimate = distill_memory(normalize(model), batch, 1, chunk).per_job
    # chunked batches run in a worker process: its peak is the one saved with the batch
    peak = max(round(peak_rss() / MIB), info["process_peak_rss_mib"] or 0)
    return {"batch": batch, "chunk": chunk, "peak_rss_mib": peak,
            "estimate_mib": round(estimate / MIB), "s_per_step": round(info["seconds_per_step"], 2),
            "wall_s": round(time.perf_counter() - start, 1)}


def _paired(model_path: str, batch: int, chunk: int, steps: int) -> dict:
    """One graph and chunks on the same parameters, steps alternated, so that both see the same load."""
    import onnx

    from onnxgenie.distill.genie_d import BatchDistiller, DistillConfig, chunked_models, initial_values, training_model
    from onnxgenie.graph.load import normalize
    from onnxgenie.graph.swing import swing_feed

    teacher = normalize(onnx.load(model_path))
    cfg = DistillConfig(1, batch, steps)
    whole = BatchDistiller(*training_model(teacher, cfg), cfg)
    chunked = BatchDistiller(*chunked_models(teacher, cfg, chunk), cfg)
    values = initial_values(whole.model, cfg, np.random.default_rng(0))
    times: dict[str, list[float]] = {"one_graph": [], "chunked": []}
    losses = {}
    for _ in range(steps + 1):   # the first step of each (arena growth) is not counted
        for name, distiller in (("one_graph", whole), ("chunked", chunked)):
            distiller.graph.set_params(values)
            start = time.perf_counter()
            losses[name], _ = distiller._step(swing_feed(1, 1))
            times[name].append(time.perf_counter() - start)
    one, chunk_s = statistics.median(times["one_graph"][1:]), statistics.median(times["chunked"][1:])
    return {"batch": batch, "chunk": chunk, "one_graph_s": round(one, 2), "chunked_s": round(chunk_s, 2),
            "ratio": round(chunk_s / one, 3), "steps": steps, "loss": {k: round(v, 4) for k, v in losses.items()}}


def _init(model_path: str, data: str, images: int, budget_mib: int | None, mean: float, std: float) -> dict:
    from onnxgenie import resources
    from onnxgenie.pipeline import prepare
    from onnxgenie.quant.init import init_activations, init_weights
    from onnxgenie.quant.plan import build_plan

    if budget_mib is not None:
        resources.BATCH_ACTIVATIONS = budget_mib * resources.MIB
    _, folded = prepare(model_path)
    plan = build_plan(folded, 4, 4, 8, "ort", (), "auto", (), None)
    init_weights(folded, plan)
    with np.load(data) as f:
        x = ((f["images"][:images].astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2).copy()
    before = resources.peak_rss()
    start = time.perf_counter()
    init_activations(folded, plan, x, threads=1)
    return {"images": images, "budget_mib": budget_mib or resources.BATCH_ACTIVATIONS // resources.MIB,
            "peak_rss_before_mib": round(before / resources.MIB),
            "peak_rss_mib": round(resources.peak_rss() / resources.MIB), "wall_s": round(time.perf_counter() - start, 1)}


def _child(queue, fn, args) -> None:
    try:
        queue.put(fn(*args))
    except BaseException as err:   # noqa: BLE001 - reported by the parent
        queue.put({"error": repr(err)})


def _in_child(fn, *args) -> dict:
    """``fn(*args)`` in a fresh process that may start its own workers (not a daemonic pool worker)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(queue, fn, args))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("distill")
    p.add_argument("model")
    p.add_argument("batches", nargs="+", type=int)
    p.add_argument("--chunk", type=int, help="images per chunk (default: the estimate's choice)")
    p.add_argument("--iters", type=int, default=2)
    p = sub.add_parser("paired")
    p.add_argument("model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p = sub.add_parser("init")
    p.add_argument("model")
    p.add_argument("--data", required=True, help=".npz with uint8 NHWC images")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--budget-mib", type=int, help="activations per batch (default: resources.BATCH_ACTIVATIONS)")
    p.add_argument("--mean", type=float, default=0.49804)
    p.add_argument("--std", type=float, default=0.50196)
    args = parser.parse_args()
    if args.what == "distill":
        for batch in args.batches:
            print(json.dumps({"model": args.model, **_in_child(_distill_run, args.model, batch, args.chunk,
                                                                 args.iters)}), flush=True)
    elif args.what == "paired":
        print(json.dumps({"model": args.model, **_in_child(_paired, args.model, args.batch, args.chunk, args.steps)}))
    else:
        print(json.dumps({"model": args.model, **_in_child(_init, args.model, args.data, args.images, args.budget_mib,
                                                             args.mean, args.std)}))


if __name__ == "__main__":
    main()
