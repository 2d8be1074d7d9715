"""Command line. Expected failures print one line on stderr and exit 2 (bad input) or 3 (quality
gate); anything else is a bug: exit 1 with the traceback written to a log file."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback

from .errors import OnnxGenieError


def _cmd_inspect(args) -> int:
    from .inspect import format_summary, inspect_model

    info = inspect_model(args.model, input_hw=tuple(args.input_size) if args.input_size else None)
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def _auto_jobs(n_batches: int) -> int:
    """One worker per core, at most one per batch, and about 2 GiB of memory each."""
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 2.0
    return max(1, min(os.cpu_count() or 1, n_batches, int(mem_gib // 2)))


def _cmd_distill(args) -> int:
    from pathlib import Path

    import numpy as np

    from .distill import distill
    from .distill.preview import save_grid
    from .errors import BadInputError
    from .graph.load import load_model

    out = Path(args.output)
    for path, what in ((out, "-o"), (Path(args.preview) if args.preview else None, "--preview")):
        if path is not None and not path.parent.is_dir():
            raise BadInputError(f"{what} {path}: folder {path.parent} does not exist; create it or pick another path")
    if args.preview and Path(args.preview).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise BadInputError(f"--preview {args.preview}: give a .png (or .jpg) file name")
    model = load_model(args.model)
    batch = min(args.batch, args.images) if args.images > 0 else args.batch
    jobs = args.jobs or _auto_jobs(-(-args.images // max(batch, 1)) if args.images > 0 else 1)
    images, info = distill(model, n_images=args.images, batch=args.batch, iters=args.iters, mode=args.mode,
                           swing=not args.no_swing, seed=args.seed, jobs=jobs, workdir=args.workdir,
                           resume=args.resume, lr_latent=args.lr_latent, lr_generator=args.lr_generator)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as fh:  # written in full, then renamed: never a half-written dataset
        np.savez(fh, images=images, loss_history=info["loss_history"])
    os.replace(tmp, out)
    if args.preview:
        save_grid(images, args.preview)
    print(f"wrote {images.shape[0]} images {tuple(images.shape[1:])} to {out}; final BNS loss per batch: "
          f"mean {info['final_losses'].mean():.4f}, {info['seconds_per_step']:.3f} s/step")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxgenie", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show what the tool sees in a model")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="fix a dynamic input size")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("distill", help="GENIE-D: distil synthetic calibration images from the BN statistics")
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
    p.set_defaults(func=_cmd_distill)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except OnnxGenieError as err:
        print(f"onnxgenie: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("onnxgenie: interrupted; finished work is kept in the work directory, rerun with --resume",
              file=sys.stderr)
        return 130
    except Exception:  # a bug: keep the traceback in a log, not on the terminal
        fd, log = tempfile.mkstemp(prefix="onnxgenie-crash-", suffix=".log")
        with os.fdopen(fd, "w") as fh:
            traceback.print_exc(file=fh)
        print(f"onnxgenie: internal error ({sys.exc_info()[1]!r}); traceback in {log}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
