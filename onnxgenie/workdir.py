"""The work directory of a resumable run: its record (``run.json``: the model's hash, the settings that
change the result, the given calibration images' hash), checked on ``--resume``, and its parts (finished
distillation batches, reconstructed blocks, the report's copy)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from .config import QuantizeConfig
from .errors import BadInputError, ResumeMismatchError
from .status import say

RUN_FILE = "run.json"
PARTS = ("distill", "reconstruct")   # the folders of finished work
REPORT = "report.json"
# Settings that do not change the result: a resumed run may differ in them.
NOT_HASHED = ("workdir", "progress", "jobs", "threads", "preset", "min_agreement", "verbose")


def part(config: QuantizeConfig, name: str) -> str | None:
    """The folder of one part of the work (``PARTS``), or None without a work dir."""
    return None if config.workdir is None else str(Path(config.workdir) / name)


def report_path(config: QuantizeConfig) -> Path | None:
    """The report's copy in the work dir (replaced on resume), or None."""
    return None if config.workdir is None else Path(config.workdir) / REPORT


def owns_report(workdir: str | os.PathLike) -> bool:
    """Whether ``workdir`` holds a run of this tool, whose report.json it may replace."""
    return (Path(workdir) / RUN_FILE).exists()


def run_record(model: onnx.ModelProto, config: QuantizeConfig, calib: np.ndarray | None = None) -> dict:
    """What a resumed run must share with the first: the model, the settings that change the result, the
    given calibration images (JSON values, as read back)."""
    run = {"model_sha256": hashlib.sha256(model.SerializeToString()).hexdigest(),
           **{k: v for k, v in asdict(config).items() if k not in NOT_HASHED}}
    if calib is not None:
        run["calib_sha256"] = hashlib.sha256(np.ascontiguousarray(calib, np.float32).tobytes()).hexdigest()
    return json.loads(json.dumps(run))  # tuples as lists


def check_workdir(model: onnx.ModelProto, config: QuantizeConfig, resume: bool,
                  calib: np.ndarray | None = None) -> None:
    """Record the run (``run_record``) in ``config.workdir``, or check it on ``resume``."""
    if config.workdir is None:
        if resume:
            raise BadInputError("--resume continues a run kept in a work directory; "
                                "add the interrupted run's --workdir")
        return
    work = Path(config.workdir)
    if work.exists() and not work.is_dir():
        raise BadInputError(f"--workdir {work} is a file; give a folder")
    run = run_record(model, config, calib)
    saved_file = work / RUN_FILE
    started = saved_file.exists() or any((work / p).exists() for p in PARTS)
    if started and not resume:
        raise BadInputError(f"{work} holds an earlier run; add --resume to continue it, or choose an empty --workdir")
    if started:
        try:
            saved = json.loads(saved_file.read_text()) if saved_file.exists() else {}
            if not isinstance(saved, dict):
                raise ValueError(type(saved).__name__)
        except (ValueError, UnicodeDecodeError, OSError):
            raise ResumeMismatchError(f"{saved_file} is damaged (not the JSON this tool writes), so the finished "
                                      f"work cannot be checked; remove {work} to start again, or choose a new "
                                      "--workdir") from None
        differ = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
        if differ:
            what = ", ".join(d.replace("model_sha256", "model").replace("calib_sha256", "calibration images")
                             for d in differ)
            raise ResumeMismatchError(f"{work} was made with a different {what}; resume with the same model and "
                                      "flags, or choose a new --workdir")
        return
    if resume and config.progress:
        say(f"note: {work} holds no earlier run; starting a new one")
    try:
        work.mkdir(parents=True, exist_ok=True)
        tmp = work / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(run, indent=1))
        os.replace(tmp, saved_file)
    except OSError as err:
        raise BadInputError(f"cannot write in --workdir {work} ({err.strerror}); choose a writable folder") from None
