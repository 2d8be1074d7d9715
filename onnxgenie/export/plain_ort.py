"""Run an exported model on the latest plain ``onnxruntime`` (what deployment users install).

onnxruntime-training installs the module ``onnxruntime`` too, so the two cannot share a venv: the
plain one lives in a second venv (``.venv-ort`` at the repository root, ignored by git, or
``$ONNXGENIE_PLAIN_ORT_VENV``), created on first use with ``pip install onnxruntime numpy``, and
models run there in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_RUNNER = r"""
import sys, json, numpy as np, onnxruntime as ort
model, x_path, out_path, level = sys.argv[1:5]
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
if len(sys.argv) > 5:
    opts.optimized_model_filepath = sys.argv[5]
s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
x = np.load(x_path)
np.save(out_path, s.run(None, {s.get_inputs()[0].name: x})[0])
print(ort.__version__)
"""


def venv_dir() -> Path:
    return Path(os.environ.get("ONNXGENIE_PLAIN_ORT_VENV", Path(__file__).resolve().parents[2] / ".venv-ort"))


def plain_ort_python(create: bool = True, packages: tuple[str, ...] = ("onnxruntime", "numpy")
                     ) -> tuple[Path | None, str]:
    """(python of the plain-onnxruntime venv with ``packages``, '') or (None, why it is unavailable)."""
    venv = venv_dir()
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    modules = ", ".join(sorted({p.replace("-", "_") for p in packages}))
    check = [str(python), "-c", f"import {modules}, onnxruntime; assert not hasattr(onnxruntime, 'training')"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python, ""
    if not create:
        return None, f"no plain-onnxruntime venv at {venv}"
    steps = [[sys.executable, "-m", "venv", str(venv)]] if not python.exists() else []
    steps.append([str(python), "-m", "pip", "install", "-q", "--upgrade", *packages])
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            return None, f"cannot create {venv} ({' '.join(cmd[-3:])}: {tail[0][:160]})"
    if subprocess.run(check, capture_output=True).returncode != 0:
        return None, f"{venv} has no working plain onnxruntime"
    return python, ""


def run_plain_ort(model_path: str | os.PathLike, x: np.ndarray, level: str = "ORT_ENABLE_ALL",
                  python: Path | None = None, optimized_path: str | os.PathLike | None = None) -> tuple[np.ndarray, str]:
    """(first output of the model on ``x``, onnxruntime version) in the plain-onnxruntime venv;
    ``optimized_path`` receives the graph onnxruntime runs after its optimisations at ``level``."""
    if python is None:
        python, why = plain_ort_python()
        if python is None:
            raise RuntimeError(why)
    with tempfile.TemporaryDirectory(prefix="onnxgenie-plain-ort-") as tmp:
        x_path, out_path = Path(tmp) / "x.npy", Path(tmp) / "y.npy"
        np.save(x_path, np.ascontiguousarray(x, dtype=np.float32))
        extra = [] if optimized_path is None else [str(optimized_path)]
        done = subprocess.run([str(python), "-c", _RUNNER, str(model_path), str(x_path), str(out_path), level, *extra],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"plain onnxruntime failed: {done.stderr.strip().splitlines()[-1:]}")
        return np.load(out_path), done.stdout.strip()
