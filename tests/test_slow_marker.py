"""The fast loop stays fast: ``md4`` subprocesses only in tests marked slow, and only via conftest's helper."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from conftest import md4, md4_command

TESTS = Path(__file__).resolve().parent


def test_an_unmarked_test_that_runs_md4_in_a_subprocess_fails_before_starting_it(tmp_path, monkeypatch):
    import subprocess

    def started(*args, **kwargs):
        raise AssertionError("the subprocess was started")

    monkeypatch.setattr(subprocess, "run", started)
    for call in (lambda: md4("fit", "--help", cwd=tmp_path), lambda: md4_command("fit")):
        with pytest.raises(pytest.fail.Exception, match=r"test_slow_marker\.py::.* runs `md4 fit` in a subprocess "
                                                        r"but is not marked slow: add @pytest.mark.slow"):
            call()


@pytest.mark.slow
def test_a_slow_test_gets_the_command():
    # Only the command is built here; the slow tests elsewhere run it.
    assert md4_command("fit", "--help") == [sys.executable, "-m", "lightning_md4.cli", "fit", "--help"]


def test_md4_subprocesses_are_started_only_by_the_guarded_helper():
    """A test starting ``python -m lightning_md4.cli`` itself would escape the slow-marker check."""
    pattern = re.compile(r"""["']-m["']\s*,\s*["']lightning_md4\.cli["']""")
    offenders = [path.name for path in sorted(TESTS.glob("*.py"))
                 if path.name not in ("conftest.py", Path(__file__).name) and pattern.search(path.read_text())]
    assert not offenders, f"use conftest's md4() or md4_command() instead in {offenders}"
