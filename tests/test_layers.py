"""The package's layers (pyproject.toml's import-linter contract): each module imports only the layers below
it, so no import cycle can hide in a function-local import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports is missing: install the test extra (make setup)")
    return lint


def test_imports_follow_the_layers():
    proc = subprocess.run([_lint_imports(), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout, proc.stdout[-2000:]


def test_an_import_against_the_layers_is_caught_even_inside_a_function(tmp_path):
    """The contract is no formality: a copy of the package whose graph layer imports the pipeline inside a
    function fails it, naming that import."""
    shutil.copytree(REPO / "onnxgenie", tmp_path / "onnxgenie", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    bn = tmp_path / "onnxgenie" / "graph" / "bn.py"
    bn.write_text(bn.read_text() + "\n\ndef _upward():\n    from ..pipeline import quantize\n\n    return quantize\n")
    proc = subprocess.run([_lint_imports(), "--no-cache"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "onnxgenie.graph.bn -> onnxgenie.pipeline" in proc.stdout, proc.stdout[-3000:]
