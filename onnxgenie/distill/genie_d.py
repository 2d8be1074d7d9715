"""GENIE-D (Sec. 3.1): distil a synthetic calibration set from the teacher's BN statistics.

One training graph per run: latents → generator → swing teacher → BNS loss (``bns.py``); where that
graph would not fit in memory, ``ChunkedGraph`` runs the generator on the whole batch and the teacher
on chunks of it, with the same loss and gradients (``bns.py`` says why; ``memory.py`` picks the
chunk). Each batch starts from fresh latents and a fresh generator (seeded by (seed, batch index), so
a batch's result does not depend on which process computes it, or whether the run was resumed) and
takes ``iters`` Adam steps with two parameter groups, as in the reference: latents lr 0.1 with
ReduceLROnPlateau (patience 100, min lr 1e-4), generator lr 0.01 ×0.95 every 100 steps. The swing
offsets are drawn each step from the batch's generator (the same for every chunk of a step).

Modes (the paper's Table 2 ablation), each with or without swing:
  genie  generator + trainable latents
  noise  generator on fixed latents (the latents are a graph input, not a parameter)
  zeroq  the pixels themselves are the parameters (ZeroQ's Adam lr 0.5 with the same plateau schedule)

The images returned are those of the last step's forward pass (as the reference does), in the
teacher's input space (the generator's last BN without affine gives zero mean, unit std per channel).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from ..builder import GraphBuilder, make_model
from ..errors import (BadInputError, BadSettingError, DivergenceError, OnnxGenieError, ResumeMismatchError,
                      StorageError, UnsupportedModelError)
from ..graph.bn import require_bn
from ..graph.load import image_io, nhwc_transpose, normalize, with_batch
from ..graph.swing import SWING_INPUTS, swing_feed, swing_rewrite
from ..optim import Adam, ParamGroup
from ..ortrain import GradientGraph, describe_ort_error, inference_session
from ..progress import progress_bar as _progress
from ..resources import peak_rss, process_pool
from .bns import (IMAGE_WEIGHTS, INPUT_TERMS, LOSS, batch_mean_name, batch_statistics, batch_var_name,
                  bns_head_model, bns_loss_model, bns_statistics_model, bns_surrogate_model, grad_mean_name,
                  grad_var_name, image_mean_name, image_var_name)
from .generator import LATENT_DIM, build_generator, init_generator, trainable_names
from .memory import chunk_size, fit_distill

MODES = ("genie", "zeroq", "noise")
LATENTS, PIXELS, IMAGES = "latents", "pixels", "distilled_images"
IMAGE_GRAD, SOURCE_SURROGATE = "distilled_images/grad", "distilled_images/surrogate"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class DistillConfig:
    n_batches: int
    batch: int
    iters: int
    mode: str = "genie"
    swing: bool = True
    seed: int = 0
    lr_latent: float = 0.1
    lr_generator: float = 0.01
    lr_pixels: float = 0.5
    fused: bool = True


class ReduceLROnPlateau:
    """torch.optim.lr_scheduler.ReduceLROnPlateau (mode min, relative threshold, no cooldown) for one group."""

    def __init__(self, group: ParamGroup, patience: int = 100, factor: float = 0.1, threshold: float = 1e-4,
                 min_lr: float = 1e-4, eps: float = 1e-8):
        self.group, self.patience, self.factor, self.threshold = group, patience, factor, threshold
        self.min_lr, self.eps = min_lr, eps
        self.best, self.bad_steps = math.inf, 0

    def step(self, loss: float) -> None:
        if loss < self.best * (1 - self.threshold):
            self.best, self.bad_steps = loss, 0
        else:
            self.bad_steps += 1
        if self.bad_steps > self.patience:
            new_lr = max(self.group.lr * self.factor, self.min_lr)
            if self.group.lr - new_lr > self.eps:
                self.group.lr = new_lr
            self.bad_steps = 0


# The training graph ---------------------------------------------------------------------------

def _source_graph(teacher: onnx.ModelProto, cfg: DistillConfig):
    """What writes the teacher's image input (in the model's layout): the generator, or the pixels.
    Returns (its nodes and initializers, inputs, groups, image shape)."""
    io = image_io(teacher)
    image = io.input
    shape = [cfg.batch, *io.chw]
    nhwc = nhwc_transpose(teacher) is not None
    source = f"{image}/nchw" if nhwc else image   # what the generator (or the pixels) write
    b, inputs = GraphBuilder(), []
    groups: dict[str, list[str]] = {}
    if cfg.mode == "zeroq":
        b.op("Identity", b.const(np.zeros(shape, np.float32), PIXELS), out=source, name="pixels_to_image")
        groups["pixels"] = [PIXELS]
    else:
        gen = build_generator(io.chw, latents=LATENTS, images=source)
        b.nodes.extend(gen.graph.node)
        b.inits.extend(gen.graph.initializer)
        groups["generator"] = trainable_names(gen)
        if cfg.mode == "genie":
            b.const(np.zeros((cfg.batch, LATENT_DIM), np.float32), LATENTS)
            groups["latents"] = [LATENTS]
        else:  # noise: fixed latents are data, fed each step
            inputs.append(helper.make_tensor_value_info(LATENTS, TensorProto.FLOAT, [cfg.batch, LATENT_DIM]))
    if nhwc:   # the model's own Transpose turns them back
        b.op("Transpose", source, out=image, name="images_to_nhwc", perm=[0, 2, 3, 1])
        shape = [shape[0], shape[2], shape[3], shape[1]]
    b.op("Identity", image, out=IMAGES)
    return b, inputs, groups, shape


def _model(name: str, nodes, inputs, outputs, inits, like: onnx.ModelProto) -> onnx.ModelProto:
    model = make_model(nodes, name, inputs, outputs, inits, like, producer_name="onnxgenie")
    return shape_inference.infer_shapes(model)


def _check_names(inits: list[onnx.TensorProto], teacher: onnx.ModelProto) -> None:
    clash = {t.name for t in inits} & {t.name for t in teacher.graph.initializer}
    if clash:
        raise UnsupportedModelError(f"the model uses tensor names reserved for the generator ({sorted(clash)[:3]}); "
                                    "rename them in the model")


def _swung(teacher: onnx.ModelProto, cfg: DistillConfig, batch: int) -> onnx.ModelProto:
    return swing_rewrite(with_batch(teacher, batch)) if cfg.swing else teacher


def training_model(teacher: onnx.ModelProto, cfg: DistillConfig) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
    """latents → generator → (swing) teacher → BNS loss, outputs (bns_loss, distilled_images).

    ``teacher`` is in normal form. Returns the model and its trainable names per parameter group
    (``latents``, ``generator`` or ``pixels``).
    """
    loss_model = bns_loss_model(_swung(teacher, cfg, cfg.batch), fused=cfg.fused)
    image = image_io(teacher).input
    source, inputs, groups, shape = _source_graph(teacher, cfg)
    _check_names(source.inits, loss_model)
    inputs += [i for i in loss_model.graph.input if i.name != image]
    outputs = [helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, []),
               helper.make_tensor_value_info(IMAGES, TensorProto.FLOAT, shape)]
    model = _model("genie_d", source.nodes + list(loss_model.graph.node), inputs, outputs,
                   source.inits + list(loss_model.graph.initializer), loss_model)
    return model, groups


def chunked_models(teacher: onnx.ModelProto, cfg: DistillConfig, chunk: int
                   ) -> tuple[dict[str, onnx.ModelProto], dict[str, list[str]]]:
    """The four graphs of a step on the teacher in chunks of ``chunk`` images (see ``ChunkedGraph``):
    ``source`` (generator or pixels on the whole batch, with the fed image gradient's surrogate),
    ``stats`` (teacher forward: per-image statistics), ``head`` (BN terms of the batch statistics) and
    ``teacher`` (the surrogate of one chunk; its image is its one trainable initializer)."""
    source, inputs, groups, shape = _source_graph(teacher, cfg)
    image = image_io(teacher).input
    source.op("ReduceSum", source.op("Mul", image, IMAGE_GRAD, out="source/weighted"), out=SOURCE_SURROGATE,
              keepdims=0)
    inputs.append(helper.make_tensor_value_info(IMAGE_GRAD, TensorProto.FLOAT, shape))
    outputs = [helper.make_tensor_value_info(SOURCE_SURROGATE, TensorProto.FLOAT, []),
               helper.make_tensor_value_info(IMAGES, TensorProto.FLOAT, shape)]
    chunk = chunk_size(cfg.batch, chunk)
    swung = _swung(teacher, cfg, chunk)
    surrogate = bns_surrogate_model(swung, fused=cfg.fused)
    _check_names(source.inits, surrogate)
    chunk_shape = [chunk, *shape[1:]]
    kept = [i for i in surrogate.graph.input if i.name != image]
    del surrogate.graph.input[:]
    surrogate.graph.input.extend(kept)
    surrogate.graph.initializer.append(numpy_helper.from_array(np.zeros(chunk_shape, np.float32), image))
    models = {"source": _model("genie_d_source", source.nodes, inputs, outputs, source.inits, teacher),
              "stats": bns_statistics_model(swing_rewrite(teacher) if cfg.swing else teacher, fused=cfg.fused),
              "head": bns_head_model(swung, fused=cfg.fused),
              "teacher": surrogate}
    return models, groups


def initial_values(model: onnx.ModelProto, cfg: DistillConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fresh parameters for one batch: N(0,1) latents or pixels, a PyTorch-style generator init."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    if cfg.mode == "zeroq":
        return {PIXELS: rng.standard_normal(shapes[PIXELS]).astype(np.float32)}
    values = {}
    if cfg.mode == "genie":
        values[LATENTS] = rng.standard_normal(shapes[LATENTS]).astype(np.float32)
    else:
        values[LATENTS] = rng.standard_normal((cfg.batch, LATENT_DIM)).astype(np.float32)
    gen = onnx.ModelProto()
    gen.graph.initializer.extend(t for t in model.graph.initializer if t.name.startswith("generator."))
    values.update(init_generator(gen, rng))
    return values


# One batch ------------------------------------------------------------------------------------

def chunks(batch: int, chunk: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk (``chunk_size``)."""
    size = chunk_size(batch, chunk)
    return [(start, min(start + size, batch)) for start in range(0, batch, size)]


class ChunkedGraph:
    """One GENIE-D step with the teacher run on chunks of the batch; the loss and every gradient are
    those of the whole batch (``bns.py``: batch statistics from chunks, and the surrogate).

    1. ``source`` (generator or pixels) forward on the whole batch: the images;
    2. ``stats`` per chunk (inference): per-image statistics → batch mean m and variance v per layer;
    3. ``head``: the BN terms L(m, v) and their gradients g_m, g_v (onnxruntime-training);
    4. ``teacher`` per chunk: the surrogate's gradient w.r.t. the chunk's images;
    5. ``source`` forward + backward of <images, fed image gradient>: the gradients of the parameters.
    The last chunk is padded (with weight 0) to the size of the others: one graph of each kind. The
    sessions share one CPU arena (``ortrain.use_shared_arena``), which lives as long as the process:
    ``distill`` runs chunked batches in worker processes.
    """

    def __init__(self, models: dict[str, onnx.ModelProto], trainable: list[str], cfg: DistillConfig,
                 threads: int = 1):
        self.cfg = cfg
        self.source = GradientGraph(models["source"], trainable, threads=threads, shared_arena=True)
        self.image = models["stats"].graph.input[0].name   # the teacher's image: the stats graph's input
        self.teacher = GradientGraph(models["teacher"], [self.image], threads=threads, shared_arena=True)
        self.size = next(t for t in models["teacher"].graph.initializer if t.name == self.image).dims[0]
        self.stats = inference_session(models["stats"], threads, shared_arena=True)
        self.stats_inputs = [i.name for i in self.stats.get_inputs()]   # the image, then any swing offsets
        grad_input = next(i for i in models["source"].graph.input if i.name == IMAGE_GRAD)
        self.image_shape = tuple(d.dim_value for d in grad_input.type.tensor_type.shape.dim)
        self.layers = sum(1 for o in models["stats"].graph.output if o.name.endswith(".image_mean"))
        head = [name(i) for i in range(self.layers) for name in (batch_mean_name, batch_var_name)]
        self.head = GradientGraph(models["head"], head, threads=threads, shared_arena=True)
        self.set_params, self.params, self.grads = self.source.set_params, self.source.params, self.source.grads

    def _padded(self, images: np.ndarray, start: int, stop: int) -> np.ndarray:
        part = images[start:stop]
        if len(part) == self.size:
            return part
        return np.concatenate([part, np.zeros((self.size - len(part), *part.shape[1:]), part.dtype)])

    def step(self, feeds: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        batch = self.cfg.batch
        source_in = {**feeds, IMAGE_GRAD: np.zeros(self.image_shape, np.float32)}
        _, images = self.source.evaluate(*[source_in[n] for n in self.source.input_names])
        parts = chunks(batch, self.size)
        swing = {n: feeds[n] for n in SWING_INPUTS if n in feeds}
        names = [INPUT_TERMS] + [name(i) for i in range(self.layers) for name in (image_mean_name, image_var_name)]
        stats: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for start, stop in parts:   # the statistics graph takes any batch: no padding
            feed = {self.stats_inputs[0]: images[start:stop], **swing}
            for name, value in zip(names, self.stats.run(names, {n: feed[n] for n in self.stats_inputs})):
                stats[name].append(value)
        moments = {}
        for i in range(self.layers):
            moments[batch_mean_name(i)], moments[batch_var_name(i)] = batch_statistics(
                np.concatenate(stats[image_mean_name(i)]), np.concatenate(stats[image_var_name(i)]))
        self.head.set_params(moments)
        loss = self.head.step()[0] + float(np.concatenate(stats[INPUT_TERMS]).astype(np.float64).mean())
        head_grads = self.head.grads()
        teacher_in = {**swing, **{batch_mean_name(i): moments[batch_mean_name(i)] for i in range(self.layers)}}
        for i in range(self.layers):
            teacher_in[grad_mean_name(i)] = head_grads[batch_mean_name(i)]
            teacher_in[grad_var_name(i)] = head_grads[batch_var_name(i)]
        image_grad = np.empty_like(images)
        for start, stop in parts:
            weights = np.zeros(self.size, np.float32)
            weights[:stop - start] = 1.0 / batch
            teacher_in[IMAGE_WEIGHTS] = weights
            self.teacher.set_params({self.image: self._padded(images, start, stop)})
            self.teacher.step(*[teacher_in[n] for n in self.teacher.input_names])
            image_grad[start:stop] = self.teacher.grads()[self.image][:stop - start]
        source_in[IMAGE_GRAD] = image_grad
        self.source.step(*[source_in[n] for n in self.source.input_names])
        return loss, images


class BatchDistiller:
    """Owns the training graph(s) of one batch and distils batches on them, one at a time: one
    GradientGraph of the whole step, or a ``ChunkedGraph`` when ``model`` is ``chunked_models``'s dict."""

    def __init__(self, model: onnx.ModelProto | dict[str, onnx.ModelProto], groups: dict[str, list[str]],
                 cfg: DistillConfig, threads: int = 1):
        self.cfg, self.groups = cfg, groups
        self.model = model["source"] if isinstance(model, dict) else model
        self.trainable = [n for names in groups.values() for n in names]
        try:
            if isinstance(model, dict):
                self.graph = ChunkedGraph(model, self.trainable, cfg, threads=threads)
            else:
                self.graph = GradientGraph(model, self.trainable, threads=threads)
        except StorageError:
            raise
        except Exception as err:   # an op without a gradient between the image and a BN layer
            raise UnsupportedModelError(
                f"distillation cannot train through this model ({describe_ort_error(err)}); quantize it from real "
                "images with --calib-data, or re-export it without that op") from None

    def _step(self, feeds: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        if isinstance(self.graph, ChunkedGraph):
            return self.graph.step(feeds)
        loss, images = self.graph.step(*[feeds[n] for n in self.graph.input_names])
        return loss, images

    def run(self, index: int, on_step=None) -> tuple[np.ndarray, np.ndarray, float]:
        """Distil batch ``index``: (images, loss per step, seconds)."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, index])
        values = initial_values(self.model, cfg, rng)
        fixed = {LATENTS: values.pop(LATENTS)} if cfg.mode == "noise" else {}
        self.graph.set_params(values)
        lrs = {"latents": cfg.lr_latent, "generator": cfg.lr_generator, "pixels": cfg.lr_pixels}
        groups = {name: ParamGroup(names, lrs[name]) for name, names in self.groups.items()}
        adam = Adam(list(groups.values()))
        plateau = [ReduceLROnPlateau(groups[g]) for g in ("latents", "pixels") if g in groups]
        history = np.zeros(cfg.iters, np.float32)
        start = time.perf_counter()
        images = None
        for step in range(cfg.iters):
            feeds = dict(fixed)
            if cfg.swing:
                feeds.update(swing_feed(*rng.integers(0, 3, size=2)))
            loss, images = self._step(feeds)
            history[step] = loss
            if not np.isfinite(loss):
                rates = ", ".join(f"{g} {p.lr:g}" for g, p in groups.items())
                raise DivergenceError(f"GENIE-D batch {index}: the BNS loss became {loss} at step {step} "
                                      f"(learning rates {rates}); rerun with lower learning rates")
            self.graph.set_params(adam.step(self.graph.params(), self.graph.grads()))
            for sched in plateau:
                sched.step(loss)
            if "generator" in groups and (step + 1) % 100 == 0:
                groups["generator"].lr *= 0.95
            if on_step is not None:
                on_step(step, loss)
        self.lrs = {g: p.lr for g, p in groups.items()}  # the schedules' final learning rates
        return np.ascontiguousarray(images, np.float32), history, time.perf_counter() - start


# Work directory, resume -----------------------------------------------------------------------

def batch_path(workdir: Path, index: int) -> Path:
    return workdir / f"batch_{index:04d}.npz"


def _save_batch(workdir: Path, index: int, images: np.ndarray, history: np.ndarray, seconds: float) -> None:
    tmp = workdir / f".batch_{index:04d}.tmp.npz"
    np.savez(tmp, images=images, loss_history=history, seconds=np.float64(seconds), peak_rss=np.int64(peak_rss()))
    os.replace(tmp, batch_path(workdir, index))


def _run_config(model: onnx.ModelProto, cfg: DistillConfig) -> dict:
    return {"model_sha256": hashlib.sha256(model.SerializeToString()).hexdigest(), **asdict(cfg)}


def _batch_is_whole(path: Path, cfg: dict) -> bool:
    """Whether a saved batch reads back complete (a file truncated or damaged on disk does not)."""
    try:
        with np.load(path) as f:
            images, history = f["images"], f["loss_history"]
            float(f["seconds"])
        return images.ndim == 4 and len(images) == cfg["batch"] and history.shape == (cfg["iters"],) \
            and bool(np.isfinite(images).all())
    except Exception:
        return False


def _prepare_workdir(workdir: Path, config: dict, resume: bool, notify: bool = True) -> list[int]:
    """Check or write the run's config; return the batch indices already finished. A finished batch
    whose file is damaged is removed (with a note) and distilled again."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_file = workdir / CONFIG_FILE
    done = sorted(int(p.stem.split("_")[1]) for p in workdir.glob("batch_[0-9][0-9][0-9][0-9].npz"))
    if cfg_file.exists() or done:
        if not resume:
            raise BadInputError(f"{workdir} already holds a distillation run ({len(done)} finished batches); "
                                "add --resume to continue it, or choose an empty --workdir")
        try:
            saved = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
            if not isinstance(saved, dict):
                raise ValueError(type(saved).__name__)
        except (ValueError, UnicodeDecodeError):
            raise ResumeMismatchError(f"{cfg_file} is damaged (not the JSON this tool writes), so the finished "
                                      f"batches cannot be checked; remove {workdir} to distil again, or choose a "
                                      "new --workdir") from None
        differ = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        if differ:
            raise ResumeMismatchError(f"{workdir} was made with a different {', '.join(differ)}; resume with the "
                                      "same model and flags, or choose a new --workdir")
        whole = []
        for b in done:
            if b >= config["n_batches"]:
                continue
            if _batch_is_whole(batch_path(workdir, b), config):
                whole.append(b)
            else:
                if notify:
                    print(f"onnxgenie: note: {batch_path(workdir, b)} is damaged; distilling that batch again",
                          file=sys.stderr)
                batch_path(workdir, b).unlink()
        return whole
    tmp = workdir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=1))
    os.replace(tmp, cfg_file)
    return []


# Parallel workers (spawn: each builds its own GradientGraph, one ORT thread) ---------------------

_WORKER: dict = {}


def _to_bytes(model: onnx.ModelProto | dict[str, onnx.ModelProto]):
    if isinstance(model, dict):
        return {k: m.SerializeToString() for k, m in model.items()}
    return model.SerializeToString()


def _from_bytes(data: bytes | dict[str, bytes]):
    if isinstance(data, dict):
        return {k: onnx.ModelProto.FromString(b) for k, b in data.items()}
    return onnx.ModelProto.FromString(data)


def _worker_init(model_bytes, groups: dict, cfg: DistillConfig, workdir: str, steps) -> None:
    model = _from_bytes(model_bytes)
    _WORKER.update(workdir=Path(workdir), steps=steps)
    try:
        _WORKER["distiller"] = BatchDistiller(model, groups, cfg, threads=1)
    except UnsupportedModelError as err:   # raised from _worker_run: a failing initializer respawns forever
        _WORKER["error"] = err


def _worker_run(index: int) -> tuple[int, float]:
    if "error" in _WORKER:
        raise _WORKER["error"]
    steps = _WORKER["steps"]

    def on_step(step, loss):
        if (step + 1) % 10 == 0:
            steps.put(10)

    images, history, seconds = _WORKER["distiller"].run(index, on_step)
    _save_batch(_WORKER["workdir"], index, images, history, seconds)
    return index, float(history[-1])


def _run_sequential(model, groups, cfg, todo, workdir, progress, threads):
    distiller = BatchDistiller(model, groups, cfg, threads=threads)
    with _progress(len(todo), progress, desc="batches", unit="batch", position=0) as overall:
        for index in todo:
            with _progress(cfg.iters, progress, desc=f"batch {index}", unit="step", position=1,
                           leave=False) as bar:
                def on_step(step, loss):
                    bar.update(1)
                    if step % 10 == 0:
                        bar.set_postfix(loss=f"{loss:.3f}")
                images, history, seconds = distiller.run(index, on_step)
            _save_batch(workdir, index, images, history, seconds)
            overall.update(1)
            overall.set_postfix(last_loss=f"{history[-1]:.3f}")


def _run_parallel(model, groups, cfg, todo, workdir, progress, jobs, task=None):
    """``task`` (default ``_worker_run``) per batch index in ``jobs`` spawned processes. A worker that
    dies (a signal inside onnxruntime) fails the run with one line instead of leaving it waiting."""
    steps = mp.get_context("spawn").Queue()
    with _progress(len(todo) * cfg.iters, progress, desc=f"{len(todo)} batches on {jobs} workers",
                   unit="step") as bar:
        # The parent only reads the queue: a worker terminated inside put() can leave its cross-process
        # write lock held, and a parent put() would then block its feeder thread, which exit joins.
        finished = threading.Event()

        def drain():  # until the queue is empty after the pool has finished
            while True:
                try:
                    bar.update(steps.get(timeout=0.1))
                except queue.Empty:
                    if finished.is_set():
                        return

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:  # on Ctrl-C or a worker's error the pool stops the other batches now
            with process_pool(jobs, _worker_init, (_to_bytes(model), groups, cfg, str(workdir), steps)) as pool:
                futures = [pool.submit(task or _worker_run, index) for index in todo]
                wait(futures, return_when=FIRST_EXCEPTION)
                for future in futures:
                    future.result()
        except BrokenProcessPool:
            raise OnnxGenieError("a GENIE-D worker process died (a crash inside onnxruntime); finished batches are "
                                 "kept with --workdir; rerun with --jobs 1 to see the error, or try --no-swing") from None
        finally:
            finished.set()
            reader.join(timeout=5)


# Public entry point -----------------------------------------------------------------------------

def distill(model: onnx.ModelProto, n_images: int = 1024, batch: int = 128, iters: int = 500, mode: str = "genie",
            swing: bool = True, seed: int = 0, jobs: int = 1, workdir: str | None = None, resume: bool = False,
            progress: bool = True, *, lr_latent: float = 0.1, lr_generator: float = 0.01, lr_pixels: float = 0.5,
            fused: bool = True, threads: int = 1, input_hw: tuple[int, int] | None = None,
            chunk: int | None = None) -> tuple[np.ndarray, dict]:
    """GENIE-D: ``n_images`` synthetic images (float32 NCHW, the model's input space) and an info dict.

    ``n_images`` is rounded up to a whole number of batches (said on stderr). Finished batches are
    kept in ``workdir`` (``batch_0003.npz``); ``resume=True`` continues a run there. ``jobs`` > 1
    distils batches in that many processes with one ORT thread each; ``threads`` is the ORT thread
    count when ``jobs`` == 1. ``input_hw`` fixes a dynamic image height/width. ``jobs`` is lowered, and
    the teacher run in chunks of ``chunk`` images (None: chosen), where the memory estimate says so
    (``memory.fit_distill``; said on stderr).
    """
    if mode not in MODES:
        raise BadInputError(f"unknown distillation mode {mode!r}; use one of {', '.join(MODES)}")
    for name, value, low in (("images", n_images, 1), ("batch", batch, 1), ("iters", iters, 1), ("jobs", jobs, 1),
                             ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise BadSettingError(f"--{name} must be a whole number >= {low} (got {value!r}); pass one")
    for name, value in (("lr-latent", lr_latent), ("lr-generator", lr_generator), ("lr-pixels", lr_pixels)):
        if not isinstance(value, (int, float, np.number)) or not math.isfinite(value) or value <= 0:
            raise BadSettingError(f"--{name} must be a finite number > 0 (got {value!r}); pass one")
    if resume and workdir is None:
        raise BadInputError("--resume needs the --workdir of the interrupted run")
    teacher = normalize(model, input_hw)
    require_bn(teacher, model if isinstance(model, onnx.ModelProto) else None)
    batch = min(batch, n_images)
    n_batches = math.ceil(n_images / batch)
    if n_batches * batch != n_images:
        print(f"onnxgenie: note: {n_images} images is not a multiple of the batch size {batch}; "
              f"distilling {n_batches * batch} ({n_batches} batches)", file=sys.stderr)
    cfg = DistillConfig(n_batches, batch, iters, mode, bool(swing), seed, lr_latent, lr_generator, lr_pixels, fused)
    if chunk is not None and int(chunk) < 1:
        raise BadInputError(f"the chunk must be at least 1 image (got {chunk})")
    jobs, chunk = fit_distill(teacher, batch, min(jobs, n_batches), chunk=chunk, notify=progress)
    chunk = chunk_size(batch, chunk)
    tmp = tempfile.TemporaryDirectory(prefix="onnxgenie-distill-") if workdir is None else None
    work = Path(tmp.name if tmp else workdir)
    try:
        run = {**_run_config(model, cfg), **({"input_hw": list(input_hw)} if input_hw else {})}
        done = _prepare_workdir(work, run, resume, progress)
        todo = [b for b in range(n_batches) if b not in done]
        start = time.perf_counter()
        if todo:
            if chunk < batch:
                train_model, groups = chunked_models(teacher, cfg, chunk)
            else:
                train_model, groups = training_model(teacher, cfg)
            jobs = min(jobs, len(todo))
            # chunks: in a worker, whose exit frees the shared arena (where this process may have one)
            if jobs > 1 or chunk < batch and not mp.current_process().daemon:
                _run_parallel(train_model, groups, cfg, todo, work, progress, jobs)
            else:
                _run_sequential(train_model, groups, cfg, todo, work, progress, threads)
        files = [np.load(batch_path(work, b)) for b in range(n_batches)]
        images = np.concatenate([f["images"] for f in files])
        history = np.stack([f["loss_history"] for f in files])
        batch_seconds = np.array([float(f["seconds"]) for f in files])
        peaks = [int(f["peak_rss"]) for f in files if "peak_rss" in f.files]
    finally:
        if tmp is not None:
            tmp.cleanup()
    info = {"loss_history": history, "final_losses": history[:, -1], "seconds": time.perf_counter() - start,
            "seconds_per_step": float(batch_seconds.mean() / iters), "resumed_batches": done,
            "mode": mode, "swing": bool(swing), "n_images": int(images.shape[0]),
            "process_peak_rss_mib": round(max(peaks) / 2 ** 20) if peaks else None,
            "jobs": jobs, "chunk": chunk if chunk < batch else None}
    return images, info
