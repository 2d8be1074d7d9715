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


def relu_as_clip(model: onnx.ModelProto) -> None:
    """Relu -> Clip(x, 0) in place: the same values; in a training graph ClipGrad is 3-5x faster than
    onnxruntime-training 1.19's CPU ReluGrad. The gradients differ only at x == 0 exactly."""
    from onnx import numpy_helper

    relus = [n for n in model.graph.node if n.op_type == "Relu"]
    if relus:
        model.graph.initializer.append(numpy_helper.from_array(np.float32(0), "ortrain.relu_floor"))
    for node in relus:
        node.op_type = "Clip"
        node.input.append("ortrain.relu_floor")


def _channel_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Static channel counts (axis 1) of the tensors shape inference knows ({} if it fails)."""
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - an unknown shape only means no rewrite
        return {}
    counts = {}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) > 1 and dims[1].dim_value > 0:
            counts[vi.name] = dims[1].dim_value
    return counts


def avgpool_as_conv(model: onnx.ModelProto) -> None:
    """AveragePool -> depthwise Conv with weights 1/(kernel area), in place, where the two are the same
    function (no ceil mode or dilation; zero pads, or pads counted in the average). onnxruntime-training
    1.19's AveragePoolGrad fails when the batch axis is symbolic ("Can broadcast 0 by 0 or 1"; distillation
    fixes its batch, GENIE-M's block graphs do not); ConvGrad does not. Values equal up to float rounding."""
    from onnx import numpy_helper

    pools = [n for n in model.graph.node if n.op_type == "AveragePool" and n.domain in ("", "ai.onnx")]
    channel_counts = _channel_counts(model) if pools else {}
    for node in pools:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        pads = list(a.get("pads", []))
        explicit_pads = a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        pads_averaged = not any(pads) or a.get("count_include_pad", 0)
        plain = not a.get("ceil_mode", 0) and all(d == 1 for d in a.get("dilations", []))
        channels = channel_counts.get(node.input[0])
        if not (explicit_pads and pads_averaged and plain) or channels is None:
            continue
        kernel = list(a["kernel_shape"])
        weight = np.full([channels, 1, *kernel], 1.0 / float(np.prod(kernel)), np.float32)
        w_name = f"{node.name or node.output[0]}/as_conv_weight"
        model.graph.initializer.append(numpy_helper.from_array(weight, w_name))
        attrs = {"kernel_shape": kernel, "group": channels, "strides": list(a.get("strides", [1] * len(kernel)))}
        if pads:
            attrs["pads"] = pads
        node.op_type = "Conv"
        node.input.append(w_name)
        del node.attribute[:]
        node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in attrs.items())


# Activations without a gradient in onnxruntime-training 1.19; trainable_form writes them with ops that have
# one (the same values up to float rounding).
_NO_GRADIENT = ("HardSigmoid", "HardSwish", "PRelu", "Elu", "Selu", "Celu", "Softplus", "Softsign",
                "ThresholdedRelu", "Mish")


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, node: onnx.NodeProto):
        self.model, self.prefix, self.nodes, self.count = model, f"{node.name or node.output[0]}/grad_form", [], 0
        self.attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def const(self, value: float) -> str:
        self.count += 1
        name = f"{self.prefix}/c{self.count}"
        self.model.graph.initializer.append(onnx.numpy_helper.from_array(np.float32(value), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None) -> str:
        self.count += 1
        out = out or f"{self.prefix}/t{self.count}"
        self.nodes.append(onnx.helper.make_node(op_type, list(inputs), [out], name=f"{self.prefix}/n{self.count}"))
        return out

    def elu_part(self, x: str, alpha: float, inner_scale: float = 1.0) -> str:
        """alpha * (exp(min(x, 0) / inner_scale) - 1): the negative side of Elu/Celu/Selu."""
        neg = self.op("Min", x, self.const(0.0))
        if inner_scale != 1.0:
            neg = self.op("Div", neg, self.const(inner_scale))
        return self.op("Mul", self.const(alpha), self.op("Sub", self.op("Exp", neg), self.const(1.0)))

    def softplus(self, x: str, out: str | None = None) -> str:
        """relu(x) + log(1 + exp(-|x|)): log(1 + exp(x)) without overflow."""
        tail = self.op("Log", self.op("Add", self.const(1.0), self.op("Exp", self.op("Neg", self.op("Abs", x)))))
        return self.op("Add", self.op("Relu", x), tail, out=out)

    def rewrite(self, op_type: str, inputs: list[str], y: str) -> None:
        x, a = inputs[0], self.attrs
        if op_type == "HardSigmoid":
            lin = self.op("Add", self.op("Mul", x, self.const(a.get("alpha", 0.2))), self.const(a.get("beta", 0.5)))
            self.op("Clip", lin, self.const(0.0), self.const(1.0), out=y)
        elif op_type == "HardSwish":
            lin = self.op("Add", self.op("Mul", x, self.const(1 / 6)), self.const(0.5))
            self.op("Mul", x, self.op("Clip", lin, self.const(0.0), self.const(1.0)), out=y)
        elif op_type == "PRelu":   # relu(x) - slope * relu(-x)
            neg = self.op("Mul", inputs[1], self.op("Relu", self.op("Neg", x)))
            self.op("Sub", self.op("Relu", x), neg, out=y)
        elif op_type in ("Elu", "Celu"):
            alpha = a.get("alpha", 1.0)
            self.op("Add", self.op("Relu", x), self.elu_part(x, alpha, alpha if op_type == "Celu" else 1.0), out=y)
        elif op_type == "Selu":
            elu = self.op("Add", self.op("Relu", x), self.elu_part(x, a.get("alpha", 1.67326319217681884765625)))
            self.op("Mul", self.const(a.get("gamma", 1.05070102214813232421875)), elu, out=y)
        elif op_type == "Softplus":
            self.softplus(x, out=y)
        elif op_type == "Softsign":
            self.op("Div", x, self.op("Add", self.const(1.0), self.op("Abs", x)), out=y)
        elif op_type == "ThresholdedRelu":
            zero = self.const(0.0)
            self.op("Where", self.op("Greater", x, self.const(a.get("alpha", 1.0))), x, zero, out=y)
        elif op_type == "Mish":
            self.op("Mul", x, self.op("Tanh", self.softplus(x)), out=y)


def trainable_form(model: onnx.ModelProto) -> None:
    """In place: activations without a gradient in onnxruntime-training (``_NO_GRADIENT``) written with
    ops that have one, then Relu as Clip (``relu_as_clip``) and AveragePool as Conv (``avgpool_as_conv``).
    Values are unchanged up to float rounding."""
    nodes = []
    for node in model.graph.node:
        if node.op_type in _NO_GRADIENT and node.domain in ("", "ai.onnx"):
            rewriter = _Rewriter(model, node)
            rewriter.rewrite(node.op_type, list(node.input), node.output[0])
            nodes += rewriter.nodes
        else:
            if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx"):
                _with_layer_norm_statistics(node)
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    relu_as_clip(model)
    avgpool_as_conv(model)


def _with_layer_norm_statistics(node: onnx.NodeProto) -> None:
    """onnxruntime-training's LayerNormalization gradient reads the node's optional Mean and
    InvStdDev outputs, which exporters leave out (its builder asserts: ConvNeXt's blocks failed)."""
    while len(node.output) < 3:
        node.output.append(f"{node.output[0]}/layer_norm_{('mean', 'inv_std_dev')[len(node.output) - 1]}")


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


GRAD_ANCHOR = "/grad_anchor"


def shared_concat_inputs(model: onnx.ModelProto, trainable: list[str]) -> set[str]:
    """Tensors without a gradient of their own that two or more differentiated Concats read."""
    needs_grad = set(trainable)
    for node in model.graph.node:
        if any(i in needs_grad for i in node.input):
            needs_grad.update(node.output)
    readers: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Concat" and node.output[0] in needs_grad:
            for t in set(node.input):
                readers[t] = readers.get(t, 0) + 1
    return {t for t, n in readers.items() if n > 1 and t not in needs_grad}


def anchor_shared_concat_inputs(model: onnx.ModelProto, trainable: list[str]) -> list[str]:
    """Work around onnxruntime-training 1.19's Concat gradient (DenseNet's dense blocks): for a
    tensor that several Concats read and whose own gradient is not needed (a graph input, or
    computed from frozen values only), each Concat's gradient defines ``<tensor>_grad`` and the
    builder rejects its own graph. Multiplying the tensor by a scalar 1 that is "trainable" gives it
    a gradient that onnxruntime accumulates like any other. Changes ``model`` in place; returns the
    scalars' names (to be differentiated, never updated)."""
    g = model.graph
    shared = shared_concat_inputs(model, trainable)
    if not shared:
        return []
    anchors, anchored, nodes = [], {}, []
    produced_at_start = {i.name for i in g.input} | {t.name for t in g.initializer}

    def anchor(t: str) -> None:
        name = t + GRAD_ANCHOR
        g.initializer.append(onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [], [1.0]))
        nodes.append(onnx.helper.make_node("Mul", [t, name], [name + "ed"], name=name + "/Mul"))
        anchors.append(name)
        anchored[t] = name + "ed"

    for t in sorted(shared & produced_at_start):
        anchor(t)
    for node in g.node:
        if node.op_type == "Concat":
            for i, t in enumerate(node.input):
                if t in anchored:
                    node.input[i] = anchored[t]
        nodes.append(node)
        for t in node.output:
            if t in shared:
                anchor(t)
    del g.node[:]
    g.node.extend(nodes)
    return anchors


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
