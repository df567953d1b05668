"""pyproject.toml declares every package the code imports.

Every ``import`` of the project's code (also inside functions) is mapped to the distribution that
provides it (``importlib.metadata.packages_distributions``); a third-party one must be declared in
``[project] dependencies``. Exceptions: an import inside ``try: ... except ImportError`` is optional
(the code says what to install when it is missing) and may be declared in an optional extra instead;
the tests may also use the ``dev`` extra. A package that works today only because another one pulls
it in breaks the day that one drops it.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from conftest import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PACKAGES = ("lightning_md4", "datamodules", "sweeps", "benchmarks")  # what the project runs
OWN = {*PACKAGES, "conftest"}  # and each test folder's helper modules, found beside the importing file


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", r).group(1)) for r in requirements}


def catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


def imports(path: Path) -> dict[str, bool]:
    """Top-level module name -> whether every import of it in ``path`` is optional (inside a ``try``
    that catches ``ImportError``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    optional_nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(catches_import_error(h) for h in node.handlers):
            optional_nodes |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            found[top] = found.get(top, True) and id(node) in optional_nodes
    return found


def third_party_imports(files: list[Path]) -> dict[str, tuple[bool, list[str]]]:
    """Module -> (optional everywhere, the files importing it), stdlib and the project's own left out."""
    result: dict[str, tuple[bool, list[str]]] = {}
    for path in files:
        beside = {p.stem for p in path.parent.glob("*.py")} | {p.name for p in path.parent.iterdir() if p.is_dir()}
        for module, optional in imports(path).items():
            if module in sys.stdlib_module_names or module in OWN or module in beside or module == "__future__":
                continue
            was_optional, where = result.get(module, (True, []))
            shown = str(path.relative_to(ROOT)) if ROOT in path.parents else path.name
            result[module] = (was_optional and optional, [*where, shown])
    return result


def undeclared(files: list[Path], required: set[str], optional: set[str]) -> list[str]:
    providers = packages_distributions()
    problems = []
    for module, (is_optional, where) in sorted(third_party_imports(files).items()):
        allowed = required | optional if is_optional else required
        dists = {normalize(d) for d in providers.get(module, [])} or {normalize(module)}
        if not dists & allowed:
            kind = "an optional extra (or dependencies)" if is_optional else "dependencies"
            problems.append(f"{module} (distribution {' or '.join(sorted(dists))}; imported in {', '.join(where[:3])})"
                            f" is not declared in pyproject.toml's {kind}")
    return problems


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_the_code_imports_only_declared_packages(project):
    files = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    files += sorted((ROOT / "scripts").rglob("*.py"))
    extras = project.get("optional-dependencies", {})
    runtime = requirement_names(project["dependencies"])
    optional = requirement_names([r for name, reqs in extras.items() if name != "dev" for r in reqs])
    assert undeclared(files, runtime, optional) == []


def test_the_tests_import_only_declared_packages(project):
    extras = project.get("optional-dependencies", {})
    runtime = requirement_names(project["dependencies"]) | requirement_names(extras.get("dev", []))
    optional = requirement_names([r for reqs in extras.values() for r in reqs])
    assert undeclared(sorted((ROOT / "tests").rglob("*.py")), runtime, optional) == []


def test_the_check_sees_imports_inside_functions_and_knows_optional_ones(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("import os\nimport numpy as np\n\ndef f():\n    from yaml import safe_load\n"
                      "    try:\n        import datasets\n    except ImportError:\n        pass\n")
    assert imports(source) == {"os": False, "numpy": False, "yaml": False, "datasets": True}
    problems = undeclared([source], required={"numpy"}, optional=set())
    assert [p.split(" ")[0] for p in problems] == ["datasets", "yaml"]
    assert undeclared([source], required={"numpy", "pyyaml"}, optional={"datasets"}) == []
