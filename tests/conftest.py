"""The one helper that runs the ``md4`` command in a subprocess, and the guard that keeps such tests
out of the fast loop (``bash scripts/test.sh -m "not slow"``).

A subprocess imports torch and Lightning again (seconds each), so every test that starts an ``md4``
or ``md4-sweep`` process -- through ``md4()`` or ``md4_command()``, through code under test that
starts one (a benchmark harness, a sweep worker), or with ``subprocess`` directly; in the test, a
helper or a fixture it uses -- must be marked ``slow`` (``@pytest.mark.slow``, or ``pytestmark =
pytest.mark.slow`` for a whole file); an unmarked one fails before the process is started. The guard
sits in ``subprocess.Popen`` (which ``subprocess.run``, ``check_output`` and ``call`` use) and knows an
``md4`` process by its argv: ``-m lightning_md4.cli`` or ``-m sweeps.cli`` (torchrun's too), the
``md4``/``md4-sweep`` scripts (also in a shell line). It does not read ``python -c`` code (a
test's own check that importing the CLI leaves torch out is fast), nor see processes started without
``subprocess`` (``os.system``) or by a child (a shell script that calls ``md4``).
Test files import these with ``from conftest import md4``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest_plugins = ["pytester"]  # tests/test_slow_marker.py runs the guard in an inner pytest

_running: pytest.Item | None = None  # the test being set up, run or torn down


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    global _running
    _running = item
    try:
        return (yield)
    finally:
        _running = None


def _require_slow(args: Sequence[str], command: str = "md4") -> None:
    item = _running
    where = item.nodeid if item is not None else "code outside a test (collection?)"
    if item is None or item.get_closest_marker("slow") is None:
        pytest.fail(f"{where} runs `{command} {' '.join(args[:1])}` in a subprocess but is not marked slow: add "
                    "@pytest.mark.slow (or pytestmark = pytest.mark.slow for the file), so that "
                    "`bash scripts/test.sh -m \"not slow\"` stays fast", pytrace=False)


_CLI_MODULES = {"lightning_md4.cli": "md4", "sweeps.cli": "md4-sweep"}
# what may stand before a command word in a shell line: an operator, a wrapper, an assignment
_COMMAND_BEFORE = re.compile(r".*(&&|\|\||;|\|)|time|exec|env|nohup|srun|\w+=.*")


def md4_process(args: Any) -> tuple[str, list[str]] | None:
    """``(command, its arguments)`` when a ``Popen`` argv (a list, or a shell string) runs ``md4`` or
    ``md4-sweep``, else ``None``."""
    if isinstance(args, (str, bytes, os.PathLike)):
        text = os.fsdecode(args)
        try:
            argv = shlex.split(text)
        except ValueError:
            argv = text.split()
    else:
        argv = [os.fsdecode(a) if isinstance(a, (str, bytes, os.PathLike)) else str(a) for a in args]
    for i, arg in enumerate(argv):
        module = arg if i > 0 and argv[i - 1] == "-m" else arg.removeprefix("-m")
        if module in _CLI_MODULES:  # python -m lightning_md4.cli, torchrun ... -m lightning_md4.cli
            return _CLI_MODULES[module], argv[i + 1 :]
        if os.path.basename(arg) in ("md4", "md4-sweep") and (i == 0 or _COMMAND_BEFORE.fullmatch(argv[i - 1])):
            return os.path.basename(arg), argv[i + 1 :]
    return None


_popen_init = None


def _guarded_popen_init(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
    found = md4_process(args)
    if found is not None:
        _require_slow(found[1], found[0])
    _popen_init(self, args, *rest, **kwargs)


def pytest_configure(config: pytest.Config) -> None:
    global _popen_init
    _popen_init = subprocess.Popen.__init__
    subprocess.Popen.__init__ = _guarded_popen_init


def pytest_unconfigure(config: pytest.Config) -> None:
    if _popen_init is not None:
        subprocess.Popen.__init__ = _popen_init


# -- the tiny network, data and md4 arguments of most tests (plain data: importing conftest imports
# no torch; the fixtures import what they build) -------------------------------------------------
CONFIGS = ROOT / "configs"
DIGITS = str(CONFIGS / "digits.yaml")  # the main job: scikit-learn's 8x8 digits, 17 levels, 64 tokens
TINY_TEXT = str(CONFIGS / "tiny_text.yaml")  # a character model of any text file (--data.init_args.path)
TINY_NETWORK = {"n_layers": 1, "d_model": 32, "n_heads": 2, "d_cond": 16}  # TransformerConfig(**TINY_NETWORK)
TINY_NET_ARGS = [f"--model.init_args.network.{key}={value}" for key, value in TINY_NETWORK.items()]


def digits_fit_args(run: Path, steps: int, *extra: str) -> list[str]:
    """``md4 fit`` arguments of a short run of the tiny network on the digits into ``run``: batches
    of 16, validation on one batch every 5 steps, no progress bar; ``extra`` come last."""
    return ["fit", "--config", DIGITS, f"--trainer.default_root_dir={run}", f"--trainer.max_steps={steps}",
            "--trainer.val_check_interval=5", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--data.init_args.batch_size=16", *TINY_NET_ARGS, *extra]


@pytest.fixture
def tiny_network() -> Any:
    """The tiny network's ``TransformerConfig`` (``TINY_NETWORK``)."""
    from lightning_md4.nets import TransformerConfig

    return TransformerConfig(**TINY_NETWORK)


@pytest.fixture
def tiny_digits() -> Any:
    """A ``DigitsDataModule`` with batches of 8 for training and evaluation."""
    from datamodules import DigitsDataModule

    return DigitsDataModule(batch_size=8, eval_batch_size=8)


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


def one_line_error(argv: list[str]) -> str:
    """The message of ``md4 ARGV`` run in-process, which must fail with one ``md4: error:`` line.
    (``lightning_md4.cli`` imports no torch at module level, so this stays fast.)"""
    from lightning_md4.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("md4: error: ") and "\n" not in message, message
    return message
