"""The machine's resources: memory (peak, available, from shapes), cores, threads and worker processes that
end with the run.

Activation memory from shapes only (shape inference with the batch axis as 1): ``tensor_floats``;
inference batches bounded by it (``inference_batch``). GENIE-D's own estimate, built on these, is
``distill/memory.py``.
"""

from __future__ import annotations

import ctypes
import io
import multiprocessing.context
import os
import resource
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from multiprocessing import popen_spawn_posix, resource_tracker, spawn, util
from multiprocessing.context import reduction, set_spawning_popen

import numpy as np
import onnx
from onnx import TensorProto, shape_inference

from .errors import BadInputError

MIB, GIB = 2 ** 20, 2 ** 30


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


MULTIPLY_ADD_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def multiply_adds(model: onnx.ModelProto) -> int:
    """Multiply-adds of one image (batch axis as 1) through the Conv, Gemm and MatMul nodes: each output
    element costs one per element of its reduction (the weight's C_in/group x kernel, or K); from shape
    inference (a node without known shapes counts 0)."""
    graph = shape_inference.infer_shapes(model).graph
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
              for vi in [*graph.input, *graph.value_info, *graph.output] if vi.type.tensor_type.HasField("shape")}
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    total = 0
    for node in graph.node:
        if node.op_type not in MULTIPLY_ADD_OPS or node.output[0] not in shapes:
            continue
        out, a, b = shapes[node.output[0]], shapes.get(node.input[0]), shapes.get(node.input[1])
        if a is None or b is None or not out:
            continue
        if node.op_type == "Conv":
            reduction = int(np.prod(b[1:], dtype=np.int64))
        elif node.op_type == "ConvTranspose":   # each input element meets C_out/group x kernel weights
            out, reduction = a, int(np.prod(b[1:], dtype=np.int64))
        elif node.op_type == "Gemm":
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            reduction = a[0] if trans_a else a[-1]
        else:
            reduction = a[-1]
        total += int(np.prod(out[1:], dtype=np.int64)) * reduction
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
                            f"{mib(per_image)} and {mib(available)} are available; export the model at a smaller "
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


def mib(n: int) -> str:
    """``n`` bytes in words: 3.2 MiB, 512 MiB, 8.5 GiB."""
    if n < 10 * MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / MIB:.0f} MiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"


@contextmanager
def process_pool(workers: int, initializer=None, initargs: tuple = ()):
    """A ProcessPoolExecutor of ``workers`` spawned processes that ignore SIGINT (Ctrl-C is the parent's to
    handle) and die with the parent, even when it is killed with SIGKILL (``die_with_parent``). On
    Ctrl-C, SIGTERM or any error inside the block the processes are terminated at once (not left to
    finish their task), then the pool is shut down."""
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
