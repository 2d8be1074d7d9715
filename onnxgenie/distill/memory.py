"""GENIE-D's memory before distillation: estimate the peak from shapes, run the teacher in chunks or lower
``--jobs`` rather than meet the OOM killer, and refuse a model no batch of which fits.

The estimate of one distilling process, from shapes only (shape inference of the normal form with the
batch axis as 1; the generator's sizes from its layout, ``generator_floats``; nothing is built):

    base      256 MiB + 4 × teacher weights + 6 × generator weights (values, gradients, Adam moments)
    one graph base + B × 1.3 × (teacher + generator activations per image)
    in chunks base + B × (0.8 × generator activations + 4 images) + c × 1.7 × teacher activations

(activations: the float tensors of one forward pass; B the batch, c the chunk.) Measured peak RSS of
the distilling process (VmHWM, 2 steps, onnxruntime-training 1.19.2, 1 thread; ``tools/bench_memory.py
distill``) / the estimate, MiB:
    EfficientNet-Lite0 224², one graph  B 8: 1212 / 1337   B 16: 2165 / 2307   B 32: 4015 / 4247
                                        B 64: 7640 / 8126
                  in chunks  B 16 c 4: 985 / 1144   B 16 c 8: 1487 / 1658   B 32 c 8: 1654 / 1920
                             B 64 c 8: 1896 / 2442  B 64 c 16: 2933 / 3472  B 128 c 8: 3011 / 3487
                             B 128 c 32: 5499 / 6576  B 128 c 43 (the 8 GiB limit's choice): 6584 / 7992
    ResNet-20 32², one graph B 32: 410 / 495   B 128: 711 / 1052;  in chunks B 128 c 32: 458 / 648
                             B 256 c 32: 571 / 843
In chunks the generator's memory and the teacher's passes reuse one arena one after
the other (``ortrain.use_shared_arena``), so the batch adds less per image than in one graph.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import onnx

from .. import resources   # looked up on each call: tests and tools patch available_memory
from ..errors import BadInputError
from ..graph.load import image_io
from ..resources import GIB, MIB, mib
from .generator import generator_floats

PROCESS_BASE = 256 * MIB   # python + numpy + onnxruntime-training + the built training graph
ACTIVATION_FACTOR = 1.3    # bytes kept per activation byte of one forward pass, with the arena's margin
CHUNK_TEACHER_FACTOR = 1.7  # the same for a chunk's teacher: its statistics and training passes
CHUNK_GENERATOR_FACTOR = 0.8  # the generator on the whole batch beside a chunked teacher
IMAGE_COPIES = 4           # images, their gradient, the zero gradient of the first pass, the saved batch
PROCESS_LIMIT = 8 * GIB    # a distilling process is kept under this by chunking (the presets' budget)


def chunk_size(batch: int, chunk: int) -> int:
    """The size of each of the fewest chunks of at most ``chunk`` images that hold ``batch``, as even
    as can be (the last one is padded to it)."""
    return -(-batch // -(-batch // max(1, chunk)))


@dataclass(frozen=True)
class MemoryEstimate:
    per_job: int        # bytes of one distilling process
    main: int           # bytes of the parent process while workers run
    jobs: int

    @property
    def total(self) -> int:
        return self.per_job if self.jobs == 1 else self.main + self.jobs * self.per_job


def activation_floats(model: onnx.ModelProto) -> int:
    """Float elements of every intermediate and output tensor for one image (batch axis as 1)."""
    return resources.tensor_floats(model)


@dataclass(frozen=True)
class DistillSizes:
    """What the estimate needs of a model, in bytes: fixed, and per image of the batch or of a chunk."""
    chw: tuple[int, int, int]
    base: int
    teacher: int        # activations of one image through the teacher
    generator: int      # activations of one image through the generator
    image: int

    def per_job(self, batch: int, chunk: int | None = None) -> int:
        """One process distilling batches of ``batch``, the teacher in chunks of ``chunk`` (None: one graph)."""
        if chunk is None or chunk >= batch:
            return self.base + int(batch * ACTIVATION_FACTOR * (self.teacher + self.generator))
        return (self.base + int(batch * (CHUNK_GENERATOR_FACTOR * self.generator + IMAGE_COPIES * self.image))
                + int(chunk * CHUNK_TEACHER_FACTOR * self.teacher))

    def largest_chunk(self, batch: int, cap: int) -> int | None:
        """The batch itself if one graph fits in ``cap`` bytes, else the largest chunk that does (None: none)."""
        if self.per_job(batch) <= cap:
            return batch
        per_image = CHUNK_TEACHER_FACTOR * self.teacher
        chunk = math.floor((cap - self.per_job(batch, 0)) / per_image) if batch > 1 else 0
        return min(chunk, batch - 1) if chunk >= 1 else None


def distill_sizes(normal: onnx.ModelProto) -> DistillSizes:
    chw = image_io(normal).chw
    gen_weights, gen_acts = generator_floats(chw)
    weights = sum(int(np.prod(t.dims, dtype=np.int64)) * 4 for t in normal.graph.initializer)
    return DistillSizes(chw=tuple(chw), base=PROCESS_BASE + 4 * weights + 6 * 4 * gen_weights,
                        teacher=4 * activation_floats(normal), generator=4 * gen_acts, image=4 * int(np.prod(chw)))


def distill_memory(normal: onnx.ModelProto, batch: int, jobs: int = 1, chunk: int | None = None) -> MemoryEstimate:
    """Peak memory of GENIE-D on ``normal`` (normal form) with ``batch`` images in each of ``jobs``
    processes, the teacher in chunks of ``chunk`` images (None: the whole batch in one graph)."""
    return MemoryEstimate(per_job=distill_sizes(normal).per_job(batch, chunk), main=PROCESS_BASE, jobs=jobs)


def _too_large(sizes: DistillSizes, batch: int, available: int) -> BadInputError:
    """The refusal of a model no process of which fits in ``available`` bytes, with the way out."""
    c, h, w = sizes.chw
    if sizes.per_job(1) > available:
        return BadInputError(
            f"distilling from this model needs about {mib(sizes.per_job(1))} per process even one image at a "
            f"time ({c}x{h}x{w} input: {mib(sizes.teacher)} of activations per image) and {mib(available)} are "
            "available; export the model at a smaller input size (such as 224x224), or quantize on a machine "
            "with more memory")
    fits = max(b for b in range(1, batch) if min(sizes.per_job(b), sizes.per_job(b, 1)) <= available)
    return BadInputError(
        f"distilling batches of {batch} {c}x{h}x{w} images needs about {mib(sizes.per_job(batch, 1))} per "
        f"process (the generator runs on the whole batch) and {mib(available)} are available; lower the batch "
        f"to {fits} or less (--distill-batch; --batch of onnxgenie distill)")


def fit_distill(normal: onnx.ModelProto, batch: int, jobs: int, chunk: int | None = None,
                available: int | None = None, notify: bool = True) -> tuple[int, int]:
    """(jobs, chunk) for GENIE-D: each of ``jobs`` processes under its share of the available memory and
    under ``PROCESS_LIMIT``, the teacher in chunks where the whole batch would not fit (``chunk`` ==
    ``batch``: one graph), then ``jobs`` lowered where even one image at a time would not fit. One line
    on stderr for each change. A model that does not fit with one process is refused (BadInputError);
    without a figure of available memory only ``PROCESS_LIMIT`` applies. A given ``chunk`` is kept."""
    sizes = distill_sizes(normal)
    available = resources.available_memory() if available is None else available

    def share(j: int) -> int | None:
        return available if available is None or j == 1 else (available - PROCESS_BASE) // j

    fitted, chosen = jobs, None
    for fitted in range(jobs, 0, -1):
        room = share(fitted)
        if chunk is not None:
            chosen = min(chunk, batch)
            if room is None or sizes.per_job(batch, chosen) <= room or fitted == 1:
                break
            continue
        chosen = sizes.largest_chunk(batch, PROCESS_LIMIT if room is None else min(PROCESS_LIMIT, room))
        if chosen is None:   # over the limit: within the share it still runs; without a figure, one at a time
            chosen = 1 if room is None else sizes.largest_chunk(batch, room)
        if chosen is not None:
            break
    if chosen is None:
        raise _too_large(sizes, batch, available)
    if fitted < jobs and notify:
        need = MemoryEstimate(min(sizes.per_job(batch), sizes.per_job(batch, 1)), PROCESS_BASE, jobs).total
        print(f"onnxgenie: note: {jobs} distillation jobs need about {need / MIB:.0f} MiB but "
              f"{available / MIB:.0f} MiB are available; using --jobs {fitted}", file=sys.stderr)
    if chosen < batch and chunk is None and notify:
        room = share(fitted)
        bound = f"the {PROCESS_LIMIT / GIB:.0f} GiB a distilling process is kept under"
        if room is not None and room < PROCESS_LIMIT:
            bound = f"{'its share of ' if fitted > 1 else ''}the {available / MIB:.0f} MiB available"
        print(f"onnxgenie: note: GENIE-D on batches of {batch} needs about {sizes.per_job(batch) / MIB:.0f} MiB per "
              f"process, more than {bound}; the teacher runs on chunks of {chunk_size(batch, chosen)} images "
              "(the same loss and gradients)", file=sys.stderr)
    return fitted, chosen


def fit_jobs(normal: onnx.ModelProto, batch: int, jobs: int, available: int | None = None,
             notify: bool = True) -> int:
    """The number of distillation processes ``fit_distill`` chooses."""
    return fit_distill(normal, batch, jobs, available=available, notify=notify)[0]
