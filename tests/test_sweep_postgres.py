"""The sweeps' RDB storage path against a real PostgreSQL server that the tests start themselves
(:mod:`pg`): Optuna's heartbeat table written by ``record_heartbeat``, a trial whose heartbeat
stops failed after the grace period and retried once per ``max_retry``, and workers in separate
processes racing on one grid study. Every storage is opened with ``sweeps.storage.open_storage``;
the trials are tiny ask/tell objectives, not training runs, but for one sweep whose storage URL,
password included, reaches the worker and its training run only through the environment.
"""

from __future__ import annotations

import itertools
import multiprocessing
import subprocess
import sys
import time

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from pg import create_database, postgres_server
from sweeps.spec import AskTellGridSampler
from sweeps.storage import BEAT_ATTR, fail_stale_trials, open_storage, record_heartbeat
from test_sweeps import ENV, write_study

pytestmark = pytest.mark.slow  # a PostgreSQL server started for the file; workers in subprocesses

# grace_period != 2 * interval (Optuna's default grace): a storage that dropped the study's grace
# period would fail trials at the wrong time.
INTERVAL, GRACE, MAX_RETRY = 1, 6, 1
GRID = {"x": list(range(8)), "schedule": ["linear", "cosine", "geometric"]}
N_POINTS = 24


@pytest.fixture(scope="module")
def socket_dir():
    with postgres_server() as path:
        yield path


@pytest.fixture
def url(socket_dir):
    return create_database(socket_dir)


def open_study(url: str, name: str, **kwargs) -> optuna.Study:
    """One worker's view of the study: its own storage, engine and connections."""
    storage = open_storage(url, INTERVAL, GRACE, MAX_RETRY)
    return optuna.create_study(storage=storage, study_name=name, load_if_exists=True, **kwargs)


def beat_for(study: optuna.Study, trial: optuna.Trial, seconds: float) -> None:
    """A live worker: beat ``trial`` twice per heartbeat interval for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        record_heartbeat(study, trial._trial_id)
        time.sleep(INTERVAL / 2)
    record_heartbeat(study, trial._trial_id)


def heartbeat_rows(url: str, trial_id: int) -> list[tuple]:
    """(heartbeat, server time) of each row of Optuna's heartbeat table for ``trial_id``."""
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(
                sqlalchemy.text("SELECT heartbeat, LOCALTIMESTAMP FROM trial_heartbeats WHERE trial_id = :id"),
                {"id": trial_id})]
    finally:
        engine.dispose()


def test_heartbeats_are_rows_of_optunas_table_and_keep_a_trial_alive(url):
    study = open_study(url, "beat")
    trial = study.ask()
    record_heartbeat(study, trial._trial_id)
    ((first, now),) = heartbeat_rows(url, trial._trial_id)
    assert 0 <= (now - first).total_seconds() < INTERVAL
    # Beating for longer than the grace period, with the stale check of every worker loop in between.
    end = time.monotonic() + GRACE + 1
    while time.monotonic() < end:
        beat_for(study, trial, INTERVAL)
        fail_stale_trials(study, GRACE, MAX_RETRY)
    ((last, now),) = heartbeat_rows(url, trial._trial_id)  # one row per trial, moved forward
    assert (last - first).total_seconds() >= GRACE + 1 and 0 <= (now - last).total_seconds() < INTERVAL
    (frozen,) = study.get_trials()
    assert frozen.state == TrialState.RUNNING and BEAT_ATTR not in frozen.system_attrs


def test_a_trial_whose_heartbeat_stops_is_failed_after_the_grace_period_and_retried_once(url):
    workers = [open_study(url, "stale") for _ in range(2)]
    alive, dead = workers[0].ask(), workers[1].ask()
    for study, trial in zip(workers, (alive, dead)):
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        trial.suggest_categorical("schedule", GRID["schedule"])
        record_heartbeat(study, trial._trial_id)

    def notice() -> list[TrialState]:
        """Both workers run their stale check, one of them twice; the trials' states after."""
        for study in (workers[0], workers[1], workers[0]):
            fail_stale_trials(study, GRACE, MAX_RETRY)
        return [t.state for t in workers[0].get_trials()]

    # worker 1 is dead from here on: only worker 0 beats.
    beat_for(workers[0], alive, GRACE / 2)  # margins of GRACE / 2: a loaded CI machine is slow
    assert notice() == [TrialState.RUNNING, TrialState.RUNNING]  # still within the grace period
    beat_for(workers[0], alive, GRACE / 2 + 1.5)
    assert notice() == [TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING]
    retry = workers[0].get_trials()[2]
    assert retry.params == dead.params and retry.system_attrs["failed_trial"] == dead.number

    rerun = workers[0].ask()  # the next ask, by any worker, picks the retry up, once
    assert rerun.number == 2 and rerun.params == dead.params
    record_heartbeat(workers[0], rerun._trial_id)
    beat_for(workers[0], alive, GRACE + 1.5)  # the rerun's worker dies too: max_retry is spent
    assert notice() == [TrialState.RUNNING, TrialState.FAIL, TrialState.FAIL]
    workers[0].tell(alive, 1.0)
    assert [t.state for t in workers[1].get_trials()] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]


def objective(params: dict) -> float:
    """A value that names its grid point, so a value told to the wrong trial shows."""
    return params["x"] + 100 * GRID["schedule"].index(params["schedule"])


def grid_worker(url: str, index: int, start) -> None:
    """A sweep worker's ask/tell loop: stop at the first ask past the grid (marked surplus)."""
    start.wait()  # they race to create Optuna's tables in the empty database
    # Every worker builds the same sampler from the same study file: the grid's shuffle order agrees.
    study = open_study(url, "grid", sampler=AskTellGridSampler(GRID))
    start.wait()  # and on the grid: a worker that lost the first race (and waited to retry) still takes part
    while True:
        trial = study.ask()
        record_heartbeat(study, trial._trial_id)
        trial.set_user_attr("worker", index)
        if trial.number >= N_POINTS:
            study.tell(trial, state=TrialState.FAIL)
            return
        params = {name: trial.suggest_categorical(name, choices) for name, choices in GRID.items()}
        study.tell(trial, objective(params))


def test_workers_racing_on_a_grid_study_run_each_point_exactly_once(url):
    n_workers = 3
    # The database is empty: the workers' first opens race to create Optuna's tables (open_storage
    # retries the losers).
    context = multiprocessing.get_context("fork")  # the workers share nothing but the database
    start = context.Barrier(n_workers)
    workers = [context.Process(target=grid_worker, args=(url, i, start)) for i in range(n_workers)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    for w in workers:
        if w.is_alive():
            w.kill()
    assert [w.exitcode for w in workers] == [0] * n_workers

    trials = open_study(url, "grid").get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert [t.number for t in complete] == list(range(N_POINTS))
    points = sorted((t.params["x"], t.params["schedule"]) for t in complete)
    assert points == sorted(itertools.product(*GRID.values()))
    assert all(t.value == objective(t.params) for t in complete)
    surplus = [t for t in trials if t.state != TrialState.COMPLETE]
    assert all(t.state == TrialState.FAIL and t.number >= N_POINTS and not t.params for t in surplus)
    assert sorted(t.user_attrs["worker"] for t in surplus) == list(range(n_workers))  # one each
    assert {t.user_attrs["worker"] for t in complete} == set(range(n_workers))  # they did race


def test_env_storage_keeps_the_password_out_of_files_attributes_and_output(url, tmp_path):
    """storage: env:NAME with a password-bearing URL in NAME (the socket's trust login ignores the
    password): the worker and the trial's training run both open the database, and the password
    is in no file of the study folder, no attribute of the study or its trial, no printed line."""
    password = "hunter2-md4-sweep"
    secret_url = url.replace("postgres@", f"postgres:{password}@", 1)
    assert password in secret_url
    space = {"schedule": {"type": "categorical", "choices": ["cosine"], "arg": "model.init_args.schedule"}}
    study_file = write_study(tmp_path, search_space=space, storage="env:MD4_TEST_STORAGE")
    proc = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", str(study_file)], cwd=tmp_path,
                          env={**ENV, "MD4_TEST_STORAGE": secret_url}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="s", storage=open_storage(secret_url))
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE and trial.intermediate_values  # the run reported through it
    assert "--trainer.callbacks.init_args.storage=env:MD4_TEST_STORAGE" in trial.user_attrs["command"]
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.name == "config.yaml" for f in files) and any(f.name == "stderr.log" for f in files)
    for f in files:
        assert password.encode() not in f.read_bytes(), f
    shown = [proc.stdout, proc.stderr, repr(study.user_attrs),
             repr(trial.user_attrs), repr(trial.system_attrs)]
    assert not [text for text in shown if password in text]
