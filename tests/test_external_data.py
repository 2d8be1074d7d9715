"""Weights kept beside the model (``save_as_external_data``) are read only from the model's own folder:
every location is resolved, links included, and a location outside the folder, a missing file or one
shorter than the tensor needs is refused (exit 2, one line naming the tensor, nothing written). The
outside file holds a marker: if it were read, the marker would reach the output."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import fixtures
from onnxgenie.cli import main
from onnxgenie.errors import BadInputError

MARKER = b"SECRET-OUTSIDE-THE-MODEL-FOLDER!"


def _save_external(folder: Path, location: str = "w.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(fixtures.conv_bn_net(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)
    return path


def _relocate(path: Path, location: str) -> None:
    """Point every external tensor of the model at ``path`` to ``location`` (offsets kept)."""
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


def _outside(tmp: Path, like: Path) -> Path:
    """A file outside the model's folder, the size of ``like``, full of the marker."""
    folder = tmp / "outside"
    folder.mkdir(exist_ok=True)
    secret = folder / "secret.bin"
    size = like.stat().st_size
    secret.write_bytes((MARKER * (size // len(MARKER) + 1))[:size])
    return secret


def _link_data_file(tmp: Path) -> Path:
    src = _save_external(tmp / "m")
    secret = _outside(tmp, tmp / "m" / "w.bin")
    (tmp / "m" / "w.bin").unlink()
    os.symlink(secret, tmp / "m" / "w.bin")
    return src


def _link_folder(tmp: Path) -> Path:
    src = _save_external(tmp / "m")
    secret = _outside(tmp, tmp / "m" / "w.bin")
    os.symlink(secret.parent, tmp / "m" / "sub")
    _relocate(src, "sub/secret.bin")
    return src


def _dot_dot(tmp: Path) -> Path:
    src = _save_external(tmp / "m")
    _outside(tmp, tmp / "m" / "w.bin")
    _relocate(src, "../outside/secret.bin")
    return src


def _absolute(tmp: Path) -> Path:
    src = _save_external(tmp / "m")
    _relocate(src, str(_outside(tmp, tmp / "m" / "w.bin")))
    return src


def _short(tmp: Path) -> Path:
    src = _save_external(tmp / "m")
    data = (tmp / "m" / "w.bin").read_bytes()
    (tmp / "m" / "w.bin").write_bytes(data[:-100])
    return src


CASES = {  # builder -> words of the message
    "symlinked_data_file": (_link_data_file, ("outside the model's folder", "links are followed")),
    "symlinked_folder": (_link_folder, ("outside the model's folder",)),
    "dot_dot": (_dot_dot, ("outside the model's folder",)),
    "absolute_path": (_absolute, ("outside the model's folder",)),
    "short_data_file": (_short, ("truncated", "only")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_external_data_outside_or_short_is_refused(case, tmp_path, capsys):
    build, words = CASES[case]
    src = build(tmp_path)
    out = tmp_path / "m" / "q.onnx"
    before = sorted(p.name for p in (tmp_path / "m").iterdir())
    code = main(["quantize", str(src), "-o", str(out), "--calib", "noise", "--calib-images", "8", "--no-reconstruct"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"onnxgenie: error: {src}: tensor ") and "external weight data" in lines[0]
    assert lines[0].endswith(("next to the model", "re-export the model")), lines[0]   # whole, not cut
    for word in words:
        assert word in lines[0], lines[0]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before   # nothing written


def test_links_inside_the_folder_work_and_nothing_outside_is_read(tmp_path, capsys):
    """A data file that is a link to another file in the model's folder is read; the output holds the
    model's own weights (checked against the same model saved plainly)."""
    src = _save_external(tmp_path / "m")
    os.rename(tmp_path / "m" / "w.bin", tmp_path / "m" / "real.bin")
    os.symlink("real.bin", tmp_path / "m" / "w.bin")
    plain = fixtures.save(fixtures.conv_bn_net(), tmp_path, "plain")
    args = ["--calib", "noise", "--calib-images", "8", "--no-reconstruct", "--threads", "1", "-q"]
    assert main(["quantize", str(src), "-o", str(tmp_path / "a.onnx"), *args]) == 0
    assert main(["quantize", str(plain), "-o", str(tmp_path / "b.onnx"), *args]) == 0
    a, b = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    for ta, tb in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(ta), onnx.numpy_helper.to_array(tb))


def test_api_refuses_a_model_proto_with_unread_external_data(tmp_path):
    """A ModelProto whose data was not loaded would be read relative to the current folder: refused."""
    import onnxgenie

    src = _save_external(tmp_path / "m")
    model = onnx.load(str(src), load_external_data=False)
    with pytest.raises(BadInputError, match="external file"):
        onnxgenie.quantize(model, calib="noise", calib_images=8, reconstruct=False, progress=False)
