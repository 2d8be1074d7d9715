"""All onnxruntime-training glue: torch-free import, artifact generation, gradient steps, Adam.

A forward graph with a scalar output (the loss, computed in-graph) and a list of trainable
initializers becomes a ``GradientGraph``: calling it runs forward + backward and the gradients are
read back as NumPy arrays. The optimiser runs in NumPy (``Adam``) so that every parameter group
can have its own learning rate and schedule, which ORT's single-lr optimizer model cannot express.
"""

from __future__ import annotations

import copy
import errno
import importlib.util
import logging
import os
import re
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .engine_forms import anchor_shared_concat_inputs, shared_concat_inputs

ort.set_default_logger_severity(3)


def _training_modules():
    """Import ``onnxruntime.training.{artifacts,api,onnxblock}`` without importing torch.

    ``onnxruntime/training/__init__.py`` imports torch-only modules, so we register a bare package
    object pointing at the same folder and import only the torch-free submodules through it.
    """
    if "onnxruntime.training.api" not in sys.modules:
        pkg = sys.modules.get("onnxruntime.training")
        if pkg is None:
            spec = importlib.util.find_spec("onnxruntime")
            folder = Path(spec.origin).parent / "training"
            pkg = types.ModuleType("onnxruntime.training")
            pkg.__path__ = [str(folder)]
            sys.modules["onnxruntime.training"] = pkg
    from onnxruntime.training import api, artifacts, onnxblock  # noqa: E402
    from onnxruntime.training.onnxblock import _training_graph_utils

    # Its graph optimiser runs with fresh SessionOptions that log every transformer at INFO.
    _training_graph_utils.SessionOptions = lambda: session_options(1)
    return artifacts, api, onnxblock


def quiet_ort_logs() -> None:
    """Artifact generation logs at INFO by default; keep warnings and errors only."""
    ort.set_default_logger_severity(3)
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))


_SHARED_ARENA: list[bool] = []


def session_options(threads: int = 1, shared_arena: bool = False) -> ort.SessionOptions:
    """``shared_arena``: the session draws from one CPU arena of the process (``use_shared_arena``)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if shared_arena:
        use_shared_arena()
        opts.add_session_config_entry("session.use_env_allocators", "1")
        # a memory pattern is one block per run, which another session's larger block cannot reuse:
        # EfficientNet-Lite0, GENIE-D batch 64 in chunks of 16, peak 4095 MiB with patterns, 2940 without
        # (and no slower)
        opts.enable_mem_pattern = False
    return opts


def use_shared_arena() -> None:
    """Register one CPU arena for the process (once), grown by what is asked rather than to the next
    power of two. Sessions that run one after another on it reuse each other's memory: each session's
    own arena keeps its peak for its lifetime, so two of them hold the sum of their peaks."""
    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
        _SHARED_ARENA.append(True)


def describe_ort_error(err: Exception) -> str:
    """The useful part of an onnxruntime-training error: "no gradient for Floor (node x)" where it is one."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    missing = re.search(r"gradient builder has not been registered: (\S+) for node (\S+)", text)
    if missing:
        return f"no gradient for {missing.group(1)} (node {missing.group(2)})"
    duplicate = re.search(r"Duplicate definition of name \((\S+)_grad\)", text)
    if duplicate:  # a tensor several Concats read that anchor_shared_concat_inputs did not see (merged copies)
        return f"onnxruntime-training built two gradients for {duplicate.group(1)} (several Concats read it)"
    if "GradientBuilderBase::O" in text:  # LayerNormalization without its statistics outputs, before trainable_form
        return f"onnxruntime-training's gradient builder asked for an output a node does not have ({text[-80:]})"
    return re.sub(r"^.*?(was false\. |\] )", "", text)[:160]


def inference_session(model: onnx.ModelProto, threads: int = 1, shared_arena: bool = False) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), session_options(threads, shared_arena),
                                providers=["CPUExecutionProvider"])


_NO_ROOM = {"No space left on device": errno.ENOSPC, "File too large": errno.EFBIG,
            "Disk quota exceeded": errno.EDQUOT, "Read-only file system": errno.EROFS}


def _storage_error(err: Exception, folder: Path):
    """A StorageError when writing the training graph's files failed for want of room (the OSError, or
    onnxruntime's text of it); else None."""
    from .files import storage_error

    if isinstance(err, OSError):
        return storage_error(err, f"the training graph's files in the folder {folder}")
    code = next((code for text, code in _NO_ROOM.items() if text in str(err)), None)
    return None if code is None else storage_error(OSError(code, os.strerror(code)),
                                                         f"the training graph's files in the folder {folder}")


class GradientGraph:
    """Forward+backward of ``model`` w.r.t. the initializers named in ``trainable``.

    ``model``'s first output must be a scalar loss; further outputs are returned as extras.
    Every other initializer is frozen. Inputs are passed positionally in the model's input order.
    ``shared_arena``: see ``use_shared_arena``.
    """

    def __init__(self, model: onnx.ModelProto, trainable: list[str], threads: int = 1,
                 artifact_dir: str | os.PathLike | None = None, shared_arena: bool = False):
        artifacts, api, onnxblock = _training_modules()
        quiet_ort_logs()
        inits = {t.name for t in model.graph.initializer}
        missing = [n for n in trainable if n not in inits]
        if missing:
            raise ValueError(f"trainable names are not initializers: {missing}")
        anchors = []
        if shared_concat_inputs(model, list(trainable)):
            model = copy.deepcopy(model)
            anchors = anchor_shared_concat_inputs(model, list(trainable))
        inits.update(anchors)
        self.input_names = [i.name for i in model.graph.input if i.name not in inits]
        self.output_names = [o.name for o in model.graph.output]
        self.trainable = list(trainable)
        frozen = [n for n in inits if n not in set(trainable) | set(anchors)]
        self._tmp = None
        if artifact_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="onnxgenie-ort-")
            artifact_dir = self._tmp.name
        artifact_dir = Path(artifact_dir)
        extra = self.output_names[1:]
        try:
            artifact_dir.mkdir(parents=True, exist_ok=True)
            artifacts.generate_artifacts(
                model, requires_grad=self.trainable + anchors, frozen_params=frozen, loss=None, optimizer=None,
                artifact_directory=artifact_dir, additional_output_names=extra or None,
                loss_input_names=[self.output_names[0]] if extra else None)
            self.state = api.CheckpointState.load_checkpoint(str(artifact_dir / "checkpoint"))
            self.module = api.Module(str(artifact_dir / "training_model.onnx"), self.state,
                                     str(artifact_dir / "eval_model.onnx"),
                                     session_options=session_options(threads, shared_arena))
        except Exception as err:
            full = _storage_error(err, Path(tempfile.gettempdir()) if self._tmp is not None else artifact_dir)
            if self._tmp is not None:
                self._tmp.cleanup()
            if full is not None:
                raise full from None
            raise
        self.module.train()
        if self._tmp is not None:  # the sessions hold everything now; a killed process leaves no files
            self._tmp.cleanup()
            self._tmp = None

    def __call__(self, *inputs: np.ndarray):
        """One forward+backward pass; returns the loss (float) and any extra outputs."""
        self.module.lazy_reset_grad()
        out = self.module(*[np.ascontiguousarray(x) for x in inputs])
        out = out if isinstance(out, (tuple, list)) else (out,)
        out = [o.numpy() if hasattr(o, "numpy") else o for o in out]  # an input-less graph returns OrtValues
        return (float(np.asarray(out[0]).reshape(-1)[0]), *out[1:]) if len(out) > 1 else float(out[0])

    def evaluate(self, *inputs: np.ndarray):
        """Forward only (no gradients, no state change)."""
        self.module.eval()
        try:
            out = self.module(*[np.ascontiguousarray(x) for x in inputs])
        finally:
            self.module.train()
        out = out if isinstance(out, tuple) else (out,)
        return (float(out[0]), *out[1:]) if len(out) > 1 else float(out[0])

    def grads(self) -> dict[str, np.ndarray]:
        return {n: self.state.parameters[n].grad for n in self.trainable}

    def params(self) -> dict[str, np.ndarray]:
        return {n: self.state.parameters[n].data for n in self.trainable}

    def set_params(self, values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            self.state.parameters[name] = np.ascontiguousarray(value, dtype=np.float32)


@dataclass
class ParamGroup:
    names: list[str]
    lr: float


@dataclass
class Adam:
    """PyTorch-equivalent Adam (no weight decay) over NumPy arrays, one learning rate per group."""

    groups: list[ParamGroup]
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    t: int = 0
    m: dict = field(default_factory=dict)
    v: dict = field(default_factory=dict)

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        out = {}
        for group in self.groups:
            for name in group.names:
                g = grads[name]
                m = self.m[name] = b1 * self.m.get(name, 0.0) + (1 - b1) * g
                v = self.v[name] = b2 * self.v.get(name, 0.0) + (1 - b2) * g * g
                out[name] = params[name] - group.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)
        return out

    def state_dict(self) -> dict:
        return {"t": self.t, "m": dict(self.m), "v": dict(self.v), "lrs": [g.lr for g in self.groups]}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.m, self.v = state["t"], dict(state["m"]), dict(state["v"])
        for group, lr in zip(self.groups, state["lrs"]):
            group.lr = lr
