"""What the benchmark tools share: where the shared models and the raw results are, the dev split of each
model (and its seeded calibration/evaluation halves), the machine's load while a run goes, the code's version,
and writing one generated section of BENCHMARKS.md (or README.md)."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BENCHMARKS = ROOT / "BENCHMARKS.md"
README = ROOT / "README.md"
# The raw rows each table is rebuilt from. Tracked (out/ is not), so that a fresh checkout's next run adds to
# the figures instead of replacing them; models, caches and reports stay under out/.
RESULTS_DIR = ROOT / "benchmarks"
DEV_DATA = {"cifar10": "cifar10_dev_test.npz", "imagenet": "imagenet_sample_dev_224.npz"}
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def model_info(model: str) -> dict:
    """The model's entry in ../shared/models/models.json (``model`` without ``.onnx``)."""
    return json.loads((SHARED / "models" / "models.json").read_text())[f"{model}.onnx"]


def dev_split(model: str, limit: int):
    """The first ``limit`` images of the model's dev split (CIFAR-10: 5,000 images; ImageNet sample: 500),
    preprocessed for ``model`` (float32 NCHW), and their labels."""
    import numpy as np

    from onnxgenie.evaluate import preprocess

    info = model_info(model)
    with np.load(SHARED / "data" / DEV_DATA[info.get("dataset", "cifar10")]) as d:
        images, labels = d["images"][:limit], d["labels"][:limit]
    return preprocess(images, (3, *info["size"]), info["mean"], info["std"]), labels


def calib_eval_split(model: str, folder: Path, n_calib: int, seed: int = 0) -> dict:
    """The model's dev images split into ``n_calib`` calibration and the rest evaluation images by
    ``numpy.random.default_rng(seed).permutation``: {"seed", "calib", "eval" (sorted indices), "calib_file" (the
    calibration images as uint8 ``images`` + ``labels``, for ``--calib-data``)}. Written to ``folder`` on first
    use; a split file there that the permutation does not give is refused (delete it to rewrite it)."""
    import numpy as np

    data = SHARED / "data" / DEV_DATA[model_info(model).get("dataset", "cifar10")]
    with np.load(data) as d:
        images, labels = d["images"], d["labels"]
    order = np.random.default_rng(seed).permutation(len(labels))
    calib, evaluation = np.sort(order[:n_calib]), np.sort(order[n_calib:])
    index_file = folder / f"{data.stem}_split{n_calib}_seed{seed}.npz"
    calib_file = folder / f"{data.stem}_calib{n_calib}_seed{seed}.npz"
    folder.mkdir(parents=True, exist_ok=True)
    if index_file.exists():
        with np.load(index_file) as f:
            if not (np.array_equal(f["calib"], calib) and np.array_equal(f["eval"], evaluation)):
                raise SystemExit(f"{index_file} is not the seed-{seed} split of {data.name}; delete it to rewrite it")
    for path, arrays in ((index_file, dict(calib=calib, eval=evaluation, seed=seed)),
                         (calib_file, dict(images=images[calib], labels=labels[calib]))):
        if not path.exists():  # written whole, then renamed: never half a file
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, **arrays)
            tmp.replace(path)
    return {"seed": seed, "calib": calib, "eval": evaluation, "calib_file": calib_file}


ALONE_OTHERS_PCT = 10.0  # a run is "alone" when other processes used at most this share of the CPUs meanwhile


def _busy_cpu_s() -> float | None:
    """CPU seconds every process on the machine has used since boot (/proc/stat: user, nice, system, irq,
    softirq; steal and idle excluded), or None where there is no /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its finished (waited-for) children, theirs included."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


class MachineLoad:
    """The machine's load while a command runs (``with MachineLoad() as load: ...``; then ``load.result``):
    the 1-minute load average sampled every ``every`` seconds (mean and max) and the share of all CPUs that
    processes other than this one and its children used meanwhile. ``alone``: that share was at most
    ``ALONE_OTHERS_PCT`` %, so the run's wall time is its own."""

    def __init__(self, every: float = 5.0):
        self.every, self.samples, self.result = every, [], {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> "MachineLoad":
        self._t0, self._busy0, self._own0 = time.perf_counter(), _busy_cpu_s(), _own_cpu_s()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        wall, busy = time.perf_counter() - self._t0, _busy_cpu_s()
        cpus = os.cpu_count() or 1
        others = None
        if busy is not None and self._busy0 is not None and wall > 0:
            spent = busy - self._busy0 - (_own_cpu_s() - self._own0)
            others = round(min(max(spent / (wall * cpus) * 100, 0.0), 100.0), 1)
        self.result = {"load_mean": round(sum(self.samples) / len(self.samples), 2),
                       "load_max": round(max(self.samples), 2), "others_cpu_pct": others, "cpus": cpus,
                       "alone": others is not None and others <= ALONE_OTHERS_PCT}


def code_version() -> dict:
    """{"onnxgenie": the package's version, "commit": the checkout's short commit (+"-dirty" where the code that
    makes the figures, onnxgenie/ and tools/, has uncommitted changes; None outside a git checkout)}."""
    from onnxgenie import __version__

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no", "--", "onnxgenie", "tools", "pyproject.toml"):
        commit += "-dirty"
    return {"onnxgenie": __version__, "commit": commit}


def section_pattern(begin: str, end: str) -> re.Pattern:
    return re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)


def write_section(begin: str, end: str, section: str, path: Path = BENCHMARKS) -> None:
    """Replace the text from ``begin`` to ``end`` (markers included in ``section``), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = section_pattern(begin, end)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def stale(begin: str, end: str, section: str, path: Path = BENCHMARKS) -> bool:
    """True if ``path`` does not hold exactly ``section`` between the markers."""
    match = section_pattern(begin, end).search(path.read_text()) if path.exists() else None
    return match is None or match.group(0) != section


def publish(begin: str, end: str, section: str, write: bool, path: Path = BENCHMARKS, quiet: bool = False) -> int:
    """Print the section, and put it into ``path`` unless ``write`` is False; the tools' exit code."""
    if not quiet:
        print(section)
    if write:
        write_section(begin, end, section, path)
    return 0


def read_rows(path: Path) -> list[dict]:
    """The JSON lines of a results file (none if it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def bits_pairs(values: list[str]) -> list[tuple[int, int]]:
    """``["4/4", "2/4"]`` -> ``[(4, 4), (2, 4)]``."""
    return [tuple(int(b) for b in v.split("/")) for v in values]
