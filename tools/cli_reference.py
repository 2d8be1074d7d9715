"""Write README.md's CLI reference from the argparse parser and the settings' declaration (onnxgenie.config:
help, defaults, presets and their rules), so the three cannot drift.

The section between ``<!-- cli-reference -->`` and ``<!-- /cli-reference -->`` is replaced by one table per
subcommand (every option, its default, its help text) and the presets table. tests/test_docs.py checks
that README.md holds what this script generates.

    .venv/bin/python tools/cli_reference.py           # rewrite the section in README.md
    .venv/bin/python tools/cli_reference.py --check   # exit 1 if README.md differs from the generated text
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN, END = "<!-- cli-reference -->", "<!-- /cli-reference -->"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _help(action: argparse.Action) -> str:
    """A setting's own help (the presets table gives what the presets set), or the option's."""
    setting = getattr(action, "setting", None)
    text = setting.help if setting is not None else action.help or ""
    return text.replace("%%", "%").replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    """The default as a user meets it: ``off`` for a switch, ``preset`` where the preset decides."""
    from onnxgenie.config import PRESETS, default

    if action.required:
        return "required"
    if action.nargs == 0:
        return "off"
    value = action.default
    setting = getattr(action, "setting", None)
    if value is None and setting is not None:
        if any(setting.name in p for p in PRESETS.values()):
            return "preset"
        value = default(setting.name)
        if isinstance(value, bool):
            return "on" if value else "off"
    if value is None:
        return "–"
    if value == []:
        return "none"
    if isinstance(value, float) and value == int(value) and abs(value) >= 1:
        value = int(value)
    return f"`{value}`"


def _option(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(f"`{o}`" for o in action.option_strings)
    if action.nargs == 0:
        return names
    if action.choices:
        return f"{names} {{{','.join(map(str, action.choices))}}}"
    metavar = action.metavar or {int: "N", float: "F"}.get(action.type, action.dest.upper())
    metavar = " ".join(metavar) if isinstance(metavar, tuple) else metavar
    return f"{names} {metavar}{' ...' if action.nargs in ('+', '*') else ''}"


def _table(parser: argparse.ArgumentParser, shared: set[str] | None = None) -> list[str]:
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if shared is not None and action.dest in shared:
            continue
        default = _default(action)
        # what the default column already says
        help_text = re.sub(r"\s*\(default:? " + re.escape(default.strip("`")) + r"\)", "", _help(action))
        lines.append(f"| {_option(action)} | {default} | {help_text} |")
    return lines


BITS = ((8, 8), (8, 4), (4, 8), (4, 4), (2, 4))


def _number(value):
    return int(value) if isinstance(value, float) and value == int(value) else value


def _ruled(name: str, config) -> str:
    """What a setting a rule chooses becomes at each bit width (``config.settle``, as a run does); a rule
    that reads the model is given in words."""
    from dataclasses import replace

    from onnxgenie.config import SETTINGS, settle

    rule = SETTINGS[name].rule
    if rule.reads_model:
        return rule.says
    values = [_number(getattr(settle(replace(config, wbits=w, abits=a)), name)) for w, a in BITS]
    usual = max(set(values), key=values.count)
    if len(set(values)) == 1:
        return f"`{usual}`"
    special = {}
    for (w, a), v in zip(BITS, values):
        if v != usual:
            special.setdefault(v, []).append(f"W{w}A{a}")
    return "; ".join(f"`{v}` at {', '.join(bits)}" for v, bits in special.items()) + f"; else `{usual}`"


def _presets() -> list[str]:
    from onnxgenie.config import PRESETS, SETTINGS, preset_config

    names = list(PRESETS)
    keys = list(dict.fromkeys(k for p in PRESETS.values() for k in p))
    configs = {n: preset_config(n) for n in names}
    lines = ["| setting | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in keys:
        setting = SETTINGS[key]
        cells = []
        for name in names:
            value = getattr(configs[name], key)
            if setting.rule is not None and value == setting.rule.auto:
                cells.append(_ruled(key, configs[name]))
            elif isinstance(value, bool):
                cells.append("on" if value else "off")
            else:
                cells.append(f"`{_number(value)}`")
        flag = setting.flag_name
        label = f"{key} (`{flag}` turns it off)" if flag.startswith("--no-") else f"`{flag}`"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def generate() -> str:
    from onnxgenie.cli import build_parser

    parser = build_parser()
    subs = _subparsers(parser)
    order = ["quantize", *[n for n in subs if n != "quantize"]]
    quantize_opts = {a.dest: a for a in subs["quantize"]._actions if a.option_strings}
    lines = [BEGIN, "<!-- generated by tools/cli_reference.py from onnxgenie.cli and onnxgenie.config; "
             "do not edit by hand -->", ""]
    for name in order:
        sub = subs[name]
        lines += [f"### `onnxgenie {name}`", "", _summary(parser, name)]
        shared = None
        if name != "quantize":
            same = [a for a in sub._actions if a.option_strings and a.dest in quantize_opts
                    and not isinstance(a, argparse._HelpAction)
                    and a.default == quantize_opts[a.dest].default and a.help == quantize_opts[a.dest].help]
            shared = {a.dest for a in same}
            if same:
                lines[-1] += " Also " + ", ".join(f"`{a.option_strings[-1]}`" for a in same) + \
                    ", as for `quantize`."
        lines += ["", *_table(sub, shared), ""]
    lines += ["### Presets", "",
              "`--preset` sets these `quantize` settings; a flag given on the command line overrides its "
              f"setting. Bit-width rules are shown for {', '.join(f'W{w}A{a}' for w, a in BITS)}.", "",
              *_presets(), END]
    return "\n".join(lines)


def _summary(parser: argparse.ArgumentParser, name: str) -> str:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for choice in action._choices_actions:
        if choice.dest == name:
            return choice.help[:1].upper() + choice.help[1:] + "."
    return ""


def section(text: str) -> str | None:
    match = re.search(re.escape(BEGIN) + ".*?" + re.escape(END), text, re.S)
    return match.group(0) if match else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if README.md is stale")
    args = parser.parse_args()
    text = README.read_text()
    current, fresh = section(text), generate()
    if current is None:
        print(f"cli_reference: README.md has no {BEGIN} ... {END} section", file=sys.stderr)
        return 2
    if args.check:
        if current != fresh:
            print("cli_reference: README.md's CLI reference is stale; run .venv/bin/python tools/cli_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(text.replace(current, fresh))
    return 0


if __name__ == "__main__":
    sys.exit(main())
