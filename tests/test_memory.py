"""Memory: the estimate from shapes alone, the chunk and jobs it chooses, the refusal of a model too large
for the machine, and the bounded batches of the activation-range and reconstruction passes."""

from __future__ import annotations

import importlib
import time
import tracemalloc

import numpy as np
import onnx
import pytest

from fixtures import conv_bn_net, random_input, save
from onnxgenie import resources
from onnxgenie.cli import main
from onnxgenie.distill import distill
from onnxgenie.distill.generator import build_generator, generator_floats
from onnxgenie.errors import BadInputError
from onnxgenie.graph.load import normalize
from onnxgenie.distill import memory
from onnxgenie.distill.memory import PROCESS_BASE, activation_floats, chunk_size, distill_sizes, fit_distill
from onnxgenie.resources import MIB


@pytest.mark.parametrize("chw", [(3, 8, 8), (1, 10, 6), (3, 32, 32), (3, 100, 60), (3, 224, 224)])
def test_generator_sizes_from_shapes_equal_the_built_graph(chw):
    gen = build_generator(chw)
    weights = sum(int(np.prod(t.dims)) for t in gen.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert generator_floats(chw) == (weights, activation_floats(gen))


def test_estimate_of_a_huge_input_builds_nothing_large(monkeypatch):
    """3x8192x8192: the generator's upsampling constants alone would be 268 MB; the estimate allocates
    next to nothing and does not build the generator."""
    generator = importlib.import_module("onnxgenie.distill.generator")   # onnxgenie.distill is also a function
    monkeypatch.setattr(generator, "build_generator", lambda *a, **k: pytest.fail("the estimate built the generator"))
    normal = normalize(conv_bn_net(hw=(8192, 8192)))
    tracemalloc.start()
    try:
        sizes = distill_sizes(normal)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MIB
    assert sizes.teacher > 10 * 2 ** 30   # one image's activations through the teacher: > 10 GiB


def _sizes(hw=(64, 64)):
    normal = normalize(conv_bn_net(hw=hw))
    return normal, distill_sizes(normal)


def test_one_graph_when_the_batch_fits(capsys):
    normal, sizes = _sizes()
    assert fit_distill(normal, 16, 1, available=sizes.per_job(16)) == (1, 16)
    assert capsys.readouterr().err == ""


def test_chunk_is_the_largest_that_fits_the_share_of_each_job(capsys):
    normal, sizes = _sizes()
    for jobs in (1, 2):
        room = sizes.per_job(16, 5) + 1
        available = room if jobs == 1 else PROCESS_BASE + jobs * room
        assert fit_distill(normal, 16, jobs, available=available) == (jobs, 5)
        assert sizes.per_job(16, 5) <= room < sizes.per_job(16, 6)
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "runs on chunks of 4 images (the same loss and gradients)" in err[0], err
        assert f"{'its share of ' if jobs > 1 else ''}the {available / MIB:.0f} MiB available;" in err[0]


def test_chunk_keeps_a_process_under_the_limit(monkeypatch, capsys):
    normal, sizes = _sizes()
    monkeypatch.setattr(memory, "PROCESS_LIMIT", sizes.per_job(16, 3) + 1)
    assert fit_distill(normal, 16, 1, available=100 * 2 ** 30) == (1, 3)
    assert "GiB a distilling process is kept under; the teacher runs on chunks of 3 images" in capsys.readouterr().err


def test_jobs_are_lowered_where_one_image_at_a_time_does_not_fit_their_share(capsys):
    normal, sizes = _sizes()
    available = sizes.per_job(16, 1) + 2 * MIB   # one process, no room for a second
    assert fit_distill(normal, 16, 2, available=available)[0] == 1
    assert "2 distillation jobs need about" in capsys.readouterr().err


def test_a_batch_too_large_for_the_generator_is_refused_with_the_batch_that_fits():
    normal, sizes = _sizes()
    least = [min(sizes.per_job(b), sizes.per_job(b, 1)) for b in range(1, 65)]
    available = (least[20] + least[21]) // 2   # 21 images fit, 22 do not
    with pytest.raises(BadInputError, match=r"batches of 64 3x64x64 images needs about .* lower the batch to 21 or"):
        fit_distill(normal, 64, 1, available=available)


@pytest.mark.parametrize("command", ["quantize", "distill"])
def test_an_input_too_large_for_the_machine_exits_2_at_once(tmp_path, capsys, monkeypatch, command):
    """A conv-BN net at 3x8192x8192 on a machine with 16 GiB available: one line with the estimate and the
    way out, exit 2 within seconds, nothing written."""
    monkeypatch.setattr(resources, "available_memory", lambda: 16 * 2 ** 30)
    src = save(conv_bn_net(hw=(8192, 8192)), tmp_path, "huge")
    out = tmp_path / ("q.onnx" if command == "quantize" else "d.npz")
    capsys.readouterr()
    start = time.perf_counter()
    code = main([command, str(src), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert time.perf_counter() - start < 30
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxgenie: error: distilling from this model needs about "), err
    assert "even one image at a time (3x8192x8192 input" in err and "16.0 GiB are available" in err
    assert "export the model at a smaller input size" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["huge.onnx"]


def test_short_memory_runs_the_teacher_in_chunks_with_the_same_images(monkeypatch, capsys):
    model = conv_bn_net(hw=(32, 32))
    sizes = distill_sizes(normalize(model))
    kw = dict(n_images=8, batch=8, iters=3, seed=1, progress=True)
    whole, info = distill(model, **kw)
    assert info["chunk"] is None
    capsys.readouterr()
    monkeypatch.setattr(resources, "available_memory", lambda: sizes.per_job(8, 3) + 1)
    chunked, chunked_info = distill(model, **kw)
    assert chunked_info["chunk"] == chunk_size(8, 3) == 3
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "onnxgenie: note:" in ln]
    assert len(notes) == 1 and "the teacher runs on chunks of 3 images" in notes[0]
    np.testing.assert_allclose(chunked, whole, rtol=1e-3, atol=1e-4)


# Inference passes that read activations back ------------------------------------------------------

def test_inference_batches_stay_within_the_budget(monkeypatch):
    from onnxgenie.graph.bn import fold_bn
    from onnxgenie.runtime import batches

    folded = fold_bn(normalize(conv_bn_net()))
    tensors = ["stem.relu", "block.relu"]
    per_image = 4 * (resources.tensor_floats(folded) + resources.tensor_floats(folded, tensors))
    assert resources.tensor_floats(folded, tensors) == 2 * 8 * 8 * 8
    x = random_input(folded, 10)
    whole = list(batches(folded, x, tensors, batch_size=64))
    monkeypatch.setattr(resources, "BATCH_ACTIVATIONS", 3 * per_image + 1)
    parts = list(batches(folded, x, tensors, batch_size=64))
    assert [len(x[part]) for part, _ in whole] == [10] and [len(x[part]) for part, _ in parts] == [3, 3, 3, 1]
    for i, _ in enumerate(tensors):
        np.testing.assert_array_equal(np.concatenate([v[i] for _, v in parts]), whole[0][1][i])


def test_inference_batches_refuse_an_image_larger_than_the_memory(monkeypatch):
    from onnxgenie.graph.bn import fold_bn
    from onnxgenie.runtime import batches

    folded = fold_bn(normalize(conv_bn_net()))
    monkeypatch.setattr(resources, "available_memory", lambda: 1024)
    with pytest.raises(BadInputError, match=r"one 3x8x8 image with its activations read back needs about"):
        next(batches(folded, random_input(folded, 2), ["stem.relu"]))


def test_reconstruction_passes_stay_within_the_budget(monkeypatch):
    from onnxgenie.graph.bn import fold_bn
    from onnxgenie.runtime import run_into

    folded = fold_bn(normalize(conv_bn_net()))
    x = random_input(folded, 9)
    whole = run_into(folded, x, np.empty((9, 10), np.float32), 1)
    calls = []
    real = resources.inference_batch
    monkeypatch.setattr(resources, "BATCH_ACTIVATIONS", 4 * 4 * resources.tensor_floats(folded) + 1)
    monkeypatch.setattr(resources, "inference_batch", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    np.testing.assert_array_equal(run_into(folded, x, np.empty((9, 10), np.float32), 1), whole)
    assert calls == [4]
