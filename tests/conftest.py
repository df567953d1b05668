"""The one helper that runs the ``md4`` command in a subprocess, and the guard that keeps such tests
out of the fast loop (``bash scripts/test.sh -m "not slow"``).

A subprocess imports torch and Lightning again (seconds each), so every test that calls ``md4()`` or
``md4_command()`` -- directly, through a helper, or through a fixture it uses -- must be marked
``slow`` (``@pytest.mark.slow``, or ``pytestmark = pytest.mark.slow`` for a whole file); an unmarked
one fails before anything is started. Test files import these with ``from conftest import md4``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_running: pytest.Item | None = None  # the test being set up, run or torn down


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    global _running
    _running = item
    try:
        return (yield)
    finally:
        _running = None


def _require_slow(args: tuple[str, ...]) -> None:
    item = _running
    where = item.nodeid if item is not None else "code outside a test (collection?)"
    if item is None or item.get_closest_marker("slow") is None:
        pytest.fail(f"{where} runs `md4 {' '.join(args[:1])}` in a subprocess but is not marked slow: add "
                    "@pytest.mark.slow (or pytestmark = pytest.mark.slow for the file), so that "
                    "`bash scripts/test.sh -m \"not slow\"` stays fast", pytrace=False)


def md4_command(*args: str) -> list[str]:
    """The argv of ``md4 ARGS`` with this interpreter, for ``subprocess.Popen`` (tests marked slow only)."""
    _require_slow(args)
    return [sys.executable, "-m", "lightning_md4.cli", *args]


def md4(*args: str, cwd: Path, check: bool = True, timeout: float = 300,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``md4 ARGS`` in a subprocess in ``cwd``, its output captured as text; with ``check``, a
    non-zero exit fails the test with the ends of stdout and stderr (tests marked slow only)."""
    proc = subprocess.run(md4_command(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else dict(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"md4 {' '.join(args)} failed with exit code {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
