"""The Lightning callback a trial's training run carries: report, prune, record.

``optuna_integration.PyTorchLightningPruningCallback`` is not used: it needs the ``Trial`` of a
``study.optimize`` in the launching process (which DDP re-executes, duplicating trials), reports
once per epoch, and under DDP accepts only RDB storages, passing the prune decision to the other
ranks through the storage's system attributes. Here the training run gets the trial's storage id,
rank 0 alone talks to the storage (any kind, journal included) at every validation, and the
decision reaches the other ranks by ``strategy.broadcast``, so all ranks stop at the same step.

At the first validation rank 0 checks that every objective metric was logged; a misspelt one
fails the run there on every rank (:class:`ObjectiveNotLogged`) instead of after the whole training.

Rank 0 also keeps ``progress.json`` (the step, at most every ``PROGRESS_EVERY_S`` seconds) for the
worker's no-progress limit, and a report that the storage refuses never stops the training: a
storage error is retried, and a trial already finished (failed as stale while its worker was
paused) is reported no more; the worker then gives the result to the trial's rerun.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import optuna
import torch

from lightning_md4.atomic import write_atomic
from sweeps.spec import StudyError, build_pruner, check_objective_metric, redact_secrets
from sweeps.storage import open_storage, retrying

PROGRESS_EVERY_S = 1.0  # rank 0 writes progress.json at most this often


class ObjectiveNotLogged(StudyError):
    """An objective metric of the study was not logged at the run's first validation: every trial
    would fail the same way, so the worker counts it as a training failure (not retried)."""


def result_path(trial_dir: Path, rank: int) -> Path:
    return Path(trial_dir) / f"result.rank{rank}.json"


def progress_path(trial_dir: Path) -> Path:
    return Path(trial_dir) / "progress.json"


def read_progress(trial_dir: Path) -> dict[str, Any]:
    """The run's last progress record (``step``, ``start_step``: where this attempt began, ``time``);
    empty before the first one."""
    try:
        return json.loads(progress_path(trial_dir).read_text())
    except (OSError, ValueError):
        return {}


def write_progress(trial_dir: Path, record: dict[str, Any]) -> None:
    """Replace ``progress.json`` atomically (the worker may read it at any moment); not fsynced: it is
    rewritten every second from the training loop, and a crash only loses a heartbeat."""
    write_atomic(progress_path(trial_dir), json.dumps(record), durable=False)


class OptunaTrial(pl.Callback):
    """Report the objective to an Optuna trial at each validation and stop every rank if it is pruned.

    At the end of fit every rank writes ``result.rank{r}.json`` (``pruned``, ``step``, the final
    scalar metrics and the run's ``params``) into ``trial_dir`` for the sweep worker. The run's
    HPARAMS session is the study's (:mod:`sweeps.tensorboard`, written by the worker): ``md4 fit``
    writes none of its own for a run with this callback (``hparams_by_study``).

    Args:
        storage: the study's storage URL (see :mod:`sweeps.storage`).
        study_name: the study.
        trial_id: Optuna's storage id of the trial (not its number).
        metric: the objective to report for pruning; ``None`` for multi-objective studies, which
            Optuna cannot prune.
        objectives: every objective metric of the study, checked at the first validation
            (default: ``metric``).
        pruner: the study file's ``pruner`` mapping (a storage keeps no pruner, so the trial builds it).
        params: the run's parameters and its seed, recorded in its result.
        trial_dir: where the result files go.
    """

    # Read by md4 fit's run record: a session of its own would end SUCCESS whatever the trial's state.
    hparams_by_study = True

    def __init__(self, storage: str, study_name: str, trial_id: int, trial_dir: str, metric: str | None = None,
                 objectives: list[str] | None = None, pruner: dict[str, Any] | None = None,
                 params: dict[str, Any] | None = None) -> None:
        self.storage, self.study_name, self.trial_id = storage, study_name, trial_id
        self.objectives = objectives if objectives is not None else ([metric] if metric else [])
        self._objectives_checked = False
        self.pruner = pruner or {"name": "none"}
        self.trial_dir, self.metric = Path(trial_dir), metric
        self.params = params or {}
        self.pruned = False
        self._trial: optuna.trial.Trial | None = None
        self._start_step = 0
        self._last_progress = -float("inf")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self.metric is not None:
            study = retrying(lambda: optuna.load_study(study_name=self.study_name, storage=open_storage(self.storage),
                                                       pruner=build_pruner(self.pruner)))
            self._trial = optuna.trial.Trial(study, self.trial_id)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step  # after a resume, the checkpoint's step
        self._record_progress(trainer, force=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._record_progress(trainer)

    def _record_progress(self, trainer: pl.Trainer, force: bool = False) -> None:
        now = time.monotonic()
        if trainer.is_global_zero and (force or now - self._last_progress >= PROGRESS_EVERY_S):
            self.trial_dir.mkdir(parents=True, exist_ok=True)
            write_progress(self.trial_dir, {"step": trainer.global_step, "start_step": self._start_step,
                                            "time": time.time()})
            self._last_progress = now

    def _report(self, value: float, step: int) -> bool:
        """Report to the trial and ask the pruner; False (and no more reports) when the trial is finished."""
        try:
            return retrying(lambda: (self._trial.report(value, step), self._trial.should_prune())[1])
        except optuna.exceptions.UpdateFinishedTrialError:
            print(f"md4-sweep: trial id {self.trial_id} is already finished (failed as stale while its worker did "
                  "not beat); training on without reports, the worker gives the result to its rerun",
                  file=sys.stderr, flush=True)
        except Exception as err:  # the storage's own errors: skip this report, never the training
            print(f"md4-sweep: report at step {step} not recorded: {type(err).__name__}: {redact_secrets(str(err))}",
                  file=sys.stderr, flush=True)
            return False
        self._trial = None
        return False

    def _check_objectives(self, trainer: pl.Trainer) -> None:
        """Once, at the first validation: raise :class:`ObjectiveNotLogged` on every rank when rank 0
        did not log an objective metric (one rank raising alone would leave the others in a collective)."""
        self._objectives_checked = True
        problem = None
        if trainer.is_global_zero:
            try:
                for metric in self.objectives:
                    check_objective_metric(metric, trainer.callback_metrics)
            except StudyError as err:
                problem = str(err)
        problem = trainer.strategy.broadcast(problem, src=0)
        if problem is not None:
            raise ObjectiveNotLogged(problem)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if not self._objectives_checked:
            self._check_objectives(trainer)
        if self.metric is None:
            return
        prune = False
        if trainer.is_global_zero and self._trial is not None and self.metric in trainer.callback_metrics:
            prune = self._report(float(trainer.callback_metrics[self.metric]), trainer.global_step)
        # One decision for all ranks: a rank that stopped alone would hang the others' collectives.
        if trainer.strategy.broadcast(prune, src=0):
            self.pruned = True
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)}
        self.trial_dir.mkdir(parents=True, exist_ok=True)
        result = {"pruned": self.pruned, "step": trainer.global_step, "start_step": self._start_step,
                  "metrics": metrics, "params": self.params}
        result_path(self.trial_dir, trainer.global_rank).write_text(json.dumps(result, indent=1))
