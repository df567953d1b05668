"""The fast loop stays fast: ``md4`` subprocesses only in tests marked slow, however they are started."""

from __future__ import annotations

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



INNER_TESTS = '''
import subprocess
import sys

import pytest


def start_rows():  # code under test that starts md4 itself, as benchmarks/speed.py does
    return subprocess.run([sys.executable, "-m", "lightning_md4.cli", "fit", "--help"], capture_output=True)


def test_direct():
    subprocess.run([sys.executable, "-m", "lightning_md4.cli", "--help"], capture_output=True)


def test_through_code_under_test():
    start_rows()


def test_torchrun():
    subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "lightning_md4.cli",
                      "fit"])


def test_shell_line():
    subprocess.run("OMP_NUM_THREADS=1 md4-sweep run study.yaml", shell=True)


def test_other_processes_are_not_md4():
    code = "import lightning_md4.cli; print('md4 fit')"  # python -c code is the test's own business
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out == "md4 fit\\n"


@pytest.mark.slow
def test_marked_slow_may():  # an argv the guard takes for md4 that starts in no time: -m is python -c's argument
    assert subprocess.run([sys.executable, "-c", "pass", "-m", "lightning_md4.cli"]).returncode == 0
'''


def test_an_unmarked_test_that_starts_md4_any_way_fails_before_the_process_starts(pytester):
    """The guard sits in subprocess.Popen: an md4 or md4-sweep process started by the test, by code it
    calls (a benchmark harness, a sweep worker), through torchrun or a shell line fails an
    unmarked test; other processes, and md4 in a test marked slow, are allowed."""
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n")
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(failed=4, passed=2)
    result.stdout.fnmatch_lines([
        "*test_inner.py::test_direct runs `md4 --help` in a subprocess but is not marked slow: add @pytest.mark.slow*",
        "*test_inner.py::test_through_code_under_test runs `md4 fit` in a subprocess but is not marked slow*",
        "*test_inner.py::test_torchrun runs `md4 fit` in a subprocess but is not marked slow*",
        "*test_inner.py::test_shell_line runs `md4-sweep run` in a subprocess but is not marked slow*",
    ], consecutive=False)
