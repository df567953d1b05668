"""Durable checkpoints: torn files, NaNs between logging steps, kills mid-write, SIGTERM.

Tiny character models on the CPU, trained by real ``md4 fit`` subprocesses.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from conftest import TINY_NET_ARGS, TINY_NETWORK, TINY_TEXT, md4, md4_command
from lightning_md4.checkpointing import PREEMPTED_EXIT_CODE, DurableCheckpointIO, floating_tensors

ROOT = Path(__file__).resolve().parents[1]


class PoisonWeights(pl.Callback):
    """Sets one weight to NaN before the training step ``step``, so its loss is NaN (a divergence)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(f"line {i}: the cat sat on the mat.\n" for i in range(300)))
    return path


def md4_fit(run: Path, corpus: Path, *extra: str) -> list[str]:
    """The arguments of a tiny ``md4 fit``."""
    return ["fit", "--config", TINY_TEXT, f"--data.init_args.path={corpus}",
            "--data.init_args.seq_len=32", "--data.init_args.batch_size=8", f"--trainer.default_root_dir={run}",
            "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=1", *TINY_NET_ARGS, *extra]


def run_fit(run: Path, corpus: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    # PYTHONPATH: the runs below may name PoisonWeights of this file as a callback.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return md4(*md4_fit(run, corpus, *extra), cwd=run.parent, check=check, env=env)


def step_of(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def finite(path: Path) -> bool:
    """Whether the weights and optimiser state of a checkpoint are finite."""
    ckpt = torch.load(path, weights_only=True)
    return all(bool(t.isfinite().all()) for t in floating_tensors([ckpt["state_dict"], ckpt["optimizer_states"]]))


def tear(path: Path) -> None:
    """What a kill during a copy leaves: the first part of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
def test_torn_checkpoints_resume_from_the_newest_that_loads(tmp_path, corpus):
    run = tmp_path / "run"
    run_fit(run, corpus, "--trainer.max_steps=6", "--trainer.val_check_interval=2")
    folder = run / "checkpoints"
    # Two step checkpoints are kept besides last.ckpt, so one torn step file still leaves one.
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt",
                                                              "last.ckpt"]
    tear(folder / "last.ckpt")
    tear(folder / "epoch=0-step=6.ckpt")

    newest = subprocess.run([sys.executable, "-m", "lightning_md4.checkpointing", "newest", str(run)],
                            capture_output=True, text=True, timeout=120)
    assert newest.returncode == 0 and newest.stdout.strip() == str(folder / "epoch=0-step=4.ckpt")
    skip_lines = [line for line in newest.stderr.splitlines() if "skipped" in line]
    assert len(skip_lines) == 1 and "last.ckpt" in skip_lines[0] and "epoch=0-step=6.ckpt" in skip_lines[0]

    out = run_fit(run, corpus, "--trainer.max_steps=8", "--trainer.val_check_interval=2", "--ckpt_path", "last")
    skip_lines = [line for line in out.stderr.splitlines() if line.startswith("md4: skipped")]
    assert len(skip_lines) == 1 and "last.ckpt is corrupt" in skip_lines[0]
    assert skip_lines[0].endswith(f"using {folder / 'epoch=0-step=4.ckpt'}")
    assert f"Restoring states from the checkpoint path at {folder / 'epoch=0-step=4.ckpt'}" in out.stderr + out.stdout
    resumed = torch.load(folder / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 8
    assert {int(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()} == {8}


@pytest.mark.slow
def test_nan_between_logging_steps_never_reaches_a_checkpoint(tmp_path, corpus):
    """A step checkpoint every 4 steps (keeping one, as the step configs did), logging every 5 steps,
    the loss NaN from step 6: the save at step 8 must be refused, leaving step 4's checkpoints."""
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {dirpath: \"${trainer.default_root_dir}/checkpoints\", save_last: true, every_n_train_steps: 4}\n"
        "    - class_path: test_checkpoints.PoisonWeights\n"
        "      init_args: {step: 6}\n")
    run = tmp_path / "run"
    proc = run_fit(run, corpus, "--config", str(callbacks), "--trainer.max_steps=20",
                   "--trainer.val_check_interval=100", "--trainer.log_every_n_steps=5", check=False)
    last_line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last_line.startswith("md4: error: refused to save a checkpoint at step 8") and "first at step 6" in last_line
    saved = sorted((run / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in saved] == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert all(finite(p) for p in saved) and step_of(run / "checkpoints" / "last.ckpt") == 4


class Killed(BaseException):
    """A kill: nothing after it runs, and no ``except Exception`` catches it."""


def cross_device_rename(real):
    """``os.rename``/``os.replace`` between folders failing as they do across file systems (a
    node-local $TMPDIR, the run on NFS): shutil.move then copies instead."""

    def rename(src, dst, *args, **kwargs):
        if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst, *args, **kwargs)

    return rename


def killed_halfway_copy(src, dst, length=0):
    data = src.read()
    dst.write(data[: len(data) // 2])
    raise Killed


@pytest.mark.parametrize("kill_during", ["serialising", "moving"])
def test_a_write_killed_midway_leaves_the_old_checkpoint(kill_during, tmp_path, monkeypatch):
    """Killed while the checkpoint is serialised, or while a temporary file is moved onto it from
    another file system (Lightning's TorchCheckpointIO: a $TMPDIR file copied over the old one)."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    old, new = {"state_dict": {"w": torch.zeros(4096)}}, {"state_dict": {"w": torch.ones(4096)}}
    DurableCheckpointIO().save_checkpoint(old, path)
    monkeypatch.setattr(os, "rename", cross_device_rename(os.rename))
    monkeypatch.setattr(os, "replace", cross_device_rename(os.replace))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node-local"))
    (tmp_path / "node-local").mkdir()
    if kill_during == "serialising":
        real_save = torch.save

        def killed_save(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[:1000])
            raise Killed

        monkeypatch.setattr(torch, "save", killed_save)
    else:
        monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", False)  # the copy goes through copyfileobj
        monkeypatch.setattr(shutil, "copyfileobj", killed_halfway_copy)
    try:
        DurableCheckpointIO().save_checkpoint(new, path)
    except Killed:
        pass
    monkeypatch.undo()
    try:
        w = torch.load(path, weights_only=True)["state_dict"]["w"]
    except Exception as err:
        pytest.fail(f"the kill left a torn {path.name}: {err}")
    assert torch.equal(w, old["state_dict"]["w"]) or torch.equal(w, new["state_dict"]["w"])
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left beside it


class StepMarker(pl.Callback):
    """Appends the global step after each training batch to ``path``: how a test sees a run's progress."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        with self.path.open("a") as f:
            f.write(f"{trainer.global_step}\n")


def marked_steps(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_step_reached_and_resume_continues_from_it(tmp_path, corpus):
    marker = tmp_path / "step.txt"
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {dirpath: \"${trainer.default_root_dir}/checkpoints\", save_last: true}\n"
        "    - class_path: test_checkpoints.StepMarker\n"
        f"      init_args: {{path: {marker}}}\n")
    run = tmp_path / "run"
    # No validation, so no checkpoint, before the SIGTERM.
    args = ["--config", str(callbacks), "--trainer.val_check_interval=100000"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.Popen(md4_command(*md4_fit(run, corpus, "--trainer.max_steps=100000", *args)), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if marked_steps(marker)[-1:] >= [7]:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    step = step_of(last)
    reached = marked_steps(marker)
    assert step >= 7 and step == reached[-1]  # the step the run had reached
    assert f"md4: SIGTERM: saved {last} at step {step}; exiting with code {PREEMPTED_EXIT_CODE}" in stderr
    out = run_fit(run, corpus, f"--trainer.max_steps={step + 2}", *args, "--ckpt_path", "last")
    assert f"Restoring states from the checkpoint path at {last}" in out.stderr + out.stdout
    assert marked_steps(marker)[len(reached):] == [step + 1, step + 2]  # on from the step reached


def test_best_skips_a_torn_best_checkpoint_for_the_next_best(tmp_path):
    """``--ckpt_path best``: the run's record ranks best-2 (0.5) over best-1 (0.7); best-2 is torn."""
    from lightning_md4.cli import run_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    best1, best2, last = folder / "best-1.ckpt", folder / "best-2.ckpt", folder / "last.ckpt"
    key_val = "ModelCheckpoint{'monitor': 'val/nelbo', 'mode': 'min', 'every_n_train_steps': 0}"
    key_step = "ModelCheckpoint{'monitor': 'step', 'mode': 'max', 'every_n_train_steps': 0}"
    states = {key_step: {"monitor": "step", "best_model_path": str(last), "best_k_models": {str(last): 3.0}},
              key_val: {"monitor": "val/nelbo", "best_model_path": str(best2),
                        "best_k_models": {str(best1): torch.tensor(0.7), str(best2): torch.tensor(0.5)}}}
    for step, path in ((1, best1), (2, best2), (3, last)):
        torch.save({"global_step": step, "state_dict": {}, "hyper_parameters": {"_class_path": "x.MD4"},
                    "callbacks": states}, path)
    tear(best2)
    path, ckpt, skipped = run_checkpoint([folder], "best")
    assert path == best1 and ckpt["global_step"] == 1
    assert len(skipped) == 1 and f"{best2} is corrupt" in skipped[0]


class SigtermAfterPreemptionLooked(pl.Callback):
    """SIGTERM to this process at the end of batch ``at``, after PreemptionCheckpoint's own check: the
    race in which Lightning, not our callback, notices the signal first."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_seen_first_by_lightning_still_saves_and_exits_143(tmp_path, tiny_digits):
    from lightning_md4.checkpointing import install
    from lightning_md4.modules import MD4
    from lightning_md4.nets import TransformerConfig

    net = TransformerConfig(**TINY_NETWORK, time_conditioning=False)
    trainer = pl.Trainer(max_steps=50, logger=False, enable_progress_bar=False, limit_val_batches=0,
                         default_root_dir=tmp_path, callbacks=[
                             pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)])
    install(trainer)
    trainer.callbacks.append(SigtermAfterPreemptionLooked(at=3))
    with pytest.raises(SystemExit) as exit_info:
        trainer.fit(MD4(17, 64, network=net), tiny_digits)
    assert exit_info.value.code == PREEMPTED_EXIT_CODE
    assert step_of(tmp_path / "checkpoints" / "last.ckpt") == 3
