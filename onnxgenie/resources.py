"""Memory sanity before distillation: estimate the peak from shapes, run the teacher in chunks or lower
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

import io
import math
import multiprocessing.context
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import popen_spawn_posix

import numpy as np
import onnx
from onnx import TensorProto, shape_inference

from .errors import BadInputError

MIB, GIB = 2 ** 20, 2 ** 30
PROCESS_BASE = 256 * MIB   # python + numpy + onnxruntime-training + the built training graph
ACTIVATION_FACTOR = 1.3    # bytes kept per activation byte of one forward pass, with the arena's margin
CHUNK_TEACHER_FACTOR = 1.7  # the same for a chunk's teacher: its statistics and training passes
CHUNK_GENERATOR_FACTOR = 0.8  # the generator on the whole batch beside a chunked teacher
IMAGE_COPIES = 4           # images, their gradient, the zero gradient of the first pass, the saved batch
PROCESS_LIMIT = 8 * GIB    # a distilling process is kept under this by chunking (the presets' budget)


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
    return tensor_floats(model)


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
    from .distill.generator import generator_floats
    from .graph.load import image_io

    chw = image_io(normal).chw
    gen_weights, gen_acts = generator_floats(chw)
    weights = sum(int(np.prod(t.dims, dtype=np.int64)) * 4 for t in normal.graph.initializer)
    return DistillSizes(chw=tuple(chw), base=PROCESS_BASE + 4 * weights + 6 * 4 * gen_weights,
                        teacher=4 * activation_floats(normal), generator=4 * gen_acts, image=4 * int(np.prod(chw)))


def distill_memory(normal: onnx.ModelProto, batch: int, jobs: int = 1, chunk: int | None = None) -> MemoryEstimate:
    """Peak memory of GENIE-D on ``normal`` (normal form) with ``batch`` images in each of ``jobs``
    processes, the teacher in chunks of ``chunk`` images (None: the whole batch in one graph)."""
    return MemoryEstimate(per_job=distill_sizes(normal).per_job(batch, chunk), main=PROCESS_BASE, jobs=jobs)


BATCH_ACTIVATIONS = GIB   # activations of one inference batch that reads intermediate tensors back


def tensor_floats(model: onnx.ModelProto, tensors: list[str] | None = None) -> int:
    """Float elements per image (batch axis as 1) of ``tensors``, or of every intermediate and output
    tensor; from shape inference (a tensor without a known shape counts 0)."""
    graph = shape_inference.infer_shapes(model).graph
    infos = list(graph.value_info) + list(graph.output)
    if tensors is not None:
        wanted = set(tensors)
        infos = list({vi.name: vi for vi in infos + list(graph.input) if vi.name in wanted}.values())
    total = 0
    for vi in infos:
        t = vi.type.tensor_type
        if t.elem_type != TensorProto.FLOAT or not t.HasField("shape") or not t.shape.dim:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        total += int(np.prod(dims[1:], dtype=np.int64))
    return total


def inference_batch(model: onnx.ModelProto, outputs: list[str], most: int) -> int:
    """Images per batch for running ``model`` with ``outputs`` read back: its activations (kept by
    onnxruntime) and the outputs (returned) of one batch within ``BATCH_ACTIVATIONS``, at most ``most``.
    Refuses (BadInputError) where one image alone needs more than the memory available."""
    per_image = 4 * (tensor_floats(model) + tensor_floats(model, outputs))
    available = available_memory()
    if available is not None and per_image > available:
        c_h_w = "x".join(str(d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
        raise BadInputError(f"running this model on one {c_h_w} image with its activations read back needs about "
                            f"{_mib(per_image)} and {_mib(available)} are available; export the model at a smaller "
                            "input size (such as 224x224), or quantize on a machine with more memory")
    return max(1, min(most, BATCH_ACTIVATIONS // max(per_image, 1)))


def _proc_kib(path: str, key: str) -> int | None:
    """The value (kB) of ``key:`` in a /proc file such as /proc/self/status, in bytes; None if absent."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss() -> int:
    """This process's peak resident memory in bytes, counted from its last exec.

    ``VmHWM`` from /proc/self/status; ``ru_maxrss`` only where that is missing, because Linux carries
    ``ru_maxrss`` over fork and exec (a child of a large process reports its parent's peak)."""
    peak = _proc_kib("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), else free pages from sysconf, else None."""
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, as in a container or under taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(threads: int = 0, notify: bool = True) -> int:
    """``threads`` (at most one per core, ``cap_to_cores``), or one onnxruntime thread per core when 0."""
    return cap_to_cores(threads, "--threads", notify) if threads > 0 else cores()


def cap_to_cores(value: int, flag: str, notify: bool = True) -> int:
    """``value`` processes or threads, at most one per core (one line on stderr when lowered): more only
    share the cores, each with its own memory."""
    n = cores()
    if value <= n:
        return value
    if notify:
        print(f"onnxgenie: note: {flag} {value} is more than the {n} core(s) this process may use; using {flag} {n}",
              file=sys.stderr)
    return n


def default_jobs(n_batches: int) -> int:
    """One distillation worker per core, at most one per batch (``fit_jobs`` then bounds it by memory)."""
    return max(1, min(cores(), n_batches))


def _mib(n: int) -> str:
    if n < 10 * MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / MIB:.0f} MiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"


def _too_large(sizes: DistillSizes, batch: int, available: int) -> BadInputError:
    """The refusal of a model no process of which fits in ``available`` bytes, with the way out."""
    c, h, w = sizes.chw
    if sizes.per_job(1) > available:
        return BadInputError(
            f"distilling from this model needs about {_mib(sizes.per_job(1))} per process even one image at a "
            f"time ({c}x{h}x{w} input: {_mib(sizes.teacher)} of activations per image) and {_mib(available)} are "
            "available; export the model at a smaller input size (such as 224x224), or quantize on a machine "
            "with more memory")
    fits = max(b for b in range(1, batch) if min(sizes.per_job(b), sizes.per_job(b, 1)) <= available)
    return BadInputError(
        f"distilling batches of {batch} {c}x{h}x{w} images needs about {_mib(sizes.per_job(batch, 1))} per "
        f"process (the generator runs on the whole batch) and {_mib(available)} are available; lower the batch "
        f"to {fits} or less (--distill-batch; --batch of onnxgenie distill)")


def fit_distill(normal: onnx.ModelProto, batch: int, jobs: int, chunk: int | None = None,
                available: int | None = None, notify: bool = True) -> tuple[int, int]:
    """(jobs, chunk) for GENIE-D: each of ``jobs`` processes under its share of the available memory and
    under ``PROCESS_LIMIT``, the teacher in chunks where the whole batch would not fit (``chunk`` ==
    ``batch``: one graph), then ``jobs`` lowered where even one image at a time would not fit. One line
    on stderr for each change. A model that does not fit with one process is refused (BadInputError);
    without a figure of available memory only ``PROCESS_LIMIT`` applies. A given ``chunk`` is kept."""
    sizes = distill_sizes(normal)
    available = available_memory() if available is None else available

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
        from .distill.genie_d import chunk_size

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


@contextmanager
def process_pool(workers: int, initializer=None, initargs: tuple = ()):
    """A ProcessPoolExecutor of ``workers`` spawned processes that ignore SIGINT (Ctrl-C is the parent's to
    handle) and die with the parent, even when it is killed with SIGKILL (``die_with_parent``). On
    Ctrl-C, SIGTERM or any error inside the block the processes are terminated at once (not left to
    finish their task), then the pool is shut down."""
    from concurrent.futures import ProcessPoolExecutor

    from concurrent.futures.process import BrokenProcessPool

    context = _SignalSafeSpawn()
    pool = ProcessPoolExecutor(workers, context, _pool_worker_init, (initializer, initargs, os.getpid()))
    try:
        yield pool
    except BaseException as err:
        # every process started, also one a signal caught before the pool had registered it
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        if isinstance(err, BrokenPipeError):   # a worker died while reading its arguments (_Popen)
            raise BrokenProcessPool("a worker process died while it was starting") from err
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _SignalSafeProcess(multiprocessing.context.SpawnProcess):
    """Starts with SIGINT and SIGTERM blocked (the mask survives exec), so that a signal while the worker is
    still importing stays pending until ``_pool_worker_init``: a Ctrl-C is dropped there, a SIGTERM ends the
    worker there; no traceback from a half-started worker. In the parent a SIGINT/SIGTERM during start()
    (which writes the worker's arguments into a pipe while the worker imports, so it can take seconds) is
    held back until the process is fully started, so that the pool can terminate it; then it is raised.
    Raised in the middle of that write, it would leave the worker reading a truncated pickle."""

    def start(self):
        held = []
        hold = threading.current_thread() is threading.main_thread()
        handlers = {}
        if hold:
            for sig in _HELD_SIGNALS:
                if callable(signal.getsignal(sig)):
                    handlers[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(_HELD_SIGNALS))
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        for sig in dict.fromkeys(held):
            signal.raise_signal(sig)


    @staticmethod
    def _Popen(process_obj):  # noqa: N802 - multiprocessing's name
        return _Popen(process_obj)


class _Popen(popen_spawn_posix.Popen):
    """CPython's spawn launch with one change: the child's ends of the two pipes are closed in the parent
    before the arguments are written, not after. A worker that dies while reading them (larger than a
    pipe's buffer: the model's bytes) then fails the write with BrokenPipeError; with the parent's own
    copy of the read end open, the write blocked forever (and with SIGINT/SIGTERM held, unkillably)."""

    def _launch(self, process_obj):
        from multiprocessing import resource_tracker, spawn, util
        from multiprocessing.context import reduction, set_spawning_popen

        tracker_fd = resource_tracker.getfd()
        self._fds.append(tracker_fd)
        prep_data = spawn.get_preparation_data(process_obj._name)
        fp = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, fp)
            reduction.dump(process_obj, fp)
        finally:
            set_spawning_popen(None)
        parent_r, child_w = os.pipe()
        child_r, parent_w = os.pipe()
        self.finalizer = util.Finalize(self, util.close_fds, (parent_r, parent_w))
        try:
            cmd = spawn.get_command_line(tracker_fd=tracker_fd, pipe_handle=child_r)
            self._fds.extend([child_r, child_w])
            self.pid = util.spawnv_passfds(spawn.get_executable(), cmd, self._fds)
            self.sentinel = parent_r
        finally:
            os.close(child_r)
            os.close(child_w)
        with open(parent_w, "wb", closefd=False) as f:
            f.write(fp.getbuffer())


class _SignalSafeSpawn(multiprocessing.context.SpawnContext):
    """The spawn context of one pool; it remembers the processes it made."""

    def __init__(self):
        self.processes: list[_SignalSafeProcess] = []

    def Process(self, *args, **kwargs):  # noqa: N802 - multiprocessing's name
        process = _SignalSafeProcess(*args, **kwargs)
        self.processes.append(process)
        return process


def _pool_worker_init(initializer, initargs: tuple, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(_HELD_SIGNALS))   # a pending Ctrl-C is dropped, a SIGTERM ends it
    if initializer is not None:
        initializer(*initargs)


PR_SET_PDEATHSIG = 1   # linux/prctl.h
WATCHDOG_S = 0.5


def die_with_parent(parent: int) -> None:
    """End this process when ``parent`` ends, however it ends (the OOM killer's SIGKILL included): Linux's
    parent-death signal (prctl PR_SET_PDEATHSIG, SIGKILL), and a watchdog thread that polls the parent's
    pid where that is missing. A parent already gone ends this process now."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="onnxgenie-parent-watchdog", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCHDOG_S)
    os._exit(1)
