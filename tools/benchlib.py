"""What the benchmark tools share: where the shared models and the raw results are, and writing one section of
BENCHMARKS.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BENCHMARKS = ROOT / "BENCHMARKS.md"
# The raw rows each table is rebuilt from. Tracked (out/ is not), so that a fresh checkout's next run adds to
# the earlier figures instead of replacing them; models, caches and reports stay under out/.
RESULTS_DIR = ROOT / "benchmarks"


def model_info(model: str) -> dict:
    """The model's entry in ../shared/models/models.json (``model`` without ``.onnx``)."""
    return json.loads((SHARED / "models" / "models.json").read_text())[f"{model}.onnx"]


def dev_split(model: str, limit: int):
    """The first ``limit`` images of the shared dev split, preprocessed for ``model`` (float32 NCHW), and labels."""
    import numpy as np

    from onnxgenie.evaluate import preprocess

    info = model_info(model)
    with np.load(SHARED / "data" / "cifar10_dev_test.npz") as d:
        return preprocess(d["images"][:limit], (3, 32, 32), info["mean"], info["std"]), d["labels"][:limit]


def fixed_images_setup(model: str, calib: str, bits: str, dev_images: int):
    """What the paired experiments on cached images start from: (wbits, abits, the model's info, the
    calibration images of the .npz ``calib``, the dev images and labels)."""
    import numpy as np

    wbits, abits = (int(b) for b in bits.split("/"))
    with np.load(calib) as f:
        images = f["images"].astype(np.float32)
    x, y = dev_split(model, dev_images)
    return wbits, abits, model_info(model), images, x, y


def write_section(begin: str, end: str, section: str, path: Path = BENCHMARKS) -> None:
    """Replace the text from ``begin`` to ``end`` (markers included in ``section``), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def publish(begin: str, end: str, section: str, write: bool) -> int:
    """Print the section, and put it into BENCHMARKS.md unless ``write`` is False; the tools' exit code."""
    print(section)
    if write:
        write_section(begin, end, section)
    return 0


def read_rows(path: Path) -> list[dict]:
    """The JSON lines of a results file (none if it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
