"""Kill -9 in the middle of distillation and again in the middle of reconstruction, resume each time:
the final model is byte-identical to an uninterrupted run with the same seed. Resuming with another
seed, config or model is refused (exit 2) before any work.

The embedded digits model (1x16x16, 9 BN, 5 reconstruction blocks) with a tiny budget: 4
distillation batches of 8 images, 100 reconstruction steps per block, one process, one thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fixtures
from conftest import DEFAULT_MODEL, REPO
from onnxgenie.cli import main

BUDGET = ["--wbits", "4", "--abits", "4", "--calib-images", "32", "--holdout-images", "8", "--distill-batch", "8",
          "--distill-iters", "60",
          "--recon-iters", "100", "--recon-batch", "8", "--jobs", "1", "--threads", "1", "--seed", "3"]
BATCHES, BLOCKS = 5, 5  # 32 calibration + 8 held-out images in batches of 8


def cli_args(src: Path, out: Path, *extra) -> list[str]:
    return ["quantize", str(src), "-o", str(out), *BUDGET, *map(str, extra)]


def command(src: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "onnxgenie.cli", *cli_args(src, out, *extra)]


def scratch_env(tmp: Path) -> dict:
    """A private TMPDIR: what a killed process leaves there is removed with the test's folder."""
    (tmp / "scratch").mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp / "scratch")}


def run_until(argv: list[str], ready: Path, env: dict, timeout: float = 120.0) -> None:
    """Start ``argv``, SIGKILL it as soon as ``ready`` exists."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO, env=env)
    end = time.monotonic() + timeout
    try:
        while not ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended ({proc.returncode}) before {ready.name}: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > end:
                pytest.fail(f"no {ready.name} after {timeout} s")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def finished(folder: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in folder.glob(pattern))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> bytes:
    """The uninterrupted run (no work directory at all)."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(command(DEFAULT_MODEL, tmp / "ref.onnx"), capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return (tmp / "ref.onnx").read_bytes()


@pytest.mark.slow  # runs killed twice, then resumed
def test_kill_during_distillation_and_reconstruction_then_resume(tmp_path, reference):
    src, out, wd = tmp_path / "digits.onnx", tmp_path / "q.onnx", tmp_path / "wd"
    src.write_bytes(DEFAULT_MODEL.read_bytes())
    src_stamp = (src.read_bytes(), src.stat().st_mtime_ns)

    # 1. killed while distilling: one batch kept, the others not, no output
    env = scratch_env(tmp_path)
    run_until(command(src, out, "--workdir", wd), wd / "distill" / "batch_0000.npz", env)
    batches = finished(wd / "distill", "batch_*.npz")
    assert 1 <= len(batches) < BATCHES and not out.exists()
    assert not (wd / "reconstruct").exists()

    # 2. resumed, then killed while reconstructing
    run_until(command(src, out, "--workdir", wd, "--resume"), wd / "reconstruct" / "block_000.npz", env)
    assert finished(wd / "distill", "batch_*.npz") == [f"batch_{i:04d}.npz" for i in range(BATCHES)]
    blocks = finished(wd / "reconstruct", "block_*[0-9].npz")
    assert 1 <= len(blocks) < BLOCKS and not out.exists()

    # 3. resumed to the end
    proc = subprocess.run(command(src, out, "--workdir", wd, "--resume"), capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes() == reference
    assert (src.read_bytes(), src.stat().st_mtime_ns) == src_stamp
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("change, words", [
    (["--seed", "4"], "different seed"),
    (["--wbits", "3"], "different wbits"),
    (["--recon-iters", "50"], "different recon_iters"),
    (["--calib", "noise"], "different calib"),
    ("model", "different model"),
])
def test_resume_refuses_another_run(tmp_path, capsys, change, words):
    """A work directory written by one run (its run.json) refuses --resume with other settings."""
    src = tmp_path / "digits.onnx"
    src.write_bytes(DEFAULT_MODEL.read_bytes())
    wd = tmp_path / "wd"
    short = ["--distill-iters", "2", "--recon-iters", "2"]
    assert main(cli_args(src, tmp_path / "a.onnx", "--workdir", wd, *short)) == 0
    capsys.readouterr()
    state = sorted((p.relative_to(wd), p.stat().st_mtime_ns) for p in wd.rglob("*"))
    argv = cli_args(src, tmp_path / "b.onnx", "--workdir", wd, "--resume", *short)
    if change == "model":
        argv[argv.index(str(src))] = str(fixtures.save(fixtures.conv_bn_net(), tmp_path, "other"))
    else:
        argv += change
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and words in err and "--workdir" in err
    assert not (tmp_path / "b.onnx").exists()
    assert sorted((p.relative_to(wd), p.stat().st_mtime_ns) for p in wd.rglob("*")) == state  # untouched


def test_workdir_of_an_earlier_run_needs_resume(tmp_path, capsys):
    src = tmp_path / "digits.onnx"
    src.write_bytes(DEFAULT_MODEL.read_bytes())
    wd = tmp_path / "wd"
    short = ["--distill-iters", "2", "--recon-iters", "2"]
    assert main(cli_args(src, tmp_path / "a.onnx", "--workdir", wd, *short)) == 0
    capsys.readouterr()
    assert main(cli_args(src, tmp_path / "b.onnx", "--workdir", wd, *short)) == 2
    assert "add --resume" in capsys.readouterr().err
    # resuming a finished run redoes nothing and gives the same model
    assert main(cli_args(src, tmp_path / "b.onnx", "--workdir", wd, "--resume", *short)) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_resume_refuses_other_calibration_data(tmp_path, capsys):
    """Few-shot runs record a hash of their calibration images: another --calib-data file is refused."""
    import numpy as np

    src = tmp_path / "digits.onnx"
    src.write_bytes(DEFAULT_MODEL.read_bytes())
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        np.savez(tmp_path / f"{name}.npz", images=rng.integers(0, 256, (16, 16, 16, 1), dtype=np.uint8))
    short = ["--recon-iters", "2", "--mean", "0.3056", "--std", "0.319"]
    wd = tmp_path / "wd"
    assert main(cli_args(src, tmp_path / "a.onnx", "--workdir", wd, "--calib-data", tmp_path / "a.npz", *short)) == 0
    capsys.readouterr()
    code = main(cli_args(src, tmp_path / "b.onnx", "--workdir", wd, "--resume", "--calib-data", tmp_path / "b.npz",
                         *short))
    err = capsys.readouterr().err
    assert code == 2 and "different calibration images" in err and not (tmp_path / "b.onnx").exists()
