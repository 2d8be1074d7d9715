"""Command line. Expected failures print one line on stderr and exit 2 (bad input) or 3 (quality
gate); anything else is a bug: exit 1 with the traceback written to a log file."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import traceback

from .errors import OnnxGenieError


class _Names(argparse.Action):
    """A list flag (``--exclude a b``, ``--exclude a,b``, repeated): values accumulate."""

    def __call__(self, parser, namespace, values, option_string=None):
        names = list(getattr(namespace, self.dest, None) or [])
        names += [v for value in values for v in value.split(",") if v]
        setattr(namespace, self.dest, names)


LIST_FLAGS = ("exclude", "high_bits", "op_types")


def _add_layer_choice(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exclude", nargs="+", action=_Names, default=[], metavar="NODE",
                   help="nodes kept in float (onnxruntime's nodes_to_exclude); names from `onnxgenie inspect "
                   "--plan`, space- or comma-separated")
    p.add_argument("--op-types", nargs="+", action=_Names, default=None, metavar="OP",
                   help="quantize only nodes of these op types, e.g. Conv (onnxruntime's op_types_to_quantize; "
                   "default: Conv, Gemm, MatMul and the residual Adds the plan needs)")
    p.add_argument("--high-bits", nargs="+", action=_Names, default=[], metavar="NODE",
                   help="nodes quantized like the first and last layer: weights and input at --first-last-bits "
                   "(mixed precision for sensitive layers; names from `onnxgenie inspect --plan`)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has a real one and its help does not say it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return super()._get_help_string(action)


def _model_from_list_flag(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--exclude a b model.onnx`` gives the model path to --exclude; take it back from there."""
    if getattr(args, "model", "") is not None:
        return
    for dest in LIST_FLAGS:
        values = getattr(args, dest, None) or []
        if values and values[-1].lower().endswith(".onnx"):
            args.model = values.pop()
            return
    parser.error("the following arguments are required: model")


def _cmd_inspect(args) -> int:
    from .inspect import format_summary, inspect_model

    input_hw = tuple(args.input_size) if args.input_size else None
    info = inspect_model(args.model, input_hw=input_hw)
    folded = None
    if args.plan or args.blocks:  # normalised and folded once for both
        from .pipeline import prepare

        folded = prepare(args.model, input_hw)[1]
    if args.plan:
        from .quant.plan import build_plan, format_plan

        plan = build_plan(folded, args.wbits, args.abits, args.first_last_bits, args.target,
                          exclude=args.exclude, weight_grid=args.weight_grid, high_bits=args.high_bits,
                          op_types=None if args.op_types is None else tuple(args.op_types))
        if args.json:
            info["plan"] = plan.to_arrays()[0]
        else:
            print(format_plan(plan))
    if args.blocks:
        from .graph.blocks import blocks_json, format_blocks, partition_blocks

        blocks = partition_blocks(folded)
        if args.json:
            info["blocks"] = blocks_json(blocks)
        else:
            print(format_blocks(folded, blocks))
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def _cmd_eval(args) -> int:
    from .errors import BadSettingError
    from .evaluate import evaluate
    from .resources import default_threads

    if args.threads < 0:
        raise BadSettingError(f"--threads must be 0 (one per core) or more (got {args.threads}); pass one")
    result = evaluate(args.model, args.data, args.mean, args.std, args.reference,
                      threads=default_threads(args.threads))
    if args.json:
        print(json.dumps(result))
    else:
        line = f"top-1 {result['top1']:.2f} % on {result['images']} images"
        if "agreement" in result:
            line += f"; reference top-1 {result['reference_top1']:.2f} %, agreement {result['agreement']:.2f} %"
        print(line)
    return 0


def _cmd_quantize(args) -> int:
    from dataclasses import replace

    from .pipeline import auto_jobs, preset_config, run_quantize

    calib = "data" if args.calib_data else args.calib
    config = preset_config(
        args.preset, wbits=args.wbits, abits=args.abits, first_last_bits=args.first_last_bits, target=args.target,
        weight_grid=args.weight_grid, exclude=tuple(args.exclude), high_bits=tuple(args.high_bits),
        op_types=None if args.op_types is None else tuple(args.op_types),
        auto_high_bits=args.auto_high_bits, calib=calib,
        calib_images=args.calib_images,
        holdout_images=args.holdout_images,
        distill_iters=args.distill_iters, distill_batch=args.distill_batch, distill_mode=args.distill_mode,
        swing=False if args.no_swing else None,
        reconstruct=False if args.no_reconstruct else None, recon_iters=args.recon_iters,
        recon_lr_scale=args.recon_lr_scale, recon_act_lr_scale=args.recon_act_lr_scale,
        recon_candidates=args.recon_candidates,
        recon_augment=args.recon_augment, recon_qdrop=None if args.qdrop is None else args.qdrop == "on",
        recon_batch=args.recon_batch, quantizer=args.quantizer, lam=args.lam, seed=args.seed, threads=args.threads,
        workdir=args.workdir, mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None, min_agreement=args.min_agreement,
        input_size=tuple(args.input_size) if args.input_size else None,
        progress=not args.quiet, verbose=args.verbose)
    jobs = args.jobs or auto_jobs(config)
    output = args.output or default_output(args.model, config.wbits, config.abits)
    result = run_quantize(args.model, output, replace(config, jobs=jobs), args.calib_data, args.overwrite,
                          args.resume, report_json=args.report, report_html=args.report_html)
    if args.json:
        summary = {k: result.report[k] for k in ("parity", "agreement", "size", "stages")}
        summary["calibration"] = {k: v for k, v in result.report["calibration"].items() if k != "loss_history"}
        print(json.dumps(summary))
    return 0


def default_output(model: str, wbits: int, abits: int) -> str:
    from pathlib import Path

    path = Path(model)
    return str(path.with_name(f"{path.stem}_w{wbits}a{abits}.onnx"))


def _add_bits(p: argparse.ArgumentParser, wbits: int | None, abits: int | None) -> None:
    p.add_argument("--wbits", type=int, default=wbits, required=wbits is None, help="weight bits, 2-8")
    p.add_argument("--abits", type=int, default=abits, required=abits is None, help="activation bits, 4-8")
    p.add_argument("--first-last-bits", type=int, default=8,
                   help="bits of the first/last layer's weights and of the 2nd/last layer's input (default 8)")
    p.add_argument("--target", choices=("ort", "tensorrt"), default="ort",
                   help="ort: asymmetric per-channel weights; tensorrt: int8, zero points 0, int32 biases")
    p.add_argument("--weight-grid", choices=("auto", "asym", "sym"), default="auto",
                   help="per-channel weight grid: asym (the paper's), sym (zero point 0), auto (default): "
                        "sym for depthwise convs, asym for the rest")


def _cmd_distill(args) -> int:
    import io
    from pathlib import Path

    import numpy as np

    from .distill import distill
    from .distill.preview import save_grid
    from .errors import BadInputError
    from .files import atomic_write, check_writes
    from .graph.load import external_data_files, load_model
    from .resources import cap_to_cores, default_jobs

    out = Path(args.output)
    inputs = [("the input model", args.model)] + [("the model's external data file", f)
                                                  for f in external_data_files(args.model)]
    check_writes([("-o", out), ("--preview", args.preview)], inputs, args.overwrite)
    if args.preview and Path(args.preview).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise BadInputError(f"--preview {args.preview}: give a .png (or .jpg) file name")
    model = load_model(args.model)
    input_hw = tuple(args.input_size) if args.input_size else None
    batch = min(args.batch, args.images) if args.images > 0 else args.batch
    if args.jobs < 0:
        raise BadInputError(f"--jobs must be 0 (one per core) or more (got {args.jobs}); pass one")
    jobs = cap_to_cores(args.jobs, "--jobs") if args.jobs > 0 else \
        default_jobs(-(-args.images // max(batch, 1)) if args.images > 0 else 1)
    images, info = distill(model, n_images=args.images, batch=args.batch, iters=args.iters, mode=args.mode,
                           swing=not args.no_swing, seed=args.seed, jobs=jobs, workdir=args.workdir,
                           resume=args.resume, lr_latent=args.lr_latent, lr_generator=args.lr_generator,
                           input_hw=input_hw)
    data = io.BytesIO()   # written in full, then renamed: never a half-written dataset
    np.savez(data, images=images, loss_history=info["loss_history"])
    atomic_write(out, data.getvalue(), overwrite=args.overwrite)
    if args.preview:
        save_grid(images, args.preview)
    print(f"wrote {images.shape[0]} images {tuple(images.shape[1:])} to {out}; final BNS loss per batch: "
          f"mean {info['final_losses'].mean():.4f}, {info['seconds_per_step']:.3f} s/step")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line with a pointer to --help (not argparse's usage block), exit 2."""

    def error(self, message: str):
        self.exit(2, f"onnxgenie: error: {message}; see `{self.prog} --help`\n")


def _add_input_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                   help="fix a dynamic (or invalid) input height and width")


def build_parser() -> argparse.ArgumentParser:
    from .quant.augment import AUGMENTS

    from . import __version__

    parser = _Parser(prog="onnxgenie", description=__doc__)
    parser.add_argument("--version", action="version", version=f"onnxgenie {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices   # name -> its parser, for errors in the command's own words
    p = sub.add_parser("inspect", help="show what the tool sees in a model", formatter_class=_HelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL.onnx", help="the exported float model")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    _add_input_size(p)
    p.add_argument("--plan", action="store_true", help="also show the quantization plan (see --wbits/--abits)")
    _add_bits(p, 4, 4)
    _add_layer_choice(p)
    p.add_argument("--blocks", action="store_true", help="also list the GENIE-M reconstruction blocks")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("eval", help="top-1 accuracy on a labelled .npz, and agreement with a reference model",
                       formatter_class=_HelpFormatter)
    p.add_argument("model")
    p.add_argument("--data", required=True, help=".npz with images (uint8 NHWC or float32 NCHW) and labels")
    p.add_argument("--mean", type=float, nargs="+", help="per-channel mean for uint8 images (after /255)")
    p.add_argument("--std", type=float, nargs="+", help="per-channel std for uint8 images (after /255)")
    p.add_argument("--reference", metavar="FP.onnx", help="also report top-1 agreement with this model")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: one per core)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("quantize", help="quantize a model and export it as QDQ ONNX", formatter_class=_HelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL.onnx", help="the exported float model")
    p.add_argument("-o", "--output", help="output .onnx (default: MODEL_w4a4.onnx beside the input; refused if it "
                   "exists, see --overwrite)")
    _add_bits(p, 4, 4)
    p.add_argument("--preset", choices=("fast", "paper"), default="fast",
                   help="budget: fast (default; minutes on a laptop CPU) or paper (GENIE's own, hours); "
                   "the flags below override it")
    _add_layer_choice(p)
    p.add_argument("--auto-high-bits", type=int, default=0, metavar="K",
                   help="K more layers like --high-bits, chosen without data: those whose high bits bring the "
                   "quantized model closest to FP32 on the calibration images (KL of the outputs)")
    p.add_argument("--no-reconstruct", action="store_true", help="step initialisation only (no GENIE-M)")
    p.add_argument("--quantizer", choices=("genie", "adaround"), default="genie",
                   help="reconstruction weight quantizer: genie learns the weight steps, adaround keeps them")
    p.add_argument("--recon-iters", type=int, default=None, help="reconstruction steps per block (default: preset)")
    p.add_argument("--recon-batch", type=int, default=None, help="reconstruction batch size (default: preset)")
    p.add_argument("--recon-lr-scale", type=float, default=None,
                   help="factor on GENIE-M's learning rates (default: preset; short budgets want larger ones)")
    p.add_argument("--recon-act-lr-scale", type=float, default=None,
                   help="a further factor on the activation steps' learning rate (default: preset; "
                        "fast: 64 for 4-bit activations beside weights of 4 bits or more, else 1; paper: 1)")
    p.add_argument("--recon-candidates", type=int, default=None, metavar="N",
                   help="reconstruct N times with different seeds (in parallel, one process per core) and keep the "
                        "one whose outputs on the calibration images are closest to FP32 (KL); default: preset "
                        "(fast: 2 below 4-bit weights, else 1; paper: 1)")
    p.add_argument("--qdrop", choices=("on", "off"), default=None,
                   help="QDrop at the activation quantizers inside each block: each element quantized with "
                        "probability 0.5 (on) or always (off); the block's input is a float/quantized mix "
                        "either way (default: preset)")
    p.add_argument("--recon-augment", choices=AUGMENTS, default=None,
                   help="reconstruct on the calibration images plus mirrored (flip) and shifted copies "
                        "(default: preset; fast: auto = flip-shift below 4-bit weights, paper: none)")
    p.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="rounding-loss weight (default 1.0 genie, 0.1 adaround)")
    p.add_argument("--calib", choices=("distill", "noise"), default="distill",
                   help="calibration images without --calib-data: GENIE-D (default) or Gaussian noise")
    p.add_argument("--calib-data", metavar="X.npz", help="real (or previously distilled) calibration images")
    _add_input_size(p)
    p.add_argument("--calib-images", type=int, default=None, help="number of calibration images (default: preset)")
    p.add_argument("--distill-iters", type=int, default=None, help="GENIE-D steps per batch (default: preset)")
    p.add_argument("--distill-batch", type=int, default=None, help="images distilled together (default: preset)")
    p.add_argument("--distill-mode", choices=("genie", "zeroq", "noise"), default=None,
                   help="GENIE-D ablation: generator + latents (genie, default), pixels (zeroq), fixed latents (noise)")
    p.add_argument("--no-swing", action="store_true", help="GENIE-D without swing convolution (ablation)")
    p.add_argument("--mean", type=float, nargs="+",
                   help="the model's per-channel input mean (after /255): preprocesses uint8 --calib-data and, "
                        "where the image is quantized (W8A8, tensorrt), gives its exact range")
    p.add_argument("--std", type=float, nargs="+", help="the model's per-channel input std (after /255), as --mean")
    p.add_argument("--jobs", type=int, default=0, help="distillation processes (default: cores, bounded by memory)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: one per core)")
    p.add_argument("--workdir", help="keep finished distillation batches / reconstructed blocks here")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --workdir (same model, flags and seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout-images", type=int, default=None,
                   help="extra distilled images that only measure FP32-vs-quantized agreement (default: preset)")
    p.add_argument("--min-agreement", type=float, metavar="P",
                   help="quality gate: exit 3 and write no model when top-1 agreement with FP32 is below P %%; "
                   "use it with --holdout-images N: without them agreement is measured on the calibration "
                   "images the model was fitted to, which is optimistic")
    p.add_argument("--report", metavar="REPORT.json", help="write the run report (also kept in --workdir)")
    p.add_argument("--report-html", metavar="REPORT.html", help="the report as a self-contained page with plots")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--json", action="store_true",
                   help="print parity, agreement, sizes, calibration and stage timings as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes: only errors on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="a line per distillation batch and per block")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("distill", help="GENIE-D: distil synthetic calibration images from the BN statistics",
                       formatter_class=_HelpFormatter)
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="output .npz (images float32 NCHW, loss_history)")
    p.add_argument("--images", type=int, default=1024,
                   help="number of images; rounded up to a multiple of --batch (a note says so)")
    p.add_argument("--batch", type=int, default=128, help="images distilled together (default 128)")
    p.add_argument("--iters", type=int, default=500, help="Adam steps per batch (default 500; the paper uses 4000)")
    p.add_argument("--mode", choices=("genie", "zeroq", "noise"), default="genie",
                   help="genie: generator + latents; zeroq: optimise pixels; noise: generator on fixed latents")
    p.add_argument("--no-swing", action="store_true", help="plain strided convolutions (ablation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=0, help="worker processes (default: cores, bounded by memory)")
    p.add_argument("--workdir", help="keep finished batches here, so that --resume can continue")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    p.add_argument("--preview", metavar="GRID.png", help="also write a grid of the first 64 images")
    p.add_argument("--lr-latent", type=float, default=0.1, help="Adam lr of the latents (default 0.1)")
    p.add_argument("--lr-generator", type=float, default=0.01, help="Adam lr of the generator (default 0.01)")
    _add_input_size(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_cmd_distill)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a CI timeout, ``kill``): stop like Ctrl-C, so temporary folders are removed."""


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, _exit_now)   # a second SIGTERM does not wait for the cleanup
    raise _Terminated


def _exit_now(signum, frame):
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    _model_from_list_flag(parser.commands[args.command], args)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return args.func(args)
    except OnnxGenieError as err:
        print(f"onnxgenie: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:
        workdir = getattr(args, "workdir", None)
        if workdir:
            print(f"onnxgenie: interrupted; finished work is kept in {workdir}: rerun the same command with "
                  "--resume to continue", file=sys.stderr)
        else:
            print("onnxgenie: interrupted; nothing was kept (no --workdir): pass --workdir DIR to make a run "
                  "resumable", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(err, _Terminated) else 130
    except OSError as err:
        from .files import storage_error

        full = storage_error(err, err.filename or "a file")
        if full is None:
            return _crash()
        print(f"onnxgenie: error: {full}", file=sys.stderr)
        return full.exit_code
    except Exception:  # a bug: keep the traceback in a log, not on the terminal
        return _crash()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _crash() -> int:
    """A bug: the traceback goes to a log file, one line to stderr, exit 1."""
    fd, log = tempfile.mkstemp(prefix="onnxgenie-crash-", suffix=".log")
    with os.fdopen(fd, "w") as fh:
        traceback.print_exc(file=fh)
    print(f"onnxgenie: internal error ({sys.exc_info()[1]!r}); traceback in {log}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
