"""GENIE-D: generator, BNS loss graph vs NumPy, latent gradients vs finite differences, the two
learning-rate groups and their schedules, resume, parallel workers, divergence, CLI, a real model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from fixtures import conv_bn_net, no_bn, random_input, save, wait_for
from onnxgenie.cli import main
from onnxgenie.distill import distill
from onnxgenie.distill.bns import LOSS, STD_EPS, bns_loss_model, fused_layers
from onnxgenie.distill.generator import build_generator, channels, init_generator, stages
from onnxgenie.distill.genie_d import (LATENTS, BatchDistiller, DistillConfig, ReduceLROnPlateau,
                                       initial_values, training_model)
from onnxgenie.errors import BadInputError, DivergenceError, NoBatchNormError, ResumeMismatchError
from onnxgenie.graph.bn import bn_layers
from onnxgenie.graph.load import normalize
from onnxgenie.optim import ParamGroup
from onnxgenie.ortrain import inference_session

SHARED = Path(__file__).parents[1].parent / "shared"


def _with_values(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in values:
            t.CopyFrom(onnx.numpy_helper.from_array(values[t.name], t.name))
    return out


def _numpy_bns(teacher: onnx.ModelProto, x: np.ndarray) -> float:
    """Σ_l mean_c[(μ−μ_BN)² + (σ−σ_BN)²] + Σ_{n,c}[μ_nc² + (σ_nc−1)²]/N, float64, from tapped activations."""
    layers = bn_layers(teacher)
    tapped = onnx.ModelProto()
    tapped.CopyFrom(teacher)
    tapped.graph.output.extend(helper.make_tensor_value_info(bn.input, onnx.TensorProto.FLOAT, None)
                               for bn in layers)
    acts = inference_session(tapped).run([bn.input for bn in layers], {tapped.graph.input[0].name: x})
    x64 = x.astype(np.float64)
    mean, std = x64.mean((2, 3)), np.sqrt(x64.var((2, 3)) + STD_EPS)
    loss = ((mean ** 2).sum() + ((std - 1) ** 2).sum()) / x.shape[0]
    for bn, a in zip(layers, acts):
        axes = (0, *range(2, a.ndim))
        a = a.astype(np.float64)
        mu, sigma = a.mean(axes), np.sqrt(a.var(axes) + STD_EPS)
        loss += ((mu - bn.mean) ** 2).mean() + ((sigma - np.sqrt(bn.var.astype(np.float64) + STD_EPS)) ** 2).mean()
    return float(loss)


# Generator ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("chw", [(3, 8, 8), (1, 10, 6)])
def test_generator_uses_batch_statistics_and_any_input_size(chw):
    gen = build_generator(chw)
    gen = _with_values(gen, init_generator(gen, np.random.default_rng(0)))
    z = np.random.default_rng(1).standard_normal((5, 256)).astype(np.float32)
    images = inference_session(gen).run(None, {"latents": z})[0]
    assert images.shape == (5, *chw)
    # the last BN (no affine) normalises with this batch's statistics: mean 0, std 1 per channel
    np.testing.assert_allclose(images.mean((0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(images.std((0, 2, 3)), 1, atol=1e-3)
    # and each image depends on the others through those statistics
    alone = inference_session(gen).run(None, {"latents": z[:2]})[0]
    assert not np.allclose(alone, images[:2], atol=1e-3)
    assert not any(n.op_type == "BatchNormalization" for n in gen.graph.node)


def _numpy_generator(values: dict, z: np.ndarray, chw: tuple) -> np.ndarray:
    """The reference Generator's forward in float64 (torch semantics: BN on batch stats, eps 1e-5)."""
    c, h, w = chw
    v = {k.removeprefix("generator."): x.astype(np.float64) for k, x in values.items()}

    def bn(x, name=None):
        y = (x - x.mean((0, 2, 3), keepdims=True)) / np.sqrt(x.var((0, 2, 3), keepdims=True) + 1e-5)
        if name is None:
            return y
        return y * v[f"{name}.weight"].reshape(1, -1, 1, 1) + v[f"{name}.bias"].reshape(1, -1, 1, 1)

    def conv(x, name):
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        k = v[f"{name}.weight"]
        out = sum(np.einsum("nchw,oc->nohw", xp[:, :, i:i + x.shape[2], j:j + x.shape[3]], k[:, :, i, j])
                  for i in range(3) for j in range(3))
        return out + v[f"{name}.bias"].reshape(1, -1, 1, 1)

    def up(x):
        return x.repeat(2, axis=2).repeat(2, axis=3)

    k = stages(h, w)
    chans = channels(k)
    x = z.astype(np.float64) @ v["linear.weight"].T + v["linear.bias"]
    x = bn(x.reshape(len(z), chans[0], -(-h // 2 ** k), -(-w // 2 ** k)), "bn1")
    for i in range(1, k + 1):
        x = conv(up(x), f"conv{i}")
        if i < k:
            x = bn(x, f"bn{i + 1}")
            x = np.where(x > 0, x, 0.2 * x)
    x = x[:, :, :h, :w]
    return bn(np.tanh(x))


@pytest.mark.parametrize("chw", [(3, 8, 8), (1, 10, 6), (2, 40, 24), (1, 70, 50)])
def test_generator_equals_numpy_reference(chw):
    gen = build_generator(chw)
    rng = np.random.default_rng(0)
    values = init_generator(gen, rng)
    for name in values:  # non-trivial BN affine parameters
        if ".bn" in name:
            centre = 1.0 if name.endswith("weight") else 0.0
            values[name] = rng.normal(centre, 0.3, values[name].shape).astype(np.float32)
    z = rng.standard_normal((5, 256)).astype(np.float32)
    got = inference_session(_with_values(gen, values)).run(None, {"latents": z})[0]
    np.testing.assert_allclose(got, _numpy_generator(values, z, chw), rtol=1e-3, atol=1e-3)


# BNS loss ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", [{}, {"bn_after_add": True}, {"depthwise": True}])
@pytest.mark.parametrize("fused", [True, False])
def test_bns_loss_equals_numpy_on_the_same_activations(variant, fused):
    teacher = normalize(conv_bn_net(**variant))
    loss_model = bns_loss_model(teacher, fused=fused)
    assert loss_model.graph.output[0].name == LOSS
    assert not any(n.op_type == "BatchNormalization" for n in loss_model.graph.node)
    x = random_input(teacher, 6, seed=3) * 1.7 + 0.3
    got = float(inference_session(loss_model).run(None, {teacher.graph.input[0].name: x})[0])
    assert got == pytest.approx(_numpy_bns(teacher, x), rel=1e-4)


def test_fused_loss_folds_the_conv_bns():
    teacher = normalize(conv_bn_net(bn_after_add=True))
    # stem, block, down fold into their convs, fc1.bn into its Gemm; block.add_bn follows an Add
    assert fused_layers(teacher) == len(bn_layers(teacher)) - 1


def _with_gamma(model, channel_gammas: dict[int, float]):
    """``model`` with the first BN's gamma set to the given values in the given channels."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    t = next(t for t in model.graph.initializer if t.name == bn.input[1])
    gamma = numpy_helper.to_array(t).copy()
    for c, g in channel_gammas.items():
        gamma[c] = g
    t.CopyFrom(numpy_helper.from_array(gamma, t.name))
    return model


@pytest.mark.parametrize("gammas", [{0: 0.0}, {0: 0.0, 3: 0.0}, {1: 1e-9}])
def test_zero_or_tiny_gamma_loss_is_exact_and_finite(gammas):
    # timm's zero_init_last and pruned models have BN channels with gamma 0: the fused loss keeps such a
    # BN unfolded (tapped at its input) instead of dividing by a zero scale
    teacher = normalize(_with_gamma(conv_bn_net(), gammas))
    assert fused_layers(teacher) == fused_layers(normalize(conv_bn_net())) - 1
    x = random_input(teacher, 6, seed=3) * 1.7 + 0.3
    for fused in (True, False):
        loss_model = bns_loss_model(teacher, fused=fused)
        got = float(inference_session(loss_model).run(None, {teacher.graph.input[0].name: x})[0])
        assert np.isfinite(got)
        assert got == pytest.approx(_numpy_bns(teacher, x), rel=1e-4)


def test_zero_gamma_model_distils(tmp_path):
    teacher = _with_gamma(conv_bn_net(), {0: 0.0, 2: 0.0})
    images, info = distill(teacher, n_images=4, batch=4, iters=3, seed=0, progress=False)
    assert np.isfinite(images).all() and np.isfinite(info["final_losses"]).all()


# Gradients and learning-rate groups ---------------------------------------------------------------

def _tiny_setup(mode="genie", swing=False, iters=1, **kw):
    teacher = normalize(conv_bn_net())
    cfg = DistillConfig(n_batches=1, batch=4, iters=iters, mode=mode, swing=swing, **kw)
    model, groups = training_model(teacher, cfg)
    return cfg, model, groups


def test_latent_gradient_matches_finite_differences():
    cfg, model, groups = _tiny_setup()
    distiller = BatchDistiller(model, groups, cfg)
    values = initial_values(model, cfg, np.random.default_rng(0))
    distiller.graph.set_params(values)
    loss, _ = distiller._step({})
    grad = distiller.graph.grads()[LATENTS]
    # finite differences through a plain inference session (float32, central, along random directions)
    sess_model = _with_values(model, values)
    del sess_model.graph.output[1:]
    rng = np.random.default_rng(5)
    for _ in range(3):
        # directions with a sizeable derivative (float32 losses of ~5 leave ~1e-5 of resolution)
        d = grad / np.linalg.norm(grad) + rng.standard_normal(grad.shape).astype(np.float32) / np.sqrt(grad.size)
        d = (d / np.linalg.norm(d)).astype(np.float32)
        h = 1e-2
        plus = _with_values(sess_model, {LATENTS: values[LATENTS] + h * d})
        minus = _with_values(sess_model, {LATENTS: values[LATENTS] - h * d})
        fd = (inference_session(plus).run(None, {})[0] - inference_session(minus).run(None, {})[0]) / (2 * h)
        assert float(fd) == pytest.approx(float((grad * d).sum()), rel=1e-2)
    assert loss == pytest.approx(float(inference_session(sess_model).run(None, {})[0]), rel=1e-5)


@pytest.mark.parametrize("mode,lrs", [("genie", {"latents": 0.1, "generator": 0.01}),
                                      ("zeroq", {"pixels": 0.5}), ("noise", {"generator": 0.01})])
def test_first_adam_step_moves_each_group_by_its_own_lr(mode, lrs):
    cfg, model, groups = _tiny_setup(mode)
    assert set(groups) == set(lrs)
    distiller = BatchDistiller(model, groups, cfg)
    before = initial_values(model, cfg, np.random.default_rng([cfg.seed, 0]))
    distiller.run(0)
    after = distiller.graph.params()
    for group, lr in lrs.items():
        moves = np.concatenate([np.abs(after[n] - before[n]).ravel() for n in groups[group]])
        # Adam's first step is lr·g/(|g|+eps): ≈ lr wherever the gradient is not vanishingly small
        assert np.median(moves) == pytest.approx(lr, rel=1e-3)
        assert moves.max() <= lr * (1 + 1e-5)


def test_generator_lr_decays_by_095_every_100_steps():
    cfg, model, groups = _tiny_setup(iters=201)
    distiller = BatchDistiller(model, groups, cfg)
    distiller.run(0)
    assert distiller.lrs["generator"] == pytest.approx(0.01 * 0.95 ** 2)


def test_reduce_lr_on_plateau_follows_torch_defaults():
    group = ParamGroup(["z"], 0.1)
    sched = ReduceLROnPlateau(group)
    sched.step(1.0)
    for _ in range(100):  # 100 steps without a relative improvement of 1e-4: still patient
        sched.step(0.99995)
    assert group.lr == 0.1
    sched.step(1.0)  # the 101st bad step
    assert group.lr == pytest.approx(0.01)
    sched.step(0.5)  # an improvement resets the count
    for _ in range(300):
        sched.step(0.5)
    assert group.lr == pytest.approx(1e-4)  # 0.01 → 0.001 → 1e-4, clipped at min_lr


# The teacher in chunks: the same loss and gradients as the whole batch ------------------------------

def _step_values(model, groups, cfg, values, feeds):
    distiller = BatchDistiller(model, groups, cfg)
    distiller.graph.set_params(values)
    loss, images = distiller._step(feeds)
    return loss, images, distiller.graph.grads()


@pytest.mark.parametrize("chunk", [1, 2, 3])    # batch 5: chunks 1x5; 2+2+1 and 3+2 (uneven, padded)
@pytest.mark.parametrize("mode,teacher", [("genie", {}), ("noise", {"bn_after_add": True}), ("zeroq", {}),
                                          ("genie", {"nhwc": True})])
def test_chunked_step_equals_the_whole_batch(chunk, mode, teacher):
    """Loss, images and the gradients of every trainable (latents, generator, or pixels) of one step
    with the teacher in chunks equal those of the one-graph step. The teacher has a BN after a Gemm
    (rank 2), BNs folded into convs and (bn_after_add) one tapped at its input; swing on."""
    from fixtures import nhwc_input
    from onnxgenie.distill.genie_d import chunked_models, chunks
    from onnxgenie.graph.swing import swing_feed

    net = normalize(nhwc_input() if teacher.get("nhwc") else conv_bn_net(**teacher))
    cfg = DistillConfig(n_batches=1, batch=5, iters=1, mode=mode, swing=True)
    whole, groups = training_model(net, cfg)
    values = initial_values(whole, cfg, np.random.default_rng(0))
    feeds = {**swing_feed(0, 2), **({LATENTS: values.pop(LATENTS)} if mode == "noise" else {})}
    loss, images, grads = _step_values(whole, groups, cfg, values, feeds)
    models, chunk_groups = chunked_models(net, cfg, chunk)
    assert chunk_groups == groups
    assert len(chunks(5, chunk)) == -(-5 // chunk)
    c_loss, c_images, c_grads = _step_values(models, groups, cfg, values, feeds)
    assert c_loss == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(c_images, images, rtol=1e-6, atol=1e-6)
    assert set(c_grads) == set(grads) and grads
    scale = max(float(np.abs(g).max()) for g in grads.values())
    for name, g in grads.items():  # a conv bias before a BN has a zero gradient: compare on the common scale
        np.testing.assert_allclose(c_grads[name], g, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def test_chunks_are_even_and_cover_the_batch():
    from onnxgenie.distill.genie_d import chunks

    assert chunks(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert chunks(128, 48) == [(0, 43), (43, 86), (86, 128)]
    assert chunks(8, 8) == [(0, 8)] and chunks(8, 100) == [(0, 8)]


@pytest.mark.slow  # worker processes
def test_chunked_workers_match_one_process(tmp_path):
    one, _ = _run(tmp_path, "one", mode="zeroq", iters=2)
    two, info = _run(tmp_path, "two", mode="zeroq", iters=2, jobs=2, chunk=3)
    assert info["chunk"] == 2 and info["jobs"] == 2
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)


def _distill_chunked(_):
    return distill(conv_bn_net(), n_images=4, batch=4, iters=2, chunk=2, progress=False)[0]


def test_chunked_distillation_runs_inside_a_pool_worker():
    """A daemonic process may not start the worker chunked batches otherwise run in: they run in it."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        images = pool.apply(_distill_chunked, (None,))
    np.testing.assert_allclose(images, _distill_chunked(None), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["genie", "zeroq"])
def test_chunked_distillation_gives_the_same_images(mode):
    kw = dict(n_images=10, batch=5, iters=4, mode=mode, seed=3, progress=False)
    whole, info = distill(conv_bn_net(), **kw)
    chunked, chunked_info = distill(conv_bn_net(), chunk=2, **kw)
    assert (info["chunk"], chunked_info["chunk"]) == (None, 2)
    np.testing.assert_allclose(chunked_info["loss_history"], info["loss_history"], rtol=1e-4)
    np.testing.assert_allclose(chunked, whole, rtol=1e-3, atol=1e-4)


# Runs: resume, parallel, divergence, bad input -------------------------------------------------

def _run(tmp_path, name, **kw):
    args = dict(n_images=8, batch=4, iters=3, progress=False, workdir=str(tmp_path / name))
    args.update(kw)
    return distill(conv_bn_net(), **args)


def test_resume_after_an_interrupted_run_gives_the_same_images(tmp_path):
    full, info = _run(tmp_path, "full")
    assert full.shape == (8, 3, 8, 8) and info["loss_history"].shape == (2, 3)
    # interrupted after batch 0: batch 1 never finished (its file was not written)
    _run(tmp_path, "cut")
    (tmp_path / "cut" / "batch_0001.npz").unlink()
    resumed, info = _run(tmp_path, "cut", resume=True)
    assert info["resumed_batches"] == [0]
    np.testing.assert_array_equal(resumed, full)
    with pytest.raises(ResumeMismatchError, match="seed"):
        _run(tmp_path, "cut", resume=True, seed=1)
    with pytest.raises(BadInputError, match="--resume"):
        _run(tmp_path, "cut")


def test_parallel_workers_match_one_process(tmp_path):
    one, _ = _run(tmp_path, "one", mode="zeroq", iters=2)
    two, _ = _run(tmp_path, "two", mode="zeroq", iters=2, jobs=2)
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5)


def test_divergence_names_batch_and_step_and_writes_nothing(tmp_path):
    with pytest.raises(DivergenceError, match=r"batch 0: .* at step 1 .*lower learning rates"):
        _run(tmp_path, "nan", mode="zeroq", lr_pixels=1e30)
    assert not list((tmp_path / "nan").glob("batch_*.npz"))


@pytest.mark.parametrize("mode", ["genie", "zeroq"])
def test_nhwc_model_distils_the_nchw_twins_images_transposed(mode):
    """The NHWC fixture is the NCHW one behind a Transpose (same weights): the same seed must give the
    same images, in the model's layout, and the same BNS losses."""
    from fixtures import nhwc_input

    kw = dict(n_images=4, batch=4, iters=3, mode=mode, seed=2, progress=False)
    nchw, info = distill(conv_bn_net(), **kw)
    nhwc, info_nhwc = distill(nhwc_input(), **kw)
    assert nhwc.shape == (4, *nchw.shape[2:], nchw.shape[1])
    np.testing.assert_allclose(nhwc.transpose(0, 3, 1, 2), nchw, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(info_nhwc["loss_history"], info["loss_history"], rtol=1e-4)


def test_model_without_bn_is_refused():
    with pytest.raises(NoBatchNormError):
        distill(no_bn(), n_images=4, batch=4, iters=1, progress=False)


@pytest.mark.parametrize("jobs", [1, 2])
def test_op_without_gradient_is_refused_in_one_line(tmp_path, capsys, jobs):
    """A Floor between the image and a BN: no gradient in onnxruntime-training. Exit 2 naming the op and
    the way out, from one process or from the workers (a failing worker initializer is not respawned)."""
    model = conv_bn_net()
    next(n for n in model.graph.node if n.name == "block.relu").op_type = "Floor"
    out = tmp_path / "data.npz"
    assert main(["distill", str(save(model, tmp_path)), "-o", str(out), "--images", "8", "--batch", "4",
                 "--iters", "2", "--jobs", str(jobs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no gradient for Floor (node block.relu)" in err and "--calib-data" in err
    assert not out.exists()


def test_cli_rounds_up_and_writes_images_loss_history_and_preview(tmp_path, capsys):
    model = save(conv_bn_net(), tmp_path)
    out, grid = tmp_path / "data.npz", tmp_path / "grid.png"
    assert main(["distill", str(model), "-o", str(out), "--images", "6", "--batch", "4", "--iters", "2",
                 "--jobs", "1", "--preview", str(grid)]) == 0
    assert "distilling 8" in capsys.readouterr().err
    data = np.load(out)
    assert data["images"].shape == (8, 3, 8, 8) and data["images"].dtype == np.float32
    assert data["loss_history"].shape == (2, 2)
    from PIL import Image

    assert Image.open(grid).size[0] > 0
    assert main(["distill", str(save(no_bn(), tmp_path, "nobn")), "-o", str(tmp_path / "x.npz")]) == 2
    assert not (tmp_path / "x.npz").exists()


# A real model ------------------------------------------------------------------------------------

@pytest.mark.slow  # GENIE-D on a real ResNet-20
def test_resnet20_bns_loss_falls_within_a_few_dozen_steps():
    path = SHARED / "models" / "resnet20_cifar10.onnx"
    if not path.exists():
        pytest.skip(f"{path} not found: the shared pretrained models are not in this checkout")
    images, info = distill(onnx.load(str(path)), n_images=16, batch=16, iters=30, progress=False)
    history = info["loss_history"][0]
    assert images.shape == (16, 3, 32, 32)
    assert history[-5:].mean() < 0.5 * history[0]


DATA = Path(__file__).parent / "data"


def test_average_pool_behind_a_swung_conv_distils(tmp_path):
    """DenseNet's AveragePool transitions sit behind stride-2 convs. onnxruntime-training 1.19's
    AveragePool gradient dies with SIGFPE on a tensor without a static batch, and the swing crop used
    to lose it; the distillation graph now has the batch fixed. Run in a child: a crash must fail the test."""
    import subprocess
    import sys

    out = tmp_path / "data.npz"
    done = subprocess.run([sys.executable, "-m", "onnxgenie.cli", "distill", str(DATA / "tiny_densenet_2_2_64.onnx"),
                           "-o", str(out), "--images", "4", "--batch", "4", "--iters", "2", "--jobs", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-500:]
    assert np.isfinite(np.load(out)["images"]).all()


def _die(index: int):
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow  # worker processes
def test_a_worker_killed_by_a_signal_fails_the_run_in_one_line(tmp_path):
    """A worker dying inside onnxruntime (SIGFPE, SIGSEGV) fails the run instead of leaving the pool waiting."""
    from onnxgenie.distill.genie_d import _run_parallel
    from onnxgenie.errors import OnnxGenieError

    teacher = normalize(conv_bn_net())
    cfg = DistillConfig(n_batches=2, batch=4, iters=2, mode="genie", swing=True, seed=0)
    model, groups = training_model(teacher, cfg)
    with pytest.raises(OnnxGenieError, match="worker process died.*--jobs 1"):
        _run_parallel(model, groups, cfg, [0, 1], tmp_path, False, 2, task=_die)


def _hold_progress_queue_lock(index: int):
    """Stands for a worker terminated inside ``steps.put``: it holds the queue's cross-process write lock."""
    import time

    from onnxgenie.distill.genie_d import _WORKER

    _WORKER["steps"]._wlock.acquire()
    (_WORKER["workdir"] / f"locked_{index}").touch()
    time.sleep(600)


@pytest.mark.slow  # worker processes in a subprocess
def test_ctrl_c_exits_even_when_a_terminated_worker_held_the_progress_queue(tmp_path):
    """CI once hung after Ctrl-C: the parent's own put() on the progress queue waited for a lock a
    terminated worker never released, and interpreter exit waited for that put."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from fixtures import conv_bn_net
from test_distill import _hold_progress_queue_lock
from onnxgenie.distill.genie_d import DistillConfig, _run_parallel, training_model
from onnxgenie.graph.load import normalize
if __name__ == "__main__":
    cfg = DistillConfig(n_batches=2, batch=4, iters=2, mode="genie", swing=True, seed=0)
    model, groups = training_model(normalize(conv_bn_net()), cfg)
    try:
        _run_parallel(model, groups, cfg, [0, 1], {str(tmp_path)!r}, False, 2, task=_hold_progress_queue_lock)
    except KeyboardInterrupt:
        sys.exit(130)
""")
    # SIGINT back to its default: a shell's background job (`make test &`) starts with it ignored
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: any(tmp_path.glob("locked_*")), proc, timeout=120)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # workers too
        pytest.fail("the run did not exit within 60 s of Ctrl-C")
    assert proc.returncode == 130, err[-500:]


def test_generator_is_the_reference_up_to_32_and_stays_small_at_real_resolution():
    """Up to 32x32 the reference's two stages (128 -> 64 -> C); at 224x224 five stages whose Linear layer
    maps to 128x7x7 instead of 128x56x56, and whose convolutions cost less than 1/4 of Lite0's forward."""
    assert (stages(32, 32), channels(stages(32, 32))) == (2, [128, 64])
    gen = build_generator((3, 224, 224))
    weights = {t.name: tuple(t.dims) for t in gen.graph.initializer}
    assert weights["generator.linear.weight"] == (128 * 7 * 7, 256)
    assert stages(224, 224) == 5 and channels(5) == [128, 64, 32, 16, 8]
    macs = 0
    side = 7
    for cin, cout in zip(channels(5), channels(5)[1:] + [3]):
        side *= 2
        macs += side * side * cin * cout * 9
    assert macs < 0.25 * 400e6   # EfficientNet-Lite0: about 400 M multiply-adds per image
