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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxgenie", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show what the tool sees in a model")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="fix a dynamic input size")
    p.set_defaults(func=_cmd_inspect)
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
