"""Finished blocks on disk, so that a rerun with the same settings resumes after them: ``block_007.npz``
holds what the block learned and its stats, under a key of everything the result depends on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx

from ...errors import ResumeMismatchError
from ..spec import QuantPlan
from .status import as_text
from .train import BlockConfig

RECON_VERSION = 2  # part of the resume key: 2 = step learning rates relative to the grid


def save_block(path: Path, key: str, updates: dict, stats: dict) -> None:
    arrays, meta = {}, {"key": key, "stats": as_text(stats), "weights": [], "acts": updates.get("acts", {})}
    for j, (node, (wint, scale)) in enumerate(updates.get("weights", {}).items()):
        meta["weights"].append(node)
        arrays[f"w{j}_wint"], arrays[f"w{j}_scale"] = wint, scale
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)


def load_block(path: Path, key: str) -> tuple[dict, dict] | None:
    """A saved block's updates and stats; None for a file damaged on disk (to be learned again)."""
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            if meta["key"] != key:
                raise ResumeMismatchError(
                    f"{path} was written for another model, plan or reconstruction setting; "
                    "use a fresh work directory or rerun with the same settings")
            weights = {node: (data[f"w{j}_wint"], data[f"w{j}_scale"]) for j, node in enumerate(meta["weights"])}
            acts = {tensor: float(scale) for tensor, scale in meta["acts"].items()}
            return {"weights": weights, "acts": acts}, dict(meta["stats"])
    except ResumeMismatchError:
        raise
    except Exception:
        return None


def config_key(folded: onnx.ModelProto, plan: QuantPlan, calib: np.ndarray, cfg: BlockConfig, seed: int) -> str:
    h = hashlib.sha256(folded.SerializeToString())
    meta, arrays = plan.to_arrays()
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for k in sorted(arrays):
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    h.update(np.ascontiguousarray(calib[: min(len(calib), 64)]).tobytes())
    h.update(json.dumps([RECON_VERSION, len(calib), cfg.iters, cfg.batch, cfg.quantizer, cfg.lam, seed]
                        + ([cfg.lr_scale] if cfg.lr_scale != 1.0 else [])
                        + ([["act", cfg.act_lr_scale]] if cfg.act_lr_scale != 1.0 else [])
                        + ([] if cfg.qdrop else ["no-qdrop"])).encode())
    return h.hexdigest()[:16]
