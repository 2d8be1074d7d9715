"""The product surface of ``onnxgenie quantize``: presets, the report, the quality gate, quiet mode,
the default output path and the Python API."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import fixtures
import onnxgenie
from onnxgenie.cli import main
from onnxgenie.config import PRESETS, QuantizeConfig, preset_config
from onnxgenie.errors import BadInputError, QualityGateError
from onnxgenie.graph.load import image_io, normalize
from onnxgenie.runtime import predict

# Init-only on Gaussian-noise calibration: seconds, and the held-out images can be recomputed here.
NOISE = ["--wbits", "4", "--abits", "4", "--no-reconstruct", "--calib", "noise", "--calib-images", "24",
         "--holdout-images", "40", "--seed", "3"]


def noise_holdout(model: onnx.ModelProto, n: int, m: int, seed: int) -> np.ndarray:
    chw = image_io(normalize(model)).chw
    return np.random.default_rng(seed).standard_normal((n + m, *chw)).astype(np.float32)[n:]


def test_presets_and_overrides():
    fast = preset_config("fast")
    assert fast.reconstruct is None and fast.preset == "fast"   # the model's cost decides (config.FAST_BUDGET)
    assert {k: getattr(fast, k) for k in PRESETS["fast"]} == PRESETS["fast"]
    paper = preset_config("paper", recon_iters=7, lam=None)
    assert paper.recon_iters == 7 and paper.distill_iters == 4000 and paper.lam is None
    assert QuantizeConfig().reconstruct is False  # the bare config is init-only
    with pytest.raises(BadInputError, match="unknown preset 'slow'"):
        preset_config("slow")
    with pytest.raises(TypeError, match="recon_itrs"):
        preset_config("fast", recon_itrs=3)


def test_report_holds_what_it_claims(tmp_path, capsys):
    model = fixtures.conv_bn_net()
    src = fixtures.save(model, tmp_path)
    out, report_file = tmp_path / "q.onnx", tmp_path / "report.json"
    code = main(["quantize", str(src), "-o", str(out), *NOISE, "--report", str(report_file),
                 "--workdir", str(tmp_path / "work")])
    assert code == 0, capsys.readouterr().err
    report = json.loads(report_file.read_text())
    assert json.loads((tmp_path / "work" / "report.json").read_text()) == report
    assert report["config"]["wbits"] == 4 and report["seed"] == 3 and report["output"] == str(out)
    assert {"onnxgenie", "onnx", "onnxruntime", "numpy", "python"} <= set(report["versions"])
    assert list(report["stages"]) == ["prepare", "init", "export"]
    assert all(s["wall_s"] >= 0 and s["peak_rss_mib"] > 0 for s in report["stages"].values())
    # the agreement recomputed from the written model on the same held-out noise images
    quantized = onnx.load(str(out))
    held = noise_holdout(model, 24, 40, seed=3)
    expected = 100 * float((predict(model, held).argmax(1) == predict(quantized, held).argmax(1)).mean())
    assert report["agreement"] == {"top1_agreement": round(expected, 2), "images": 40, "on": "held-out"}
    assert report["calibration"] == {"source": "noise", "images": 24, "holdout_images": 40}
    # one SQNR per quantized weight, and the file sizes are the real ones
    assert set(report["weight_sqnr_db"]) == {n.name for n in normalize(model).graph.node if n.op_type == "Conv"} | \
        {n.name for n in normalize(model).graph.node if n.op_type in ("Gemm", "MatMul")}
    assert report["size"]["quantized_bytes"] == out.stat().st_size
    assert report["size"]["fp32_bytes"] == src.stat().st_size


@pytest.mark.parametrize("threshold,code", [(0.0, 0), (100.0, 3)])   # this run agrees on 75 % (30 of 40)
def test_quality_gate(tmp_path, capsys, threshold, code):
    src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    out = tmp_path / "q.onnx"
    report_file = tmp_path / "r.json"
    got = main(["quantize", str(src), "-o", str(out), *NOISE, "--min-agreement", str(threshold),
                "--report", str(report_file), "--quiet"])
    err = capsys.readouterr().err
    assert got == code, err
    report = json.loads(report_file.read_text())
    assert report["gate"] == {"min_agreement": threshold, "passed": code == 0, "on": "held-out"}
    if code == 0:
        assert out.exists() and err == ""          # --quiet: nothing but errors on stderr
    else:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "below --min-agreement 100;" in lines[0] and "no model written" in lines[0]
        assert f"is {report['agreement']['top1_agreement']:.2f} % on 40 held-out images" in lines[0]
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "r.json"]


def test_default_output_beside_the_input(tmp_path, capsys):
    src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    assert main(["quantize", str(src), *NOISE, "--quiet"]) == 0, capsys.readouterr().err
    assert (tmp_path / "model_w4a4.onnx").is_file()
    assert main(["quantize", str(src), *NOISE, "--quiet"]) == 2   # exists now: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_python_api_writes_what_it_returns(tmp_path):
    model = fixtures.conv_bn_net()
    calib = fixtures.random_input(model, 24, seed=1)
    before = model.SerializeToString()
    result = onnxgenie.quantize(model, tmp_path / "q.onnx", wbits=4, abits=8, calib_data=calib, seed=1,
                                progress=False, recon_iters=4, recon_batch=8)
    assert model.SerializeToString() == before                   # the input model is not modified
    assert (tmp_path / "q.onnx").read_bytes() == result.model.SerializeToString()
    assert result.report["reconstruction"]["blocks"] and result.report["calibration"]["images"] == 24
    assert result.agreement == result.report["agreement"]["top1_agreement"]
    assert result.report["agreement"]["on"] == "calibration"     # an array gives no held-out images
    np.testing.assert_array_equal(result.calibration, calib)
    with pytest.raises(QualityGateError) as err:
        onnxgenie.quantize(model, tmp_path / "gated.onnx", calib_data=calib, progress=False, reconstruct=False,
                           min_agreement=100.0)   # it agrees on 58 % of these images
    assert err.value.report["gate"]["passed"] is False and not (tmp_path / "gated.onnx").exists()
    noise = onnxgenie.quantize(model, calib="noise", calib_images=16, progress=False, reconstruct=False)
    assert noise.report["calibration"]["source"] == "noise"   # like --calib noise (was a TypeError)
    with pytest.raises(BadInputError, match="calib_data"):
        onnxgenie.quantize(model, calib="noise", calib_data=calib, progress=False)


def test_outputs_get_ordinary_permissions(tmp_path, capsys):
    """Model and report are written through a temporary file, but end up like any file the user writes."""
    import os

    src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["quantize", str(src), "-o", str(out), *NOISE, "--quiet", "--report", str(report)]) == 0
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == (report.stat().st_mode & 0o777) == 0o666 & ~mask


@pytest.mark.parametrize("name", ["maxpool", "relu6", "silu", "hardswish", "prelu"])
def test_zero_shot_on_other_architectures_runs_at_every_onnxruntime_level(name, tmp_path):
    """MaxPool, ReLU6, SiLU, HardSwish, PRelu: GENIE-D and GENIE-M train through them (HardSwish and
    PRelu have no gradient in onnxruntime-training: rewritten), every block is learned, and the
    written model loads and matches the simulation at onnxruntime's highest optimisation level."""
    import onnxruntime as ort

    model = getattr(fixtures, name)()
    result = onnxgenie.quantize(model, tmp_path / "q.onnx", wbits=4, abits=4, progress=False, jobs=1,
                                calib_images=16, holdout_images=0, distill_iters=6, distill_batch=16,
                                recon_iters=6, recon_batch=8)
    failed = [b["status"] for b in result.report["reconstruction"]["blocks"] if "failed" in b["status"]]
    assert not failed
    x = fixtures.random_input(model, 32, seed=4)
    sim = predict(result.simulation, x)
    written = onnx.load(str(tmp_path / "q.onnx"))
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        y = predict(written, x, level=level)
        assert np.isfinite(y).all() and (y.argmax(1) == sim.argmax(1)).mean() >= 0.9


# onnxruntime quantize_static conventions ------------------------------------------------------------

class _Reader:
    """What onnxruntime's CalibrationDataReader gives: {input_name: batch} until None."""

    def __init__(self, name: str, x: np.ndarray, batch: int):
        self.batches = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


def test_calib_data_takes_a_reader_an_iterable_and_an_npz_keyed_by_input_name(tmp_path):
    model = fixtures.nhwc_input()   # NHWC: each form holds the images as the model takes them
    x = np.random.default_rng(0).standard_normal((12, fixtures.HW, fixtures.HW, fixtures.C_IN)).astype(np.float32)
    settings = dict(wbits=4, abits=4, reconstruct=False, progress=False, threads=1)
    want = onnxgenie.quantize(model, calib_data=x, **settings).model.SerializeToString()
    np.savez(tmp_path / "calib.npz", input=x)
    for data in (_Reader("input", x, 5), [{"input": x[i:i + 4]} for i in range(0, 12, 4)],
                 str(tmp_path / "calib.npz")):
        result = onnxgenie.quantize(model, calib_data=data, holdout_images=0, **settings)
        assert result.model.SerializeToString() == want, type(data)
    with pytest.raises(BadInputError, match="each item must be"):
        onnxgenie.quantize(model, calib_data=[{"a": x, "b": x}], **settings)
    np.savez(tmp_path / "other.npz", pixels=x)
    with pytest.raises(BadInputError, match="it needs 'images' \\(or the model's input name 'input'\\)"):
        onnxgenie.quantize(model, calib_data=str(tmp_path / "other.npz"), **settings)


def _planned_ops(out: str, folded) -> list[str]:
    """Op types of the weight quantizers `inspect --plan` lists."""
    ops = {n.name: n.op_type for n in folded.graph.node}
    return [ops[line.split()[4]] for line in out.splitlines() if line.startswith("  W")]


def test_op_types_and_exclude_mean_what_onnxruntime_means(tmp_path, capsys):
    from onnxgenie.pipeline import prepare

    model = fixtures.gemm_head()
    src, folded = fixtures.save(model, tmp_path), prepare(model)[1]
    assert main(["inspect", str(src), "--plan"]) == 0
    full = _planned_ops(capsys.readouterr().out, folded)
    assert main(["inspect", "--op-types", "Conv", str(src), "--plan"]) == 0   # the model path is not swallowed
    only_conv = _planned_ops(capsys.readouterr().out, folded)
    assert "Gemm" in full and set(only_conv) == {"Conv"} and len(only_conv) == full.count("Conv")
    assert main(["inspect", "--exclude", "x,y", "--high-bits", "z", str(src), "--plan"]) == 2
    assert "--exclude names no node of the model: x, y" in capsys.readouterr().err
    assert main(["inspect", str(src), "--plan", "--op-types", "Relu"]) == 2
    assert "matches no quantizable node" in capsys.readouterr().err


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"onnxgenie {onnxgenie.__version__}"
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "weight bits, 2-8 (default: 4)" in text and "activation bits, 4-8 (default: 4)" in text
    assert "--holdout-images" in text.split("--min-agreement P")[-1]   # the gate's help recommends them


def test_a_log_gets_stage_lines_not_progress_bars(tmp_path, capsys):
    src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    code = main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--calib-images", "8", "--distill-iters", "3",
                 "--recon-iters", "3", "--recon-batch", "4", "--jobs", "1", "--threads", "1",
                 "--min-agreement", "0"])
    err = capsys.readouterr().err   # captured: not a terminal
    assert code == 0 and "\r" not in err and "it/s" not in err and "step/s" not in err
    lines = err.strip().splitlines()
    assert [line.split(":")[1].strip() for line in lines[:-1]] == ["distill", "init", "reconstruct", "export"]
    assert "on 8 calibration images (optimistic" in lines[-2]


def test_distilled_images_from_a_file_take_their_image_range_from_mean_and_std(tmp_path, capsys):
    """A file written by `onnxgenie distill` holds preprocessed float images; --mean/--std then give the
    8-bit image quantizer its exact range instead of being refused."""
    model = fixtures.conv_bn_net()
    src = fixtures.save(model, tmp_path)
    images = np.tanh(np.random.default_rng(0).standard_normal((16, *image_io(normalize(model)).chw)))
    data = tmp_path / "distilled.npz"
    np.savez(data, images=images.astype(np.float32), loss_history=np.zeros((1, 3), np.float32))
    report = tmp_path / "r.json"
    code = main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--wbits", "8", "--abits", "8",
                 "--no-reconstruct", "--calib-data", str(data), "--mean", "0.5", "0.5", "0.5", "--std", "0.25",
                 "0.25", "0.25", "--quiet", "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    calibration = json.loads(report.read_text())["calibration"]
    assert calibration["image_range_from"] == "--mean/--std"
    assert calibration["image_range"] == [-2.0, 2.0]   # (0 - 0.5) / 0.25 and (1 - 0.5) / 0.25
