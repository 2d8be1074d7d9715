"""What the benchmark tools share: where the shared models and the raw results are, the dev split of each
model, and writing one generated section of BENCHMARKS.md (or README.md)."""

from __future__ import annotations

import json
import re
import sys
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
