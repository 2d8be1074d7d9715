"""Same seed, same machine, same thread count -> byte-identical model and identical report figures
(timings excepted). The seed must matter (another seed gives another model), and the number of
distillation processes must not (each batch is seeded by (seed, batch index) and runs on one thread).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import fixtures
from conftest import REPO
from onnxgenie.pipeline import QuantizeConfig, quantize

# timings and memory: the report's figures that may differ between identical runs
TIMING_KEYS = {"wall_s", "ort_s", "ort_train_s", "ort_fraction", "seconds", "seconds_per_step", "peak_rss_mib",
               "distilling_process_peak_rss_mib"}


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def tiny_config(seed: int) -> QuantizeConfig:
    """Zero-shot: GENIE-D (2 batches) then GENIE-M on every block, one thread."""
    return QuantizeConfig(wbits=4, abits=4, calib_images=16, distill_batch=8, distill_iters=10, reconstruct=True,
                          recon_iters=20, recon_batch=8, seed=seed, threads=1, jobs=1, progress=False)


@pytest.fixture(scope="module")
def runs():
    model = fixtures.conv_bn_net()
    return {name: quantize(model, tiny_config(seed)) for name, seed in (("a", 5), ("b", 5), ("other", 6))}


def test_same_seed_same_model_bytes(runs):
    assert runs["a"].model.SerializeToString() == runs["b"].model.SerializeToString()
    assert runs["a"].simulation.SerializeToString() == runs["b"].simulation.SerializeToString()


def test_same_seed_same_report(runs):
    a, b = without_timings(runs["a"].report), without_timings(runs["b"].report)
    assert a == b
    assert a["reconstruction"]["blocks"] and all("recon_last" in blk for blk in a["reconstruction"]["blocks"])
    meta_a, arrays_a = runs["a"].plan.to_arrays()
    meta_b, arrays_b = runs["b"].plan.to_arrays()
    assert meta_a == meta_b and arrays_a.keys() == arrays_b.keys()
    for k in arrays_a:
        np.testing.assert_array_equal(arrays_a[k], arrays_b[k])


def test_another_seed_another_model(runs):
    assert runs["a"].model.SerializeToString() != runs["other"].model.SerializeToString()
    a, other = without_timings(runs["a"].report), without_timings(runs["other"].report)
    assert a["reconstruction"] != other["reconstruction"]


@pytest.mark.slow  # two CLI runs in fresh processes
def test_jobs_do_not_change_the_model(tmp_path):
    """CLI, a fresh process each: 1 distillation process vs 2 worker processes, byte-identical outputs."""
    src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    outputs = []
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}.onnx"
        proc = subprocess.run([sys.executable, "-m", "onnxgenie.cli", "quantize", str(src), "-o", str(out),
                               "--wbits", "4", "--abits", "4", "--calib-images", "16", "--distill-batch", "8",
                               "--distill-iters", "10", "--recon-iters", "20", "--recon-batch", "8",
                               "--jobs", str(jobs), "--seed", "5"], capture_output=True, text=True, timeout=300,
                              cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
