"""``onnxgenie inspect`` through the CLI: JSON output, and every bad input ends with
exit code 2 and one line on stderr (no traceback), leaving the input file untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import fixtures
from conftest import REPO
from onnxgenie.cli import main


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["inspect", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, out: str, err: str, *words: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxgenie: error: "), err
    assert "Traceback" not in err and out == ""
    for word in words:
        assert word in lines[0], lines[0]


def test_json_output(capsys, tmp_path):
    path = fixtures.save(fixtures.bn_after_add(), tmp_path)
    before = path.read_bytes()
    code, out, err = _cli(capsys, path, "--json")
    assert code == 0 and err == ""
    info = json.loads(out)
    assert info["zero_shot_ready"] is True and info["reason"] is None
    assert info["image"] == {"input": "input", "chw": [3, 8, 8], "output": "logits", "classes": 10}
    assert [b["producer_op"] for b in info["bn_layers"]] == ["Conv", "Conv", "Add", "Conv", "Gemm"]
    assert info["strided_convs"] == ["down.conv"]
    assert path.read_bytes() == before


def test_text_summary(capsys, tmp_path):
    code, out, _ = _cli(capsys, fixtures.save(fixtures.opset21(), tmp_path))
    assert code == 0
    assert out.startswith("opset 21, IR 10") and "BatchNormalization layers: 4" in out
    assert "zero-shot ready: yes" in out


def test_no_bn_is_reported_not_refused(capsys, tmp_path):
    code, out, err = _cli(capsys, fixtures.save(fixtures.no_bn(), tmp_path), "--json")
    assert code == 0 and err == ""
    info = json.loads(out)
    assert info["zero_shot_ready"] is False and info["bn_layers"] == []
    for words in ("do_constant_folding=False", "TrainingMode.PRESERVE", "--calib-data"):
        assert words in info["reason"]


@pytest.mark.parametrize("node,ready", [("block.relu", False), ("fc1.relu", True)])
def test_op_without_gradient_before_a_bn_is_reported(capsys, tmp_path, node, ready):
    """A Floor between the image and a BN stops distillation (exit 2 there); after the last BN it does not."""
    model = fixtures.conv_bn_net()
    next(n for n in model.graph.node if n.name == node).op_type = "Floor"
    code, out, err = _cli(capsys, fixtures.save(model, tmp_path), "--json")
    info = json.loads(out)
    assert code == 0 and info["zero_shot_ready"] is ready
    if not ready:
        assert info["reason"].startswith(f"Floor (node {node}) has no gradient") and "--calib-data" in info["reason"]


def test_dynamic_hw_with_input_size(capsys, tmp_path):
    code, out, _ = _cli(capsys, fixtures.save(fixtures.dynamic_hw(), tmp_path), "--json", "--input-size", "8", "8")
    assert code == 0 and json.loads(out)["image"]["chw"] == [3, 8, 8]
    code, out, _ = _cli(capsys, fixtures.save(fixtures.dynamic_hw(), tmp_path), "--json", "--input-size", "8", "8",
                        "--plan", "--blocks")
    info = json.loads(out)
    assert code == 0 and info["plan"] and info["blocks"]


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _not_a_model() -> bytes:
    """A valid protobuf message, but a TensorProto rather than a ModelProto."""
    return helper.make_tensor("t", onnx.TensorProto.FLOAT, [4], np.arange(4, dtype=np.float32)).SerializeToString()


BAD_FILES = {
    "missing": (lambda tmp: tmp / "missing.onnx", ("no such file",)),
    "directory": (lambda tmp: tmp, ("directory",)),
    "empty": (lambda tmp: _write(tmp, "empty.onnx", b""), ("empty",)),
    "random_bytes": (lambda tmp: _write(tmp, "random.onnx", np.random.default_rng(0).bytes(3000)), ("re-export",)),
    "truncated": (lambda tmp: _write(tmp, "cut.onnx", fixtures.opset17().SerializeToString()[:1500]),
                  ("re-export",)),
    "not_a_model": (lambda tmp: _write(tmp, "tensor.onnx", _not_a_model()), ("re-export",)),
    "model_without_graph": (lambda tmp: _write(tmp, "nograph.onnx",
                                               onnx.ModelProto(producer_name="x").SerializeToString()),
                            ("no ONNX graph",)),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_unreadable_inputs_exit_2(capsys, tmp_path, case):
    make_path, words = BAD_FILES[case]
    path = make_path(tmp_path)
    before = path.read_bytes() if path.is_file() else None
    code, out, err = _cli(capsys, path)
    _assert_one_line_error(code, out, err, *words)
    if before is not None:
        assert path.read_bytes() == before


@pytest.mark.parametrize("name, words", [("two_inputs", ("2 inputs", "single input")),
                                         ("int64_input", ("INT64", "float32")),
                                         ("dynamic_hw", ("--input-size",)),
                                         ("custom_op", ("com.example::FancyRelu", "standard ONNX ops")),
                                         ("fixed_batch_baked_constant", ("fixed batch size", "dynamic_axes"))])
def test_unsupported_models_exit_2(capsys, tmp_path, name, words):
    path = fixtures.save(fixtures.REFUSED[name](), tmp_path)
    before = path.read_bytes()
    code, out, err = _cli(capsys, path, "--json")
    _assert_one_line_error(code, out, err, *words)
    assert path.read_bytes() == before


def test_shared_model_json(capsys, shared):
    code, out, _ = _cli(capsys, shared / "models" / "resnet20_cifar10.onnx", "--json")
    info = json.loads(out)
    assert code == 0 and len(info["bn_layers"]) == 19 and len(info["strided_convs"]) == 2


def _subprocess(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "onnxgenie.cli", "inspect", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_subprocess_json_and_error(tmp_path):
    ok = _subprocess(fixtures.save(fixtures.depthwise(), tmp_path), "--json")
    assert ok.returncode == 0, ok.stderr
    info = json.loads(ok.stdout)
    assert info["zero_shot_ready"] is True and len(info["bn_layers"]) == 4
    bad = _subprocess(_write(tmp_path, "empty.onnx", b""))
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_external_weight_data(capsys, tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(fixtures.opset17(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    code, out, _ = _cli(capsys, path, "--json")
    assert code == 0 and len(json.loads(out)["bn_layers"]) == 4
    (tmp_path / "ext.data").unlink()
    code, out, err = _cli(capsys, path)
    _assert_one_line_error(code, out, err, "external weight data", "next to the model")
