"""The ImageNet benchmark's tooling without running a model: its table and method paragraph from synthetic raw
rows, the commands tools/bench.py runs for it, the seeded calibration/evaluation split, and the machine-load
record that tells runs that had the machine to themselves from those that shared it."""

from __future__ import annotations

import importlib
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
LITE0 = "efficientnet_lite0_imagenet"
COMMIT_HASH = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")


def _tool(name: str):
    return importlib.import_module(name)


def _machine(others: float) -> dict:
    return {"load_mean": 2.0 + others / 50, "load_max": 2.5 + others / 50, "others_cpu_pct": others, "cpus": 2,
            "alone": others <= 10.0}


def _common(variant: str, wbits: int, abits: int, seed: int, top1: float, agree: float, others: float) -> dict:
    return {"model": LITE0, "variant": variant, "wbits": wbits, "abits": abits, "seed": seed, "top1": top1,
            "fp32": 88.4, "agreement": {"top1_agreement": agree, "images": 250, "on": "evaluation"},
            "eval_images": 250, "runtime": "onnxruntime 1.32.0", "split": {"seed": 0, "calib": 250, "eval": 250},
            "machine": _machine(others), "cpus": 2, "cpu": "x86_64",
            "version": {"onnxgenie": "0.1.0", "commit": "0123abcd"}, "commit": "0123abcd"}


def _ours(variant: str, wbits: int, abits: int, seed: int, top1: float, agree: float, others: float,
          top1_all: float | None = None) -> dict:
    stages = {"prepare": {"wall_s": 10.2, "peak_rss_mib": 330},
              "distill": {"wall_s": 600.4, "peak_rss_mib": 900, "jobs": 1, "distilling_process_peak_rss_mib": 2933},
              "init": {"wall_s": 70.0, "peak_rss_mib": 1200}, "reconstruct": {"wall_s": 900.6, "peak_rss_mib": 1500},
              "export": {"wall_s": 3.0, "peak_rss_mib": 1500}}
    if variant == "fewshot":
        del stages["distill"]
    calib = 250 if variant == "fewshot" else 256
    row = {**_common(variant, wbits, abits, seed, top1, agree, others),
           "wall_s": sum(s["wall_s"] for s in stages.values()) + 5, "stages": stages,
           "stages_s": {k: v["wall_s"] for k, v in stages.items()},
           "rss_mib": max(max(s["peak_rss_mib"], s.get("distilling_process_peak_rss_mib", 0)) for s in stages.values()),
           "threads": 2, "jobs": 1,
           "config": {"calib_images": calib, "holdout_images": 0, "distill_iters": 200, "distill_batch": 128,
                      "recon_iters": 500, "recon_batch": 32, "recon_lr_scale": 8.0, "recon_augment": "none",
                      "act_lr_scale": 64.0 if abits == 4 else 1.0, "candidates": 1}}
    if top1_all is not None:
        row.update(top1_all=top1_all, fp32_all=89.2, eval_images_all=500,
                   agreement_all={"top1_agreement": agree + 1, "images": 500, "on": "all"})
    return row


def _ort(method: str, wbits: int, abits: int, top1: float, agree: float) -> dict:
    return {**_common(f"ort-{method.lower()}", wbits, abits, 0, top1, agree, 3.0), "wall_s": 95.3,
            "stages": {"quantize_static": {"wall_s": 95.3, "peak_rss_mib": 3500}},
            "stages_s": {"quantize_static": 95.3}, "rss_mib": 3500, "quantizer": "onnxruntime 1.32.0",
            "config": {"calib_images": 250, "method": method, "batch": 50}}


def synthetic_rows() -> list[dict]:
    fp32 = {**_common("fp32", 32, 32, 0, 88.4, 100.0, 0.0), "top1_all": 89.2, "fp32_all": 89.2,
            "eval_images_all": 500, "stages": {}}
    return [fp32,
            _ort("MinMax", 8, 8, 86.0, 93.2), _ort("Percentile", 8, 8, 87.2, 95.6), _ort("MinMax", 4, 8, 1.2, 1.6),
            _ours("fast", 8, 8, 0, 88.0, 97.2, 2.0, top1_all=89.0),
            _ours("fast", 4, 4, 0, 85.2, 88.0, 4.0, top1_all=86.0),
            _ours("fast", 4, 4, 1, 80.0, 80.0, 2.0, top1_all=81.0),  # an earlier run of seed 1: not the latest
            _ours("fast", 4, 4, 1, 84.4, 86.8, 55.0, top1_all=85.2),
            _ours("fast", 4, 4, 2, 86.0, 89.2, 30.0, top1_all=86.6),
            _ours("fewshot", 4, 4, 0, 86.8, 90.4, 1.0)]


def _latest(rows: list[dict]) -> list[dict]:
    """The last row of each (variant, bits, seed), as the table takes them."""
    last = {}
    for r in rows:
        last[(r["variant"], r["wbits"], r["abits"], r["seed"])] = r
    return list(last.values())


def _table_lines(text: str, first_column: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_column} |")]


def test_imagenet_table_from_synthetic_rows():
    product = _tool("bench_product")
    rows = synthetic_rows()
    text = product.imagenet_table(rows)
    begin, end = product.SECTIONS["imagenet"]
    assert text.startswith(begin) and text.endswith(end)
    accuracy, cost = text.split("Cost of each run")
    lines = _table_lines(accuracy, LITE0)
    by_method = {(c[1], c[2]): c for c in lines}
    assert [(c[1], c[2]) for c in lines] == [  # FP32, then per bit width onnxruntime, zero-shot, few-shot
        ("FP32", "FP32"), ("W8A8", "onnxruntime MinMax"), ("W8A8", "onnxruntime Percentile"),
        ("W8A8", "onnxgenie zero-shot (`fast`)"), ("W4A8", "onnxruntime MinMax"),
        ("W4A4", "onnxgenie zero-shot (`fast`)"), ("W4A4", "onnxgenie few-shot (`fewshot`)")]

    w4 = [r for r in _latest(rows) if r["variant"] == "fast" and r["wbits"] == 4]
    tops = [r["top1"] for r in w4]
    row = by_method[("W4A4", "onnxgenie zero-shot (`fast`)")]
    assert row[4] == "0, 1, 2"  # seeds
    assert row[5] == (f"{statistics.mean(tops):.2f} ± {statistics.stdev(tops):.2f} ("
                      + " / ".join(f"{v:.2f}" for v in tops) + ")")
    assert row[6] == f"{statistics.mean(tops) - 88.4:+.2f}"
    assert row[7] == f"{statistics.mean(r['agreement']['top1_agreement'] for r in w4):.2f}"
    assert row[9] == f"{statistics.mean(r['top1_all'] for r in w4) - 89.2:+.2f}"
    assert "80.00" not in row[5], "a seed's earlier run is not in the mean"
    fewshot = by_method[("W4A4", "onnxgenie few-shot (`fewshot`)")]
    assert fewshot[3].startswith("250 real") and fewshot[8] == fewshot[9] == "–", \
        "rows calibrated on real images are scored on the evaluation images only"
    ort = by_method[("W4A8", "onnxruntime MinMax")]
    assert ort[3] == "250 real (MinMax, batches of 50)" and ort[4] == "–" and ort[5] == "1.20"
    assert ort[6] == f"{1.2 - 88.4:+.2f}" and ort[8] == "–"
    assert by_method[("FP32", "FP32")][5:] == ["88.40", "–", "–", "89.20", "–"]
    assert "top-1 % (250 eval.)" in accuracy and "top-1 % (all 500)" in accuracy

    costs = _table_lines(cost, LITE0)
    assert len(costs) == len(_latest(rows)) - 1, "one cost line per latest run, FP32 has none"
    header = next(line for line in cost.splitlines() if line.startswith("| model |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for line in costs:
        cells = dict(zip(columns, line))
        run = next(r for r in _latest(rows) if r["variant"] in (cells["method"].split("`")[1:2] or [None])
                   and str(r["seed"]) == cells["seed"] and f"W{r['wbits']}A{r['abits']}" == cells["bits"]) \
            if cells["seed"] != "–" else None
        if run is not None:
            others = run["machine"]["others_cpu_pct"]
            assert cells["machine"].startswith("alone" if others <= 10 else "**shared**"), cells
            assert f"({others:.0f} %, load {run['machine']['load_mean']:.1f})" in cells["machine"]
            assert cells["wall s"] == f"{run['wall_s']:.0f}"
            assert cells["reconstruct"] == "901 s / 1500"
            assert cells["distill"] == ("–" if run["variant"] == "fewshot" else "600 s / 900 (workers 2933)")
            assert cells["code"] == "onnxgenie 0.1.0"
        else:
            assert cells["quantize_static"] == "95 s / 3500" and cells["code"] == "onnxruntime 1.32.0"
    assert not COMMIT_HASH.search(text), "the raw rows' commit stays out of the published text"


def test_imagenet_method_paragraph():
    product = _tool("bench_product")
    rows = synthetic_rows()
    text = product.imagenet_table(rows)
    method = next(line for line in text.splitlines() if line.startswith("Method:"))
    latest = [r for r in _latest(rows) if r["variant"] != "fp32"]
    alone = sum(r["machine"]["alone"] for r in latest)
    hours = sum(r["wall_s"] for r in latest) / 3600
    for phrase in ("seed 0", "250 calibration and 250 evaluation images", "same 250 evaluation images",
                   "also on all 500", "onnxruntime 1.32.0", "W4A4 onnxgenie zero-shot: 3 seeds (0, 1, 2)",
                   "every other row one seed (0)", "--calib-data CALIB_250.npz --calib-images 250",
                   f"at most {product.ALONE_OTHERS_PCT:.0f} %", f"{alone} of {len(latest)} runs",
                   "2-core x86_64", "onnxgenie 0.1.0", f"took {hours:.1f} h", "`python tools/bench.py --only imagenet`",
                   "--smoke"):
        assert phrase in method, phrase
    assert "SMOKE" not in text
    smoke = product.imagenet_table([{**r, "smoke": True} for r in rows])
    assert "SMOKE RUN: tiny budget, not a measurement" in smoke.splitlines()[1]
    empty = product.imagenet_table([])
    assert "No rows yet" in empty and "python tools/bench.py --only imagenet" in empty


def test_imagenet_rows_stay_out_of_the_cifar_table_and_reach_the_headline():
    product = _tool("bench_product")
    rows = synthetic_rows()
    sections = {begin: text for begin, _, text, _ in product.sections(rows)}
    assert LITE0 not in sections[product.SECTIONS["cifar10"][0]]
    headline = sections[product.HEADLINE[0]]
    lite0 = next(line for line in headline.splitlines() if line.startswith("| EfficientNet-Lite0"))
    tops = [r["top1"] for r in _latest(rows) if r["variant"] == "fast" and r["wbits"] == 4]
    assert f"{statistics.mean(tops):.2f} ({statistics.mean(tops) - 88.4:+.2f}, 3 seeds)" in lite0
    assert "(ImageNet, 88.40)" in lite0


def test_bench_plans_every_imagenet_row():
    """tools/bench.py --only imagenet makes exactly the rows the table needs (tests/test_docs.py checks that
    every published row comes from such a command)."""
    bench = _tool("bench")
    product = _tool("bench_product")
    keys = set()
    for argv in bench.STEPS["imagenet"]:
        keys |= product.planned(product.build_parser().parse_args(argv[1:]))
    expected = {(LITE0, "FP32", "fp32", 0)}
    expected |= {(LITE0, bits, v, 0) for bits in ("W8A8", "W4A8", "W4A4") for v in ("ort-minmax", "ort-percentile")}
    expected |= {(LITE0, bits, "fast", 0) for bits in ("W8A8", "W4A8", "W4A4")}
    expected |= {(LITE0, "W4A4", "fast", s) for s in (1, 2)}
    expected |= {(LITE0, bits, "fewshot", 0) for bits in ("W4A4", "W8A8")}
    assert keys == expected
    assert {product.row_key(r) for r in synthetic_rows()} <= keys


def test_bench_smoke_is_for_the_imagenet_group_only():
    done = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "--smoke", "--only", "product"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "--smoke runs the commands of imagenet only" in done.stderr
    listed = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "--only", "imagenet", "--smoke", "--list"],
                            capture_output=True, text=True, cwd=REPO)
    commands = [line for line in listed.stdout.splitlines() if line.startswith("$ ")]
    assert listed.returncode == 0 and len(commands) == len(_tool("bench").STEPS["imagenet"])
    assert all(line.endswith(" --smoke") for line in commands)


def test_machine_load_counts_the_run_itself_apart_from_the_others(monkeypatch):
    benchlib = _tool("benchlib")
    busy = iter([1000.0, 1012.0])  # the machine's CPU seconds before and after
    own = iter([50.0, 58.0])  # this process and its children: 8 of the 12
    clock = iter([0.0, 10.0])  # 10 s on 2 CPUs: others used 4 of 20 CPU seconds
    monkeypatch.setattr(benchlib, "_busy_cpu_s", lambda: next(busy))
    monkeypatch.setattr(benchlib, "_own_cpu_s", lambda: next(own))
    monkeypatch.setattr(benchlib.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(benchlib.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(benchlib.os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    with benchlib.MachineLoad(every=0.01) as load:
        pass
    assert load.result == {"load_mean": 3.0, "load_max": 3.0, "others_cpu_pct": 20.0, "cpus": 2, "alone": False}


def test_machine_load_attributes_a_childs_cpu_to_the_run():
    benchlib = _tool("benchlib")
    before = benchlib._own_cpu_s()
    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\n"
                    "while time.process_time() - t < 0.3: pass"], check=True)
    assert benchlib._own_cpu_s() - before >= 0.3


SHARED = REPO.parent / "shared"


@pytest.mark.skipif(not (SHARED / "data" / "imagenet_sample_dev_224.npz").exists(),
                    reason="../shared/data/imagenet_sample_dev_224.npz is not present")
def test_calib_eval_split_is_seeded_disjoint_and_written_once(tmp_path):
    benchlib = _tool("benchlib")
    split = benchlib.calib_eval_split(LITE0, tmp_path, 250, seed=0)
    order = np.random.default_rng(0).permutation(500)
    assert np.array_equal(split["calib"], np.sort(order[:250]))
    assert np.array_equal(split["eval"], np.sort(order[250:]))
    assert not set(split["calib"]) & set(split["eval"])
    with np.load(SHARED / "data" / "imagenet_sample_dev_224.npz") as d, np.load(split["calib_file"]) as c:
        assert c["images"].dtype == np.uint8 and c["images"].shape == (250, 224, 224, 3)
        assert np.array_equal(c["images"], d["images"][split["calib"]])
        assert np.array_equal(c["labels"], d["labels"][split["calib"]])
    written = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = benchlib.calib_eval_split(LITE0, tmp_path, 250, seed=0)
    assert np.array_equal(again["eval"], split["eval"])
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == written, "written once"
    index_file = next(p for p in tmp_path.iterdir() if "split" in p.name)
    np.savez(index_file, calib=split["eval"], eval=split["calib"], seed=0)
    with pytest.raises(SystemExit, match="is not the seed-0 split"):
        benchlib.calib_eval_split(LITE0, tmp_path, 250, seed=0)
