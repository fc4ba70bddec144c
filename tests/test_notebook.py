"""The Colab notebook: valid nbformat 4 JSON, code cells that parse, and commands that match
the current flags of app.py and `python -m trainers` (fast, no network, no torch)."""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import io
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "danlu_colab.ipynb"
PLACEHOLDER = "PLACEHOLDER"
SHELL_STOPS = {"&&", "||", ";", "|", "&", ">", ">>", "<", "2>&1"}
APP_COMMAND = re.compile(r"\bpython3?\s+(?:-u\s+)?app\.py\b(.*)")
TRAINERS_COMMAND = re.compile(r"\bpython3?\s+(?:-u\s+)?-m\s+trainers\b(.*)")
FORM_FIELD = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*(.+?)\s*#\s*@param\b")


# ---------------------------------------------------------------- reading the notebook

def load_notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def cell_source(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def code_cells(notebook: dict) -> list[str]:
    return [cell_source(cell) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) with backslash-continued lines joined, as IPython joins them."""
    result, buffer, start = [], [], 0
    for number, line in enumerate(text.splitlines()):
        if not buffer:
            start = number
        if line.rstrip().endswith("\\"):
            buffer.append(line.rstrip()[:-1])
            continue
        buffer.append(line)
        indent = buffer[0][:len(buffer[0]) - len(buffer[0].lstrip())]
        result.append((start, indent + " ".join(part.strip() for part in buffer)))
        buffer = []
    if buffer:
        result.append((start, " ".join(buffer)))
    return result


def strip_ipython(text: str) -> str:
    """Python source with each IPython shell escape (`!cmd`, `%magic`, continued over several
    lines with `\\`) replaced by a placeholder call at the same indentation."""
    lines = text.splitlines()
    out, skipping = [], False
    for line in lines:
        if skipping:  # continuation of an escaped command
            skipping = line.rstrip().endswith("\\")
            continue
        stripped = line.lstrip()
        if stripped.startswith(("!", "%")):
            indent = line[:len(line) - len(stripped)]
            out.append(f"{indent}_ipython_escape()")
            skipping = line.rstrip().endswith("\\")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def shell_commands(notebook: dict) -> list[str]:
    """The `!` command lines of every code cell, continuations joined."""
    commands = []
    for source in code_cells(notebook):
        for _, line in logical_lines(source):
            stripped = line.strip()
            if stripped.startswith("!"):
                commands.append(stripped[1:].strip())
    return commands


def all_text_lines(notebook: dict) -> list[str]:
    """Every logical line of every cell, markdown included, for finding documented commands."""
    lines = []
    for cell in notebook["cells"]:
        lines += [line for _, line in logical_lines(cell_source(cell))]
    return lines


def form_defaults(notebook: dict) -> dict[str, object]:
    """Colab form fields (`NAME = value  #@param ...`) and their default values."""
    values = {}
    for source in code_cells(notebook):
        for line in source.splitlines():
            match = FORM_FIELD.match(line)
            if match:
                values[match.group(1)] = ast.literal_eval(match.group(2))
    return values


def placeholder(name: str) -> str:
    return PLACEHOLDER + "_" + re.sub(r"\W+", "_", name).strip("_")


def interpolate(command: str, values: dict[str, object]) -> str:
    """Replace IPython's `{expr}` and `$VAR` by the form default, else a placeholder that
    names the variable (`PLACEHOLDER_DATA_DIR`)."""
    def value(name: str) -> str:
        return str(values.get(name, placeholder(name)))
    command = re.sub(r"\{([^{}]*)\}", lambda m: value(m.group(1).strip()), command)
    return re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: value(m.group(1)), command)


def command_args(tail: str, values: dict[str, object]) -> list[str]:
    """The arguments of one command, up to the first shell operator, redirect or comment."""
    tail = tail.split("`")[0]  # a command quoted in markdown ends at the backtick
    tokens = shlex.split(interpolate(tail, values), comments=True)
    args = []
    for token in tokens:
        if token in SHELL_STOPS or token.startswith((">", "2>", "1>")):
            break
        args.append(token)
    return args


def redirect_target(tail: str, values: dict[str, object]) -> str | None:
    tokens = shlex.split(interpolate(tail, values), comments=True)
    for i, token in enumerate(tokens):
        if token == ">" and i + 1 < len(tokens):
            return tokens[i + 1]
    return None


def found_commands(lines: list[str], pattern: re.Pattern) -> list[str]:
    """The argument tails of every occurrence of a command in these lines, in order."""
    tails = []
    for line in lines:
        for match in pattern.finditer(line):
            tails.append(match.group(1))
    return tails


# ---------------------------------------------------------------- the real parsers

class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def captured_parser(entry, argv) -> argparse.ArgumentParser:
    """The ArgumentParser that `entry(argv)` builds, caught as it starts parsing."""
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        entry(argv)
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{entry} did not parse any arguments")


def parse_or_fail(parser: argparse.ArgumentParser, args: list[str], what: str):
    """Parse like the real program; unknown or abbreviated flags fail the test."""
    known = set(parser._option_string_actions)
    for token in args:
        flag = token.split("=", 1)[0]
        if flag.startswith("--"):
            assert flag in known, f"{what}: {flag} is not a flag of {parser.prog} ({sorted(known)})"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{what}: {parser.prog} refuses {args}: {stderr.getvalue().strip()}")


def app_parser() -> argparse.ArgumentParser:
    import app
    return captured_parser(app.parse_args, [])


def trainers_parser() -> argparse.ArgumentParser:
    from trainers.__main__ import main
    return captured_parser(main, [])


# ---------------------------------------------------------------- tests

def test_notebook_is_nbformat_4_json():
    notebook = load_notebook()
    assert notebook["nbformat"] == 4 and isinstance(notebook["nbformat_minor"], int)
    assert isinstance(notebook["metadata"], dict)
    assert notebook["metadata"].get("kernelspec", {}).get("name") == "python3"
    assert notebook["metadata"].get("accelerator") == "GPU"  # Colab opens it on a GPU runtime
    cells = notebook["cells"]
    assert isinstance(cells, list) and len(cells) >= 6
    assert cells[0]["cell_type"] == "markdown"
    ids = []
    for cell in cells:
        assert cell["cell_type"] in ("markdown", "code"), cell
        assert isinstance(cell["metadata"], dict)
        source = cell["source"]
        assert isinstance(source, str) or all(isinstance(part, str) for part in source)
        if notebook["nbformat_minor"] >= 5:
            assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cell["id"]), cell.get("id")
            ids.append(cell["id"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, \
                "ship the notebook without outputs"
    assert len(ids) == len(set(ids)), "cell ids must be unique"
    assert NOTEBOOK.stat().st_size < 40_000


def test_strip_ipython_keeps_python_and_indentation():
    source = ("import os\nif True:\n    !git clone {URL} \\\n        {DIR}\nelse:\n"
              "    %cd /content\nx = 1\n")
    assert strip_ipython(source) == ("import os\nif True:\n    _ipython_escape()\nelse:\n"
                                     "    _ipython_escape()\nx = 1\n")
    assert logical_lines("!a \\\n  --b \\\n  --c\nd")[0] == (0, "!a --b --c")


@pytest.mark.parametrize("index", range(len(code_cells(load_notebook()))))
def test_code_cell_parses(index):
    source = code_cells(load_notebook())[index]
    ast.parse(strip_ipython(source), filename=f"code cell {index + 1}")


def test_code_cells_match_ipython_transform():
    """Where IPython is installed, its own transformer turns every cell into valid Python."""
    transformer = pytest.importorskip("IPython.core.inputtransformer2")
    manager = transformer.TransformerManager()
    for index, source in enumerate(code_cells(load_notebook())):
        ast.parse(manager.transform_cell(source), filename=f"code cell {index + 1}")


def test_notebook_covers_the_steps():
    notebook = load_notebook()
    text = "\n".join(all_text_lines(notebook))
    intro = cell_source(notebook["cells"][0]).lower()
    assert "gpu" in intro and "public" in intro and "password" in intro
    fields = form_defaults(notebook)
    assert fields["USE_DRIVE"] in (True, False)
    assert "<you>" in fields["REPO_URL"]
    assert "snapshot_download" in text and "drive.mount" in text
    for folder in ("models", "embeddings", "datasets", "outputs"):
        assert f'"{folder}' in text
    assert "requirements.txt" in text and 'requirement_name(line) != "torch"' in text


def test_install_filters_only_the_torch_line():
    """Colab's torch is kept: the install cell's filter drops `torch==...` and nothing else."""
    install = next(source for source in code_cells(load_notebook()) if "requirements.txt" in source)
    tree = ast.parse(strip_ipython(install))
    function = next(node for node in tree.body
                    if isinstance(node, ast.FunctionDef) and node.name == "requirement_name")
    namespace = {"re": re}
    exec(compile(ast.Module(body=[function], type_ignores=[]), "install cell", "exec"), namespace)
    name = namespace["requirement_name"]
    lines = (ROOT / "requirements.txt").read_text().splitlines() + [
        "torch==2.13.0", "torch>=2", "torch", "Torch ; python_version>'3'", "torchvision==0.28",
        "torch-optimizer", "# torch is pinned", ""]
    dropped = [line for line in lines if name(line) == "torch"]
    assert dropped and all(re.match(r"(?i)torch\s*([<>=;]|$)", line) for line in dropped)
    assert name("torchvision==0.28") == "torchvision" and name("# torch is pinned") == "#"


def test_app_commands_use_existing_flags():
    notebook = load_notebook()
    values = form_defaults(notebook)
    parser = app_parser()
    tails = found_commands(all_text_lines(notebook), APP_COMMAND)
    assert tails, "the notebook launches the app"
    launched_shared = False
    for tail in tails:
        args = command_args(tail, values)
        parsed = parse_or_fail(parser, args, f"python app.py {' '.join(args)}")
        if parsed.share:
            launched_shared = True
            assert parsed.data_dir == placeholder("DATA_DIR"), "the app gets the notebook's data folder"
    assert launched_shared


def test_app_is_launched_with_a_login_or_a_generated_one():
    """Every shared launch either names a login file/login or lets the app generate one."""
    import app
    notebook = load_notebook()
    for tail in found_commands(shell_commands(notebook), APP_COMMAND):
        args = app.parse_args(command_args(tail, form_defaults(notebook)))
        assert args.share
        assert args.auth is None or ":" in args.auth
    launch = next(source for source in code_cells(notebook) if "app.py" in source)
    assert "--auth-file" in launch and "0o600" in launch


def test_trainers_commands_use_existing_flags_methods_and_keys():
    from core.config import load_toml
    from trainers import catalog
    notebook = load_notebook()
    values = form_defaults(notebook)
    parser = trainers_parser()
    assert {"--config", "--set", "--data-dir", "--print-config"} <= set(parser._option_string_actions)
    tails = found_commands(all_text_lines(notebook), TRAINERS_COMMAND)
    assert tails, "the notebook has a headless cell"
    for tail in tails:
        args = command_args(tail, values)
        what = f"python -m trainers {' '.join(args)}"
        parsed = parse_or_fail(parser, args, what)
        assert parsed.method in catalog.names(), what
        config = catalog.get(parsed.method).config
        fields = {field.name for field in dataclasses.fields(config)}
        for override in parsed.set:
            key, sep, value = override.partition("=")
            assert sep and key.strip() in fields, f"{what}: {key!r} is not a {parsed.method} setting"
        # the values convert to the setting's type (form defaults stand in for {VARS})
        load_toml(config, None, parsed.set)


def test_headless_commands_run_in_order(tmp_path):
    """The headless cell's commands, in order, with --print-config added so nothing trains:
    the printed run.toml is read back with the cell's --set overrides applied."""
    import tomllib
    from core.config import parse_override
    from trainers.__main__ import main
    notebook = load_notebook()
    values = form_defaults(notebook)
    parser = trainers_parser()
    files: dict[str, Path] = {}
    tails = found_commands(shell_commands(notebook), TRAINERS_COMMAND)
    assert tails
    for number, tail in enumerate(tails):
        args = [str(files.get(arg, arg)) for arg in command_args(tail, values)]
        if "--data-dir" in args:
            args[args.index("--data-dir") + 1] = str(tmp_path / "data")
        if "--print-config" not in args:
            args.append("--print-config")
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert main(args) == 0, args
        target = redirect_target(tail, values)
        if target:
            files[target] = tmp_path / f"printed{number}.toml"
            files[target].write_text(stdout.getvalue(), encoding="utf-8")
            continue
        printed = tomllib.loads(stdout.getvalue())
        overrides = parse_or_fail(parser, args, "headless command").set
        assert overrides, "the headless command sets a few keys"
        for override in overrides:
            key, value = parse_override(override)
            assert printed[key] == value, (key, printed[key], value)
    assert files, "the headless cell writes run.toml with --print-config first"
