"""The command surface of ``md4``: one help that lists every command, typed options of the
checkpoint commands from their signatures, one-line errors, and modules without import cycles."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
from docstring_parser import parse as parse_docstring

from conftest import one_line_error
from lightning_md4.cli import LIGHTNING_COMMANDS, main
from lightning_md4.commands import COMMANDS, Grid

ROOT = Path(__file__).resolve().parents[1]


def words(text: str) -> str:
    """``text`` with its whitespace collapsed: help lines are wrapped to the terminal."""
    return " ".join(text.split())


def test_help_lists_every_command_with_its_line(tmp_path):
    code = ("import sys\nfrom lightning_md4.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'md4 --help imported torch'")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {**LIGHTNING_COMMANDS,
             **{name: parse_docstring(function.__doc__).short_description for name, function in COMMANDS.items()}}
    assert list(lines) == ["fit", "validate", "test", "sample", "evaluate-samples", "zeroshot", "genppl"]
    for name, line in lines.items():
        assert line and "\n" not in line and f" {name} {line}" in words(out.stdout), name
    assert "predict" not in out.stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_help_shows_the_typed_options_of_its_function(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = words(capsys.readouterr().out)
    doc = {param.arg_name: param.description for param in parse_docstring(COMMANDS[name].__doc__).params}
    for param in inspect.signature(COMMANDS[name]).parameters.values():
        assert f"--{param.name} " in out and words(doc[param.name]) in out, param.name
    assert "--ckpt_path CKPT_PATH checkpoint written by md4 fit" in out and "(required, type: str)" in out
    if name != "genppl":  # every command but genppl takes a guidance or an evaluation setting
        assert "type: PositiveInt" in out


def test_bad_typed_values_are_one_line_errors_naming_the_option():
    assert one_line_error(["sample", "--ckpt_path", "x.ckpt", "--num_samples", "0"]) == (
        "md4: error: --num_samples: Not of type PositiveInt: 0 does not conform to restriction v>0 "
        "(md4 sample --help lists the options)")
    message = one_line_error(["genppl", "--ckpt_path", "x.ckpt", "--grid", "cos"])
    assert message.startswith("md4: error: --grid: ") and "'uniform', 'cosine'" in message
    message = one_line_error(["zeroshot", "--ckpt_path", "x.ckpt", "--paths", "ptb=FILE"])
    assert message.startswith("md4: error: --paths: Expected a <class 'dict'>")
    message = one_line_error(["zeroshot", "--ckpt_path", "x.ckpt", "--sets", "ptb", "--paths.lambada", "FILE"])
    assert message == "md4: error: --paths.lambada: lambada is not one of --sets (ptb)"
    assert one_line_error(["sampel"]).startswith("md4: error: argument command: invalid choice: 'sampel'")


def test_the_grid_type_is_the_samplers_grids():
    from lightning_md4.diffusion.sampling import GRIDS

    assert get_args(Grid) == GRIDS


def project_imports() -> dict[str, set[str]]:
    """Each module of the project with the project modules it imports, also inside functions."""
    files = {p: p.relative_to(ROOT).with_suffix("").parts for pkg in ("lightning_md4", "datamodules")
             for p in (ROOT / pkg).rglob("*.py")}
    modules = {".".join(parts[:-1] if parts[-1] == "__init__" else parts): path for path, parts in files.items()}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def test_no_import_cycles_even_through_imports_inside_functions():
    graph = project_imports()
    assert {"lightning_md4.cli", "lightning_md4.commands", "lightning_md4.evaluation"} <= graph.keys()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen))
                   for nxt in graph[start])

    assert [name for name in graph if reaches(name, name, set())] == []


# Importing evaluation imports torch and Lightning: seconds, so that case is slow.
@pytest.mark.parametrize("module, absent", [pytest.param("lightning_md4.evaluation", "lightning_md4.cli",
                                                         marks=pytest.mark.slow),
                                            ("lightning_md4.cli", "lightning_md4.evaluation"),
                                            ("lightning_md4.cli", "torch")])
def test_importing_a_module_leaves_the_other_unimported(module, absent, tmp_path):
    code = f"import sys, {module}\nassert {absent!r} not in sys.modules, 'it imports {absent}'"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]


def test_checkpoints_are_loaded_and_the_precision_chosen_in_one_module():
    sources = {path.relative_to(ROOT).as_posix(): path.read_text() for pkg in ("lightning_md4", "datamodules", "sweeps")
               for path in (ROOT / pkg).rglob("*.py")}
    for code in ('"bf16-mixed"', "load_from_checkpoint("):
        assert [name for name, text in sources.items() if code in text] == ["lightning_md4/checkpoints.py"], code
