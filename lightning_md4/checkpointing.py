"""Checkpoints that survive what clusters do to a run: kills mid-write, NaNs, torn files, preemption.

Every ``md4`` run gets (``install``, called by the CLI on its Trainer):

- ``DurableCheckpointIO``: a checkpoint is written to a temporary file in its own folder, flushed and
  fsynced, then ``os.replace``d onto its name (and the folder fsynced): a kill at any moment leaves
  either the old file or the new one, never a torn one. Lightning 2.6's ``TorchCheckpointIO`` writes
  through an fsspec transaction whose temporary file is ``tempfile.mkstemp()`` in ``$TMPDIR``; the
  commit is ``shutil.move``, which across file systems (node-local ``/tmp``, ``runs/`` on NFS or
  Lustre) is a copy that first truncates the old checkpoint, and nothing is fsynced.
- ``FiniteCheckpoints``: a save is refused (``FloatingPointError``) when a tensor of the checkpoint
  is NaN or inf, or when a training loss was since the last check (``DiffusionModule.nonfinite_step``,
  a device-side record kept every step): the last good checkpoint stays the newest one.
- ``PreemptionCheckpoint``: after SIGTERM, ``last.ckpt`` is saved at the end of the current batch and
  the process exits with ``PREEMPTED_EXIT_CODE``; under SLURM, SIGUSR1 (``--signal=SIGUSR1@90``)
  does the same and requeues the job.

``newest_loadable`` picks the newest checkpoint that loads (``--ckpt_path last``, and the SLURM
script through ``python -m lightning_md4.checkpointing newest RUN_DIR``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from lightning_md4.atomic import atomic_file
from lightning_md4.modules.base import CheckpointError

# 128 + SIGTERM: what a shell reports for a process that SIGTERM ended; requeue scripts read it as
# "preempted, checkpoint saved, resume with --ckpt_path last".
PREEMPTED_EXIT_CODE = 143


# -- durable writes ----------------------------------------------------------------------------
def write_durably(path: Path, write: Callable[[Any], None]) -> None:
    """``write(file)`` into a temporary file beside ``path``, then atomically rename it onto ``path``
    (:func:`lightning_md4.atomic.atomic_file`; its hidden ``.tmp`` name is seen by no ``*.ckpt``
    glob). A checkpoint has one writer, so what killed writes left beside it is removed first.
    """
    with atomic_file(path, "wb", clean_stale=True) as f:
        write(f)


class DurableCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes go through ``write_durably``; remote URLs (s3://,
    gs://) keep Lightning's fsspec transaction, where an object appears whole or not at all."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_durably(Path(path), lambda f: torch.save(checkpoint, f))


# -- finite checkpoints ------------------------------------------------------------------------
def floating_tensors(obj: Any) -> Iterable[Tensor]:
    """The floating-point tensors anywhere in nested dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from floating_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from floating_tensors(value)


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every element is finite: one fused max-abs per device, one host sync per device."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            by_device.setdefault(t.device, []).append(t.detach())
    for group in by_device.values():
        # The inf-norm is NaN or inf exactly when some element is (a 2-norm could overflow on finite values).
        norms = torch._foreach_norm(group, ord=float("inf"))
        if not bool(torch.stack([n.float() for n in norms]).isfinite().all()):
            return False
    return True


# Bookkeeping where inf is a legitimate value (ModelCheckpoint's best score before any validation).
BOOKKEEPING = ("callbacks", "loops", "lr_schedulers")


def nonfinite_sections(checkpoint: dict[str, Any]) -> list[str]:
    """The keys of ``checkpoint`` holding a NaN or inf weight or optimiser state (state_dict, the EMA's
    current_model_state, optimizer_states, ...)."""
    return [key for key, value in checkpoint.items()
            if key not in BOOKKEEPING and not all_finite(floating_tensors(value))]


class FiniteCheckpoints(Callback):
    """Refuse to save a checkpoint with non-finite weights or after a non-finite training loss.

    Runs on every rank (the decision is all-reduced, so no rank waits at the save's barrier alone)
    and after the EMA callback has put its weights into the checkpoint (``install`` appends it last).
    """

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        recorded = getattr(pl_module, "nonfinite_step", None)
        loss_step = int(recorded) if recorded is not None else -1
        sections = nonfinite_sections(checkpoint)
        if trainer.strategy.reduce_boolean_decision(loss_step < 0 and not sections, all=True):
            return
        what = [f"the training loss (first at step {loss_step})"] if loss_step >= 0 else []
        what += [f"the checkpoint's {', '.join(sections)}"] if sections else []
        if not what:
            what = ["the training loss or weights of another rank"]
        raise FloatingPointError(
            f"refused to save a checkpoint at step {trainer.global_step}: {' and '.join(what)} is not finite "
            "(NaN or inf); the last good checkpoint is kept: lower optim.lr or set (or lower) trainer.gradient_clip_val, "
            "then resume from it with --ckpt_path last")


# -- preemption --------------------------------------------------------------------------------
class Preempted(SystemExit):
    """The run stopped after SIGTERM with its checkpoint saved; exits with ``PREEMPTED_EXIT_CODE``."""


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """Where the run's ``last.ckpt`` goes: the folder of its first ModelCheckpoint that saves one."""
    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    chosen = next((cb for cb in callbacks if cb.save_last), callbacks[0] if callbacks else None)
    if chosen is None:
        return Path(trainer.default_root_dir) / "checkpoints" / f"last{ModelCheckpoint.FILE_EXTENSION}"
    return Path(chosen.dirpath) / f"{chosen.CHECKPOINT_NAME_LAST}{chosen.FILE_EXTENSION}"


def save_last(trainer: pl.Trainer) -> Path:
    """Save ``last.ckpt`` now (every rank calls this: it is a collective) and return its path.

    The ModelCheckpoints that keep a ``last`` file are told first that this is their last file: a
    resumed run's ModelCheckpoint otherwise finds a ``last.ckpt`` it did not write and saves its own
    as ``last-v1.ckpt`` from then on, leaving ``last.ckpt`` behind at the preempted step."""
    path = last_checkpoint_path(trainer)
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath and Path(cb.dirpath) == path.parent:
            cb.last_model_path = str(path)
    trainer.save_checkpoint(path)
    return path


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes for this SLURM job (``ARRAYJOB_TASK`` for an array task)."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None and os.environ.get("SLURM_ARRAY_TASK_ID") is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class PreemptionCheckpoint(Callback):
    """After SIGTERM (preemption, ``scancel``), save ``last.ckpt`` at the end of the current batch and exit.

    Lightning's own SIGTERM handler only records the signal (``trainer.received_sigterm``) and ends
    the fit with exit code 0 and no checkpoint. Saving here, at batch end, is where ModelCheckpoint
    saves its step checkpoints, so the resume is the one those get.

    With ``requeue_signal`` (SLURM's time-limit warning, ``--signal=SIGUSR1@90``; ``install`` sets it
    under SLURM in place of Lightning's auto-requeue), that signal does the same and then requeues
    the job (``scontrol requeue``, on global rank 0). Lightning's handler saved ``hpc_ckpt_<n>.ckpt``
    from inside the signal handler, in the middle of whatever step was running (its data and RNG
    half consumed), and trained on until SLURM killed the job; a resume from it was not exact.
    """

    def __init__(self, requeue_signal: int | None = None) -> None:
        self.requeue_signal = requeue_signal
        self.requeue_requested = False
        self._previous_handler: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.requeue_signal is not None and stage == "fit":
            self._previous_handler = signal.signal(self.requeue_signal, self._on_requeue_signal)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.requeue_signal is not None and self._previous_handler is not None:
            signal.signal(self.requeue_signal, self._previous_handler)
            self._previous_handler = None

    def _on_requeue_signal(self, signum: int, frame: Any) -> None:
        self.requeue_requested = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stop = trainer.received_sigterm or self.requeue_requested
        if trainer.world_size > 1:  # every rank saves (a collective) or none does
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        requeue = self.requeue_requested
        if trainer.world_size > 1:  # all ranks are here: the signal may have reached only some
            requeue = trainer.strategy.reduce_boolean_decision(requeue, all=False)
        path = save_last(trainer)
        if trainer.is_global_zero:
            what = "SIGTERM"
            if requeue:
                what = f"{signal.Signals(self.requeue_signal).name} (the time limit is near)" \
                    if self.requeue_signal is not None else "the requeue signal"
            print(f"md4: {what}: saved {path} at step {trainer.global_step}; exiting with code "
                  f"{PREEMPTED_EXIT_CODE} (resume with --ckpt_path last)", file=sys.stderr, flush=True)
            if requeue:
                self._requeue()
        raise Preempted(PREEMPTED_EXIT_CODE)

    @staticmethod
    def _requeue() -> None:
        job = slurm_job_id()
        if job is None:
            print("md4: no SLURM_JOB_ID: not requeueing", file=sys.stderr, flush=True)
            return
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            print(f"md4: scontrol requeue {job} failed ({err}); resubmit the job to resume", file=sys.stderr, flush=True)
            return
        if result.returncode:
            print(f"md4: scontrol requeue {job} failed with exit code {result.returncode} ({result.stderr.strip()[:200]}); "
                  "resubmit the job to resume", file=sys.stderr, flush=True)
        else:
            print(f"md4: requeued SLURM job {job}", file=sys.stderr, flush=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A SIGTERM that lands after ``on_train_batch_end`` has looked (Lightning checks again at the
        next batch start, at epoch end and during validation) reaches us as Lightning's
        ``SIGTERMException``, which would exit 0 with nothing saved: save ``last.ckpt`` and turn its
        exit code into ``PREEMPTED_EXIT_CODE``. Single-process runs only: with several ranks not every
        rank is sure to see the exception, and a save is a collective."""
        if (not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.world_size > 1):
            return
        path = save_last(trainer)
        print(f"md4: SIGTERM: saved {path} at step {trainer.global_step}; exiting with code "
              f"{PREEMPTED_EXIT_CODE} (resume with --ckpt_path last)", file=sys.stderr, flush=True)
        exception.code = PREEMPTED_EXIT_CODE  # SystemExit's status when Lightning re-raises it


def install(trainer: pl.Trainer) -> None:
    """Give ``trainer`` durable, finite checkpoints and a checkpoint on SIGTERM (a CheckpointIO the
    user configured is kept); under SLURM with Lightning's auto-requeue, the requeue signal is
    handled by :class:`PreemptionCheckpoint` instead (at the end of a batch)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = DurableCheckpointIO()
    environment = getattr(trainer._accelerator_connector, "cluster_environment", None)
    requeue_signal = None
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and environment.requeue_signal:
        environment.auto_requeue = False  # Lightning then registers no handler for the requeue signal
        requeue_signal = environment.requeue_signal
    if not any(isinstance(cb, FiniteCheckpoints) for cb in trainer.callbacks):
        trainer.callbacks.append(FiniteCheckpoints())
    if not any(isinstance(cb, PreemptionCheckpoint) for cb in trainer.callbacks):
        trainer.callbacks.append(PreemptionCheckpoint(requeue_signal))


# -- resuming ----------------------------------------------------------------------------------
def newest_first(paths: Iterable[Path]) -> list[Path]:
    """Newest modification first; at equal times ``last*.ckpt`` first (it is written after the step file)."""
    return sorted(set(paths), key=lambda p: (p.stat().st_mtime_ns, p.name.startswith("last")), reverse=True)


def run_candidates(folders: Iterable[Path], root: Path | None = None) -> list[Path]:
    """Every checkpoint of a run, newest first: ``*.ckpt`` in its checkpoint folders and the SLURM
    requeue checkpoints ``hpc_ckpt_*.ckpt`` in its root folder."""
    paths = [p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt")]
    if root is not None and root.is_dir():
        paths += root.glob("hpc_ckpt_*.ckpt")
    return newest_first(p for p in paths if p.is_file())


def newest_loadable(candidates: Iterable[Path],
                    load: Callable[[Path], dict[str, Any]]) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The first of ``candidates`` that ``load`` reads, its contents, and why each before it was skipped."""
    skipped = []
    for path in candidates:
        try:
            return path, load(path), skipped
        except CheckpointError as err:
            skipped.append(str(err))
    return None, None, skipped


def skip_reasons(skipped: list[str]) -> str:
    """The load errors of skipped checkpoints, each without its advice to use another checkpoint."""
    return "; ".join(reason.split("; ")[0] for reason in skipped)


def skipped_line(skipped: list[str], chosen: Path | None) -> str:
    """One stderr line naming the checkpoints that did not load, why, and what is used instead."""
    return f"md4: skipped {len(skipped)} unreadable checkpoint(s): {skip_reasons(skipped)}; using {chosen or 'none'}"


def best_candidates(states: dict[str, Any]) -> list[Path]:
    """The best checkpoints a run's ModelCheckpoint states record, best first: those of a callback
    that monitors a metric (not the step or epoch that keeps the newest files), else of any."""
    monitored = [(key, s) for key, s in states.items() if key.startswith("ModelCheckpoint") and s.get("best_model_path")]
    metric = [(key, s) for key, s in monitored if s.get("monitor") not in (None, "step", "epoch")]
    ranked: list[Path] = []
    for key, state in metric or monitored:
        maximise = "'mode': 'max'" in key
        scores = {p: float(v) for p, v in (state.get("best_k_models") or {}).items()}
        others = sorted((p for p in scores if p != state["best_model_path"]), key=scores.get, reverse=maximise)
        ranked += [Path(p) for p in [state["best_model_path"], *others] if Path(p) not in ranked]
    return ranked


def main(argv: list[str] | None = None) -> None:
    """``python -m lightning_md4.checkpointing newest RUN_DIR``: print the newest checkpoint of the run
    that loads (nothing when there is none); a line on stderr names each skipped file and why."""
    from lightning_md4.checkpoints import load_checkpoint

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "newest":
        sys.exit("usage: python -m lightning_md4.checkpointing newest RUN_DIR")
    run = Path(argv[1])
    path, _, skipped = newest_loadable(run_candidates([run / "checkpoints"], run), load_checkpoint)
    if skipped:
        print(skipped_line(skipped, path), file=sys.stderr)
    if path is not None:
        print(path)


if __name__ == "__main__":
    main()
