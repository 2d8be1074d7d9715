"""Memory sanity before distillation: estimate the peak, lower ``--jobs`` rather than meet the OOM killer.

The estimate is a process base plus, per image of a batch, the float activations of the generator
and the teacher (shape inference, one image), times a margin for onnxruntime's arena, which grows in
chunks. Measured peak RSS on this code (onnxruntime-training 1.19.2, VmHWM): digits ResNet-8 16x16
138 MB (batch 16) / 205 MB (batch 128); CIFAR ResNet-20 380 MB (batch 32) / 692 MB (batch 128) /
1126 MiB (batch 160, where the arena jumped); ShuffleNet g3 about 3.7 GB (batch 128). The estimate
is above every one of them.
"""

from __future__ import annotations

import io
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

MIB = 2 ** 20
PROCESS_BASE = 256 * MIB   # python + numpy + onnxruntime-training + the built training graph
ACTIVATION_FACTOR = 1.3    # bytes kept per activation byte of one forward pass, with the arena's margin


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
    graph = shape_inference.infer_shapes(model).graph
    total = 0
    for vi in list(graph.value_info) + list(graph.output):
        t = vi.type.tensor_type
        if t.elem_type != TensorProto.FLOAT or not t.HasField("shape") or not t.shape.dim:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        total += int(np.prod(dims[1:], dtype=np.int64))
    return total


def distill_memory(normal: onnx.ModelProto, batch: int, jobs: int = 1) -> MemoryEstimate:
    """Peak memory of GENIE-D on ``normal`` (normal form) with ``batch`` images in each of ``jobs`` processes."""
    from .distill.generator import build_generator
    from .graph.load import image_io

    floats = activation_floats(normal) + activation_floats(build_generator(image_io(normal).chw))
    per_image = int(4 * floats * ACTIVATION_FACTOR)
    weights = sum(int(np.prod(t.dims, dtype=np.int64)) * 4 for t in normal.graph.initializer)
    per_job = PROCESS_BASE + 4 * weights + per_image * batch   # weights, grads, two Adam moments
    return MemoryEstimate(per_job=per_job, main=PROCESS_BASE, jobs=jobs)


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


def fit_jobs(normal: onnx.ModelProto, batch: int, jobs: int, available: int | None = None,
             notify: bool = True) -> int:
    """``jobs`` lowered until the estimate fits in available memory (one line on stderr when lowered)."""
    available = available_memory() if available is None else available
    if available is None or jobs <= 1:
        if available is not None and notify:
            need = distill_memory(normal, batch, 1).total
            if need > available:
                print(f"onnxgenie: note: distillation needs about {need / MIB:.0f} MiB (batch {batch}) but "
                      f"{available / MIB:.0f} MiB are available; lower --distill-batch if it gets killed",
                      file=sys.stderr)
        return jobs
    fitted = jobs
    while fitted > 1 and distill_memory(normal, batch, fitted).total > available:
        fitted -= 1
    if fitted < jobs and notify:
        need = distill_memory(normal, batch, jobs).total
        print(f"onnxgenie: note: {jobs} distillation jobs need about {need / MIB:.0f} MiB but "
              f"{available / MIB:.0f} MiB are available; using --jobs {fitted}", file=sys.stderr)
    return fitted


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
