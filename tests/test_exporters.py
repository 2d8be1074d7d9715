"""Compatibility matrix: what current exporters write (tests/data/exporters, made by
tools/make_export_fixtures.py with torch 2.13 / timm 1.0.31 / tensorflow-cpu 2.21 + Keras 3.15 / tf-keras 2.21
/ tf2onnx 1.17) and what onnxgenie does with each: the front end reads it exactly, `inspect` gives the right
verdict, a tiny-budget `quantize` exports a QDQ model equal to its simulation, and `eval` scores it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import fixtures
import onnxgenie
from onnxgenie.cli import main
from onnxgenie.graph.bn import bn_layers
from onnxgenie.graph.load import image_tensors, nhwc_transpose, normalize
from onnxgenie.stages import PARITY_LEVEL
from onnxgenie.quant.init import image_range
from onnxgenie.runtime import predict

DATA = Path(__file__).parent / "data" / "exporters"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# file -> (BN layers the front end reads, what inspect must say when there are none)
ROWS = {
    "torchscript_bn": (15, None),         # TorchScript exporter, opset 17, BN kept (the README's recipe)
    "dynamo_bn_dynamic": (15, None),      # torch.export, optimize=False, opset 20, dynamic batch
    "dynamo_bn_static": (15, None),       # the same at a fixed batch of 2
    "dynamo_folded": (0, "optimize=False"),   # torch.export's default optimiser folds every BN
    "timm_zero_gamma": (15, None),        # timm resnet-d layout, zero_init_last: 4 BN with gamma 0
    "keras3_tf2onnx": (0, "KERAS_BACKEND=torch"),  # NHWC, BN merged by TF constant folding
    "tfkeras_bn": (3, None),              # tf-keras, tf2onnx without remove_back_to_back: BN kept, NHWC
    "tfkeras_folded": (0, "remove_back_to_back"),  # tf-keras, tf2onnx defaults: Conv+BN fused
    "keras3_torch": (3, None),            # Keras 3 on torch, TorchScript without constant folding: NHWC, BN as ops
    "torchscript_batch_arith": (1, None),  # dynamic batch taking part in a Reshape target: x.reshape(n * c, -1)
    "dynamo_batch_arith_dynamic": (1, None),  # the same net by torch.export, dynamic_shapes=({0: Dim("N")},)
}
# a fixed batch that cannot be made dynamic: the same net by torch.export at batch 2 (reshape to [16, -1])
FIXED_BATCH_IN_ARITHMETIC = "dynamo_batch_arith_static"
WRITTEN_AS_OPS = {"keras3_torch"}         # BN layers the file holds as arithmetic, not BatchNormalization nodes
TINY = dict(calib_images=8, holdout_images=0, distill_iters=2, distill_batch=8, recon_iters=2, recon_batch=4,
            recon_candidates=1, recon_augment="none", jobs=1, threads=1, progress=False)


def _model(row: str) -> onnx.ModelProto:
    return onnx.load(str(DATA / f"{row}.onnx"))


def _batch(model: onnx.ModelProto) -> int:
    return model.graph.input[0].type.tensor_type.shape.dim[0].dim_value  # 0: symbolic


def _images(model: onnx.ModelProto, n: int, seed: int = 0) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(seed).standard_normal((n, *dims)).astype(np.float32)


def _uint8_data(tmp_path: Path, model: onnx.ModelProto, n: int = 16) -> Path:
    """Random uint8 NHWC images labelled with the FP32 model's answers (so its top-1 is 100 %)."""
    nhwc = nhwc_transpose(model) is not None
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    h, w = (dims[0], dims[1]) if nhwc else (dims[1], dims[2])
    images = np.random.default_rng(1).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    x = (images.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
    x = x if nhwc else x.transpose(0, 3, 1, 2)
    step = _batch(model) or n
    labels = np.concatenate([predict(model, np.ascontiguousarray(x[i:i + step]), batch_size=step).argmax(1)
                             for i in range(0, n, step)])
    path = tmp_path / "data.npz"
    np.savez(path, images=images, labels=labels)
    return path


@pytest.mark.parametrize("row", sorted(ROWS))
def test_front_end_reads_the_export_exactly(row):
    original = _model(row)
    normal = normalize(original)
    assert len(bn_layers(normal)) == ROWS[row][0]
    nodes = sum(n.op_type == "BatchNormalization" for n in original.graph.node)
    assert nodes == (0 if row in WRITTEN_AS_OPS else ROWS[row][0])
    assert not normal.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value"), "batch must be dynamic"
    fixed = _batch(original)
    for batch in ((fixed,) if fixed else (1, 3)):
        x = _images(original, batch, seed=batch)
        np.testing.assert_allclose(fixtures.run(normal, x), fixtures.run(original, x), rtol=0, atol=1e-5)
    if fixed:  # the fixed-batch export runs at any batch once normalised
        x = _images(original, 2 * fixed + 1)
        want = np.concatenate([fixtures.run(original, x[i:i + fixed]) for i in range(0, 2 * fixed, fixed)])
        np.testing.assert_allclose(fixtures.run(normal, x)[:2 * fixed], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("row", sorted(ROWS))
def test_inspect_verdict(row, capsys):
    assert main(["inspect", str(DATA / f"{row}.onnx")]) == 0
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    advice = ROWS[row][1]
    if advice is None:
        assert verdict == "zero-shot ready: yes"
    else:
        assert verdict.startswith("zero-shot ready: no - the model has its BN folded into the convolutions")
        assert "--calib-data" in verdict and advice in verdict


@pytest.mark.parametrize("row", [r for r, (_, advice) in ROWS.items() if advice is not None])
def test_folded_export_is_refused_zero_shot_with_both_ways_out(row, tmp_path, capsys):
    code = main(["quantize", str(DATA / f"{row}.onnx"), "-o", str(tmp_path / "q.onnx"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "BN folded into the convolutions" in err and "--calib-data" in err and ROWS[row][1] in err
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("row", sorted(ROWS))
def test_tiny_quantize_parity_and_eval(row, tmp_path, capsys):
    original = _model(row)
    data = _uint8_data(tmp_path, original)
    nhwc = nhwc_transpose(original) is not None
    bits = dict(wbits=8, abits=8) if nhwc else dict(wbits=4, abits=4)  # W8A8 quantizes the (NHWC) image
    zero_shot = ROWS[row][1] is None
    out = tmp_path / "q.onnx"
    result = onnxgenie.quantize(str(DATA / f"{row}.onnx"), out, calib_data=None if zero_shot else str(data),
                                mean=MEAN, std=STD, **bits, **TINY)
    assert result.report["calibration"]["source"] == ("distill" if zero_shot else "data")
    # the exported QDQ model reproduces the fake-quant simulation, checked here on fresh images
    x = result.calibration[:4]
    sim, qdq = (predict(m, x, level=PARITY_LEVEL) for m in (result.simulation, result.model))
    assert np.abs(sim - qdq).max() <= 1e-4 * max(float(np.ptp(sim)), 1e-12)
    if nhwc:  # the image quantizer sits after the Transpose and takes its range from --mean/--std
        image = image_tensors(normalize(original))[-1]
        lo, hi = image_range(None, MEAN, STD)
        assert result.plan.acts[image].scale == pytest.approx(max(abs(lo), abs(hi)) / 127, rel=1e-6)
        assert result.report["calibration"]["image_range_from"] == "--mean/--std"
    capsys.readouterr()
    flags = ["--data", str(data), "--mean", *map(str, MEAN), "--std", *map(str, STD)]
    assert main(["eval", str(DATA / f"{row}.onnx"), *flags]) == 0
    assert capsys.readouterr().out.startswith("top-1 100.00 % on 16 images")
    assert main(["eval", str(out), *flags, "--reference", str(DATA / f"{row}.onnx"), "--json"]) == 0
    assert "agreement" in capsys.readouterr().out


def test_timm_zero_gammas_are_there_and_distil():
    layers = bn_layers(normalize(_model("timm_zero_gamma")))
    assert sum(bool(np.all(b.gamma == 0)) for b in layers) == 4   # each block's last BN (zero_init_last)


def test_keras3_bn_statistics_are_read_from_its_arithmetic():
    """Each BN layer the front end finds holds one Keras layer's weights exactly, and Keras's epsilon."""
    original = _model("keras3_torch")
    weights = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    keras_layers = sorted({n.rsplit("/", 1)[0] for n in weights if n.endswith("/moving_mean")})
    layers = bn_layers(normalize(original))
    assert len(layers) == len(keras_layers) == 3
    for layer in layers:
        keras = next(k for k in keras_layers if np.array_equal(weights[f"{k}/moving_mean"], layer.mean))
        for role, name in (("var", "moving_variance"), ("gamma", "gamma"), ("beta", "beta")):
            np.testing.assert_array_equal(getattr(layer, role), weights[f"{keras}/{name}"])
        assert layer.eps == pytest.approx(1e-3, rel=1e-6)   # keras.layers.BatchNormalization's default
        assert layer.producer_op == "Conv"   # the Casts and the NHWC Transpose pair around it are gone


@pytest.mark.parametrize("variant", sorted(fixtures.BN_ARITHMETIC))
def test_bn_written_as_arithmetic_is_read_as_bn(variant, tmp_path, capsys):
    reference = fixtures.conv_bn_net()   # the same net with BatchNormalization nodes
    model = fixtures.bn_as_arithmetic(variant)
    path = fixtures.save(model, tmp_path)
    assert main(["inspect", str(path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "zero-shot ready: yes"
    want = {b.name: b for b in bn_layers(reference)}
    got = {b.name: b for b in bn_layers(normalize(model))}
    assert got.keys() == want.keys()
    for name, layer in got.items():
        for role in ("mean", "var", "gamma", "beta"):
            np.testing.assert_array_equal(getattr(layer, role), getattr(want[name], role))
        assert layer.eps == want[name].eps and layer.producer_op == want[name].producer_op
    x = fixtures.random_input(model, 3)
    np.testing.assert_allclose(fixtures.run(normalize(model), x), fixtures.run(model, x), rtol=0, atol=1e-5)
    result = onnxgenie.quantize(str(path), tmp_path / "q.onnx", **TINY)
    assert result.report["calibration"]["source"] == "distill"
    sim, qdq = (predict(m, result.calibration[:4], level=PARITY_LEVEL) for m in (result.simulation, result.model))
    assert np.abs(sim - qdq).max() <= 1e-4 * max(float(np.ptp(sim)), 1e-12)


def test_arithmetic_that_is_not_bn_stays_as_it_is():
    """(x - mean) * Sqrt(var + eps) * gamma + beta (a multiplication where BN divides) is no BN."""
    model = fixtures.bn_as_arithmetic("div_nchw")
    for node in model.graph.node:
        if node.op_type == "Div":
            node.op_type = "Mul"
    normal = normalize(model)
    assert not bn_layers(normal) and not any(n.op_type == "BatchNormalization" for n in normal.graph.node)
    x = fixtures.random_input(model, 2)
    np.testing.assert_allclose(fixtures.run(normal, x), fixtures.run(model, x), rtol=1e-6, atol=1e-5)


def test_bn_constants_the_exporter_stored_once_are_read_per_role():
    """A fresh layer's zero mean and beta (and unit var and gamma) saved as one tensor each, read
    through Identity nodes, as the TorchScript exporter deduplicates them."""
    model = fixtures.bn_as_arithmetic("rsqrt_nchw")
    shared = {"mean": "zeros", "beta": "zeros", "var": "ones", "gamma": "ones"}
    inits = {t.name: t for t in model.graph.initializer}
    for role, name in shared.items():
        model.graph.initializer.remove(inits[f"stem.bn/{role}"])
        model.graph.node.insert(0, onnx.helper.make_node("Identity", [name], [f"stem.bn/{role}"]))
    model.graph.initializer.extend([numpy_helper.from_array(np.zeros((1, 8, 1, 1), np.float32), "zeros"),
                                    numpy_helper.from_array(np.ones((1, 8, 1, 1), np.float32), "ones")])
    normal = normalize(model)
    stem = next(b for b in bn_layers(normal) if b.name == "stem.bn")
    assert [float(np.abs(getattr(stem, r) - v).max()) for r, v in (("mean", 0), ("beta", 0), ("var", 1), ("gamma", 1))] \
        == [0, 0, 0, 0] and len(bn_layers(normal)) == 4
    x = fixtures.random_input(model, 2)
    np.testing.assert_allclose(fixtures.run(normal, x), fixtures.run(model, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("command", ["inspect", "quantize"])
def test_fixed_batch_in_arithmetic_is_refused_with_the_exporters_fix(command, tmp_path, capsys):
    """At another batch its Reshape splits the images differently: the normal form would compute other
    logits than the file, so it is refused, with the re-export calls that give the dynamic rows above."""
    path = DATA / f"{FIXED_BATCH_IN_ARITHMETIC}.onnx"
    out = ["-o", str(tmp_path / "q.onnx"), "-q"] if command == "quantize" else []
    assert main([command, str(path), *out]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "fixed batch size of 2 that cannot be made dynamic" in err
    assert "at batch 1 it computes other outputs than the file does 2 at a time" in err
    assert "dynamic_shapes=({0: torch.export.Dim('N')},)" in err   # the call that made dynamo_batch_arith_dynamic
    assert "dynamic_axes={'input': {0: 'N'}, 'logits': {0: 'N'}}" in err   # and torchscript_batch_arith
    assert not (tmp_path / "q.onnx").exists()
