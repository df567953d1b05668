"""Where a study lives: SQLite (one machine), a journal file (many nodes, shared file system) or
any RDB URL such as PostgreSQL (large clusters).

Spelling of ``storage`` in a study file or on the command line:

- ``sqlite:///path/study.db``, ``postgresql://user@host/db``, ...: Optuna's ``RDBStorage``, with
  Optuna's heartbeat (``heartbeat_interval``, ``grace_period``) and a
  ``RetryHeartbeatStaleTrialCallback``: a trial whose worker died is marked FAIL and re-queued
  as a WAITING copy with the same parameters, which the next ``ask()`` picks up.
- ``journal:/path/study.log``: ``JournalStorage(JournalFileBackend(path))``. Optuna 5's journal
  storage has no heartbeat, so for it the worker keeps the same protocol itself (see
  :func:`fail_stale_trials`): the beat is a trial system attribute, the rest is Optuna's callback.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

# Heartbeats, stale-trial failing and the retry helpers are long-standing but still marked experimental.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

JOURNAL = "journal:"
BEAT_ATTR = "worker_heartbeat"  # unix time of a journal trial's last beat


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
    """The Optuna storage for ``url``; with ``heartbeat_interval`` set, dead workers' trials are retried."""
    if url.startswith(JOURNAL):
        path = Path(url[len(JOURNAL):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if heartbeat_interval is not None:
        kwargs = dict(heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry))
    # SQLite under several writers (worker heartbeats, rank 0's reports) needs a lock timeout.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)


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
    callback = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
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
