"""Inference over many images, batch by batch, on ``ortrain``'s sessions: the one place for batching.

- ``predict``: a model's logits (evaluation, the KL scores of candidates and sensitivity, the parity check);
- ``batches``: any of a model's tensors, batch by batch (calibration statistics);
- ``run_into``: a model's output written into an array, in RAM or memory-mapped (GENIE-M's block data);
- ``sample_shapes``: the per-image shapes of tensors, from one image.

``batches`` and ``run_into`` keep one batch's activations within ``resources.BATCH_ACTIVATIONS``
(``resources.inference_batch``): EfficientNet-Lite0 at 224² takes 13 images with its activations read
back, 111 through its largest block.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from . import resources
from .ortrain import inference_session


def with_outputs(model: onnx.ModelProto, tensors: list[str], only: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` that also (``only``: just) outputs ``tensors``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if only:
        del out.graph.output[:]
    present = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in present)
    return out


def batches(model: onnx.ModelProto, x: np.ndarray, tensors: list[str] | None = None, batch_size: int = 256,
            threads: int = 1) -> Iterator[tuple[slice, list[np.ndarray]]]:
    """``model`` on ``x`` (float32, its input layout) in batches of at most ``batch_size`` images, fewer
    where one batch's activations would exceed the budget; yields each batch's slice of ``x`` and the
    values of ``tensors`` (any of the model's tensors; None: its outputs)."""
    batch_size = resources.inference_batch(model, tensors or [], batch_size)
    session = inference_session(with_outputs(model, tensors) if tensors else model, threads)
    name = session.get_inputs()[0].name
    for start in range(0, len(x), batch_size):
        part = slice(start, start + batch_size)
        yield part, session.run(tensors, {name: np.ascontiguousarray(x[part], dtype=np.float32)})


def run_into(model: onnx.ModelProto, x: np.ndarray, out: np.ndarray, threads: int = 1) -> np.ndarray:
    """``model``'s first output on ``x`` written into ``out`` (one row per image); returns ``out``."""
    for part, values in batches(model, x, threads=threads):
        out[part] = values[0]
    return out


def sample_shapes(model: onnx.ModelProto, tensors: list[str], x: np.ndarray, threads: int = 1
                  ) -> list[tuple[int, ...]]:
    """The shape of one image's values of each of ``tensors`` (the input included), from ``x[:1]``."""
    if not tensors:
        return []
    inputs = {i.name for i in model.graph.input}
    computed = [t for t in tensors if t not in inputs]
    session = inference_session(with_outputs(model, computed), threads)
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(x[:1], np.float32)}
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    values.update({name: x[:1] for name in inputs})
    return [tuple(values[t].shape[1:]) for t in tensors]


def predict(model: onnx.ModelProto, x: np.ndarray, batch_size: int = 250, threads: int = 1,
            level: str | None = None) -> np.ndarray:
    """Logits [N, classes] of ``model`` on ``x`` (float32, its input layout) in batches of ``batch_size``;
    ``level``: the graph optimisation level (``ortrain.inference_session``). A fixed-batch export runs at
    its batch, the last one padded."""
    n = len(x)
    session = inference_session(model, threads, optimization=level)
    name, fixed = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]
    if isinstance(fixed, int) and fixed > 0:
        batch_size = fixed
        x = np.concatenate([x, np.repeat(x[-1:], -len(x) % fixed, axis=0)]) if len(x) % fixed else x
    logits = np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0]
                             for i in range(0, len(x), batch_size)])[:n]
    return logits.reshape(len(logits), -1)   # [N, classes, 1, 1] heads as [N, classes]
