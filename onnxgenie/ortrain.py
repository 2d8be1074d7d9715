"""The engine boundary: every call to onnxruntime(-training) goes through this module.

- sessions: ``inference_session`` (inference on the CPU, with the engine's known bugs avoided),
  ``session_options``, ``use_shared_arena``, ``quiet_run_options``;
- gradients: a forward graph with a scalar output (the loss, computed in-graph) and a list of trainable
  initializers becomes a ``GradientGraph``: ``step`` runs forward + backward, ``grads``/``params``/
  ``set_params`` read and write the trainables as NumPy arrays, ``evaluate`` runs forward only,
  ``profile=True`` records onnxruntime's profile;
- its errors, in one line: ``describe_ort_error``.

The torch-free import of onnxruntime-training lives here too. The graph forms the engine can
differentiate are ``engine_forms``; batching over many images is ``runtime``; the optimiser runs in
NumPy (``optim``), so that every parameter group has its own learning rate and schedule.
"""

from __future__ import annotations

import copy
import errno
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import types
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


def quiet_logger() -> None:
    """onnxruntime's own log: warnings and errors only."""
    ort.set_default_logger_severity(3)


def quiet_ort_logs() -> None:
    """Artifact generation logs at INFO by default; keep warnings and errors only."""
    quiet_logger()
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


_LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
           "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def inference_session(model: onnx.ModelProto, threads: int = 1, shared_arena: bool = False,
                      optimization: str | None = None) -> ort.InferenceSession:
    """A CPU session of ``model``; ``optimization``: the graph optimisation level (``_LEVELS``; None: the
    default, all). Buffer reuse is off for a model this build would overflow a buffer on
    (``buffer_reuse_hazard``)."""
    opts = session_options(threads, shared_arena)
    if optimization is not None:
        opts.graph_optimization_level = _LEVELS.get(optimization, optimization)
    opts.enable_mem_reuse = not buffer_reuse_hazard(model)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def quiet_run_options() -> ort.RunOptions:
    """Run options that log nothing (for runs whose failure the caller reports itself)."""
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4
    return quiet


def engine_version() -> str:
    return ort.__version__


SUB_BYTE = {onnx.TensorProto.INT4: onnx.TensorProto.INT8, onnx.TensorProto.UINT4: onnx.TensorProto.UINT8}  # 4-bit: its 8-bit kin


def _shape_key(vi: onnx.ValueInfoProto) -> tuple:
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim)


def buffer_reuse_hazard(model: onnx.ModelProto) -> list[str]:
    """8-bit QuantizeLinear outputs that follow a 4-bit one of the same type family and shape.

    onnxruntime's allocation planner before PR 32611 (1.19, the training build, among them) took a
    uint4[N] buffer (N/2 bytes) as the same size as a uint8[N] tensor and reused it: the 8-bit write
    overflows the heap (wrong logits or a crash). The default plans put 8-bit activations only before
    the first 4-bit one of their shape or at a unique shape; ``--high-bits`` layers mid-network do not.
    """
    graph = model.graph
    quantized = [n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"]
    shapes = {vi.name: vi for vi in list(graph.value_info) + list(graph.output)}
    if any(t not in shapes for t in quantized):   # e.g. a model saved without value_info
        graph = onnx.shape_inference.infer_shapes(model).graph
        shapes = {vi.name: vi for vi in list(graph.value_info) + list(graph.output)}
    seen_sub_byte: set[tuple] = set()
    hazards = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.output[0] not in shapes:
            continue
        vi = shapes[node.output[0]]
        elem = vi.type.tensor_type.elem_type
        if elem in SUB_BYTE:
            seen_sub_byte.add((SUB_BYTE[elem], _shape_key(vi)))
        elif (elem, _shape_key(vi)) in seen_sub_byte:
            hazards.append(node.output[0])
    return hazards


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
    Every other initializer is frozen. Inputs are passed positionally in ``input_names`` order.
    ``shared_arena``: see ``use_shared_arena``. ``profile``: onnxruntime's profiler records every run
    (``end_profiling``).
    """

    def __init__(self, model: onnx.ModelProto, trainable: list[str], threads: int = 1, shared_arena: bool = False,
                 profile: bool = False):
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
        opts = session_options(threads, shared_arena)
        self._profile = tempfile.TemporaryDirectory(prefix="onnxgenie-profile-") if profile else None
        if profile:
            opts.enable_profiling, opts.profile_file_prefix = True, str(Path(self._profile.name) / "profile")
        extra = self.output_names[1:]
        with tempfile.TemporaryDirectory(prefix="onnxgenie-ort-") as tmp:
            # the sessions hold everything once built: a process killed later leaves no files
            folder = Path(tmp)
            try:
                artifacts.generate_artifacts(
                    model, requires_grad=self.trainable + anchors, frozen_params=frozen, loss=None, optimizer=None,
                    artifact_directory=folder, additional_output_names=extra or None,
                    loss_input_names=[self.output_names[0]] if extra else None)
                self._state = api.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
                self._module = api.Module(str(folder / "training_model.onnx"), self._state,
                                          str(folder / "eval_model.onnx"), session_options=opts)
            except Exception as err:
                full = _storage_error(err, Path(tempfile.gettempdir()))
                if full is not None:
                    raise full from None
                raise
        self._module.train()

    def _run(self, inputs: tuple[np.ndarray, ...]) -> tuple:
        out = self._module(*[np.ascontiguousarray(x) for x in inputs])
        out = out if isinstance(out, (tuple, list)) else (out,)
        out = [o.numpy() if hasattr(o, "numpy") else o for o in out]  # an input-less graph returns OrtValues
        return (float(np.asarray(out[0]).reshape(-1)[0]), *out[1:])

    def step(self, *inputs: np.ndarray) -> tuple:
        """One forward+backward pass (``grads`` then reads the gradients): (loss as a float, *extra outputs)."""
        self._module.lazy_reset_grad()
        return self._run(inputs)

    def evaluate(self, *inputs: np.ndarray) -> tuple:
        """Forward only (no gradients, no state change): (loss as a float, *extra outputs)."""
        self._module.eval()
        try:
            return self._run(inputs)
        finally:
            self._module.train()

    def grads(self) -> dict[str, np.ndarray]:
        return {n: self._state.parameters[n].grad for n in self.trainable}

    def params(self) -> dict[str, np.ndarray]:
        return {n: self._state.parameters[n].data for n in self.trainable}

    def set_params(self, values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            self._state.parameters[name] = np.ascontiguousarray(value, dtype=np.float32)

    def end_profiling(self) -> list[dict]:
        """The profiler's events (Chrome trace format) of every run so far; the graph cannot run after this."""
        if self._profile is None:
            raise ValueError("this GradientGraph was built without profile=True")
        del self._module   # onnxruntime writes the profile when the session closes
        try:
            return json.loads(next(Path(self._profile.name).glob("profile*.json")).read_text())
        finally:
            self._profile.cleanup()
            self._profile = None
