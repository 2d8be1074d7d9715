"""Valid or recoverable input that used to crash works (exit 0), a damaged work directory is repaired
under --resume, and the messages point at the fix that works (``--input-size`` on quantize, disk space
rather than the model, a one-line usage error). The refusals themselves are in test_reliability's matrix."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import fixtures
from conftest import DEFAULT_MODEL, REPO
from onnxgenie.cli import main
from test_reliability import TINY, _negative_dims, cli, error_lines, stamp


def _unnamed() -> onnx.ModelProto:
    model = fixtures.conv_bn_net()
    for node in model.graph.node:
        node.name = ""
    return model


def _duplicate_names() -> onnx.ModelProto:
    model = fixtures.conv_bn_net()
    for node in model.graph.node:
        node.name = "layer"
    return model


@pytest.mark.parametrize("make, extra", [(_unnamed, ()), (_duplicate_names, ()), (_duplicate_names, ("--calib", "noise"))],
                         ids=["unnamed_nodes", "duplicate_names", "duplicate_names_noise"])
def test_node_names_missing_or_repeated_work(tmp_path, capsys, make, extra):
    """Nodes without names, or all named alike, get unique names (from their outputs): the run works and
    the QDQ model has no duplicate node names (onnxruntime refuses those)."""
    src = fixtures.save(make(), tmp_path)
    before = stamp(src)
    code, err = cli(["quantize", src, "-o", tmp_path / "q.onnx", *TINY, *extra], capsys)
    assert code == 0, err
    names = [n.name for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert len(names) == len(set(names)) and all(names)
    assert stamp(src) == before


def test_api_quantizes_a_model_with_unnamed_nodes():
    import onnxgenie

    result = onnxgenie.quantize(_unnamed(), calib="noise", calib_images=8, recon_iters=3, recon_batch=4,
                                progress=False, threads=1)
    assert result.report["parity"] <= 1e-4
    layers = {n.output[0] for n in fixtures.conv_bn_net().graph.node if n.op_type in ("Conv", "Gemm")}
    assert set(result.report["weight_sqnr_db"]) == layers   # each layer named after its output
    names = [n.name for n in result.model.graph.node]
    assert all(names) and len(names) == len(set(names))


@pytest.mark.parametrize("make", [lambda: fixtures.dynamic_hw(), _negative_dims], ids=["dynamic_hw", "negative_dims"])
def test_input_size_fixes_the_height_and_width_on_quantize(tmp_path, capsys, make):
    """The advice of the refusal works: `quantize --input-size H W` quantizes a model whose height and
    width are symbolic or invalid, and the output takes images of that size."""
    src = fixtures.save(make(), tmp_path)
    code, err = cli(["quantize", src, "-o", tmp_path / "q.onnx", *TINY, "--input-size", fixtures.HW, fixtures.HW],
                    capsys)
    assert code == 0, err
    x = np.random.default_rng(0).standard_normal((2, fixtures.C_IN, fixtures.HW, fixtures.HW)).astype(np.float32)
    assert fixtures.run(onnx.load(str(tmp_path / "q.onnx")), x).shape == (2, fixtures.CLASSES)


def _pooled_head() -> onnx.ModelProto:
    """A classifier ending in a 1x1 conv and global pooling: logits [N, classes, 1, 1], no Flatten."""
    model = fixtures.conv_bn_net()
    cut = [n.name for n in model.graph.node].index("pool") + 1
    nodes = list(model.graph.node)[:cut]
    weight = np.random.default_rng(1).standard_normal((fixtures.CLASSES, 16, 1, 1)).astype(np.float32)
    nodes.append(onnx.helper.make_node("Conv", ["pool", "head.weight"], ["logits"], name="head"))
    used = {i for n in nodes for i in n.input}
    inits = [t for t in model.graph.initializer if t.name in used] + [onnx.numpy_helper.from_array(weight,
                                                                                                   "head.weight")]
    graph = onnx.helper.make_graph(nodes, "pooled_head", list(model.graph.input), [onnx.helper.make_tensor_value_info(
        "logits", onnx.TensorProto.FLOAT, ["N", fixtures.CLASSES, 1, 1])], inits)
    out = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    onnx.checker.check_model(out)
    return out


def test_logits_of_shape_n_c_1_1_work(tmp_path, capsys):
    """Logits [N, classes, 1, 1] are [N, classes] for agreement and eval (argmax over the classes)."""
    src = fixtures.save(_pooled_head(), tmp_path)
    code, err = cli(["quantize", src, "-o", tmp_path / "q.onnx", *TINY, "--calib", "noise", "--report",
                     tmp_path / "r.json"], capsys)
    assert code == 0, err
    assert 0 <= json.loads((tmp_path / "r.json").read_text())["agreement"]["top1_agreement"] <= 100
    x = np.random.default_rng(3).integers(0, 256, (16, fixtures.HW, fixtures.HW, fixtures.C_IN), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=x, labels=np.arange(16) % fixtures.CLASSES)
    capsys.readouterr()
    assert main(["eval", str(src), "--data", str(tmp_path / "d.npz"), "--reference", str(src), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 16 and result["agreement"] == 100.0


def test_input_size_must_be_positive(tmp_path, capsys):
    src = fixtures.save(fixtures.dynamic_hw(), tmp_path)
    code, err = cli(["quantize", src, "-o", tmp_path / "q.onnx", *TINY, "--input-size", "0", "8"], capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "--input-size" in lines[0] and "positive" in lines[0], err


# ------------------------------------------------------------------------------------------------
# A damaged work directory under --resume

RESUME_ARGS = ["--calib-images", "16", "--distill-batch", "8", "--distill-iters", "3", "--recon-iters", "3",
               "--recon-batch", "8", "--jobs", "1", "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def finished_workdir(tmp_path_factory):
    """A finished run of the digits model with a work directory: (work dir, its model bytes)."""
    tmp = tmp_path_factory.mktemp("finished")
    assert main(["quantize", str(DEFAULT_MODEL), "-o", str(tmp / "q.onnx"), *RESUME_ARGS,
                 "--workdir", str(tmp / "wd")]) == 0
    return tmp / "wd", (tmp / "q.onnx").read_bytes()


def _copy_workdir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


@pytest.mark.parametrize("damage", ["batch", "block", "block_of_garbage"])
def test_resume_recomputes_a_damaged_batch_or_block(tmp_path, capsys, finished_workdir, damage):
    """A truncated (or garbage) batch or block file is distilled / reconstructed again, said in one note,
    and the model is byte-identical to the uninterrupted run's."""
    wd = _copy_workdir(finished_workdir[0], tmp_path / "wd")
    target = {"batch": wd / "distill" / "batch_0001.npz", "block": wd / "reconstruct" / "block_002.npz",
              "block_of_garbage": wd / "reconstruct" / "block_000.npz"}[damage]
    if damage == "block_of_garbage":
        target.write_bytes(b"\0" * 100)
    else:
        _truncate(target, 120)
    code, err = cli(["quantize", DEFAULT_MODEL, "-o", tmp_path / "q.onnx", *RESUME_ARGS[:-1], "--workdir", wd,
                     "--resume"], capsys)
    assert code == 0, err
    notes = [ln.strip() for ln in err.replace("\r", "\n").splitlines() if "is damaged" in ln]
    assert notes == [f"onnxgenie: note: {target} is damaged; "
                     f"{'distilling that batch' if damage == 'batch' else 'reconstructing that block'} again"]
    assert (tmp_path / "q.onnx").read_bytes() == finished_workdir[1]
    report = json.loads((wd / "report.json").read_text())
    if damage == "batch":
        assert report["calibration"]["resumed_batches"] == [0]
    else:
        statuses = {b["name"]: b["status"] for b in report["reconstruction"]["blocks"]}
        assert statuses[target.stem] != "resumed" and list(statuses.values()).count("resumed") == len(statuses) - 1


@pytest.mark.parametrize("file", ["run.json", "distill/config.json"])
def test_resume_refuses_a_damaged_run_record(tmp_path, capsys, finished_workdir, file):
    """The file that says which run the work belongs to cannot be repaired: exit 2, one line, what to do."""
    wd = _copy_workdir(finished_workdir[0], tmp_path / "wd")
    (wd / file).write_text("{not json")
    code, err = cli(["quantize", DEFAULT_MODEL, "-o", tmp_path / "q.onnx", *RESUME_ARGS, "--workdir", wd,
                     "--resume"], capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert f"{wd / file} is damaged" in lines[0] and "choose a new --workdir" in lines[0]
    assert not (tmp_path / "q.onnx").exists()


# ------------------------------------------------------------------------------------------------
# Messages that point at the right fix

@pytest.mark.parametrize("argv, words", [
    (["quantize", "m.onnx", "--wbits", "four"], ("argument --wbits: invalid int value: 'four'",
                                                 "see `onnxgenie quantize --help`")),
    (["quantize"], ("the following arguments are required: model", "see `onnxgenie quantize --help`")),
    (["quantise", "m.onnx"], ("invalid choice: 'quantise'", "see `onnxgenie --help`")),
    (["eval", "m.onnx", "--data", "d.npz", "--no-such-flag"], ("unrecognized arguments: --no-such-flag",
                                                             "see `onnxgenie eval --help`")),
], ids=["bad_value", "missing_argument", "unknown_command", "unknown_flag"])
def test_usage_errors_are_one_line_with_a_help_hint(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert exit_.value.code == 2 and captured.out == ""
    assert len(lines) == 1 and lines[0].startswith("onnxgenie: error: "), captured.err
    for word in words:
        assert word in lines[0], lines[0]


def test_file_size_limit_during_distillation_blames_the_disk_not_the_model(tmp_path):
    """A file-size limit (as a full disk) while the training graph's files are written: exit 2, one line
    naming the folder and the limit, not "re-export it without that op"."""
    out = tmp_path / "q.onnx"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run([sys.executable, "-m", "onnxgenie.cli", "quantize", str(DEFAULT_MODEL), "-o", str(out),
                           "--calib-images", "8", "--distill-batch", "8", "--distill-iters", "2", "--no-reconstruct",
                           "--jobs", "1", "-q"], capture_output=True, text=True, timeout=120, cwd=REPO,
                          preexec_fn=limit)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "File too large" in lines[0] and "free some space" in lines[0] and "re-export" not in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("on", ["calibration", "held-out"])
def test_gate_message_says_where_agreement_was_measured(on):
    """The gate names the images agreement was measured on: the calibration images without held-out ones."""
    from onnxgenie.outputs import check_gate

    report = {"agreement": {"top1_agreement": 62.5, "images": 8, "on": on}}
    gate = check_gate(report, 90.0)
    assert report["gate"]["passed"] is False and report["gate"]["on"] == on
    assert f"is 62.50 % on 8 {on} images, below --min-agreement 90;" in str(gate)
    assert ("held-out" in str(gate)) == (on == "held-out")
    assert check_gate(report, 62.5) is None and report["gate"]["passed"]
