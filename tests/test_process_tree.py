"""No process outlives the run: distillation workers and reconstruction candidates die with their parent,
even when it is killed with SIGKILL (the OOM killer's signal); SIGTERM while a worker is still starting
ends the run with exit 143 and no traceback; --threads and --jobs are capped to the cores.

Each run starts in its own session, so its process group holds the run and everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import fixtures
from conftest import DEFAULT_MODEL, REPO
from test_reliability import TINY, cli

needs_two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                     reason="worker processes start only with two cores or more")


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


def _workers(pgid: int) -> list[int]:
    out = []
    for pid in _group(pgid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"spawn_main" in fh.read():
                    out.append(pid)
        except OSError:
            pass
    return out


def _start(argv: list, tmp_path) -> subprocess.Popen:
    (tmp_path / "scratch").mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "onnxgenie.cli", *map(str, argv)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(tmp_path / "scratch")})


def _wait_for_workers(proc: subprocess.Popen, count: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while len(_workers(proc.pid)) < count:
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before its workers started: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("the workers did not start")
        time.sleep(0.01)


def _assert_group_ends(pgid: int, within: float = 10.0) -> None:
    end = time.monotonic() + within
    while _group(pgid):
        if time.monotonic() > end:
            left = _group(pgid)
            for pid in left:   # do not leave them to the next test
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"processes outlived the run: {left}")
        time.sleep(0.05)


DISTILL_LONG = ["quantize", DEFAULT_MODEL, "--calib-images", "16", "--distill-batch", "8", "--distill-iters", "5000",
                "--no-reconstruct", "--jobs", "2", "-q"]
CANDIDATES_LONG = ["quantize", DEFAULT_MODEL, "--wbits", "2", "--abits", "4", "--calib", "noise", "--calib-images",
                   "32", "--recon-iters", "5000", "--recon-batch", "8", "--recon-candidates", "2", "-q"]


@pytest.mark.slow  # a run with workers, killed
@needs_two_cores
@pytest.mark.parametrize("argv", [DISTILL_LONG, CANDIDATES_LONG], ids=["distillation_workers", "recon_candidates"])
def test_kill_9_of_the_parent_takes_its_workers_along(tmp_path, argv):
    proc = _start([*argv, "-o", tmp_path / "q.onnx"], tmp_path)
    try:
        _wait_for_workers(proc, 2)
        time.sleep(1.0)   # past their start-up: busy distilling / reconstructing
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _assert_group_ends(proc.pid)
    finally:
        proc.kill()
        proc.stderr.close()
    assert not (tmp_path / "q.onnx").exists()


@needs_two_cores
def test_sigterm_while_a_worker_is_still_starting_exits_143_without_a_traceback(tmp_path):
    """The parent is inside Process.start() (writing the worker's arguments while the worker imports):
    the signal waits until the start is complete, then the run stops as for any SIGTERM."""
    proc = _start([*DISTILL_LONG, "-o", tmp_path / "q.onnx"], tmp_path)
    try:
        _wait_for_workers(proc, 1)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "Error" not in err, err
    assert err.strip().splitlines()[-1].startswith("onnxgenie: interrupted; nothing was kept")
    _assert_group_ends(proc.pid)


DYING_WORKER = """
import os, sys
sys.path.insert(0, {repo!r})
if __name__ == "__mp_main__":   # the worker dies while the parent still writes its arguments
    os._exit(1)

def noop(*args):
    pass

if __name__ == "__main__":
    from concurrent.futures.process import BrokenProcessPool
    from onnxgenie.resources import process_pool
    try:
        with process_pool(1, noop, (b"x" * 4_000_000,)) as pool:   # far more than a pipe's buffer
            pool.submit(noop).result()
    except BrokenProcessPool as err:
        print("broken:", err)
        sys.exit(3)
"""


def test_a_worker_dying_while_it_starts_fails_the_pool_instead_of_hanging(tmp_path):
    """The parent writes a worker's arguments (the model's bytes) into a pipe while the worker reads them;
    a worker that dies meanwhile used to leave that write, and the run, blocked forever."""
    script = tmp_path / "dying.py"
    script.write_text(DYING_WORKER.format(repo=str(REPO)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 3 and "broken: a worker process died while it was starting" in proc.stdout, \
        proc.stdout + proc.stderr


WATCHDOG = """
import os, subprocess, sys, time
if sys.argv[1] == "child":
    import onnxgenie.resources as resources
    resources.PR_SET_PDEATHSIG = 0          # no parent-death signal: only the watchdog is left
    resources.die_with_parent(int(sys.argv[2]))
    time.sleep(60)
else:
    child = subprocess.Popen([sys.executable, __file__, "child", str(os.getpid())])
    print(child.pid, flush=True)
    time.sleep(2)                           # the child has armed its watchdog
    os._exit(0)                             # the parent vanishes without a word
"""


def test_the_watchdog_ends_a_worker_whose_parent_vanished(tmp_path):
    """Where the parent-death signal is missing, the watchdog thread on the parent's pid ends the worker."""
    script = tmp_path / "watchdog.py"
    script.write_text(WATCHDOG)
    proc = subprocess.run([sys.executable, str(script), "parent"], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    child = int(proc.stdout.split()[0])
    end = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        if time.monotonic() > end:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the child outlived its parent by 5 s")
        time.sleep(0.05)


@pytest.mark.slow  # a CLI run in a subprocess per flag
@pytest.mark.parametrize("flag", ["--threads", "--jobs"])
def test_threads_and_jobs_are_capped_to_the_cores(tmp_path, capsys, flag):
    """More threads or processes than cores only share them: capped, said in one line, the run works."""
    from onnxgenie.resources import cores

    src = fixtures.save(fixtures.conv_bn_net(), tmp_path)
    argv = ["quantize", src, "-o", tmp_path / "q.onnx", *TINY, flag, "512", "--report", tmp_path / "r.json"]
    code, err = cli(argv, capsys)
    assert code == 0, err
    notes = [ln for ln in err.splitlines() if "onnxgenie: note:" in ln]
    assert notes == [f"onnxgenie: note: {flag} 512 is more than the {cores()} core(s) this process may use; "
                     f"using {flag} {cores()}"]
    if flag == "--threads":
        import json

        assert json.loads((tmp_path / "r.json").read_text())["config"]["threads"] == cores()
