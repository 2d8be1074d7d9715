"""The data GENIE-M learns a block on: block inputs and targets, in RAM under the memory budget and in
memory-mapped files in the work directory above it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ...runtime import run_into, sample_shapes, with_outputs


class BlockStore:
    """Arrays of block inputs/targets: in RAM under the budget, memory-mapped files in ``folder`` above it."""

    def __init__(self, folder: Path, budget_bytes: int):
        self.folder, self.budget, self.count = folder, budget_bytes, 0

    def empty(self, shape: tuple[int, ...], live_arrays: int = 3) -> np.ndarray:
        nbytes = int(np.prod(shape)) * 4
        if nbytes * live_arrays <= self.budget:
            return np.empty(shape, np.float32)
        self.count += 1
        path = self.folder / f"stream_{self.count % 4}.npy"   # at most 4 files alive
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)

    def remove_files(self) -> None:
        for path in self.folder.glob("stream_*.npy"):
            path.unlink()

    def output(self, model: onnx.ModelProto, x: np.ndarray, threads: int) -> np.ndarray:
        """``model``'s (first) output on ``x``, in a new array of the store."""
        shape = sample_shapes(model, [model.graph.output[0].name], x, threads)[0]
        return run_into(model, x, self.empty((len(x), *shape)), threads)

    def tensor(self, block_model: onnx.ModelProto, tensor: str, x: np.ndarray, threads: int) -> np.ndarray:
        """The values on ``x`` of one of the block's tensors (its input included)."""
        if tensor == block_model.graph.input[0].name:
            return x
        return self.output(with_outputs(block_model, [tensor], only=True), x, threads)
