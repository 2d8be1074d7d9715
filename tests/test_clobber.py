"""Nothing a run writes replaces a file the user did not ask to overwrite: the rule (``files.check_writes``)
is checked before any work, and again at the rename for a file that appeared while the run worked.
The up-front refusals (reports, work dir report, outputs that are inputs or each other) are cases of
test_reliability's matrix; the API's are in test_api_errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fixtures
from conftest import DEFAULT_MODEL
from test_reliability import TINY, cli, error_lines, stamp


@pytest.mark.parametrize("which", ["-o", "--report"])
def test_a_file_that_appears_during_the_run_is_kept(tmp_path, capsys, monkeypatch, which):
    """Another process creates the output while the run works: it is kept (exit 2, one line), and no
    temporary file is left."""
    import onnxgenie.pipeline as pipeline

    src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    appearing = out if which == "-o" else report
    real = pipeline.quantize

    def racing(*args, **kwargs):
        result = real(*args, **kwargs)
        appearing.write_bytes(b"written by someone else meanwhile")
        return result

    monkeypatch.setattr(pipeline, "quantize", racing)
    code, err = cli(["quantize", src, "-o", out, *TINY, "--report", report], capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert f"{appearing} appeared while the run was working; it was kept" in lines[0]
    assert appearing.read_bytes() == b"written by someone else meanwhile"
    assert not out.exists() or which == "-o"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_distill_output_is_not_replaced_without_overwrite(tmp_path, capsys):
    src = tmp_path / "digits.onnx"
    src.write_bytes(DEFAULT_MODEL.read_bytes())
    out = tmp_path / "d.npz"
    out.write_bytes(b"earlier images")
    argv = ["distill", src, "-o", out, "--images", "4", "--batch", "4", "--iters", "1", "--jobs", "1"]
    code, err = cli(argv, capsys)
    assert code == 2 and "d.npz exists; pass --overwrite" in err and err.count("\n") == 1
    assert out.read_bytes() == b"earlier images"
    code, err = cli(argv + ["--overwrite"], capsys)
    assert code == 0, err
    with np.load(out) as data:
        assert data["images"].shape == (4, 1, 16, 16)


def test_resume_replaces_the_work_dirs_own_report(tmp_path, capsys):
    """report.json in a work dir the tool made (run.json beside it) is the run's own: a resumed run
    rewrites it without --overwrite, while a report.json in a fresh folder is the user's (matrix)."""
    src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    wd = tmp_path / "wd"
    code, err = cli(["quantize", src, "-o", tmp_path / "a.onnx", *TINY, "--workdir", wd], capsys)
    assert code == 0, err
    first = json.loads((wd / "report.json").read_text())
    code, err = cli(["quantize", src, "-o", tmp_path / "b.onnx", *TINY, "--workdir", wd, "--resume"], capsys)
    assert code == 0, err
    second = json.loads((wd / "report.json").read_text())
    assert first["output"] == str(tmp_path / "a.onnx") and second["output"] == str(tmp_path / "b.onnx")


def test_overwrite_replaces_a_user_report_in_the_work_dir(tmp_path, capsys):
    src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "report.json").write_text("mine")
    before = stamp(src)
    code, err = cli(["quantize", src, "-o", tmp_path / "q.onnx", *TINY, "--workdir", tmp_path / "wd",
                     "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "wd" / "report.json").read_text())["output"] == str(tmp_path / "q.onnx")
    assert stamp(src) == before


def test_same_file_through_a_link_or_dot_dot(tmp_path):
    """Two spellings of one file are one file (links and '..' resolved), also before it exists."""
    from onnxgenie.files import same_file

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.json").write_text("x")
    (tmp_path / "link.json").symlink_to(tmp_path / "a.json")
    assert same_file(tmp_path / "link.json", tmp_path / "sub" / ".." / "a.json")
    assert same_file(tmp_path / "new.json", tmp_path / "sub" / ".." / "new.json")
    assert not same_file(tmp_path / "new.json", Path(tmp_path / "a.json"))
