"""The run report: weight SQNR against a hand computation, top-1 agreement, sizes, versions, and the JSON
and HTML writers (strict JSON round trip, self-contained page, missing sections left out)."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import fixtures
from onnxgenie.distill.preview import grid_png, save_grid
from onnxgenie.graph.bn import fold_bn
from onnxgenie.graph.load import normalize
from onnxgenie.quant.init import init_weights
from onnxgenie.quant.plan import build_plan
from onnxgenie.quant.spec import QuantPlan, WeightQuant
from onnxgenie.report import (SQNR_CAP_DB, model_sizes, to_jsonable, top1_agreement, versions, weight_sqnr,
                              write_html, write_json)

PNG = "data:image/png;base64,"


def _weights_model(**weights: np.ndarray) -> onnx.ModelProto:
    """A ModelProto that only holds the given float initializers (enough for weight_sqnr)."""
    inits = [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()]
    return helper.make_model(helper.make_graph([], "weights", [], [], initializer=inits))


def test_weight_sqnr_matches_hand_computation():
    w = np.array([[1.0, -0.5, 0.25], [2.0, 0.0, -2.0]], np.float32)
    lossy = WeightQuant("conv_a", "a.weight", bits=4, scale=np.array([0.5, 1.0], np.float32),
                        zero_point=np.zeros(2, np.int32), wint=np.array([[2, -1, 0], [2, 0, -2]], np.int32))
    exact = WeightQuant("conv_b", "b.weight", bits=4, scale=np.array([0.5, 1.0], np.float32),
                        zero_point=np.array([1, 3], np.int32), wint=np.array([[3, 0, 1], [5, 3, 1]], np.int32))
    w_b = exact.dequantized()  # a weight on the grid: quantized without error
    missing = WeightQuant("conv_c", "c.weight", bits=4)  # no integers yet: left out
    plan = QuantPlan(weights={"conv_a": lossy, "conv_b": exact, "conv_c": missing})
    sqnr = weight_sqnr(_weights_model(**{"a.weight": w, "b.weight": w_b, "c.weight": w}), plan)
    # only w[0, 2] = 0.25 is lost (quantized to 0): signal 9.3125, noise 0.0625
    assert sqnr["conv_a"] == round(10 * math.log10(9.3125 / 0.0625), 2) == 21.73
    assert sqnr["conv_b"] == SQNR_CAP_DB
    assert "conv_c" not in sqnr


def test_weight_sqnr_grows_with_bits():
    folded = fold_bn(normalize(fixtures.conv_bn_net()))
    by_bits = {}
    for bits in (2, 4, 8):
        plan = init_weights(folded, build_plan(folded, bits, 8))
        by_bits[bits] = (weight_sqnr(folded, plan), {n for n, wq in plan.weights.items() if wq.bits == bits})
    middle = by_bits[2][1]  # first and last layers stay 8-bit
    assert middle and set(by_bits[2][0]) == set(by_bits[8][0]) == set(by_bits[8][1])
    for layer in middle:
        assert by_bits[8][0][layer] > by_bits[4][0][layer] > by_bits[2][0][layer] > 0, layer
    assert all(isinstance(v, float) and v == round(v, 2) for v in by_bits[4][0].values())


def _linear_classifier(w: np.ndarray) -> onnx.ModelProto:
    """x [N, 3, 2, 2] -> Flatten -> MatMul w [12, K]: logits."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", w.shape[1]])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_top1_agreement():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 5)).astype(np.float32)
    x = rng.standard_normal((300, 3, 2, 2)).astype(np.float32)
    model = _linear_classifier(w)
    assert top1_agreement(model, model, x) == 100.0
    # classes 0 and 1 swapped: the models agree exactly where the argmax is another class
    swapped = _linear_classifier(w[:, [1, 0, 2, 3, 4]])
    pred = (x.reshape(len(x), -1) @ w).argmax(axis=1)
    expected = round(100.0 * float(np.isin(pred, [2, 3, 4]).mean()), 2)
    assert 0 < top1_agreement(model, swapped, x) == expected < 100
    # a cyclic shift has no fixed class: never the same argmax
    assert top1_agreement(model, _linear_classifier(np.roll(w, 1, axis=1)), x) == 0.0


def test_model_sizes_and_versions(tmp_path):
    rng = np.random.default_rng(1)
    big, small = _linear_classifier(rng.standard_normal((12, 400))), _linear_classifier(rng.standard_normal((12, 4)))
    path = tmp_path / "big.onnx"
    onnx.save(big, str(path))
    sizes = model_sizes(path, small)
    assert sizes == model_sizes(big, small)
    assert sizes["fp32_bytes"] == path.stat().st_size == len(big.SerializeToString())
    assert sizes["quantized_bytes"] == len(small.SerializeToString())
    assert sizes["ratio"] == round(sizes["fp32_bytes"] / sizes["quantized_bytes"], 3) > 10
    v = versions()
    assert set(v) == {"onnxgenie", "python", "numpy", "onnx", "onnxruntime", "platform", "cpu_count"}
    assert v["onnx"] == onnx.__version__ and v["numpy"] == np.__version__
    json.dumps(v)


def test_json_round_trips_numpy_types(tmp_path):
    report = {"agreement": np.float32(87.5), "images": np.int64(3), "ok": np.bool_(True),
              "curve": np.arange(6, dtype=np.float32).reshape(2, 3), "shape": (1, 2), "where": Path("a/b.onnx"),
              "diverged": float("nan"), "stats": {1: np.float64(0.25)}, "batches": {2, 0}}
    path = write_json(report, tmp_path / "report.json")
    back = json.loads(path.read_text())
    assert back == {"agreement": 87.5, "images": 3, "ok": True, "curve": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]],
                    "shape": [1, 2], "where": "a/b.onnx", "diverged": None, "stats": {"1": 0.25}, "batches": [0, 2]}
    assert type(back["images"]) is int and type(back["ok"]) is bool
    assert path.read_text().startswith('{\n "agreement"')  # indent=1
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left
    with pytest.raises(TypeError, match="object"):
        to_jsonable({"x": object()})


def _full_report(sqnr: dict) -> dict:
    rng = np.random.default_rng(2)
    return {"model": "net<1>.onnx", "config": {"wbits": 4, "abits": 4, "first_last_bits": 8, "preset": "fast"},
            "agreement": {"top1_agreement": np.float64(93.75), "images": 64, "on": "held-out"},
            "size": {"fp32_bytes": 4 * 2 ** 20, "quantized_bytes": 2 ** 20, "ratio": 4.0},
            "stages": {"distill": {"wall_s": 12.5, "peak_rss_mib": 300},
                       "reconstruct": {"wall_s": 30.0, "peak_rss_mib": 400}, "export": {"wall_s": 0.2}},
            "calibration": {"source": "distill", "images": 128, "holdout_images": 64,
                            "loss_history": np.abs(rng.standard_normal((2, 20))) + 0.1},
            "reconstruction": {"blocks": [{"name": "block0", "recon_first": 0.5, "recon_last": 0.1},
                                          {"name": "block1", "recon_first": None, "recon_last": None}],
                               "candidates": [{"seed": 0, "calibration_kl": 0.569, "chosen": False},
                                              {"seed": 1000, "calibration_kl": 0.4125, "chosen": True}]},
            "weight_sqnr_db": sqnr, "versions": versions()}


def _pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_html_has_every_section_self_contained(tmp_path):
    sqnr = {"conv1": 30.5, "conv2": 12.25, "fc": 41.0}
    images = np.random.default_rng(3).standard_normal((70, 3, 8, 8)).astype(np.float32)
    path = write_html(_full_report(sqnr), tmp_path / "report.html", images=images)
    text = path.read_text()
    assert text.count(PNG) == 4  # loss curves, reconstruction, SQNR, image grid
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in _pngs(text)) and len(_pngs(text)) == 4
    assert "http://" not in text and "https://" not in text
    assert "net&lt;1&gt;.onnx" in text and "net<1>" not in text  # escaped
    assert "W4A4, first/last 8" in text and "93.75" in text and "fast" in text
    assert "reconstruct" in text and "400" in text  # stage table: seconds and peak MiB
    assert "first 64 of 70" in text
    assert "<td>1000</td><td>0.41250</td><td>kept</td>" in text and "<td>0</td><td>0.56900</td><td></td>" in text
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_html_leaves_missing_sections_out(tmp_path):
    text = write_html({"model": "m.onnx"}, tmp_path / "a.html").read_text()
    assert PNG not in text and "m.onnx" in text
    sparse = {"calibration": {}, "weight_sqnr_db": {"conv": 20.0}, "size": {},
              "reconstruction": {"blocks": [{"name": "b0", "recon_first": None, "recon_last": None}]},
              "stages": {"distill": {"wall_s": 1.0}}}
    text = write_html(sparse, tmp_path / "b.html", images=np.zeros((0, 3, 8, 8), np.float32)).read_text()
    assert text.count(PNG) == 1 and "Weight SQNR" in text and "Reconstruction" not in text
    assert write_html({}, tmp_path / "c.html").read_text().count("<h2>") == 0


def test_grid_png_matches_save_grid(tmp_path):
    from PIL import Image

    images = np.random.default_rng(4).standard_normal((10, 1, 6, 5)).astype(np.float32)
    saved = Image.open(save_grid(images, tmp_path / "grid.png"))
    in_memory = Image.open(io.BytesIO(grid_png(images)))
    assert in_memory.size == saved.size == (8 * 7 * 2, 2 * 8 * 2)
    assert np.array_equal(np.asarray(in_memory), np.asarray(saved))
