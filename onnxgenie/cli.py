"""Command line. Expected failures print one line on stderr and exit 2 (bad input) or 3 (quality
gate); anything else is a bug: exit 1 with the traceback written to a log file."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import numpy as np

from . import __version__, status
from .config import PRESETS, SETTINGS, Names, Numbers, OneOf, QuantizeConfig, Real, Setting, Size, Switch, Whole, \
    default, preset_config
from .distill import MODES, distill
from .distill.preview import save_grid
from .errors import BadInputError, BadSettingError, OnnxGenieError
from .evaluate import evaluate
from .files import atomic_write, check_writes, storage_error
from .graph.blocks import blocks_json, format_blocks, partition_blocks
from .graph.load import external_data_files, load_model
from .inspect import format_summary, inspect_model
from .pipeline import prepare, run_quantize
from .quant.plan import format_plan
from .resources import cap_to_cores, default_jobs, default_threads
from .stages import plan_of


class _Names(argparse.Action):
    """A list flag (``--exclude a b``, ``--exclude a,b``, repeated): values accumulate."""

    def __call__(self, parser, namespace, values, option_string=None):
        names = list(getattr(namespace, self.dest, None) or [])
        names += [v for value in values for v in value.split(",") if v]
        setattr(namespace, self.dest, names)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has a real one and its help does not say it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line with a pointer to --help (not argparse's usage block), exit 2."""

    def error(self, message: str):
        self.exit(2, f"onnxgenie: error: {message}; see `{self.prog} --help`\n")


# The settings each command takes from the declaration in onnxgenie.config, in this order.
PLAN_SETTINGS = ("wbits", "abits", "first_last_bits", "target", "weight_grid", "exclude", "op_types", "high_bits")
LIST_SETTINGS = tuple(name for name, s in SETTINGS.items() if isinstance(s.check, Names))


def _preset_help(s: Setting) -> str:
    """``s``'s help, with what each preset gives it where a preset sets it (the presets table says it of
    the switches)."""
    if isinstance(s.check, Switch) or not any(s.name in values for values in PRESETS.values()):
        return s.help
    said = []
    for preset, values in PRESETS.items():
        value = values.get(s.name, default(s.name))
        if s.rule is not None and value == s.rule.auto:
            said.append(f"{preset}: " + (f"{value} = " if value is not None else "") + s.rule.says)
        elif not isinstance(value, bool):
            said.append(f"{preset}: {value:g}" if isinstance(value, float) else f"{preset}: {value}")
    return s.help + " (default: preset" + (f"; {'; '.join(said)})" if s.rule is not None else ")")


def _add_setting(p, s: Setting, from_preset: bool) -> None:
    """``s`` as a flag whose value, when given, overrides the preset's (or the default); not given, it
    is None where ``from_preset`` (the preset decides)."""
    flags = [f for f in (s.short, s.flag_name) if f]
    kw: dict = {"dest": s.name, "help": _preset_help(s) if from_preset else s.help}
    given = default(s.name)
    if isinstance(s.check, Switch):
        if s.flag_name.startswith("--no-") or s.flag_name == "--quiet":   # turns it off
            kw.update(action="store_const", const=False, default=None if from_preset else given)
        elif given is False:
            kw.update(action="store_true")
        else:
            kw.update(choices=("on", "off"), default=None)
    elif isinstance(s.check, Names):
        kw.update(nargs="+", action=_Names, default=None if given is None else [], metavar=s.metavar)
    elif isinstance(s.check, Numbers):
        kw.update(type=float, nargs="+")
    elif isinstance(s.check, Size):
        kw.update(type=int, nargs=2, metavar=s.metavar)
    else:
        kw.update(default=None if from_preset and any(s.name in v for v in PRESETS.values()) else given)
        if isinstance(s.check, OneOf):
            kw.update(choices=s.cli_choices or s.check.choices)
        else:
            kw.update(type=int if isinstance(s.check, Whole) else float if isinstance(s.check, Real) else str)
            if s.metavar:
                kw["metavar"] = s.metavar
    p.add_argument(*flags, **kw).setting = s   # tools/cli_reference.py reads the declaration from here


def _settings(args: argparse.Namespace, names) -> dict:
    """The settings the command line gave (None: not given), as QuantizeConfig values."""
    out = {}
    for name in names:
        value = getattr(args, name)
        if isinstance(value, list):
            value = tuple(value)
        elif isinstance(SETTINGS[name].check, Switch) and isinstance(value, str):   # --qdrop on|off
            value = value == "on"
        out[name] = value
    return out


def _model_from_list_flag(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--exclude a b model.onnx`` gives the model path to --exclude; take it back from there."""
    if getattr(args, "model", "") is not None:
        return
    for dest in LIST_SETTINGS:
        values = getattr(args, dest, None) or []
        if values and values[-1].lower().endswith(".onnx"):
            args.model = values.pop()
            return
    parser.error("the following arguments are required: model")


def _cmd_inspect(args) -> int:
    input_hw = tuple(args.input_size) if args.input_size else None
    info = inspect_model(args.model, input_hw=input_hw)
    folded = None
    if args.plan or args.blocks:  # normalised and folded once for both
        folded = prepare(args.model, input_hw)[1]
    if args.plan:
        plan = plan_of(folded, QuantizeConfig(**_settings(args, PLAN_SETTINGS)))
        if args.json:
            info["plan"] = plan.to_arrays()[0]
        else:
            print(format_plan(plan))
    if args.blocks:
        blocks = partition_blocks(folded)
        if args.json:
            info["blocks"] = blocks_json(blocks)
        else:
            print(format_blocks(folded, blocks))
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def _cmd_eval(args) -> int:
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
    settings = _settings(args, QUANTIZE_SETTINGS)
    config = preset_config(args.preset, **{**settings, "calib": "data" if args.calib_data else args.calib})
    output = args.output or default_output(args.model, config.wbits, config.abits)
    result = run_quantize(args.model, output, config, args.calib_data, args.overwrite, args.resume,
                          report_json=args.report, report_html=args.report_html)
    if config.progress:
        status.wrote_line(output, config, result.report)
    if args.json:
        summary = {k: result.report[k] for k in ("parity", "agreement", "size", "stages")}
        summary["calibration"] = {k: v for k, v in result.report["calibration"].items() if k != "loss_history"}
        print(json.dumps(summary))
    return 0


def default_output(model: str, wbits: int, abits: int) -> str:
    path = Path(model)
    return str(path.with_name(f"{path.stem}_w{wbits}a{abits}.onnx"))


def _cmd_distill(args) -> int:
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


# quantize's settings in the order --help lists them; the command line's own options go between.
QUANTIZE_SETTINGS = tuple(name for name, s in SETTINGS.items() if s.flag is not None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxgenie", description=__doc__)
    parser.add_argument("--version", action="version", version=f"onnxgenie {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices   # name -> its parser, for errors in the command's own words
    p = sub.add_parser("inspect", help="show what the tool sees in a model", formatter_class=_HelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL.onnx", help="the exported float model")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    _add_setting(p, SETTINGS["input_size"], False)
    p.add_argument("--plan", action="store_true", help="also show the quantization plan (see --wbits/--abits)")
    for name in PLAN_SETTINGS:
        _add_setting(p, SETTINGS[name], False)
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
    p.add_argument("--preset", choices=tuple(PRESETS), default="fast",
                   help="budget: fast (default; minutes on a laptop CPU) or paper (GENIE's own, hours); "
                   "the flags below override it")
    own = {  # the command line's own options, after the setting they belong with
        "calib": lambda: p.add_argument("--calib-data", metavar="X.npz",
                                        help="real (or previously distilled) calibration images"),
        "workdir": lambda: p.add_argument("--resume", action="store_true",
                                          help="continue the interrupted run in --workdir (same model, flags and "
                                          "seed)"),
        "min_agreement": lambda: (
            p.add_argument("--report", metavar="REPORT.json", help="write the run report (also kept in --workdir)"),
            p.add_argument("--report-html", metavar="REPORT.html",
                           help="the report as a self-contained page with plots"),
            p.add_argument("--overwrite", action="store_true", help="replace an existing output file"),
            p.add_argument("--json", action="store_true",
                           help="print parity, agreement, sizes, calibration and stage timings as JSON")),
    }
    for name in QUANTIZE_SETTINGS:
        _add_setting(p, SETTINGS[name], True)
        if name in own:
            own[name]()
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("distill", help="GENIE-D: distil synthetic calibration images from the BN statistics",
                       formatter_class=_HelpFormatter)
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="output .npz (images float32 NCHW, loss_history)")
    p.add_argument("--images", type=int, default=1024,
                   help="number of images; rounded up to a multiple of --batch (a note says so)")
    p.add_argument("--batch", type=int, default=128, help="images distilled together (default 128)")
    p.add_argument("--iters", type=int, default=500, help="Adam steps per batch (default 500; the paper uses 4000)")
    p.add_argument("--mode", choices=MODES, default="genie",
                   help="genie: generator + latents; zeroq: optimise pixels; noise: generator on fixed latents")
    p.add_argument("--no-swing", action="store_true", help="plain strided convolutions (ablation)")
    p.add_argument("--seed", type=int, default=0, help=SETTINGS["seed"].help)
    p.add_argument("--jobs", type=int, default=0, help="worker processes (default: cores, bounded by memory)")
    p.add_argument("--workdir", help="keep finished batches here, so that --resume can continue")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    p.add_argument("--preview", metavar="GRID.png", help="also write a grid of the first 64 images")
    p.add_argument("--lr-latent", type=float, default=0.1, help="Adam lr of the latents (default 0.1)")
    p.add_argument("--lr-generator", type=float, default=0.01, help="Adam lr of the generator (default 0.01)")
    _add_setting(p, SETTINGS["input_size"], False)
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
