"""The reconstruction loop on tiny fixtures (and ResNet-20 when ../shared is present): parity of the
hard-rounded result with the fake-quant simulation, resume, divergence and graph-failure fallbacks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import helper

import fixtures
from conftest import shared_model, train_images
from onnxgenie.errors import BadInputError, ResumeMismatchError
from onnxgenie.graph.blocks import extract_block_model, partition_blocks
from onnxgenie.graph.bn import fold_bn
from onnxgenie.graph.load import normalize
from onnxgenie.ortrain import inference_session
from onnxgenie.quant.fakequant import fakequant_model
from onnxgenie.quant.init import init_activations, init_weights
from onnxgenie.quant.plan import build_plan
from onnxgenie.quant.reconstruct import BlockStatus, reconstruct
from onnxgenie.quant.reconstruct.fallback import apply_updates, block_error, keep_if_better
from onnxgenie.quant.reconstruct.graph import quantized_block_model, training_model
from onnxgenie.quant.reconstruct.status import Outcome, Why
from onnxgenie.quant.reconstruct.train import LR_ACT_STEP, LR_SOFTBITS, LR_WEIGHT_STEP, coin_flips, mix_inputs, optimizer
from onnxgenie.quant.spec import QuantPlan

ITERS = 30


def _run(model: onnx.ModelProto, x: np.ndarray, outputs=None) -> list[np.ndarray]:
    sess = inference_session(model, threads=1)
    return sess.run(outputs, {sess.get_inputs()[0].name: x})


def _setup(wbits=4, abits=4, n=64):
    folded = fold_bn(normalize(fixtures.opset17()))
    x = fixtures.random_input(folded, n, seed=5)
    plan = build_plan(folded, wbits, abits, first_last_bits=8)
    init_weights(folded, plan)
    init_activations(folded, plan, x[:32])
    return folded, plan, x


@pytest.fixture(scope="module")
def reconstructed(tmp_path_factory):
    folded, plan, x = _setup()
    work = tmp_path_factory.mktemp("recon")
    new, report = reconstruct(folded, plan, x, iters=ITERS, batch=16, workdir=work, progress=False)
    return folded, plan, x, new, report, work


def _block_plan(plan: QuantPlan, block_model: onnx.ModelProto) -> QuantPlan:
    names = {n.name for n in block_model.graph.node}
    sub = QuantPlan(target=plan.target)
    sub.weights = {k: w for k, w in plan.weights.items() if k in names}
    sub.acts = {k: a for k, a in plan.acts.items() if set(a.consumers) & names}
    return sub


def test_every_block_trained_and_plan_on_grid(reconstructed):
    folded, plan, _, new, report, work = reconstructed
    guarded = [b["name"] for b in report["blocks"] if b["status"] == "rtn (learning raised the block's error)"]
    assert [b["status"] for b in report["blocks"] if b["name"] not in guarded] == ["ok"] * (len(report["blocks"])
                                                                                          - len(guarded))
    assert len(guarded) < len(report["blocks"]) / 2
    assert report["rtn_blocks"] == guarded and 0 < report["ort_fraction"] <= 1
    assert all(b["recon_last"] <= b["recon_first"] for b in report["blocks"])
    assert sorted(p.name for p in work.glob("block_*.npz")) == [f"{b['name']}.npz" for b in report["blocks"]]
    changed = 0
    for name, wq in new.weights.items():
        lo, hi = wq.qrange
        assert wq.wint.dtype == np.int32 and wq.wint.min() >= lo and wq.wint.max() <= hi
        assert wq.wint.shape == plan.weights[name].wint.shape and np.all(wq.scale > 0)
        changed += int((wq.wint != plan.weights[name].wint).sum())
        # only a flip of at most one step from the floor base: |wint - RTN| <= 1
        assert np.abs(wq.wint - plan.weights[name].wint).max() <= 1
    assert changed > 0                                   # learning moved some rounding decisions
    assert any(new.acts[t].scale != plan.acts[t].scale for t in plan.acts)
    assert plan.weights is not new.weights               # the input plan is not modified


def test_quantized_blocks_equal_fakequant_simulation(reconstructed):
    folded, plan, x, new, _, _ = reconstructed
    h = x[:8]
    for block in partition_blocks(folded, list(new.weights)):
        bm = extract_block_model(folded, block)
        ours = _run(quantized_block_model(bm, new), h)[0]
        theirs = _run(fakequant_model(bm, _block_plan(new, bm)), h)[0]
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
        # the training graph (built from the initial plan: same B = floor(W/s0)) with the learned steps,
        # hard bits (V = ±10 ⇒ h(V) ∈ {0, 1}) and all QDrop masks 1 computes the same
        tm, names = training_model(bm, plan, "genie")
        for node, v_name in names.softbits.items():
            wq = new.weights[node]
            shape = [1] * wq.wint.ndim
            shape[wq.axis] = -1
            frac = wq.wint - wq.zero_point.reshape(shape) - names.bases[node]
            _set_init(tm, v_name, np.where(frac >= 1, 10.0, -10.0))
            _set_init(tm, names.weight_steps[node], wq.scale.reshape(shape))
        for tensor, s_name in names.act_steps.items():
            _set_init(tm, s_name, np.array([new.acts[tensor].scale]))
        tm.graph.output.append(helper.make_tensor_value_info(block.output, onnx.TensorProto.FLOAT, None))
        sess = inference_session(tm)
        feeds = {names.inputs[0]: h, names.inputs[1]: ours, names.inputs[2]: np.array(2, np.float32),
                 names.inputs[3]: np.array(0, np.float32)}
        for name in names.inputs[4:]:
            shape = next(a for a in sess.get_inputs() if a.name == name).shape
            feeds[name] = np.ones([len(h) if not isinstance(d, int) else d for d in shape], np.float32)
        out, recon = sess.run([block.output, "recon_loss"], feeds)
        np.testing.assert_allclose(out, ours, rtol=1e-5, atol=1e-5)
        assert recon < 1e-8
        h = ours
    # chained blocks == the whole simulated model
    np.testing.assert_allclose(h, _run(fakequant_model(folded, new), x[:8])[0], rtol=1e-5, atol=1e-5)


def _set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), name))


def test_resume_skips_finished_blocks_and_refuses_other_settings(reconstructed):
    folded, plan, x, new, _, work = reconstructed
    again, report = reconstruct(folded, plan, x, iters=ITERS, batch=16, workdir=work, progress=False)
    assert [b["status"] for b in report["blocks"]] == ["resumed"] * len(report["blocks"])
    for name in new.weights:
        np.testing.assert_array_equal(again.weights[name].wint, new.weights[name].wint)
        np.testing.assert_array_equal(again.weights[name].scale, new.weights[name].scale)
    with pytest.raises(ResumeMismatchError):
        reconstruct(folded, plan, x, iters=ITERS, batch=16, seed=1, workdir=work, progress=False)


def test_same_seed_same_result_without_workdir(reconstructed):
    folded, plan, x, new, _, _ = reconstructed
    again, _ = reconstruct(folded, plan, x, iters=ITERS, batch=16, progress=False)
    for name in new.weights:
        np.testing.assert_array_equal(again.weights[name].wint, new.weights[name].wint)


def test_lr_scale_multiplies_every_step(reconstructed, tmp_path):
    """lr_scale changes the result (learning rates really reach Adam) and is refused when not positive;
    a work dir of another lr_scale is not resumed."""
    folded, plan, x, new, _, work = reconstructed
    scaled, report = reconstruct(folded, plan, x, iters=ITERS, batch=16, progress=False, lr_scale=4.0)
    assert report["lr_scale"] == 4.0
    assert any(not np.array_equal(scaled.weights[n].scale, new.weights[n].scale) for n in new.weights)
    with pytest.raises(ResumeMismatchError):
        reconstruct(folded, plan, x, iters=ITERS, batch=16, workdir=work, progress=False, lr_scale=4.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(BadInputError, match="recon-lr-scale"):
            reconstruct(folded, plan, x, iters=ITERS, batch=16, progress=False, lr_scale=bad)


def test_act_lr_scale_moves_only_the_activation_steps(reconstructed):
    """act_lr_scale multiplies the activation steps' rate and no other; it changes what is learned, is
    refused when not positive, and a work dir of another act_lr_scale is not resumed."""
    folded, plan, x, new, _, work = reconstructed
    all_names = [training_model(extract_block_model(folded, b), plan, "genie")[1]
                 for b in partition_blocks(folded, list(plan.weights))]
    names = next(n for n in all_names if n.act_steps)
    lr = [{p: g.lr for g in optimizer(names, plan, 2.0, act)[0].groups for p in g.names} for act in (1.0, 4.0)]
    for param in lr[0]:
        factor = 4.0 if param in names.act_steps.values() else 1.0
        assert lr[1][param] == pytest.approx(lr[0][param] * factor), param
    scaled, report = reconstruct(folded, plan, x, iters=ITERS, batch=16, progress=False, act_lr_scale=4.0)
    assert report["act_lr_scale"] == 4.0
    assert any(not np.array_equal(scaled.acts[t].scale, new.acts[t].scale) for t in new.acts)
    with pytest.raises(ResumeMismatchError):
        reconstruct(folded, plan, x, iters=ITERS, batch=16, workdir=work, progress=False, act_lr_scale=4.0)
    with pytest.raises(BadInputError, match="recon-act-lr-scale"):
        reconstruct(folded, plan, x, iters=ITERS, batch=16, progress=False, act_lr_scale=0.0)


def test_qdrop_off_learns_otherwise_and_is_not_resumed_from_a_qdrop_run(reconstructed):
    folded, plan, x, new, report, work = reconstructed
    assert report["qdrop"] is True
    plain, plain_report = reconstruct(folded, plan, x, iters=ITERS, batch=16, progress=False, qdrop=False)
    assert plain_report["qdrop"] is False
    assert any(not np.array_equal(plain.acts[t].scale, new.acts[t].scale) for t in new.acts)
    with pytest.raises(ResumeMismatchError):
        reconstruct(folded, plan, x, iters=ITERS, batch=16, workdir=work, progress=False, qdrop=False)


def test_fast_preset_raises_the_4_bit_activation_step_rate_at_4_bit_weights_and_above():
    from onnxgenie.config import FAST_ACT_LR_SCALE, preset_config, settle

    def act_lr_scale(**settings) -> float:
        return settle(preset_config(**settings)).recon_act_lr_scale

    assert [act_lr_scale(wbits=b, abits=4) for b in (2, 3, 4, 8)] == [1.0, 1.0, FAST_ACT_LR_SCALE, FAST_ACT_LR_SCALE]
    assert act_lr_scale(wbits=8, abits=8) == 1.0
    assert act_lr_scale(preset="paper", wbits=4) == 1.0
    assert act_lr_scale(wbits=4, recon_act_lr_scale=2.0) == 2.0


def test_finer_grids_get_proportionally_smaller_step_learning_rates():
    """A step of an 8-bit grid (first/last layer) gets lr × 15/255 next to 4-bit steps, so Adam moves
    each step by the same fraction of itself; soft bits keep one lr; only steps decay."""
    folded, plan, _ = _setup(wbits=4, abits=4)
    block = partition_blocks(folded, list(plan.weights))[0]
    bm = extract_block_model(folded, block)
    _, names = training_model(bm, plan, "genie")
    adam, decays = optimizer(names, plan, lr_scale=2.0)
    lr_of = {p: (g.lr, d) for g, d in zip(adam.groups, decays) for p in g.names}
    for node, param in names.weight_steps.items():
        bits = plan.weights[node].bits
        assert lr_of[param] == (pytest.approx(LR_WEIGHT_STEP * 2.0 * 15 / (2 ** bits - 1)), True)
    for tensor, param in names.act_steps.items():
        bits = plan.acts[tensor].bits
        assert lr_of[param] == (pytest.approx(LR_ACT_STEP * 2.0 * 15 / (2 ** bits - 1)), True)
    assert {lr_of[p] for p in names.softbits.values()} == {(LR_SOFTBITS * 2.0, False)}
    assert {plan.weights[n].bits for n in names.weight_steps} >= {8}, "the fixture's first block has the 8-bit layer"


def test_a_plan_of_8_bit_grids_only_gets_the_8_bit_rates():
    """The rates are made for 4-bit steps: at W8A8 every step still gets lr × 15/255 (it got the 4-bit
    rate when the coarsest grid of the plan set the reference, and blocks learned worse than RTN)."""
    folded, plan, _ = _setup(wbits=8, abits=8)
    for block in partition_blocks(folded, list(plan.weights)):
        _, names = training_model(extract_block_model(folded, block), plan, "genie")
        adam, _ = optimizer(names, plan)
        lr_of = {p: g.lr for g in adam.groups for p in g.names}
        for param in names.weight_steps.values():
            assert lr_of[param] == pytest.approx(LR_WEIGHT_STEP * 15 / 255)
        for param in names.act_steps.values():
            assert lr_of[param] == pytest.approx(LR_ACT_STEP * 15 / 255)


def test_mix_inputs_selects_exactly():
    rng = np.random.default_rng(3)
    x_fp, x_q = rng.standard_normal((2, 4, 3, 5, 5), dtype=np.float32) * 1e3
    mask = coin_flips(rng, x_fp.shape)
    assert 0 < mask.mean() < 1
    np.testing.assert_array_equal(mix_inputs(mask, x_q, x_fp), np.where(mask > 0, x_q, x_fp))


def test_diverging_loss_keeps_round_to_nearest():
    folded, plan, x = _setup()
    new, report = reconstruct(folded, plan, x, iters=10, batch=16, lam=float("inf"), progress=False)
    assert all(b["status"] == "rtn (loss diverged twice)" for b in report["blocks"])
    assert len(report["rtn_blocks"]) == len(report["blocks"])
    for name, wq in plan.weights.items():
        np.testing.assert_array_equal(new.weights[name].wint, wq.wint)


def _block_with_floor_between_two_convs():
    """The fixture with its residual block made conv -> Floor -> conv2 -> Add: no gradient crosses the
    Floor, so the block's training graph cannot be built, but each conv alone can be learned."""
    folded = fold_bn(normalize(fixtures.opset17()))
    conv = next(n for n in folded.graph.node if n.name == "block.conv")
    out = conv.output[0]
    w2 = np.random.default_rng(1).normal(0, 0.1, (8, 8, 3, 3)).astype(np.float32)
    assert onnx.numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == conv.input[1])).shape == w2.shape
    folded.graph.initializer.append(onnx.numpy_helper.from_array(w2, "block.conv2.weight"))
    floor = helper.make_node("Floor", [out], ["block.floor"], name="block.floor")
    conv2 = helper.make_node("Conv", ["block.floor", "block.conv2.weight"], ["block.conv2"], name="block.conv2",
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    for node in folded.graph.node:
        node.input[:] = ["block.conv2" if i == out else i for i in node.input]
    at = list(folded.graph.node).index(conv) + 1
    folded.graph.node.insert(at, floor)
    folded.graph.node.insert(at + 1, conv2)
    x = fixtures.random_input(folded, 64, seed=5)
    plan = build_plan(folded, 4, 4, first_last_bits=8)
    init_weights(folded, plan)
    init_activations(folded, plan, x[:32])
    owner = next(b for b in partition_blocks(folded, list(plan.weights)) if "block.floor" in b.nodes)
    assert owner.quantized_nodes == ["block.conv", "block.conv2"]
    return folded, plan, x, owner


def test_block_without_gradient_is_learned_layer_by_layer():
    folded, plan, x, owner = _block_with_floor_between_two_convs()
    new, report = reconstruct(folded, plan, x, iters=40, batch=16, progress=False)
    row = next(b for b in report["blocks"] if b["name"] == owner.name)
    assert "layer by layer" in row["status"] and "training graph failed" in row["status"]
    assert [layer["name"] for layer in row["per_layer"]] == owner.quantized_nodes
    for layer in row["per_layer"]:
        assert layer["status"] in ("ok", "rtn (learning raised the block's error)")
        assert layer["recon_last"] <= layer["recon_first"]
    changed = [n for n in owner.quantized_nodes if not np.array_equal(new.weights[n].wint, plan.weights[n].wint)]
    assert changed == [layer["name"] for layer in row["per_layer"] if layer["status"] == "ok"]
    assert row["status"].startswith("ok") == bool(changed)
    from onnxgenie.status import fallbacks   # the stage line names the block and why

    line = fallbacks(report["blocks"])
    assert f"learned layer by layer: {owner.name} (training graph failed: no gradient for Floor (node" in line


def test_the_stage_line_groups_fallbacks_by_reason_and_names_a_few():
    from onnxgenie.status import fallbacks

    blocks = [{"name": f"b{i}", "status": "rtn (learning raised the block's error)"} for i in range(6)]
    blocks += [{"name": "x", "status": "rtn (loss diverged twice)"}, {"name": "y", "status": "ok"}]
    assert fallbacks(blocks) == ("; kept at round-to-nearest (learning raised the block's error): b0, b1, b2, b3 "
                                  "and 2 more; kept at round-to-nearest (loss diverged twice): x")
    assert fallbacks(blocks[-1:]) == ""
    by_layer = BlockStatus.by_layer(0, 2, BlockStatus.kept(Why.GRAPH_FAILED, "no gradient for Floor (node f)"))
    line = fallbacks([{"name": "z", "status": str(by_layer)}])   # named once, as learned layer by layer
    assert line == "; learned layer by layer: z (training graph failed: no gradient for Floor (node f))"


@pytest.mark.parametrize("status", [
    BlockStatus.ok(), BlockStatus.ok(retried=True), BlockStatus(Outcome.RESUMED),
    BlockStatus.kept(Why.DIVERGED), BlockStatus.kept(Why.RAISED_ERROR),
    BlockStatus.kept(Why.STEP_FAILED, "Non-zero status code returned while running Sum node (x)"),
    BlockStatus.by_layer(1, 3, BlockStatus.kept(Why.GRAPH_FAILED, "no gradient for Floor (node f)")),
    BlockStatus.by_layer(0, 2, BlockStatus.kept(Why.STEP_FAILED, "a: b (c)"))])
def test_block_status_reads_back_from_its_report_text(status):
    assert BlockStatus.parse(str(status)) == status
    assert str(status).startswith(("ok", "rtn", "resumed"))
    assert (status.reason is not None) == (status.outcome is Outcome.ROUND_TO_NEAREST and status.layers is None)


def test_block_status_texts_are_the_reports():
    assert str(BlockStatus.kept(Why.GRAPH_FAILED, "no gradient for Floor (node f)")) == \
        "rtn (training graph failed: no gradient for Floor (node f))"
    assert str(BlockStatus.ok(retried=True)) == "ok (retried with halved learning rates)"
    assert str(BlockStatus.by_layer(1, 2, BlockStatus.kept(Why.GRAPH_FAILED, "x"))) == \
        "ok (layer by layer, 1 of 2 layers learned; block rtn (training graph failed: x))"
    with pytest.raises(ValueError, match="not a block status"):
        BlockStatus.parse("rtn (some other reason)")


def test_a_layer_without_gradient_stays_at_round_to_nearest(monkeypatch):
    import onnxgenie.quant.reconstruct.train as rec

    folded, plan, x, owner = _block_with_floor_between_two_convs()
    real = rec.training_model

    def failing_for_conv2(block_model, *args):
        if any(n.name == "block.conv2" for n in block_model.graph.node):
            raise RuntimeError("no gradient for this layer")
        return real(block_model, *args)

    monkeypatch.setattr(rec, "training_model", failing_for_conv2)
    new, report = reconstruct(folded, plan, x, iters=10, batch=16, progress=False)
    row = next(b for b in report["blocks"] if b["name"] == owner.name)
    statuses = {layer["name"]: layer["status"] for layer in row["per_layer"]}
    assert statuses["block.conv2"] == "rtn (training graph failed: no gradient for this layer)"
    np.testing.assert_array_equal(new.weights["block.conv2"].wint, plan.weights["block.conv2"].wint)
    np.testing.assert_array_equal(new.weights["block.conv2"].scale, plan.weights["block.conv2"].scale)


def test_a_training_step_failing_at_run_time_keeps_round_to_nearest(monkeypatch):
    """A gradient kernel that fails only when it runs (onnxruntime-training 1.19's AveragePoolGrad on a
    symbolic batch does) costs the block its learning, not the run."""
    import onnxgenie.quant.reconstruct.train as rec

    folded, plan, x, owner = _block_with_floor_between_two_convs()

    def failing_step(*args):
        raise RuntimeError("Non-zero status code returned while running Sum node")

    monkeypatch.setattr(rec, "_step", failing_step)
    new, report = reconstruct(folded, plan, x, iters=10, batch=16, progress=False)
    for row in report["blocks"]:
        layers = row.get("per_layer", [row])   # the Floor block goes layer by layer, the others fail whole
        assert all(layer["status"].startswith("rtn (training step failed: Non-zero status") for layer in layers), row
    assert len(next(b for b in report["blocks"] if b["name"] == owner.name)["per_layer"]) == 2
    for node, wq in plan.weights.items():
        np.testing.assert_array_equal(new.weights[node].wint, wq.wint)
        np.testing.assert_array_equal(new.weights[node].scale, wq.scale)


def test_bad_arguments():
    folded, plan, x = _setup(n=8)
    with pytest.raises(BadInputError):
        reconstruct(folded, plan, x, quantizer="brecq", progress=False)
    with pytest.raises(BadInputError):
        reconstruct(folded, plan, x, batch=32, progress=False)


@pytest.mark.slow  # GENIE-M on a real ResNet-20 block
def test_resnet20_reconstruction_lowers_block_error():
    """A short run on real images: every block's hard-rounded output error vs the teacher is no worse
    than round-to-nearest's on the calibration images, and lower on most blocks."""
    name = "resnet20_cifar10"
    folded = fold_bn(normalize(shared_model(name)))
    x, _ = train_images(name, 64)
    plan = build_plan(folded, 2, 4)
    init_weights(folded, plan)
    init_activations(folded, plan, x)
    new, report = reconstruct(folded, plan, x, iters=60, batch=32, progress=False)
    assert all(b["status"] in ("ok", "rtn (learning raised the block's error)") for b in report["blocks"])
    assert all(b["recon_last"] <= b["recon_first"] for b in report["blocks"])
    better = 0
    h = x
    for block in partition_blocks(folded, list(plan.weights)):
        bm = extract_block_model(folded, block)
        y = _run(bm, h)[0]
        err_rtn = ((_run(quantized_block_model(bm, plan), h)[0] - y) ** 2).mean()
        err_new = ((_run(quantized_block_model(bm, new), h)[0] - y) ** 2).mean()
        better += err_new < err_rtn
        h = y
    assert better >= 0.7 * len(report["blocks"])


@pytest.mark.parametrize("quantizer", ["genie", "adaround"])
def test_cli_quantize_reconstructs_by_default(tmp_path, quantizer):
    from onnxgenie.cli import main

    src = fixtures.save(fixtures.opset17(), tmp_path)
    out, work = tmp_path / "q.onnx", tmp_path / "work"
    rc = main(["quantize", str(src), "-o", str(out), "--wbits", "4", "--abits", "4", "--calib", "noise",
               "--calib-images", "32", "--recon-iters", "5", "--recon-batch", "16", "--quantizer", quantizer,
               "--workdir", str(work)])
    assert rc == 0 and out.is_file()
    assert len(list((work / "reconstruct").glob("block_*.npz"))) == 5   # stem, residual, down, fc1, fc
    bad = tmp_path / "bad.onnx"
    rc = main(["quantize", str(src), "-o", str(bad), "--wbits", "4", "--abits", "4", "--calib", "noise",
               "--calib-images", "32", "--recon-batch", "64"])
    assert rc == 2 and not bad.exists()


def test_streaming_from_disk_gives_the_same_result(reconstructed, tmp_path):
    folded, plan, x, new, _, _ = reconstructed
    streamed, report = reconstruct(folded, plan, x, iters=ITERS, batch=16, progress=False, workdir=tmp_path,
                                   mem_budget_mb=0)
    assert report["streamed_arrays"] == 2 * len(report["blocks"])   # every target and quantized input on disk
    assert not list(tmp_path.glob("stream_*.npy"))                  # and removed afterwards
    for name in new.weights:
        np.testing.assert_array_equal(streamed.weights[name].wint, new.weights[name].wint)


def test_a_block_keeps_learned_values_only_when_they_lower_its_error():
    folded, plan, x = _setup()
    block = partition_blocks(folded, list(plan.weights))[0]   # its input is the image
    bm = extract_block_model(folded, block)
    y = _run(bm, x)[0]
    nodes = [n for n in plan.weights if n in {m.name for m in bm.graph.node}]
    rtn = {n: (plan.weights[n].wint.copy(), plan.weights[n].scale.copy()) for n in nodes}
    worse = {"weights": {n: (w, s * 3) for n, (w, s) in rtn.items()}, "acts": {}}
    err_rtn = ((_run(quantized_block_model(bm, plan), x)[0] - y) ** 2).reshape(len(x), -1).sum(1).mean()

    kept, errors = keep_if_better(bm, plan, worse, x, y, threads=1)
    assert kept == {} and errors["status"] == BlockStatus.kept(Why.RAISED_ERROR)
    assert errors["recon_first"] == errors["recon_last"] < errors["recon_learned"]
    np.testing.assert_allclose(errors["recon_first"], err_rtn, rtol=1e-5)
    for n, (w, s) in rtn.items():                      # the plan is back at round-to-nearest
        np.testing.assert_array_equal(plan.weights[n].wint, w)
        np.testing.assert_array_equal(plan.weights[n].scale, s)

    apply_updates(plan, worse)                         # now the plan is the bad point, RTN the update
    kept, errors = keep_if_better(bm, plan, {"weights": rtn, "acts": {}}, x, y, threads=1)
    assert kept and "status" not in errors and errors["recon_last"] < errors["recon_first"]
    np.testing.assert_allclose(errors["recon_last"], err_rtn, rtol=1e-5)
    np.testing.assert_allclose(block_error(bm, plan, x, y, threads=1), err_rtn, rtol=1e-5)


def test_fast_preset_runs_two_candidates_below_4_bit_weights_only():
    from onnxgenie.config import preset_config, settle

    def candidates(**settings) -> int:
        return settle(preset_config(**settings)).recon_candidates

    assert [candidates(wbits=b) for b in (2, 3, 4, 8)] == [2, 2, 1, 1]
    assert candidates(preset="paper", wbits=2) == 1
    assert candidates(wbits=4, recon_candidates=3) == 3


@pytest.mark.slow  # three runs, two with candidate processes
def test_candidates_keep_the_reconstruction_closest_to_fp32_and_resume(tmp_path):
    """Candidate 0 is the plain run (same seed); the kept one has the lowest calibration KL, and the
    exported model scores exactly that; a resumed run reuses every candidate's blocks."""
    from onnxgenie.config import preset_config
    from onnxgenie.pipeline import quantize
    from onnxgenie.runtime import predict
    from onnxgenie.quant.sensitivity import kl_divergence

    model = fixtures.opset17()
    x = fixtures.random_input(model, 48, seed=3)
    reference = predict(model, x)
    cfg = preset_config("fast", wbits=2, abits=4, recon_iters=ITERS, recon_batch=16, threads=1, progress=False,
                        recon_candidates=2, workdir=str(tmp_path / "work"))
    result = quantize(model, cfg, calib=x)
    cands = result.report["reconstruction"]["candidates"]
    scores = [c["calibration_kl"] for c in cands]
    assert [c["seed"] for c in cands] == [0, 1000] and scores[0] != scores[1]
    best = int(np.argmin(scores))
    assert [c["chosen"] for c in cands] == [k == best for k in range(2)]
    assert result.report["reconstruction"]["chosen_seed"] == cands[best]["seed"]
    assert kl_divergence(reference, predict(result.model, x)) == pytest.approx(scores[best], rel=1e-5)

    single = quantize(model, replace(cfg, recon_candidates=1, workdir=None), calib=x)
    assert "candidates" not in single.report["reconstruction"]
    assert kl_divergence(reference, predict(single.model, x)) == pytest.approx(scores[0], rel=1e-5)

    resumed = quantize(model, cfg, calib=x, resume=True)
    assert all(b["status"] == "resumed" for b in resumed.report["reconstruction"]["blocks"])
    assert [c["calibration_kl"] for c in resumed.report["reconstruction"]["candidates"]] == scores
    assert len(list((tmp_path / "work" / "reconstruct" / "candidate_1").glob("block_*.npz"))) == 5

    with pytest.raises(BadInputError, match="--recon-candidates"):
        quantize(model, replace(cfg, recon_candidates=0, workdir=None), calib=x)
