"""scripts/setup.sh skips pip when the install is current, and reinstalls when it is not.

Runs the real script in a scratch copy of the project whose ``.venv`` holds stand-in ``python``,
``pip`` and ``md4`` that log their calls, so no package is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STUB = """#!/bin/bash
# -c: the install check (import lightning_md4 from this checkout); succeeds unless IMPORT_FAILS is set
if [ "$1" = "-c" ]; then [ -z "${IMPORT_FAILS:-}" ]; exit; fi
echo "$(basename "$0") $*" >> "$CALLS"
"""


def checkout(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", project / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    bin_dir = project / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "pip", "md4"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    return project


def setup(project: Path, calls: Path, **env: str) -> list[str]:
    """Run setup.sh; the pip calls it made."""
    before = calls.read_text().splitlines() if calls.exists() else []
    subprocess.run(["bash", str(project / "scripts" / "setup.sh")], check=True, timeout=60,
                   env={**os.environ, "CALLS": str(calls), **env})
    after = calls.read_text().splitlines() if calls.exists() else []
    return after[len(before):]


def test_setup_skips_pip_when_current_and_reinstalls_when_not(tmp_path):
    project, calls = checkout(tmp_path), tmp_path / "calls.log"
    first = setup(project, calls)
    assert any("install -q -e .[dev]" in c for c in first)  # a fresh venv: everything installed
    assert setup(project, calls) == []  # nothing changed: no pip at all
    assert setup(project, calls, IMPORT_FAILS="1") != []  # the package does not import: reinstall
    assert setup(project, calls) == []
    with open(project / "pyproject.toml", "a") as f:
        f.write("\n# a new dependency would go here\n")
    assert any("install -q -e .[dev]" in c for c in setup(project, calls))  # pyproject changed
    assert setup(project, calls) == []
    assert setup(project, calls, SETUP_FORCE="1") != []  # asked for


def test_a_failed_install_leaves_no_stamp_so_the_next_run_retries(tmp_path):
    project, calls = checkout(tmp_path), tmp_path / "calls.log"
    pip = project / ".venv" / "bin" / "pip"
    pip.write_text(STUB + "exit 1\n")
    assert subprocess.run(["bash", str(project / "scripts" / "setup.sh")], timeout=60,
                          env={**os.environ, "CALLS": str(calls)}).returncode != 0
    pip.write_text(STUB)
    assert setup(project, calls) != []
