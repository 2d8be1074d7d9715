"""The documentation is generated where it can drift: README.md's CLI reference from the argparse parser and
the presets, BENCHMARKS.md's tables (and README.md's results table) from the raw rows in benchmarks/, and
every published row from a command that tools/bench.py runs. No development history in the repository."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))


def _tool(name: str):
    return importlib.import_module(name)


def _section(text: str, begin: str, end: str) -> str | None:
    match = re.search(re.escape(begin) + ".*?" + re.escape(end), text, re.S)
    return match.group(0) if match else None


def test_cli_reference_is_what_the_parser_gives():
    cli_reference = _tool("cli_reference")
    readme = (REPO / "README.md").read_text()
    generated = cli_reference.generate()
    assert _section(readme, cli_reference.BEGIN, cli_reference.END) == generated, \
        "README.md's CLI reference is stale: run .venv/bin/python tools/cli_reference.py"
    from onnxgenie.cli import build_parser

    quantize = cli_reference._subparsers(build_parser())["quantize"]
    for action in quantize._actions:  # every quantize flag has a row
        if action.option_strings and action.dest != "help":
            assert f"`{action.option_strings[-1]}`" in generated, action.option_strings


def _published_sections():
    bench = _tool("bench")
    for name, flags in bench.TABLES:
        module = _tool(name)
        if name == "bench_quant":
            results = json.loads(module.RESULTS.read_text())
            yield from module.sections(results, module.build_parser().parse_args(flags))
        else:
            yield from module.sections(_tool("benchlib").read_rows(module.RESULTS))


def test_published_tables_are_what_the_raw_rows_give():
    sections = list(_published_sections())
    assert {path.name for *_, path in sections} == {"BENCHMARKS.md", "README.md"}
    for begin, end, text, path in sections:
        published = _section((REPO / path.name).read_text(), begin, end)
        assert published == text, f"{path.name} {begin} is stale: run .venv/bin/python tools/bench.py --tables"


def test_every_published_row_comes_from_a_bench_command():
    bench = _tool("bench")
    benchlib = _tool("benchlib")
    planned = bench.planned_rows()
    for name in ("bench_product", "bench_recon", "bench_distill"):
        module = _tool(name)
        rows = benchlib.read_rows(module.RESULTS)
        assert rows, f"{module.RESULTS} has no rows"
        missing = {module.row_key(r) for r in rows} - planned[name]
        assert not missing, f"rows that no command in tools/bench.py STEPS makes: {sorted(missing)}"
    quant = _tool("bench_quant")
    missing = quant.row_keys(json.loads(quant.RESULTS.read_text())) - planned["bench_quant"]
    assert not missing, sorted(missing)


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [REPO / line for line in out.splitlines() if line and (REPO / line).is_file()]


# Written in pieces so that this file does not match itself.
HISTORY = re.compile(r"\b(" + "st" + r"op|" + "sess" + r"ion) [0-9]+\b|\b" + "iss" + r"ue [0-9]+\b", re.I)
COMMIT_HASH = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")


def test_no_development_history_in_the_repository():
    found = []
    for path in _tracked_files():
        if path.suffix not in (".py", ".md", ".toml", ".cfg", ".txt", ".yml", ".yaml") and path.name != "Makefile":
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if HISTORY.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not found, "the repository speaks of the product, not of its history:\n" + "\n".join(found)


def test_no_commit_hashes_in_the_docs():
    found = []
    for path in _tracked_files():
        if path.suffix == ".md":
            for number, line in enumerate(path.read_text().splitlines(), 1):
                for match in COMMIT_HASH.finditer(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {match.group(0)}")
    assert not found, "commit hashes in the docs:\n" + "\n".join(found)


def test_design_architecture_names_exist():
    """Each module and function docs/design.md names for a stage or an equation exists, so the map stays true."""
    text = (REPO / "docs" / "design.md").read_text()
    table = text[text.index("## Architecture"):text.index("## How the measurements")]
    missing, named = [], 0
    for line in table.splitlines():
        if not line.startswith("| "):
            continue
        module = None
        for name in re.findall(r"`([^`]+)`", line.split("|")[-2]):
            if name.endswith(".py"):
                module = importlib.import_module(name[:-3].replace("/", "."))
            elif module is not None:
                named += 1
                if not hasattr(module, name):
                    missing.append(f"{module.__name__}.{name}")
    assert named > 30, "the architecture table names the functions"
    assert not missing, f"docs/design.md names what does not exist: {missing}"
