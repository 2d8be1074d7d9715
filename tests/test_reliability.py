"""Bad input is refused in one line (exit 2) with nothing written, the input model is never touched,
no file is clobbered, the output appears only complete and checked, a model that is broken or whose
FP32 outputs are not finite is refused instead of quantized silently, divergence never reaches the
output, memory estimates lower --jobs, and Ctrl-C stops cleanly with a hint to resume.

The bad-input matrix runs ``onnxgenie.cli.main`` in-process (the same code path as the console
script, minus interpreter start-up); one case also runs as a real subprocess.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import fixtures
from conftest import DEFAULT_MODEL, REPO
from onnxgenie.cli import main
from onnxgenie.config import SETTINGS, Real, Whole

# Tiny budgets: a full zero-shot quantize of a fixture takes about a second.
TINY = ["--calib-images", "8", "--holdout-images", "8", "--distill-batch", "8", "--distill-iters", "3",
        "--recon-iters", "3", "--recon-batch", "4", "--jobs", "1"]


def cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def stamp(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


STAGE_SUMMARY = re.compile(r"^onnxgenie: (distill|init|reconstruct|export): ")


def error_lines(err: str) -> list[str]:
    """stderr lines that are not progress-bar redraws, notes or finished-stage summaries."""
    err = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err).replace("\r", "\n")
    return [ln for ln in err.splitlines() if ln.strip() and "onnxgenie: note:" not in ln
            and "it/s" not in ln and "step/s" not in ln and "%|" not in ln and not STAGE_SUMMARY.match(ln)]


# ------------------------------------------------------------------------------------------------
# The bad-input matrix: each case builds its files in tmp_path and returns the CLI arguments.

@dataclass
class Case:
    name: str
    build: Callable[[Path], tuple[list, Path | None, Path]]   # tmp -> (argv, input model or None, output)
    words: tuple[str, ...]                                   # all must appear in the message (lowercase)


def _quantize(src, out, *extra, bits=("--wbits", "4", "--abits", "4")):
    return ["quantize", src, "-o", out, *bits, *TINY, *extra]


def _model_file(model: onnx.ModelProto, name="model"):
    def build(tmp: Path, *extra, bits=("--wbits", "4", "--abits", "4")):
        src = fixtures.save(model, tmp, name)
        return _quantize(src, tmp / "out.onnx", *extra, bits=bits), src, tmp / "out.onnx"
    return build


def _raw_file(data: bytes | None, directory: bool = False):
    def build(tmp: Path):
        src = tmp / "model.onnx"
        if directory:
            src.mkdir()
        elif data is not None:
            src.write_bytes(data)
        return _quantize(src, tmp / "out.onnx"), (src if data is not None else None), tmp / "out.onnx"
    return build


def _opset6_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pool"]), helper.make_node("Flatten", ["pool"], ["logits"])],
        "old", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    return model


def _checker_failure() -> bytes:
    """A conv reading a tensor nothing produces: parses, but onnx.checker refuses it."""
    model = fixtures.conv_bn_net()
    model.graph.node[1].input[0] = "nowhere"
    return model.SerializeToString()


def _with_calib(images: np.ndarray, model=None):
    def build(tmp: Path):
        src = fixtures.save(model or fixtures.conv_bn_net(), tmp)
        data = tmp / "calib.npz"
        np.savez(data, images=images)
        return _quantize(src, tmp / "out.onnx", "--calib-data", data), src, tmp / "out.onnx"
    return build


def _out_is(kind: str):
    def build(tmp: Path):
        src = fixtures.save(fixtures.conv_bn_net(), tmp)
        if kind == "input":
            out = src
        elif kind == "missing_dir":
            out = tmp / "no" / "such" / "out.onnx"
        elif kind == "parent_is_file":
            (tmp / "afile").write_text("x")
            out = tmp / "afile" / "out.onnx"
        elif kind == "exists":
            out = tmp / "out.onnx"
            out.write_bytes(b"previous result")
        elif kind == "directory":
            out = tmp / "outdir"
            out.mkdir()
        return _quantize(src, out), src, out
    return build


def _read_only_dir(tmp: Path) -> Path:
    """A folder this process cannot create files in (chmod; as root, /sys), or skip."""
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for folder in (ro, Path("/sys")):
        try:
            (folder / ".probe").write_bytes(b"")
            (folder / ".probe").unlink()
        except OSError:
            return folder
    pytest.skip("no read-only folder available (root without /sys)")


def _not_writable(tmp: Path):
    src = fixtures.save(fixtures.conv_bn_net(), tmp)
    out = _read_only_dir(tmp) / "onnxgenie-test-out.onnx"
    return _quantize(src, out), src, out


def _workdir_not_writable(tmp: Path):
    return _model_file(fixtures.conv_bn_net())(tmp, "--workdir", _read_only_dir(tmp) / "onnxgenie-test-wd")


def _flags(*extra, bits=("--wbits", "4", "--abits", "4")):
    def build(tmp: Path):
        return _model_file(fixtures.conv_bn_net())(tmp, *extra, bits=bits)
    return build


def _workdir_is_file(tmp: Path):
    (tmp / "wd").write_text("not a folder")
    return _model_file(fixtures.conv_bn_net())(tmp, "--workdir", tmp / "wd")


_UINT8_NHWC = np.zeros((8, fixtures.HW, fixtures.HW, fixtures.C_IN), np.uint8)
_NAN = np.full((8, fixtures.C_IN, fixtures.HW, fixtures.HW), np.nan, np.float32)


def _calib_without_images(tmp: Path):
    src = fixtures.save(fixtures.conv_bn_net(), tmp)
    np.savez(tmp / "calib.npz", pixels=_UINT8_NHWC)
    return _quantize(src, tmp / "out.onnx", "--calib-data", tmp / "calib.npz"), src, tmp / "out.onnx"

def _clobber(kind: str):
    """An output path that is an existing file, an input or another output; ``out`` is what must survive."""
    def build(tmp: Path):
        src = fixtures.save(fixtures.conv_bn_net(), tmp)
        q = tmp / "out.onnx"
        if kind in ("report", "report_html"):
            out = tmp / ("r.json" if kind == "report" else "r.html")
            out.write_text("the user's own file")
            flag = "--report" if kind == "report" else "--report-html"
            return _quantize(src, q, flag, out), src, out
        if kind == "report_is_calib_data":
            out = tmp / "calib.npz"
            np.savez(out, images=_UINT8_NHWC)
            return _quantize(src, q, "--calib-data", out, "--report", out, "--overwrite"), src, out
        if kind == "report_is_output":
            return _quantize(src, q, "--report", q, "--overwrite"), src, q
        if kind == "html_is_report":
            return _quantize(src, q, "--report", tmp / "r", "--report-html", tmp / "r", "--overwrite"), src, tmp / "r"
        if kind == "workdir_report":
            (tmp / "wd").mkdir()
            out = tmp / "wd" / "report.json"
            out.write_text("the user's own report")
            return _quantize(src, q, "--workdir", tmp / "wd"), src, out
        if kind == "report_links_to_model":
            os.symlink(src, tmp / "link.json")
            return _quantize(src, q, "--report", tmp / "link.json", "--overwrite"), src, src
        if kind == "output_is_external_data":
            onnx.save(fixtures.conv_bn_net(), str(src), save_as_external_data=True, location="w.bin",
                      size_threshold=0)
            return _quantize(src, tmp / "w.bin", "--overwrite"), src, tmp / "w.bin"
        raise ValueError(kind)
    return build


def _with_tensor(name: str, value: float, index: int = 0, *extra):
    """conv_bn_net with one element of initializer ``name`` set to ``value``."""
    def build(tmp: Path):
        model = fixtures.conv_bn_net()
        t = next(t for t in model.graph.initializer if t.name == name)
        array = numpy_helper.to_array(t).copy()
        array.flat[index] = value
        t.CopyFrom(numpy_helper.from_array(array, name))
        return _model_file(model)(tmp, *extra)
    return build


def _float16_input() -> onnx.ModelProto:
    model = fixtures.conv_bn_net()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    cast = helper.make_node("Cast", ["input"], ["input_float"], name="cast", to=TensorProto.FLOAT)
    for node in model.graph.node:
        node.input[:] = ["input_float" if i == "input" else i for i in node.input]
    model.graph.node.insert(0, cast)
    onnx.checker.check_model(model)
    return model


def _argmax_output() -> onnx.ModelProto:
    """The class index (int64) as the only output, after an ArgMax."""
    model = fixtures.conv_bn_net()
    model.graph.node[-1].output[0] = "logits_float"
    model.graph.node.append(helper.make_node("ArgMax", ["logits_float"], ["logits"], name="argmax", axis=1,
                                             keepdims=0))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("logits", TensorProto.INT64, ["N"]))
    onnx.checker.check_model(model)
    return model


def _zero_classes() -> onnx.ModelProto:
    model = fixtures.conv_bn_net()
    for t in model.graph.initializer:
        if t.name in ("fc.weight", "fc.bias"):
            t.CopyFrom(numpy_helper.from_array(np.zeros((0, *t.dims[1:]), np.float32), t.name))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 0
    return model


def _negative_dims() -> onnx.ModelProto:
    model = fixtures.conv_bn_net()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = -fixtures.HW
    return model


def _bn_epsilon(value: float, zero_variance: bool = False) -> onnx.ModelProto:
    """The first BN's epsilon set to ``value`` (and one of its variances to 0)."""
    model = fixtures.conv_bn_net()
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    next(a for a in bn.attribute if a.name == "epsilon").f = value
    if zero_variance:
        var = next(t for t in model.graph.initializer if t.name == bn.input[4])
        values = numpy_helper.to_array(var).copy()
        values[1] = 0.0
        var.CopyFrom(numpy_helper.from_array(values, var.name))
    return model


def _feature_map_output() -> onnx.ModelProto:
    """The last ReLU's feature map [N, 16, 4, 4] as the only output: no classes to agree on."""
    model = fixtures.conv_bn_net()
    cut = [n.name for n in model.graph.node].index("down.relu") + 1
    nodes = list(model.graph.node)[:cut]
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, "features", list(model.graph.input),
                              [helper.make_tensor_value_info("down.relu", TensorProto.FLOAT, ["N", 16, 4, 4])],
                              [t for t in model.graph.initializer if t.name in used])
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    onnx.checker.check_model(out)
    return out


def _calib_file(write):
    """--calib-data pointing at what ``write(path)`` makes."""
    def build(tmp: Path):
        src = fixtures.save(fixtures.conv_bn_net(), tmp)
        write(tmp / "calib.npz")
        return _quantize(src, tmp / "out.onnx", "--calib-data", tmp / "calib.npz"), src, tmp / "out.onnx"
    return build


def _eval_file(write):
    def build(tmp: Path):
        src = fixtures.save(fixtures.conv_bn_net(), tmp)
        write(tmp / "data.npz")
        return ["eval", src, "--data", tmp / "data.npz"], src, tmp / "nothing"
    return build


def _damaged_npz(path: Path) -> None:
    np.savez(path, images=_UINT8_NHWC, labels=np.zeros(8, np.int64))
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF   # inside the images array: the zip's CRC check fails on reading
    path.write_bytes(bytes(data))


def _object_npz(path: Path) -> None:
    np.savez(path, images=np.array([np.zeros(3), "a"], dtype=object), labels=np.zeros(2, np.int64))


def _calib_dir(tmp: Path):
    src = fixtures.save(fixtures.conv_bn_net(), tmp)
    (tmp / "images").mkdir()
    return _quantize(src, tmp / "out.onnx", "--calib-data", tmp / "images"), src, tmp / "out.onnx"


MATRIX = [
    Case("missing_file", _raw_file(None), ("no such file",)),
    Case("directory_as_model", _raw_file(b"", directory=True), ("is a directory",)),
    Case("empty_file", _raw_file(b""), ("is empty", "re-export")),
    Case("random_bytes", _raw_file(np.random.default_rng(0).bytes(4096)), ("not an onnx model",)),
    Case("truncated_protobuf", _raw_file(fixtures.conv_bn_net().SerializeToString()[:6000]),
         ("not an onnx model", "truncated")),
    Case("protobuf_not_a_model", _raw_file(helper.make_node("Relu", ["a"], ["b"]).SerializeToString()),
         ("no onnx graph",)),   # a NodeProto: parses as a ModelProto with no graph
    Case("fails_checker", _raw_file(_checker_failure()), ("fails onnx.checker",)),
    Case("opset_too_old", _model_file(_opset6_model()), ("opset 6", "below", "re-export")),
    Case("two_inputs", _model_file(fixtures.two_inputs()), ("2 inputs", "single input")),
    Case("int64_input", _model_file(fixtures.int64_input()), ("int64", "float")),
    Case("dynamic_hw", _model_file(fixtures.dynamic_hw()), ("dynamic height/width", "--input-size")),
    Case("custom_op", _model_file(fixtures.custom_op()), ("custom op", "com.example", "standard onnx ops")),
    Case("no_bn_zero_shot", _model_file(fixtures.no_bn()), ("batchnormalization", "--calib-data")),
    Case("output_is_input", _out_is("input"), ("is the input model",)),
    Case("output_dir_missing", _out_is("missing_dir"), ("does not exist",)),
    Case("output_parent_is_file", _out_is("parent_is_file"), ("is a file, not a folder",)),
    Case("output_not_writable", _not_writable, ("cannot write", "writable")),
    Case("output_exists", _out_is("exists"), ("exists", "--overwrite")),
    Case("output_is_directory", _out_is("directory"), ("is a directory",)),
    Case("calib_wrong_shape", _with_calib(np.zeros((8, 4, 4, fixtures.C_IN), np.uint8)), ("resize",)),
    Case("calib_wrong_channels", _with_calib(np.zeros((8, fixtures.HW, fixtures.HW, 1), np.uint8)), ("nhwc",)),
    Case("calib_wrong_dtype", _with_calib(_UINT8_NHWC.astype(np.int32)), ("dtype int32", "uint8")),
    Case("calib_nan", _with_calib(_NAN), ("nan",)),
    Case("calib_no_images_key", _calib_without_images, ("needs 'images'",)),
    Case("wbits_1", _flags(bits=("--wbits", "1", "--abits", "4")), ("weight bit width 1", "2 to 8")),
    Case("abits_3_tensorrt", _flags("--target", "tensorrt", bits=("--wbits", "4", "--abits", "3")),
         ("activation bit width 3",)),
    Case("abits_4_tensorrt", _flags("--target", "tensorrt", bits=("--wbits", "4", "--abits", "4")),
         ("tensorrt", "--abits 8")),
    Case("resume_without_workdir", _flags("--resume"), ("--resume", "--workdir")),
    Case("workdir_is_file", _workdir_is_file, ("--workdir", "file")),
    Case("workdir_not_writable", _workdir_not_writable, ("cannot write", "--workdir", "writable")),
    Case("recon_batch_too_big", _flags("--recon-batch", "64"), ("fewer than the reconstruction batch",)),
    Case("mean_without_std", _flags("--mean", "0.5", "0.5", "0.5"), ("--mean and --std go together",)),
    Case("std_not_positive", _flags("--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0", "0.2"), ("std > 0",)),
    # nothing the run writes may exist without --overwrite, be an input, or be another output
    Case("report_exists", _clobber("report"), ("r.json exists", "--overwrite")),
    Case("report_html_exists", _clobber("report_html"), ("r.html exists", "--overwrite")),
    Case("report_is_calib_data", _clobber("report_is_calib_data"), ("--report", "is the --calib-data file")),
    Case("report_is_output", _clobber("report_is_output"), ("--report", "is also -o")),
    Case("report_html_is_report", _clobber("html_is_report"), ("--report-html", "is also --report")),
    Case("workdir_report_is_a_user_file", _clobber("workdir_report"), ("report.json exists", "--overwrite")),
    Case("report_links_to_the_model", _clobber("report_links_to_model"), ("--report", "is the input model")),
    Case("output_is_external_data", _clobber("output_is_external_data"), ("is the model's external data file",)),
    # numbers that would give a silent bad model
    Case("mean_nan", _flags("--mean", "nan", "0.5", "0.5", "--std", "0.2", "0.2", "0.2"), ("--mean/--std", "finite")),
    Case("std_inf", _flags("--mean", "0.5", "0.5", "0.5", "--std", "inf", "0.2", "0.2"), ("--mean/--std", "finite")),
    Case("lambda_nan", _flags("--lambda", "nan"), ("--lambda", "finite", "nan")),
    Case("lambda_negative", _flags("--lambda", "-1"), ("--lambda", ">= 0")),
    Case("min_agreement_above_100", _flags("--min-agreement", "101"), ("--min-agreement", "<= 100")),
    Case("min_agreement_nan", _flags("--min-agreement", "nan"), ("--min-agreement", "finite")),
    Case("holdout_negative", _flags("--holdout-images", "-1"), ("--holdout-images", ">= 0")),
    Case("seed_negative", _flags("--seed", "-1"), ("--seed", ">= 0")),
    Case("weight_nan", _with_tensor("block.conv.weight", np.nan), ("block.conv.weight", "nan/inf")),
    Case("weight_inf_noise_calibration", _with_tensor("fc.weight", np.inf, 3, "--calib", "noise"),
         ("fc.weight", "nan/inf")),
    Case("bn_mean_nan", _with_tensor("stem.bn.running_mean", np.nan), ("stem.bn.running_mean", "nan/inf")),
    Case("bn_variance_negative", _with_tensor("block.bn.running_var", -0.5, 2),
         ("block.bn.running_var", "negative running variance")),
    # valid-looking input that crashed: refused before any work
    Case("float16_input", _model_file(_float16_input()), ("float16", "float32")),
    Case("int64_output", _model_file(_argmax_output()), ("int64", "logits", "argmax")),
    Case("zero_output_channels", _model_file(_zero_classes()), ("fc.weight", "empty layer")),
    Case("negative_input_dims", _model_file(_negative_dims()), ("non-positive height/width", "--input-size")),
    Case("bn_epsilon_nan", _model_file(_bn_epsilon(float("nan"))), ("stem.bn", "epsilon nan")),
    Case("bn_zero_variance_zero_epsilon", _model_file(_bn_epsilon(0.0, zero_variance=True)),
         ("stem.bn", "divides by zero")),
    Case("feature_map_output", _model_file(_feature_map_output()), ("not logits", "classifier head")),
    Case("input_size_on_a_static_model", _flags("--input-size", "16", "16"), ("fixed at 8x8", "drop --input-size")),
    Case("mean_count_mismatch", _flags("--mean", "0.5", "--std", "0.2", bits=("--wbits", "8", "--abits", "8")),
         ("1 values", "3 channels")),
    Case("distill_batch_0", _flags("--distill-batch", "0"), ("--distill-batch", ">= 1")),
    Case("calib_images_0", _flags("--calib-images", "0", "--no-reconstruct"), ("--calib-images", ">= 1")),
    Case("distill_iters_0", _flags("--distill-iters", "0"), ("--distill-iters", ">= 1")),
    Case("calib_npz_object_array", _calib_file(_object_npz), ("object arrays", "numpy.savez")),
    Case("calib_npz_crc_error", _calib_file(_damaged_npz), ("not a readable .npz", "crc")),
    Case("calib_npz_no_images", _calib_file(lambda p: np.savez(p, images=_UINT8_NHWC[:0])), ("non-empty",)),
    Case("calib_npz_scalar_images", _calib_file(lambda p: np.savez(p, images=np.float32(3))), ("shape []",)),
    Case("calib_data_is_a_directory", _calib_dir, ("is a directory", ".npz")),
    Case("eval_string_labels", _eval_file(lambda p: np.savez(p, images=_UINT8_NHWC, labels=np.array(["cat"] * 8))),
         ("labels", "class indices")),
    Case("eval_object_array", _eval_file(_object_npz), ("object arrays",)),
    Case("eval_crc_error", _eval_file(_damaged_npz), ("not a readable .npz",)),
    Case("eval_no_images", _eval_file(lambda p: np.savez(p, images=_UINT8_NHWC[:0], labels=np.zeros(0))),
         ("non-empty",)),
    Case("eval_scalar_images", _eval_file(lambda p: np.savez(p, images=np.uint8(3), labels=np.int64(1))),
         ("shape []",)),
]


def _past_bound(name: str) -> str:
    """A value just outside the range ``name``'s declaration allows."""
    check = SETTINGS[name].check
    if isinstance(check, Whole):
        return str(check.low - 1)
    return str(check.low) if check.open_low else str(check.low - 1)


BOUNDED = [name for name, s in SETTINGS.items() if s.flag is not None
           and (isinstance(s.check, Real) or (isinstance(s.check, Whole) and s.check.low is not None))]


@pytest.mark.parametrize("name", BOUNDED)
def test_every_bounded_flag_refuses_a_value_past_its_bound(name, tmp_path, capsys):
    """Each quantize flag with a lower bound in its declaration is refused just below it, in one line that
    names the flag, before any work (the matrix above has the hand-picked cases)."""
    src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    flag = SETTINGS[name].flag_name
    code, err = cli(["quantize", src, "-o", tmp_path / "q.onnx", flag, _past_bound(name)], capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and f"{flag} must be" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.name)
def test_bad_input(case: Case, tmp_path, capsys):
    argv, src, out = case.build(tmp_path)
    before_src = stamp(src) if src is not None and src.is_file() else None
    before_out = stamp(out) if out.is_file() else None
    listing = {p.name for p in out.parent.iterdir()} if out.parent.is_dir() else None

    code, err = cli(argv, capsys)

    lines = error_lines(err)
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("onnxgenie: error: "), err
    message = lines[0].lower()
    assert "traceback" not in err.lower()
    assert ";" in message, f"no fix after the problem: {message}"   # 'problem; fix'
    for word in case.words:
        assert word in message, f"{word!r} not in {message!r}"
    if before_src is not None:
        assert stamp(src) == before_src, "the input model was modified"
    if before_out is not None:
        assert stamp(out) == before_out, "an existing file was replaced"
    elif out != src and not out.is_dir():
        assert not out.exists()
    if listing is not None:  # no temporary or partial files left next to the output
        assert {p.name for p in out.parent.iterdir()} == listing


def test_bad_input_through_the_console_script(tmp_path):
    """A real process: exit 2, one line, no traceback."""
    (tmp_path / "empty.onnx").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "onnxgenie.cli", "quantize", str(tmp_path / "empty.onnx"),
                           "-o", str(tmp_path / "out.onnx"), "--wbits", "4", "--abits", "4"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "is empty" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.onnx").exists()


# ------------------------------------------------------------------------------------------------
# Inputs that must work

def _check_written(out: Path, src: Path, before) -> None:
    assert stamp(src) == before
    onnx.checker.check_model(str(out))
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_one_channel_zero_shot_works(tmp_path, capsys):
    """The embedded digits model takes 1-channel 16x16 images."""
    src = tmp_path / "digits.onnx"
    src.write_bytes(DEFAULT_MODEL.read_bytes())
    before = stamp(src)
    code, err = cli(_quantize(src, tmp_path / "q.onnx"), capsys)
    assert code == 0, err
    _check_written(tmp_path / "q.onnx", src, before)


def test_no_bn_few_shot_works(tmp_path, capsys):
    src = fixtures.save(fixtures.no_bn(), tmp_path)
    before = stamp(src)
    np.savez(tmp_path / "calib.npz", images=np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    code, err = cli(_quantize(src, tmp_path / "q.onnx", "--calib-data", tmp_path / "calib.npz"), capsys)
    assert code == 0, err
    _check_written(tmp_path / "q.onnx", src, before)


def test_nhwc_zero_shot_and_few_shot_work(tmp_path, capsys):
    """NHWC models (a leading Transpose): zero-shot and quantization from real images."""
    src = fixtures.save(fixtures.nhwc_input(), tmp_path)
    before = stamp(src)
    code, err = cli(_quantize(src, tmp_path / "zero.onnx"), capsys)
    assert code == 0, err
    _check_written(tmp_path / "zero.onnx", src, before)
    np.savez(tmp_path / "calib.npz", images=np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    code, err = cli(_quantize(src, tmp_path / "q.onnx", "--calib-data", tmp_path / "calib.npz"), capsys)
    assert code == 0, err
    _check_written(tmp_path / "q.onnx", src, before)


def test_overwrite_replaces_and_keeps_input(tmp_path, capsys):
    src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    before = stamp(src)
    out = tmp_path / "q.onnx"
    out.write_bytes(b"old")
    code, err = cli(_quantize(src, out, "--overwrite"), capsys)
    assert code == 0, err
    _check_written(out, src, before)
    # --overwrite never applies to the input itself
    code, err = cli(_quantize(src, src, "--overwrite"), capsys)
    assert code == 2 and "is the input model" in err
    assert stamp(src) == before


# ------------------------------------------------------------------------------------------------
# The output appears only complete and checked

def test_failed_check_leaves_nothing(tmp_path, capsys, monkeypatch):
    """onnx.checker fails on the written temp file: no output, no temp file, exit 1 with a log."""
    src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    before = stamp(src)
    seen = []

    def failing_check(model, *a, **k):
        seen.append(Path(model))
        assert Path(model).parent == tmp_path and Path(model).is_file()  # a temp file next to the output
        raise onnx.checker.ValidationError("forced")

    real_check = onnx.checker.check_model

    def check(model, *a, **k):  # only the written file, not the input model
        if isinstance(model, str) and model.endswith(".tmp"):
            return failing_check(model)
        return real_check(model, *a, **k)

    monkeypatch.setattr(onnx.checker, "check_model", check)
    import tempfile

    (tmp_path / "logs").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "logs"))   # the crash log goes here
    code, err = cli(_quantize(src, tmp_path / "q.onnx"), capsys)
    assert code == 1 and f"traceback in {tmp_path / 'logs'}" in err and seen
    assert not (tmp_path / "q.onnx").exists() and not seen[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "model.onnx"]
    log = next((tmp_path / "logs").glob("onnxgenie-crash-*.log")).read_text()
    assert "Traceback" in log and "ValidationError" in log
    assert stamp(src) == before


def test_nan_model_is_never_written(tmp_path, capsys, monkeypatch):
    """An activation step made NaN after calibration: the run stops in one line before writing."""
    import onnxgenie.pipeline as pipeline

    real = pipeline.init_activations

    def poisoned(folded, plan, *a, **k):
        real(folded, plan, *a, **k)
        next(iter(plan.acts.values())).scale = float("nan")

    monkeypatch.setattr(pipeline, "init_activations", poisoned)
    src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    code, err = cli(_quantize(src, tmp_path / "q.onnx", "--no-reconstruct"), capsys)
    lines = error_lines(err)
    assert code in (1, 2) and len(lines) == 1 and "nan/inf" in lines[0].lower(), err
    assert "traceback" not in err.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_write_model_refuses_nan(tmp_path):
    """The last guard, in write_model itself: NaN/Inf in any float initializer, nothing written."""
    from onnxgenie.errors import DivergenceError
    from onnxgenie.outputs import write_model

    model = fixtures.conv_bn_net()
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.full(tuple(model.graph.initializer[0].dims), np.inf, np.float32), model.graph.initializer[0].name))
    with pytest.raises(DivergenceError, match="NaN/Inf in stem.conv.weight"):
        write_model(model, tmp_path / "q.onnx")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# No silent bad model: the agreement check fails when the FP32 model's own outputs are not finite

def _log_head() -> onnx.ModelProto:
    """Finite weights, but a Log where the head's ReLU was: NaN logits for images with negative features."""
    model = fixtures.conv_bn_net()
    next(n for n in model.graph.node if n.name == "fc1.relu").op_type = "Log"
    return model


@pytest.mark.parametrize("case", ["log_head_noise", "overflowing_images"])
def test_fp32_model_with_non_finite_outputs_is_refused(tmp_path, capsys, case):
    """Both would have quantized "fine", with agreement measured between NaN logits (argmax 0 both)."""
    if case == "log_head_noise":
        src = fixtures.save(_log_head(), tmp_path)
        extra = ["--calib", "noise"]
    else:
        src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
        np.savez(tmp_path / "calib.npz", images=np.full((8, fixtures.C_IN, fixtures.HW, fixtures.HW), 3e38, np.float32))
        extra = ["--calib-data", tmp_path / "calib.npz"]
    code, err = cli(_quantize(src, tmp_path / "q.onnx", *extra, "--workdir", tmp_path / "wd"), capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "the FP32 model outputs NaN/Inf on" in lines[0] and "calibration images" in lines[0]
    assert not (tmp_path / "q.onnx").exists() and not (tmp_path / "wd").exists()   # before any work


def _nan_for_dark_images() -> onnx.ModelProto:
    """conv_bn_net with its logits scaled by sqrt(mean pixel): NaN logits for images of negative mean,
    the same class as conv_bn_net for the others."""
    model = fixtures.conv_bn_net()
    model.graph.node[-1].output[0] = "raw_logits"
    model.graph.node.extend([
        helper.make_node("ReduceMean", ["input"], ["brightness"], name="brightness", axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["brightness"], ["brightness_2d"], name="brightness_2d", axis=1),
        helper.make_node("Sqrt", ["brightness_2d"], ["gain"], name="gain"),
        helper.make_node("Mul", ["raw_logits", "gain"], ["logits"], name="scaled")])
    onnx.checker.check_model(model)
    return model


def test_agreement_counts_non_finite_quantized_outputs_as_disagreement():
    from onnxgenie.report import top1_agreement

    model = fixtures.conv_bn_net()
    broken = _nan_for_dark_images()
    x = fixtures.random_input(model, 16, seed=2)
    fp = fixtures.run(model, x)
    q = fixtures.run(broken, x)
    finite = np.isfinite(q).all(axis=1)
    assert 0 < finite.sum() < len(x)   # some images NaN, some not
    expected = 100.0 * float(((fp.argmax(1) == q.argmax(1)) & finite).mean())
    assert top1_agreement(model, broken, x) == round(expected, 2)
    from onnxgenie.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="FP32 model outputs NaN/Inf on"):
        top1_agreement(broken, model, x)


# ------------------------------------------------------------------------------------------------
# Divergence guards

def test_distillation_divergence_names_stage_batch_and_step(tmp_path, capsys):
    """A teacher whose BN statistics overflow the BNS loss (running mean 1e30): detected at step 0."""
    model = fixtures.conv_bn_net()
    for t in model.graph.initializer:
        if t.name == "block.bn.running_mean":
            t.CopyFrom(numpy_helper.from_array(np.full(fixtures.WIDTH, 1e30, np.float32), t.name))
    src = fixtures.save(model, tmp_path)
    code, err = cli(_quantize(src, tmp_path / "q.onnx", "--workdir", tmp_path / "wd"), capsys)
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1, err
    assert "GENIE-D batch 0" in lines[0] and "at step 0" in lines[0]
    assert "nan" in lines[0].lower() or "inf" in lines[0].lower()
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the forced lr overflows Adam
def test_reconstruction_divergence_falls_back_and_exports_finite(tmp_path, capsys, monkeypatch):
    """A huge weight-step learning rate: every block diverges twice, is named with its step, keeps RTN."""
    import onnxgenie.quant.reconstruct.train as train
    from onnxgenie.pipeline import QuantizeConfig, quantize

    monkeypatch.setattr(train, "LR_WEIGHT_STEP", 1e38)
    model = fixtures.conv_bn_net()
    config = QuantizeConfig(calib_images=8, recon_iters=3, recon_batch=4, reconstruct=True, progress=False)
    result = quantize(model, config, calib=fixtures.random_input(model, 8))
    err = capsys.readouterr().err
    blocks = result.report["reconstruction"]["blocks"]
    diverged = [b for b in blocks if b["status"] == "rtn (loss diverged twice)"]
    assert diverged, blocks
    for b in diverged:
        assert f"GENIE-M {b['name']}: the loss became NaN/Inf at step {b['diverged_at']}" in err
    for t in result.model.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            assert np.isfinite(numpy_helper.to_array(t)).all()


# ------------------------------------------------------------------------------------------------
# Resources

def test_memory_estimate_lowers_jobs(capsys):
    from onnxgenie.graph.load import normalize
    from onnxgenie.errors import BadInputError
    from onnxgenie.distill.memory import distill_memory, fit_jobs
    from onnxgenie.resources import MIB

    normal = normalize(onnx.load(str(DEFAULT_MODEL)))
    one = distill_memory(normal, 128, 1)
    assert distill_memory(normal, 256, 1).per_job > one.per_job            # grows with the batch
    assert distill_memory(normal, 128, 4).total > 4 * one.per_job > one.total
    # room for exactly two workers (and the parent)
    room = distill_memory(normal, 128, 2).total + MIB
    assert fit_jobs(normal, 128, 8, available=room) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "using --jobs 2" in err
    assert fit_jobs(normal, 128, 2, available=room) == 2 and capsys.readouterr().err == ""
    with pytest.raises(BadInputError, match="even one image at a time"):   # not even one process fits
        fit_jobs(normal, 128, 8, available=1)


@pytest.mark.parametrize("command", ["quantize", "distill"])
def test_cli_lowers_jobs_when_memory_is_short(tmp_path, capsys, monkeypatch, command):
    """Available memory patched to 300 MiB (and four cores, so that --jobs 3 is not capped to the cores):
    --jobs 3 runs as --jobs 1, said in one note, and succeeds."""
    import onnxgenie.resources as resources

    monkeypatch.setattr(resources, "available_memory", lambda: 300 * resources.MIB)
    monkeypatch.setattr(resources, "cores", lambda: 4)
    src = tmp_path / "digits.onnx"
    src.write_bytes(DEFAULT_MODEL.read_bytes())
    if command == "quantize":
        argv = ["quantize", src, "-o", tmp_path / "q.onnx", "--wbits", "4", "--abits", "4", "--calib-images", "24",
                "--distill-batch", "8", "--distill-iters", "2", "--no-reconstruct", "--jobs", "3"]
    else:
        argv = ["distill", src, "-o", tmp_path / "d.npz", "--images", "24", "--batch", "8", "--iters", "2",
                "--jobs", "3"]
    code, err = cli(argv, capsys)
    assert code == 0, err
    notes = [ln for ln in err.splitlines() if "onnxgenie: note:" in ln]
    assert len(notes) == 1 and "3 distillation jobs need about" in notes[0] and "using --jobs 1" in notes[0]
    assert "batches on" not in err   # no worker pool was started


def test_memory_estimate_covers_a_real_distillation():
    """Peak RSS of a child process distilling one batch stays under the estimate."""
    code = ("import onnx; from onnxgenie.distill import distill; from onnxgenie.resources import peak_rss; "
            f"distill(onnx.load({str(DEFAULT_MODEL)!r}), n_images=32, batch=32, iters=3, progress=False); "
            "print(peak_rss())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.split()[-1])
    from onnxgenie.graph.load import normalize
    from onnxgenie.distill.memory import distill_memory

    assert peak < distill_memory(normalize(onnx.load(str(DEFAULT_MODEL))), 32).total


# ------------------------------------------------------------------------------------------------
# Ctrl-C

def _interrupt_when(argv: list[str], ready, tmp_path) -> tuple[str, dict]:
    """Run ``argv``, send SIGINT to its process group (as a terminal's Ctrl-C does, workers included) once
    ``ready()``, require exit 130 without a traceback and no process left; its stderr and environment."""
    (tmp_path / "scratch").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp_path / "scratch")}  # terminated workers' leftovers stay here
    # SIGINT back to its default: a shell's background job (`make test &`) starts with it ignored
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO,
                            start_new_session=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    fixtures.wait_for(ready, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    end = time.monotonic() + 10   # no worker outlives the run
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < end, "processes of the interrupted run are still alive"
        time.sleep(0.05)
    return err, env


SLOW_STARTING_WORKER = """
import sys, time
sys.path.insert(0, {repo!r})
if __name__ == "__mp_main__":   # a spawned worker still importing when Ctrl-C comes (CI caught this)
    open({starting!r}, "w").close()
    time.sleep(3)

def square(x):
    return x * x

if __name__ == "__main__":
    from onnxgenie.resources import process_pool
    try:
        with process_pool(2) as pool:
            pool.submit(square, 3)
            try:
                time.sleep(60)
            except KeyboardInterrupt:
                time.sleep(1)   # the parent tidies up; a worker's traceback would be printed meanwhile
                raise
    except KeyboardInterrupt:
        sys.exit(130)
"""


@pytest.mark.slow  # worker processes in a subprocess
def test_sigint_while_a_worker_is_still_importing_leaves_no_traceback(tmp_path):
    starting = tmp_path / "worker_started"
    script = tmp_path / "pool.py"
    script.write_text(SLOW_STARTING_WORKER.format(repo=str(REPO), starting=str(starting)))
    _interrupt_when([sys.executable, str(script)], starting.exists, tmp_path)


@pytest.mark.slow  # a real run interrupted in a subprocess
@pytest.mark.parametrize("jobs", [1, 2])
def test_sigint_stops_cleanly_and_says_how_to_resume(tmp_path, jobs):
    src = tmp_path / "digits.onnx"
    src.write_bytes(DEFAULT_MODEL.read_bytes())
    before = stamp(src)
    wd, out = tmp_path / "wd", tmp_path / "q.onnx"
    argv = [sys.executable, "-m", "onnxgenie.cli", "quantize", str(src), "-o", str(out), "--wbits", "4",
            "--abits", "4", "--calib-images", "24", "--distill-batch", "8", "--distill-iters", "100",
            "--recon-iters", "5", "--recon-batch", "8", "--jobs", str(jobs), "--workdir", str(wd)]
    err, env = _interrupt_when(argv, lambda: any((wd / "distill").glob("batch_*.npz")), tmp_path)
    assert f"finished work is kept in {wd}" in err and "--resume" in err
    assert not out.exists() and any((wd / "distill").glob("batch_*.npz"))
    assert stamp(src) == before
    if jobs > 1:
        return
    # the hint works: resuming finishes the run
    proc = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(str(out))


@pytest.mark.slow  # worker processes interrupted, then a resumed run
def test_sigint_stops_every_reconstruction_candidate_and_resume_reuses_their_blocks(tmp_path):
    src = tmp_path / "digits.onnx"
    src.write_bytes(DEFAULT_MODEL.read_bytes())
    wd, out = tmp_path / "wd", tmp_path / "q.onnx"
    argv = [sys.executable, "-m", "onnxgenie.cli", "quantize", str(src), "-o", str(out), "--wbits", "2",
            "--abits", "4", "--calib", "noise", "--calib-images", "32", "--recon-iters", "300", "--recon-batch", "8",
            "--recon-candidates", "2", "--workdir", str(wd), "--report", str(tmp_path / "r.json")]
    candidates = wd / "reconstruct"
    finished = "candidate_*/block_[0-9][0-9][0-9].npz"   # not a killed save's block_000.tmp.npz
    err, env = _interrupt_when(argv, lambda: any(candidates.glob(finished)), tmp_path)
    assert f"finished work is kept in {wd}" in err and not out.exists()
    kept = {p.relative_to(candidates) for p in candidates.glob(finished)}
    proc = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())["reconstruction"]
    assert len(report["candidates"]) == 2 and sum(c["chosen"] for c in report["candidates"]) == 1
    chosen = next(k for k, c in enumerate(report["candidates"]) if c["chosen"])
    resumed = {b["name"] for b in report["blocks"] if b["status"] == "resumed"}
    assert resumed == {p.stem for p in kept if p.parent.name == f"candidate_{chosen}"}


@pytest.mark.parametrize("workdir", [True, False])
def test_interrupt_message_says_what_was_kept(tmp_path, capsys, monkeypatch, workdir):
    import onnxgenie.pipeline as pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "quantize", interrupted)
    src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    extra = ["--workdir", tmp_path / "wd"] if workdir else []
    code, err = cli(_quantize(src, tmp_path / "q.onnx", *extra), capsys)
    assert code == 130 and err.count("\n") == 1 and "Traceback" not in err
    if workdir:
        assert f"kept in {tmp_path / 'wd'}" in err and "--resume" in err
    else:
        assert "nothing was kept" in err and "--workdir" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_parity_failure_leaves_nothing(tmp_path, capsys, monkeypatch):
    """An export that does not reproduce its simulation is never written (exit 1, one line)."""
    import onnxgenie.stages as stages

    monkeypatch.setattr(stages, "parity", lambda *a, **k: 0.5)
    src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    code, err = cli(_quantize(src, tmp_path / "q.onnx", "--no-reconstruct"), capsys)
    lines = error_lines(err)
    assert code == 1 and len(lines) == 1 and "differs from its simulation" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("flag", ["-o", "--preview"])
def test_distill_never_writes_over_the_model(tmp_path, capsys, flag):
    src = tmp_path / "digits.onnx"
    src.write_bytes(DEFAULT_MODEL.read_bytes())
    before = stamp(src)
    argv = ["distill", src, "-o", src if flag == "-o" else tmp_path / "d.npz", "--images", "4", "--iters", "1"]
    if flag == "--preview":
        argv += ["--preview", src]
    code, err = cli(argv, capsys)
    assert code == 2 and "is the input model" in err and err.count("\n") == 1
    assert stamp(src) == before and sorted(p.name for p in tmp_path.iterdir()) == ["digits.onnx"]


def test_disk_full_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of writing the model: one line, exit 2, the temp file removed."""
    import errno

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd, mode):
            self.fh = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", FullDisk)
    src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    code, err = cli(_quantize(src, tmp_path / "q.onnx", "--no-reconstruct"), capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_sigterm_stops_cleanly_and_removes_temporary_folders(tmp_path):
    """SIGTERM (a CI timeout) without --workdir: exit 143, one line, no temporary folder left behind."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "q.onnx"
    argv = [sys.executable, "-m", "onnxgenie.cli", "quantize", str(DEFAULT_MODEL), "-o", str(out), "--wbits", "4",
            "--abits", "4", "--calib-images", "24", "--distill-batch", "8", "--distill-iters", "100",
            "--recon-iters", "5", "--recon-batch", "8", "--jobs", "1"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO,
                            env={**os.environ, "TMPDIR": str(scratch)})
    fixtures.wait_for(lambda: any(scratch.glob("onnxgenie-distill-*/batch_*.npz")), proc)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "nothing was kept" in err
    assert list(scratch.iterdir()) == [] and not out.exists()


def test_training_graph_keeps_no_temporary_files(tmp_path, monkeypatch):
    """GradientGraph's ORT artifacts are removed once the sessions are built, so a process killed
    later (SIGKILL, a pool worker terminated on Ctrl-C) leaves nothing in the temp folder."""
    import tempfile

    from onnxgenie.ortrain import GradientGraph

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    w = numpy_helper.from_array(np.ones(3, np.float32), "w")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"]),
                               helper.make_node("ReduceSum", ["y"], ["loss"], keepdims=0)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    gg = GradientGraph(model, ["w"])
    assert list(tmp_path.iterdir()) == []
    x = np.array([1, 2, 3], np.float32)
    assert gg.step(x) == (6.0,) and gg.evaluate(x) == (6.0,)
    np.testing.assert_array_equal(gg.grads()["w"], x)
