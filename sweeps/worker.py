"""A sweep worker: ask the study for a trial, run it as a (DDP) training run, tell the result.

``study.optimize`` cannot drive DDP trials: Lightning re-executes the launching script in each
child process, and each re-execution would create trials of its own. So a worker uses Optuna's
ask/tell interface and runs every trial as a separate ``md4 fit`` launched with ``torchrun``,
``srun`` or plain ``python``. Any number of workers may share one study (same storage):

- a trial is asked, run and told by one worker; trial numbers come from the storage, and Optuna's
  ``GridSampler`` gives grid point ``k`` to trial number ``k``, so workers never run the same point;
- while a trial runs its worker beats (:mod:`sweeps.storage`, retried with backoff); a trial whose
  worker died is failed by whichever worker notices first and re-queued as a WAITING copy, which
  the next ``ask`` picks up, so a crash loses nothing and duplicates nothing.

Resume, never restart: a rerun uses the folder of the trial it reruns (``trial_<original>``), and
every trial runs ``md4 fit ... --ckpt_path last`` with a checkpoint every
``CHECKPOINT_INTERVAL_S`` seconds (``resume/``, removed once the trial is told COMPLETE or
PRUNED), so a rerun goes on from the newest checkpoint with the earlier intermediate values.
A folder is locked (``.lock``, held by the worker and the trial's first process) so that two
attempts never train in it at once; an attempt that finds a finished run's result there tells it
instead of training again.

Supervision: each trial is its own process group (session) whose first process gets SIGTERM when
the worker dies (``PR_SET_DEATHSIG``; ``md4 fit`` then saves ``last.ckpt`` and exits 143); on a
limit (``limits.wall_clock_s``, ``limits.no_progress_s`` without a new training step) or when the
worker stops, the trial's processes get SIGTERM, then SIGKILL after ``limits.kill_grace_s``. No
wait on a child is without a timeout.

Failure policy (:func:`failure_kind`): a preempted run (exit 143, checkpoint saved, steps made) is
requeued; an infrastructure failure (killed by a signal, NCCL/gloo/rendezvous errors, lost node, a
hang) is requeued at most ``failures.max_infra_retries`` times; a training error (NaN, a config
error ``md4: error``, any other exception) and a wall-clock limit are final. A study whose last
``failures.max_consecutive`` told attempts failed stops every worker with the most common error;
:func:`retry_failed` queues the final failures again.

Seeds (:func:`sweeps.spec.trial_seeds`): a grid trial is one (configuration, seed) run in its folder;
a trial of another sampler runs every seed of its configuration, one after another, in
``trial_<n>/seed_<s>``. Only the first seed reports intermediate values, so the pruner judges every
trial on one curve; a pruned first seed prunes the trial, a failed seed fails it (a rerun skips the
seeds that finished), and otherwise the trial is told the mean over seeds with the value of each in
``user_attrs["seed_values"]``. Each run is a session of the study's TensorBoard view
(:mod:`sweeps.tensorboard`): started before its first launch, ended once its outcome is final.

A worker returns when the study holds ``n_trials`` trials and none is still running or waiting.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from lightning_md4.checkpointing import PREEMPTED_EXIT_CODE
from sweeps.callback import ObjectiveNotLogged, OptunaTrial, read_progress, result_path
from sweeps.spec import (SEED_PARAM, SEEDS_ATTR, StudyError, StudySpec, check_fingerprint, make_pruner, make_sampler,
                         redact_secrets, trial_seeds)
from sweeps.storage import absolute_storage, beat_with_retry, fail_stale_trials, open_storage, requeue
from sweeps.tensorboard import write_experiment, write_session_end, write_session_start

# The worker records heartbeats itself (Optuna starts its heartbeat thread only in optimize).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

SURPLUS = "surplus"  # user attribute of a trial asked after the study was already full
ERROR_TAIL = 4000  # characters of a failed run's stderr kept in the trial
FAILURE = "failure"  # user attribute of a told FAIL: its kind (see failure_kind)
STREAK_SINCE = "failure_streak_since"  # study user attribute: failures before it no longer stop the study
CHECKPOINT_INTERVAL_S = 600.0  # a sweep trial's resume checkpoint, every this many seconds of training
RESUME_DIR = "resume"  # that checkpoint's folder in the trial's folder
LOCK_FILE = ".lock"
SESSION_FILE = "session.json"  # a run's TensorBoard session: when it started, and its state once ended
WORKER_INDEX_ENV = "MD4_SWEEP_WORKER"  # i: this worker's trials use GPUs [i * devices, (i + 1) * devices)
KILL_WAIT_S = 10.0  # after SIGKILL: how long to wait for the processes to be gone
# An infrastructure failure, as the run's stderr names it (a rank or node lost, collectives broken).
INFRA_MARKERS = ("NCCL", "ncclInternalError", "Watchdog caught collective operation timeout", "RendezvousError",
                 "RendezvousTimeoutError", "DistNetworkError", "DistStoreError", "Connection closed by peer",
                 "Connection reset by peer", "Node failure", "NODE_FAIL", "Job step aborted",
                 "uncorrectable ECC error", "CUDA error: unknown error")
# A training error: rerunning the same parameters fails the same way (a misspelt objective metric
# fails every trial; its DDP peers' broken collectives must not make it look like infrastructure).
TRAINING_MARKERS = ("FloatingPointError", "md4: error", ObjectiveNotLogged.__name__)
NO_PROGRESS, WALL_CLOCK, WORKER_STOPPED = "md4-sweep: no progress", "md4-sweep: wall-clock limit", "md4-sweep: worker stopped"
TRAINING, INFRA, LIMIT, PREEMPTED, STOPPED, LATE = "training", "infra", "limit", "preempted", "stopped", "late"


@dataclass(frozen=True)
class Policy:
    """The study's supervision and failure settings (seconds, counts)."""

    wall_clock_s: float | None = None
    no_progress_s: float | None = None
    kill_grace_s: float = 30.0
    max_consecutive: int = 5
    max_infra_retries: int = 3
    ddp_timeout_s: int = 600

    @classmethod
    def of(cls, spec: StudySpec) -> Policy:
        limits, failures = spec.limits, spec.failures
        return cls(limits.wall_clock_s, limits.no_progress_s, limits.kill_grace_s, failures.max_consecutive,
                   failures.max_infra_retries, spec.launcher.ddp_timeout_s)

    def retry_limit(self, kind: str) -> int | None:
        """Reruns allowed for a failure of ``kind`` (None: unbounded)."""
        return {INFRA: self.max_infra_retries, PREEMPTED: None, STOPPED: None}.get(kind, 0)


def storage_url(spec: StudySpec) -> str:
    return absolute_storage(spec.storage or f"sqlite:///{spec.study_dir / 'study.db'}")


def open_study(spec: StudySpec) -> optuna.Study:
    """Create the study, or load it when another worker (or an earlier run) already has; refuse a
    study file that differs from the one the study was created with."""
    storage = open_storage(storage_url(spec), spec.heartbeat.interval, spec.heartbeat.grace_period, spec.max_retry)
    directions = [o.direction for o in spec.objectives]
    study = optuna.create_study(storage=storage, study_name=spec.name, sampler=make_sampler(spec),
                                pruner=make_pruner(spec), directions=directions, load_if_exists=True)
    if study.directions != [optuna.study.StudyDirection[d.upper()] for d in directions]:
        raise StudyError(f"study {spec.name!r} in {storage_url(spec)} was created with other directions "
                         f"({[d.name.lower() for d in study.directions]}); use a new study name or storage")
    check_fingerprint(study, spec)  # a worker with an edited study file would run other trials under the same name
    return study


def counted_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count towards ``n_trials``: not surplus, and not a failure that was retried
    (its WAITING or later copy counts instead)."""
    retried = {n for t in trials if (n := RetryHeartbeatStaleTrialCallback.retried_trial_number(t)) is not None}
    retried |= {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    return [t for t in trials if not t.user_attrs.get(SURPLUS) and t.number not in retried]


def run_worker(spec: StudySpec, poll: float | None = None) -> optuna.Study:
    """Run trials until the study is complete; returns the study.

    Raises :class:`StudyError` when the study's last ``failures.max_consecutive`` attempts failed.
    """
    study = open_study(spec)
    write_experiment(spec, Path(spec.study_dir).resolve())
    poll = spec.heartbeat.interval if poll is None else poll
    env = trial_environment(spec, os.environ)
    while True:
        fail_stale_trials(study, spec.heartbeat.grace_period, spec.max_retry)
        trials = study.get_trials(deepcopy=False)
        check_failure_streak(study, trials, Policy.of(spec).max_consecutive)
        counted = counted_trials(trials)
        if len(counted) < spec.n_trials or any(t.state == TrialState.WAITING for t in counted):
            run_trial(spec, study, env)
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


def build_command(spec: StudySpec, trial: optuna.Trial, params: dict[str, Any], trial_dir: Path,
                  seed: int | None = None, reports: bool = True) -> list[str]:
    """The ``md4 fit`` command line of one run of a trial (``params`` at ``seed``, default the study's
    first), with its launcher in front; ``reports``: the run reports intermediate values for pruning
    (a trial's first seed only).

    The seed and the objective's evaluation draws come after the parameters' arguments, so a choice
    that sets ``--model`` cannot reset them. Every run resumes (``--ckpt_path last``: a fresh folder
    simply starts) and checkpoints into ``trial_dir/resume`` every ``CHECKPOINT_INTERVAL_S`` seconds;
    a multi-process run's collectives time out after ``launcher.ddp_timeout_s``.
    """
    seed = spec.seeds[0] if seed is None else seed
    launcher = spec.launcher
    fit = ["-m", "lightning_md4.cli", "fit"]
    for config in spec.base_configs:
        fit += ["--config", str(Path(config).resolve())]
    fit += spec.args
    for name, value in params.items():
        fit += spec.search_space[name].cli_args(value)
    fit += spec.seed_args(seed) + spec.evaluation_args()
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(trial_dir.parent), "name": trial_dir.name, "version": "",
                            "default_hp_metric": False}}
    # Its own folder and file names: a ModelCheckpoint of the base config keeps its files.
    resume = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
              "init_args": {"dirpath": str(trial_dir / RESUME_DIR), "filename": "interval-{step}", "save_last": True,
                            "save_top_k": 1, "train_time_interval": seconds_text(CHECKPOINT_INTERVAL_S)}}
    callback_args = {"storage": storage_url(spec), "study_name": spec.name, "trial_id": trial._trial_id,
                     "trial_dir": str(trial_dir),
                     "metric": spec.objectives[0].metric if reports and not spec.multi_objective else None,
                     "objectives": [o.metric for o in spec.objectives], "pruner": spec.pruner,
                     "params": {**params, SEED_PARAM: seed}}
    fit += [f"--trainer.default_root_dir={trial_dir}", f"--trainer.logger={json.dumps(logger)}",
            "--trainer.enable_checkpointing=true", f"--trainer.callbacks+={json.dumps(resume)}", "--ckpt_path=last",
            f"--trainer.callbacks+={OptunaTrial.__module__}.{OptunaTrial.__name__}"]
    fit += [f"--trainer.callbacks.init_args.{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}"
            for k, v in callback_args.items() if v is not None]
    if launcher.devices > 1 or launcher.num_nodes > 1 or launcher.kind != "python":
        fit += [f"--trainer.devices={launcher.devices}", f"--trainer.num_nodes={launcher.num_nodes}"]
    if launcher.devices * launcher.num_nodes > 1:
        strategy = {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                    "init_args": {"timeout": seconds_text(Policy.of(spec).ddp_timeout_s)}}
        fit += [f"--trainer.strategy={json.dumps(strategy)}"]
    if launcher.kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={launcher.devices}", *fit]
    if launcher.kind == "srun":
        # A task that fails ends the step: its peers would otherwise wait in a collective.
        return ["srun", "--kill-on-bad-exit=1", f"--nodes={launcher.num_nodes}",
                f"--ntasks-per-node={launcher.devices}", sys.executable, *fit]
    return [sys.executable, *fit]


def seconds_text(seconds: float) -> str:
    """``seconds`` as the H:MM:SS[.ffffff] text jsonargparse reads as a ``timedelta``."""
    whole, fraction = divmod(float(seconds), 1)
    hours, rest = divmod(int(whole), 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return text + f".{round(fraction * 1e6):06d}" if fraction else text


# -- the trial's environment -------------------------------------------------------------------
def trial_environment(spec: StudySpec, base: dict[str, str] | os._Environ) -> dict[str, str]:
    """The environment of this worker's trials.

    The ``python`` and ``torchrun`` launchers start every rank themselves, so the worker's SLURM
    variables are dropped (Lightning would take the trial for an srun step and wait for ranks that
    never come). With ``MD4_SWEEP_WORKER=i`` set, worker ``i`` of a machine gets its own
    ``launcher.devices`` GPUs.
    """
    env = {**base, "PYTHONUNBUFFERED": "1"}
    if spec.launcher.kind == "srun":
        return env  # srun places the tasks and their GPUs
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    index = base.get(WORKER_INDEX_ENV)
    if index is not None:
        if not index.isdigit():
            raise StudyError(f"{WORKER_INDEX_ENV}={index!r}: expected a worker index 0, 1, ...")
        env["CUDA_VISIBLE_DEVICES"] = gpu_slice(base.get("CUDA_VISIBLE_DEVICES"), int(index), spec.launcher.devices)
    return env


def gpu_slice(visible: str | None, index: int, devices: int) -> str:
    """The GPUs of worker ``index`` when each trial takes ``devices`` of those ``visible`` (all when None)."""
    first, stop = index * devices, (index + 1) * devices
    if visible is None:
        return ",".join(str(g) for g in range(first, stop))
    ids = [g.strip() for g in visible.split(",") if g.strip()]
    if stop > len(ids):
        raise StudyError(f"{WORKER_INDEX_ENV}={index} with launcher.devices {devices} needs GPUs {first}..{stop - 1} "
                         f"of CUDA_VISIBLE_DEVICES={visible} ({len(ids)} visible)")
    return ",".join(ids[first:stop])


# -- one trial ---------------------------------------------------------------------------------
@dataclass
class TrialWatch:
    """What the worker does while a trial runs: ``watch()`` is one heartbeat (retried, never raised),
    and it carries the limits, the environment and the folder lock the trial's process inherits."""

    beat: Callable[[], bool]
    policy: Policy = field(default_factory=Policy)
    env: dict[str, str] | None = None
    lock: FolderLock | None = None

    def __call__(self) -> bool:
        return self.beat()


def trial_folder(spec: StudySpec, trial: FrozenTrial) -> Path:
    """``trial_<n>`` of the original trial: every rerun of a trial resumes in its folder."""
    original = trial.system_attrs.get("failed_trial", trial.number)
    return Path(spec.study_dir).resolve() / f"trial_{original:04d}"


def run_trial(spec: StudySpec, study: optuna.Study, env: dict[str, str] | None = None) -> None:
    """Ask one trial, run each of its seeds to the end (or resume it) and tell the trial's outcome."""
    trial = study.ask()
    # Optuna has no public storage id of a trial; the callback and the heartbeat need it.
    watch = TrialWatch(lambda: beat_with_retry(study, trial._trial_id), Policy.of(spec), env)
    watch()
    trials = study.get_trials(deepcopy=False)
    frozen = trials[trial.number]
    is_rerun = frozen.system_attrs.get("failed_trial") is not None
    earlier = [t for t in counted_trials(trials) if t.number < trial.number]
    if not is_rerun and len(earlier) >= spec.n_trials:
        # Another worker filled the study between our count and our ask.
        trial.set_user_attr(SURPLUS, True)
        study.tell(trial, state=TrialState.FAIL)
        return
    params = suggest(trial, spec)
    seeds = trial_seeds(spec, trial)
    trial_dir = trial_folder(spec, frozen)
    trial_dir.mkdir(parents=True, exist_ok=True)
    watch.lock = FolderLock(trial_dir)
    watch.lock.acquire(watch, spec.heartbeat.interval, watch.policy.kill_grace_s)
    try:
        trial.set_user_attr("trial_dir", str(trial_dir))
        finished: dict[int, Outcome] = {}
        for seed, run_dir in run_folders(trial_dir, seeds).items():
            outcome = run_seed(spec, study, trial, params, seed, run_dir, watch, reports=not finished)
            if outcome.state != TrialState.COMPLETE:
                if len(seeds) > 1:
                    outcome = replace(outcome, error=outcome.error and f"seed {seed}: {outcome.error}")
                if tell(spec, study, trial, outcome):  # a failure that is rerun has no end yet
                    end_session(spec, run_dir, params, outcome)
                return
            finished[seed] = outcome
        tell(spec, study, trial, over_seeds(spec, finished))
    finally:
        watch.lock.release()


def run_folders(trial_dir: Path, seeds: list[int]) -> dict[int, Path]:
    """The folder of each seed's run: the trial's own for a single run, ``seed_<s>`` in it for several."""
    if len(seeds) == 1:
        return {seeds[0]: trial_dir}
    return {seed: trial_dir / f"seed_{seed}" for seed in seeds}


def run_seed(spec: StudySpec, study: optuna.Study, trial: optuna.Trial, params: dict[str, Any], seed: int,
             run_dir: Path, watch: TrialWatch, reports: bool) -> Outcome:
    """Run (or resume) the trial's run at ``seed`` in ``run_dir``; its outcome. A run that already
    finished there (an earlier attempt whose tell did not land, or a seed before the one that failed)
    is not trained again. A COMPLETE or PRUNED run's session ends here: its outcome is final whatever
    the trial's later seeds do."""
    if result_path(run_dir, 0).is_file():
        print(f"[md4-sweep] {spec.name} trial {trial.number}: {run_dir} holds a finished run; telling its result",
              flush=True)
        outcome = run_outcome(spec, run_dir, 0)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        command = build_command(spec, trial, params, run_dir, seed, reports)
        trial.set_user_attr("command", shlex.join(command))  # the trial's latest run
        start_step = read_progress(run_dir).get("step", 0)
        resumed = f" (resuming {run_dir.name} from step {start_step})" if start_step else ""
        print(f"[md4-sweep] {spec.name} trial {trial.number}: {({**params, SEED_PARAM: seed})}{resumed}", flush=True)
        start_session(spec, run_dir, params, seed)
        offset = log_size(run_dir)
        try:
            returncode = launch(command, run_dir, watch, spec.heartbeat.interval)
        except BaseException:  # the worker is stopping (SIGTERM, Ctrl-C): launch has stopped the run
            requeue_stopped(spec, study, trial, run_dir, offset)
            raise
        progressed = read_progress(run_dir).get("step", 0) > start_step
        outcome = run_outcome(spec, run_dir, returncode, offset, progressed)
    if outcome.state != TrialState.FAIL:
        shutil.rmtree(run_dir / RESUME_DIR, ignore_errors=True)
        end_session(spec, run_dir, params, outcome)
    return outcome


def over_seeds(spec: StudySpec, finished: dict[int, Outcome]) -> Outcome:
    """The COMPLETE outcome of a trial from its seeds' runs: the mean of each objective and of each
    metric every run logged, the first run's step, and, when the trial ran the seeds itself (not a
    grid trial of one seed), each seed's objective(s) for the report."""
    runs = list(finished.values())
    common = set.intersection(*(set(r.metrics) for r in runs))
    metrics = {m: sum(r.metrics[m] for r in runs) / len(runs) for m in runs[0].metrics if m in common}
    values = [sum(r.values[i] for r in runs) / len(runs) for i in range(len(spec.objectives))]
    per_seed = None
    if spec.seeds_per_trial:
        per_seed = {str(s): (r.values if spec.multi_objective else r.values[0]) for s, r in finished.items()}
    return Outcome(TrialState.COMPLETE, runs[0].step, metrics, values, seed_values=per_seed)


def start_session(spec: StudySpec, run_dir: Path, params: dict[str, Any], seed: int) -> None:
    """The run's TensorBoard session, written before its first launch (a resumed run keeps its own:
    TensorBoard takes a run's first HPARAMS entry)."""
    record = run_dir / SESSION_FILE
    if record.is_file():
        return
    write_session_start(spec, run_dir, params, seed)
    record.write_text(json.dumps({"start": time.time()}))


def end_session(spec: StudySpec, run_dir: Path, params: dict[str, Any], outcome: Outcome) -> None:
    """End the run's session with its final outcome, once. Its wall time runs from the session's start
    to the run's result (the end of training), or to now for a failed run."""
    path = run_dir / SESSION_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    if "state" in record:
        return
    result = result_path(run_dir, 0)
    end = result.stat().st_mtime if result.is_file() else time.time()
    seconds = end - record["start"] if "start" in record else None
    write_session_end(spec, run_dir, params, outcome.state.name, outcome.step, seconds, outcome.metrics)
    path.write_text(json.dumps({**record, "state": outcome.state.name}))


def log_size(trial_dir: Path) -> int:
    """Where the next attempt's stderr starts in ``stderr.log`` (every attempt appends)."""
    path = trial_dir / "stderr.log"
    return path.stat().st_size if path.is_file() else 0


def attempt_stderr(trial_dir: Path, offset: int) -> str:
    path = trial_dir / "stderr.log"
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def requeue_stopped(spec: StudySpec, study: optuna.Study, trial: optuna.Trial, trial_dir: Path, offset: int) -> None:
    """Fail and requeue the trial of a stopping worker at once, instead of after its grace period."""
    try:
        tell(spec, study, trial, run_outcome(spec, trial_dir, None, offset, progressed=True))
    except Exception as err:  # the storage may be what is failing; the heartbeat lapse still reruns it
        print(f"[md4-sweep] trial {trial.number} left RUNNING ({type(err).__name__}: {redact_secrets(str(err))})", file=sys.stderr, flush=True)


# -- supervising the trial's processes ---------------------------------------------------------
def launch(command: list[str], trial_dir: Path, watch: TrialWatch | Callable[[], Any], interval: float) -> int:
    """Run ``command`` with its output appended to ``trial_dir/std{out,err}.log`` and supervise it;
    its exit status (negative: the signal that ended it).

    The run is a process group of its own whose first process gets SIGTERM if the worker dies.
    Every ``interval`` seconds the worker beats; the run is stopped (SIGTERM, SIGKILL after the
    grace time, its leftover processes too) on ``limits.wall_clock_s`` or ``limits.no_progress_s``,
    with a line naming the limit appended to ``stderr.log``, and when the worker is interrupted
    (then re-raised).
    """
    if not isinstance(watch, TrialWatch):
        watch = TrialWatch(watch)
    policy = watch.policy
    keep = (watch.lock.fd,) if watch.lock is not None and watch.lock.fd is not None else ()
    with open(trial_dir / "stdout.log", "a") as out, open(trial_dir / "stderr.log", "a") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=watch.env or {**os.environ, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM), pass_fds=keep)
    if watch.lock is not None:
        watch.lock.describe(pgid=proc.pid)
    try:
        reason = supervise(proc, trial_dir, watch, interval)
    except BaseException:
        stop_processes(proc, policy.kill_grace_s)
        append_line(trial_dir / "stderr.log", f"{WORKER_STOPPED}: the trial was stopped with it")
        raise
    if reason is not None:
        stop_processes(proc, policy.kill_grace_s)
        append_line(trial_dir / "stderr.log", reason)
    else:
        stop_processes(proc, policy.kill_grace_s)  # processes it left behind (its group, its children)
    return proc.returncode if proc.returncode is not None else -signal.SIGKILL


def supervise(proc: subprocess.Popen, trial_dir: Path, watch: TrialWatch, interval: float) -> str | None:
    """Beat until ``proc`` exits (None) or a limit is passed (the line that says which)."""
    policy, tick = watch.policy, min(1.0, float(interval))
    start = last_beat = last_change = time.monotonic()
    step = read_progress(trial_dir).get("step")
    while True:
        try:
            proc.wait(timeout=tick)
            return None
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if now - last_beat >= interval:
            watch()
            last_beat = now
        # The worker's own clock: the trial's nodes may disagree with it.
        if (new := read_progress(trial_dir).get("step")) != step:
            step, last_change = new, now
        if policy.wall_clock_s is not None and now - start > policy.wall_clock_s:
            return f"{WALL_CLOCK}: the attempt ran {now - start:.0f} s > limits.wall_clock_s = {policy.wall_clock_s:g}"
        if policy.no_progress_s is not None and now - last_change > policy.no_progress_s:
            return (f"{NO_PROGRESS}: no new training step for {now - last_change:.0f} s > limits.no_progress_s = "
                    f"{policy.no_progress_s:g} (last step {step})")


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when the worker dies
    (``prctl(PR_SET_PDEATHSIG)``, Linux; elsewhere None)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(1, sig, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the worker died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


def descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (children, grandchildren, ...), from ``/proc``: torchrun starts its
    ranks in sessions of their own, out of reach of the trial's process group."""
    parents: dict[int, list[int]] = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        parents[int(fields[1])].append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def signal_processes(pgid: int, pids: set[int], sig: int) -> None:
    for send, target in [(os.killpg, pgid), *((os.kill, p) for p in pids)]:
        try:
            send(target, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_processes(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the trial's process group and every process below it, SIGKILL what is left after
    ``grace`` seconds; returns once all are gone (or after ``KILL_WAIT_S`` more, with a warning)."""
    pids = descendants(proc.pid)
    if proc.poll() is not None and not pids and not group_alive(proc.pid):
        return
    signal_processes(proc.pid, pids, signal.SIGTERM)
    for sig, wait in ((signal.SIGKILL, grace), (None, KILL_WAIT_S)):
        end = time.monotonic() + wait
        while time.monotonic() < end:
            proc.poll()
            pids |= descendants(proc.pid)
            if proc.returncode is not None and not group_alive(proc.pid) and not any(alive(p) for p in pids):
                return
            time.sleep(0.05)
        if sig is not None:
            signal_processes(proc.pid, pids, sig)
    print(f"[md4-sweep] processes of the trial (group {proc.pid}) still alive {KILL_WAIT_S:g} s after SIGKILL",
          file=sys.stderr, flush=True)


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` other than zombies still runs."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def append_line(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


class FolderLock:
    """An exclusive ``flock`` on ``trial_dir/.lock``: one attempt at a time trains in a folder.

    The worker holds it and the trial's first process inherits it, so it is free only once both
    are gone. The file names its holder (host, worker pid, trial process group): a lock held on
    this host by a trial whose worker is dead (it ignored the SIGTERM its worker's death sent) is
    broken by killing that trial's processes.
    """

    def __init__(self, trial_dir: Path) -> None:
        self.path, self.fd = trial_dir / LOCK_FILE, None
        self.info: dict[str, Any] = {}

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        self.describe()
        return True

    def acquire(self, beat: Callable[[], Any], poll: float, grace: float) -> None:
        """Wait for the lock, beating meanwhile (the holder is an earlier attempt still running:
        a paused worker, or a trial finishing after its worker died)."""
        waited = 0.0
        while not self.try_acquire():
            if waited == 0:
                print(f"[md4-sweep] waiting for {self.path.parent} (held by {self.holder()})", flush=True)
            if waited >= grace:
                self.break_orphan()
            beat()
            time.sleep(min(poll, 1.0))
            waited += min(poll, 1.0)

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def describe(self, **more: Any) -> None:
        """Write who holds the lock (and ``more``, e.g. the trial's process group) into the file."""
        self.info.update(host=socket.gethostname(), worker_pid=os.getpid(), **more)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(self.info).encode(), 0)

    def break_orphan(self) -> None:
        holder = self.holder()
        pgid, worker = holder.get("pgid"), holder.get("worker_pid")
        if holder.get("host") != socket.gethostname() or pgid is None or worker is None or alive(worker):
            return  # another machine's, or a live (maybe paused) worker's: it lets go itself
        print(f"[md4-sweep] killing the orphaned trial processes (group {pgid}) of a dead worker in {self.path.parent}",
              file=sys.stderr, flush=True)
        signal_processes(pgid, descendants(pgid) if alive(pgid) else set(), signal.SIGKILL)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# -- telling the outcome -----------------------------------------------------------------------
def failure_kind(returncode: int | None, stderr: str, progressed: bool = True) -> str:
    """Why an attempt failed: ``preempted`` (exit 143 after saving a checkpoint, with steps made),
    ``infra`` (a signal, NCCL/gloo/rendezvous errors, a lost node, a hang), ``limit`` (wall clock),
    ``stopped`` (the worker stopped) or ``training`` (anything rerunning would repeat)."""
    if WORKER_STOPPED in stderr or returncode is None:
        return STOPPED
    if WALL_CLOCK in stderr:
        return LIMIT
    if NO_PROGRESS in stderr:
        return INFRA
    if returncode == PREEMPTED_EXIT_CODE:
        return PREEMPTED if progressed else INFRA
    if any(marker in stderr for marker in TRAINING_MARKERS):
        return TRAINING
    if returncode < 0 or returncode > 128 or any(marker in stderr for marker in INFRA_MARKERS):
        return INFRA
    return TRAINING


def trial_to_tell(study: optuna.Study, trial: optuna.Trial) -> optuna.Trial | None:
    """``trial``, or when it was already finished (failed as stale while this worker was paused or
    its storage unreachable) its newest rerun, claimed if still WAITING; None (with a note) when
    another worker runs that rerun: that worker takes the result from the trial's folder.

    A finished trial cannot be told again in Optuna, so the result goes to exactly one trial of
    the chain: the rerun (a new one, if the retry limit left none).
    """
    storage = study._storage
    if not storage.get_trial(trial._trial_id).state.is_finished():
        return trial
    chain = [t for t in study.get_trials(deepcopy=False) if trial.number in t.system_attrs.get("retry_history", [])]
    rerun = max(chain, key=lambda t: t.number) if chain else storage.get_trial(trial._trial_id)
    if rerun.state.is_finished():
        requeue(study, rerun, LATE, None)
        rerun = study.get_trials(deepcopy=False)[-1]
    note = f"[md4-sweep] trial {trial.number} was already finished (failed as stale while this worker did not beat)"
    try:
        claimed = rerun.state == TrialState.WAITING and storage.set_trial_state_values(rerun._trial_id, TrialState.RUNNING)
    except optuna.exceptions.UpdateFinishedTrialError:
        claimed = False
    if not claimed:
        print(f"{note}; its rerun, trial {rerun.number}, is run by another worker, which tells the result", flush=True)
        return None
    print(f"{note}; telling its outcome to its rerun, trial {rerun.number}", flush=True)
    return optuna.trial.Trial(study, rerun._trial_id)


@dataclass(frozen=True)
class Outcome:
    """How a run (or, over its seeds, a trial) ended: COMPLETE with its objective ``values``, PRUNED,
    or FAIL with its ``error`` and failure ``kind`` (:func:`failure_kind`); the step it reached and
    its final scalar metrics where known."""

    state: TrialState
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    values: list[float] | None = None
    error: str | None = None
    kind: str | None = None
    seed_values: dict[str, Any] | None = None  # a trial that ran its seeds: each seed's objective(s)
    run_dir: Path | None = None  # a run's folder (its logs)


def run_outcome(spec: StudySpec, run_dir: Path, returncode: int | None, offset: int = 0,
                progressed: bool = True) -> Outcome:
    """The outcome of the run in ``run_dir`` from its exit status, its result file and the stderr of
    the attempt that starts at ``offset``."""
    result_file = result_path(run_dir, 0)
    if returncode != 0 or not result_file.is_file():
        stderr = attempt_stderr(run_dir, offset)
        return Outcome(TrialState.FAIL, read_progress(run_dir).get("step"),
                       error=f"exit code {returncode}: {redact_secrets(stderr)[-ERROR_TAIL:]}",
                       kind=failure_kind(returncode, stderr, progressed), run_dir=run_dir)
    result = json.loads(result_file.read_text())
    step, metrics = result["step"], result["metrics"]
    if result["pruned"]:
        return Outcome(TrialState.PRUNED, step, metrics, run_dir=run_dir)
    missing = [o.metric for o in spec.objectives if o.metric not in metrics]
    if missing:
        return Outcome(TrialState.FAIL, step, metrics, kind=TRAINING, run_dir=run_dir,
                       error=f"objective {missing[0]!r} was not logged; logged: {sorted(metrics)}")
    return Outcome(TrialState.COMPLETE, step, metrics, [metrics[o.metric] for o in spec.objectives], run_dir=run_dir)


def tell(spec: StudySpec, study: optuna.Study, trial: optuna.Trial, outcome: Outcome) -> bool:
    """Tell the trial (or the rerun that replaced it) its outcome, and requeue it if the failure
    policy says so; whether the outcome is final (False: a rerun, here or by another worker, follows)."""
    trial = trial_to_tell(study, trial)
    if trial is None:
        return False
    if outcome.state == TrialState.FAIL:
        trial.set_user_attr("error", outcome.error)
        trial.set_user_attr(FAILURE, outcome.kind)
        study.tell(trial, state=TrialState.FAIL)
        limit = Policy.of(spec).retry_limit(outcome.kind)
        again = limit != 0 and requeue(study, study._storage.get_trial(trial._trial_id), outcome.kind, limit)
        print(f"[md4-sweep] {spec.name} trial {trial.number} failed ({outcome.kind}"
              f"{'; requeued to resume' if again else ''}); see {outcome.run_dir / 'stderr.log'}", flush=True)
        return not again
    trial.set_user_attr("metrics", outcome.metrics)
    trial.set_user_attr("step", outcome.step)
    if outcome.state == TrialState.PRUNED:
        study.tell(trial, state=TrialState.PRUNED)
        print(f"[md4-sweep] {spec.name} trial {trial.number} pruned at step {outcome.step}", flush=True)
        return True
    if outcome.seed_values is not None:
        trial.set_user_attr(SEEDS_ATTR, outcome.seed_values)
    study.tell(trial, outcome.values)
    print(f"[md4-sweep] {spec.name} trial {trial.number} done: "
          + ", ".join(f"{o.metric}={v:.6g}" for o, v in zip(spec.objectives, outcome.values)), flush=True)
    return True


# -- the study's failure policy ----------------------------------------------------------------
def failure_streak(study: optuna.Study, trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The attempts told FAIL for a reason of the trial or its environment (training, infra, limit)
    since the last COMPLETE or PRUNED one and since the last :func:`retry_failed`, newest first."""
    since = study.user_attrs.get(STREAK_SINCE)
    told = [t for t in trials if t.datetime_complete is not None and (
        t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or t.user_attrs.get(FAILURE) in (TRAINING, INFRA, LIMIT))]
    if since is not None:
        told = [t for t in told if t.datetime_complete.astimezone(timezone.utc).isoformat() > since]
    streak = []
    for t in sorted(told, key=lambda t: t.datetime_complete, reverse=True):
        if t.state != TrialState.FAIL:
            break
        streak.append(t)
    return streak


def last_error_line(trial: FrozenTrial) -> str:
    lines = [line for line in str(trial.user_attrs.get("error", "")).splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no error recorded"


def check_failure_streak(study: optuna.Study, trials: list[FrozenTrial], max_consecutive: int) -> None:
    """Stop (a :class:`StudyError`) when the last ``max_consecutive`` attempts failed, naming their
    most common error (last line of stderr): an environment error would otherwise fail every trial."""
    streak = failure_streak(study, trials)
    if len(streak) < max_consecutive:
        return
    errors = collections.Counter(last_error_line(t) for t in streak[:max_consecutive])
    error, count = errors.most_common(1)[0]
    numbers = ", ".join(str(t.number) for t in sorted(streak[:max_consecutive], key=lambda t: t.number))
    raise StudyError(f"study {study.study_name} stopped: its last {max_consecutive} trials failed (trials {numbers}); "
                     f"{count} of them with: {error}; fix it, then run md4-sweep run --retry-failed")


def retry_failed(study: optuna.Study, spec: StudySpec) -> list[int]:
    """Queue a rerun of every failed trial that has none (``md4-sweep run --retry-failed``): same
    parameters, same folder, resumed from its newest checkpoint; resets the failure streak.
    Returns the numbers of the trials rerun."""
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in counted_trials(trials) if t.state == TrialState.FAIL]
    for t in failed:
        requeue(study, t, "manual", None)
    study.set_user_attr(STREAK_SINCE, datetime.now(timezone.utc).isoformat())
    if failed:
        print(f"[md4-sweep] {spec.name}: rerunning failed trials {', '.join(str(t.number) for t in failed)}", flush=True)
    return [t.number for t in failed]
