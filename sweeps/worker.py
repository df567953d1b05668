"""A sweep worker: ask the study for a trial, run it as a (DDP) training run, tell the result.

``study.optimize`` cannot drive DDP trials: Lightning re-executes the launching script in each
child process, and each re-execution would create trials of its own. So a worker uses Optuna's
ask/tell interface and runs every trial as a separate ``md4 fit`` launched with ``torchrun``,
``srun`` or plain ``python``. Any number of workers may share one study (same storage):

- a trial is asked, run and told by one worker; trial numbers come from the storage, and Optuna's
  ``GridSampler`` gives grid point ``k`` to trial number ``k``, so workers never run the same point;
- while a trial runs its worker beats (:mod:`sweeps.storage`); a trial whose worker died is failed
  by whichever worker notices first and re-queued once as a WAITING copy, which the next ``ask``
  picks up, so a crash loses nothing and duplicates nothing;
- a training run that fails is told FAIL with the tail of its stderr in the ``error`` user
  attribute, and counts as one of the study's ``n_trials`` (it is recorded, not retried).

A worker returns when the study holds ``n_trials`` trials and none is still running or waiting.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from sweeps.callback import OptunaTrial, result_path
from sweeps.spec import StudyError, StudySpec, make_pruner, make_sampler
from sweeps.storage import absolute_storage, fail_stale_trials, open_storage, record_heartbeat

# The worker records heartbeats itself (Optuna starts its heartbeat thread only in optimize).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

SURPLUS = "surplus"  # user attribute of a trial asked after the study was already full
ERROR_TAIL = 4000  # characters of a failed run's stderr kept in the trial


def storage_url(spec: StudySpec) -> str:
    return absolute_storage(spec.storage or f"sqlite:///{spec.study_dir / 'study.db'}")


def open_study(spec: StudySpec) -> optuna.Study:
    """Create the study, or load it when another worker (or an earlier run) already has."""
    storage = open_storage(storage_url(spec), spec.heartbeat.interval, spec.heartbeat.grace_period, spec.max_retry)
    directions = [o.direction for o in spec.objectives]
    study = optuna.create_study(storage=storage, study_name=spec.name, sampler=make_sampler(spec),
                                pruner=make_pruner(spec), directions=directions, load_if_exists=True)
    if study.directions != [optuna.study.StudyDirection[d.upper()] for d in directions]:
        raise StudyError(f"study {spec.name!r} in {storage_url(spec)} was created with other directions "
                         f"({[d.name.lower() for d in study.directions]}); use a new study name or storage")
    return study


def counted_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count towards ``n_trials``: not surplus, and not a failure that was retried
    (its WAITING or later copy counts instead)."""
    retried = {n for t in trials if (n := RetryHeartbeatStaleTrialCallback.retried_trial_number(t)) is not None}
    retried |= {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    return [t for t in trials if not t.user_attrs.get(SURPLUS) and t.number not in retried]


def run_worker(spec: StudySpec, poll: float | None = None) -> optuna.Study:
    """Run trials until the study is complete; returns the study."""
    study = open_study(spec)
    poll = spec.heartbeat.interval if poll is None else poll
    while True:
        fail_stale_trials(study, spec.heartbeat.grace_period, spec.max_retry)
        counted = counted_trials(study.get_trials(deepcopy=False))
        if len(counted) < spec.n_trials or any(t.state == TrialState.WAITING for t in counted):
            run_trial(spec, study)
        elif any(t.state == TrialState.RUNNING for t in counted):
            time.sleep(poll)  # another worker's trial: wait, in case its worker dies and it needs a rerun
        else:
            return study


def suggest(trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    """The trial's value of every parameter (a retried trial keeps its original values)."""
    params = {}
    for name, p in spec.search_space.items():
        if p.type == "categorical":
            params[name] = trial.suggest_categorical(name, p.choices)
        elif p.type == "int":
            params[name] = trial.suggest_int(name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            params[name] = trial.suggest_float(name, float(p.low), float(p.high), step=p.step, log=p.log)
    return params


def build_command(spec: StudySpec, trial: optuna.Trial, params: dict[str, Any], trial_dir: Path) -> list[str]:
    """The ``md4 fit`` command line of one trial, with its launcher in front."""
    launcher = spec.launcher
    fit = ["-m", "lightning_md4.cli", "fit"]
    for config in spec.base_configs:
        fit += ["--config", str(Path(config).resolve())]
    fit += spec.args
    for name, value in params.items():
        fit += spec.search_space[name].cli_args(value)
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(trial_dir.parent), "name": trial_dir.name, "version": "",
                            "default_hp_metric": False}}
    callback_args = {"storage": storage_url(spec), "study_name": spec.name, "trial_id": trial._trial_id,
                     "trial_dir": str(trial_dir), "metric": None if spec.multi_objective else spec.objectives[0].metric,
                     "pruner": spec.pruner,
                     "params": params, "hparam_metrics": [o.metric for o in spec.objectives] + spec.report_metrics}
    fit += [f"--trainer.default_root_dir={trial_dir}", f"--trainer.logger={json.dumps(logger)}",
            f"--trainer.callbacks+={OptunaTrial.__module__}.{OptunaTrial.__name__}"]
    fit += [f"--trainer.callbacks.init_args.{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}"
            for k, v in callback_args.items() if v is not None]
    if launcher.devices > 1 or launcher.num_nodes > 1 or launcher.kind != "python":
        fit += [f"--trainer.devices={launcher.devices}", f"--trainer.num_nodes={launcher.num_nodes}"]
    if launcher.devices * launcher.num_nodes > 1:
        fit += ["--trainer.strategy=ddp"]
    if launcher.kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={launcher.devices}", *fit]
    if launcher.kind == "srun":
        return ["srun", f"--nodes={launcher.num_nodes}", f"--ntasks-per-node={launcher.devices}",
                sys.executable, *fit]
    return [sys.executable, *fit]


def run_trial(spec: StudySpec, study: optuna.Study) -> None:
    """Ask one trial, run its training to the end and tell its outcome."""
    trial = study.ask()
    # Optuna has no public storage id of a trial; the callback and the heartbeat need it.
    record_heartbeat(study, trial._trial_id)
    trials = study.get_trials(deepcopy=False)
    is_rerun = trials[trial.number].system_attrs.get("failed_trial") is not None
    earlier = [t for t in counted_trials(trials) if t.number < trial.number]
    if not is_rerun and len(earlier) >= spec.n_trials:
        # Another worker filled the study between our count and our ask.
        trial.set_user_attr(SURPLUS, True)
        study.tell(trial, state=TrialState.FAIL)
        return
    params = suggest(trial, spec)
    trial_dir = Path(spec.study_dir).resolve() / f"trial_{trial.number:04d}"
    trial_dir.mkdir(parents=True, exist_ok=True)
    command = build_command(spec, trial, params, trial_dir)
    trial.set_user_attr("trial_dir", str(trial_dir))
    trial.set_user_attr("command", shlex.join(command))
    print(f"[md4-sweep] {spec.name} trial {trial.number}: {params}", flush=True)
    returncode = launch(command, trial_dir, lambda: record_heartbeat(study, trial._trial_id), spec.heartbeat.interval)
    tell(spec, study, trial, trial_dir, returncode)


def launch(command: list[str], trial_dir: Path, beat: Any, interval: float) -> int:
    """Run ``command`` with its output in ``trial_dir``, beating every ``interval`` seconds.

    If the worker is interrupted the run is stopped and the trial left RUNNING: its heartbeat
    then lapses and the next worker reruns it.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(trial_dir / "stdout.log", "w") as out, open(trial_dir / "stderr.log", "w") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        try:
            while True:
                try:
                    return proc.wait(timeout=interval)
                except subprocess.TimeoutExpired:
                    beat()
        except BaseException:
            proc.terminate()
            proc.wait()
            raise


def tell(spec: StudySpec, study: optuna.Study, trial: optuna.Trial, trial_dir: Path, returncode: int) -> None:
    result_file = result_path(trial_dir, 0)
    if returncode != 0 or not result_file.is_file():
        stderr = (trial_dir / "stderr.log").read_text(errors="replace")
        trial.set_user_attr("error", f"exit code {returncode}: {stderr[-ERROR_TAIL:]}")
        study.tell(trial, state=TrialState.FAIL)
        print(f"[md4-sweep] {spec.name} trial {trial.number} failed (exit code {returncode}); "
              f"see {trial_dir / 'stderr.log'}", flush=True)
        return
    result = json.loads(result_file.read_text())
    trial.set_user_attr("metrics", result["metrics"])
    trial.set_user_attr("step", result["step"])
    if result["pruned"]:
        study.tell(trial, state=TrialState.PRUNED)
        print(f"[md4-sweep] {spec.name} trial {trial.number} pruned at step {result['step']}", flush=True)
        return
    missing = [o.metric for o in spec.objectives if o.metric not in result["metrics"]]
    if missing:
        trial.set_user_attr("error", f"objective {missing[0]!r} was not logged; logged: {sorted(result['metrics'])}")
        study.tell(trial, state=TrialState.FAIL)
        return
    values = [result["metrics"][o.metric] for o in spec.objectives]
    study.tell(trial, values)
    print(f"[md4-sweep] {spec.name} trial {trial.number} done: "
          + ", ".join(f"{o.metric}={v:.6g}" for o, v in zip(spec.objectives, values)), flush=True)
