"""Where a study lives: SQLite (one machine), a journal file (many nodes, shared file system) or
any RDB URL such as PostgreSQL (large clusters).

Spelling of ``storage`` in a study file or on the command line:

- ``sqlite:///path/study.db``, ``postgresql://user@host/db``, ...: Optuna's ``RDBStorage``, with
  Optuna's heartbeat (``heartbeat_interval``, ``grace_period``) and :class:`StaleTrialRetry`: a
  trial whose worker died is marked FAIL and re-queued as a WAITING copy (:func:`requeue`), which
  the next ``ask()`` picks up.
- ``journal:/path/study.log``: ``JournalStorage(JournalFileBackend(path))``. Optuna 5's journal
  storage has no heartbeat, so for it the worker keeps the same protocol itself (see
  :func:`fail_stale_trials`): the beat is a trial system attribute, the rest is the same requeue.

A requeued copy keeps the parameters, the folder (``trial_dir`` user attribute) and the reported
intermediate values of the trial it reruns, and Optuna's ``failed_trial`` / ``retry_history``
system attributes (so ``RetryHeartbeatStaleTrialCallback.retried_trial_number`` still works);
:data:`RETRIES_ATTR` counts the reruns of the chain by reason, each reason with its own limit.
"""

from __future__ import annotations

import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import optuna
import sqlalchemy.exc
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from sweeps.spec import redact_secrets, resolve_storage

# Heartbeats, stale-trial failing and the retry helpers are long-standing but still marked experimental.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

JOURNAL = "journal:"
BEAT_ATTR = "worker_heartbeat"  # unix time of a journal trial's last beat
RETRIES_ATTR = "retries"  # {reason: reruns so far} over a trial's chain of reruns
STALE = "stale"  # the rerun reason of a trial whose worker stopped beating
# What a trial's attempt produced: a rerun starts without them (its folder and command stay).
OUTCOME_ATTRS = ("error", "metrics", "step", "failure")
CREATE_ATTEMPTS = 5  # first opens of an empty RDB racing to create Optuna's tables
T = TypeVar("T")


def absolute_storage(url: str) -> str:
    """``url`` with a relative SQLite or journal path made absolute, so that the training
    subprocesses (and other workers) open the same file whatever their working directory."""
    if url.startswith(JOURNAL):
        return JOURNAL + str(Path(url[len(JOURNAL):]).expanduser().resolve())
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(url[len("sqlite:///"):]).expanduser().resolve())
    return url


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                 max_retry: int | None = None) -> optuna.storages.BaseStorage:
    """The Optuna storage for ``url`` (``env:NAME``: the URL in environment variable ``NAME``); with
    ``heartbeat_interval`` set, dead workers' trials are retried."""
    url = resolve_storage(url)
    if url.startswith(JOURNAL):
        path = Path(url[len(JOURNAL):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if heartbeat_interval is not None:
        kwargs = dict(heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                      heartbeat_stale_trial_callback=StaleTrialRetry(max_retry))
    # SQLite under several writers (worker heartbeats, rank 0's reports) needs a lock timeout.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(CREATE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Workers first opening an empty PostgreSQL database together each create Optuna's
            # tables; the losers' CREATE collides (a duplicate type). Once one wins, they exist.
            if attempt == CREATE_ATTEMPTS - 1:
                raise
            time.sleep(0.2 + random.random())  # apart, so the retries do not collide again
    raise AssertionError("unreachable")


def _optuna_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    """Whether ``storage`` keeps Optuna's own heartbeat (Optuna exposes this check only privately)."""
    return optuna.storages._heartbeat.is_heartbeat_enabled(storage)


def record_heartbeat(study: optuna.Study, trial_id: int) -> None:
    """One beat of the worker running ``trial_id``."""
    storage = study._storage
    if _optuna_heartbeat(storage):
        storage.record_heartbeat(trial_id)
    else:
        storage.set_trial_system_attr(trial_id, BEAT_ATTR, time.time())


def retrying(call: Callable[[], T], attempts: int = 4, first_delay: float = 0.25) -> T:
    """``call()``, retried with exponential backoff on a storage error (a locked SQLite file, an NFS
    or network hiccup); the last error is raised. A finished trial is no storage error: not retried."""
    delay = first_delay
    for attempt in range(attempts):
        try:
            return call()
        except optuna.exceptions.UpdateFinishedTrialError:
            raise
        except Exception:  # the storages' errors (sqlalchemy, OSError, ...) have no common base
            if attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def beat_with_retry(study: optuna.Study, trial_id: int) -> bool:
    """One beat, retried (:func:`retrying`); whether it was recorded.

    A beat that still fails is reported and skipped, never raised: the grace period spans several
    beats, and a healthy multi-hour trial must not die for one storage error.
    """
    try:
        retrying(lambda: record_heartbeat(study, trial_id))
        return True
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # failed as stale meanwhile; the worker's tell gives the result to its rerun
    except Exception as err:
        print(f"[md4-sweep] heartbeat of trial id {trial_id} not recorded: {type(err).__name__}: "
              f"{redact_secrets(str(err).splitlines()[0]) if str(err) else ''}", file=sys.stderr, flush=True)
        return False


def requeue(study: optuna.Study, trial: FrozenTrial, reason: str, limit: int | None) -> bool:
    """Queue a WAITING rerun of the finished ``trial`` unless its chain already had ``limit`` reruns
    for ``reason``; whether it was queued.

    The copy keeps the parameters, the user attributes but the outcome ones (so the ``trial_dir``:
    the rerun resumes in the same folder), the intermediate values (the pruner sees the whole
    curve) and Optuna's retry attributes (``failed_trial`` the original, ``retry_history``).
    """
    retries = dict(trial.system_attrs.get(RETRIES_ATTR) or {})
    if limit is not None and retries.get(reason, 0) >= limit:
        return False
    retries[reason] = retries.get(reason, 0) + 1
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    system_attrs = {k: v for k, v in trial.system_attrs.items() if k != BEAT_ATTR}  # a copy starts unbeaten
    system_attrs.update(failed_trial=history[0], retry_history=history, **{RETRIES_ATTR: retries})
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={k: v for k, v in trial.user_attrs.items() if k not in OUTCOME_ATTRS},
        system_attrs=system_attrs, intermediate_values=trial.intermediate_values))
    return True


class StaleTrialRetry:
    """Optuna's stale-trial callback: rerun a trial whose worker died, up to ``max_retry`` times."""

    def __init__(self, max_retry: int | None) -> None:
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        requeue(study, trial, STALE, self.max_retry)


def fail_stale_trials(study: optuna.Study, grace_period: float, max_retry: int | None) -> None:
    """Fail the RUNNING trials whose worker stopped beating and queue their retries.

    RDB storages: Optuna's own ``fail_stale_trials``. Journal storages: the same rule on the
    beat attribute; the state change is atomic in the journal (only one worker succeeds), so a
    stale trial is retried exactly once even when several workers notice it.
    """
    storage = study._storage
    if _optuna_heartbeat(storage):
        optuna.storages.fail_stale_trials(study)
        return
    now = time.time()
    callback = StaleTrialRetry(max_retry)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = trial.system_attrs.get(BEAT_ATTR)
        if beat is None or now - beat <= grace_period:
            continue
        try:
            won = storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            won = False
        if won:
            callback(study, storage.get_trial(trial._trial_id))
