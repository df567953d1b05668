"""Sweep trials under what clusters do to them: a SIGKILLed or paused worker, a storage hiccup,
infrastructure failures, hung runs, environment errors that fail every trial.

Real processes are killed and stopped (SIGKILL, SIGSTOP); training runs are the tiny digits
trials of ``tests/test_sweeps.py``. What is checked is the bookkeeping: no process left running,
reruns resuming in the same folder from the step reached, each result told exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sweeps import cli
from sweeps.callback import ObjectiveNotLogged, OptunaTrial, read_progress
from sweeps.spec import StudyError, load_spec
from sweeps.storage import beat_with_retry, fail_stale_trials, open_storage
from sweeps.worker import (NO_PROGRESS, WALL_CLOCK, WORKER_INDEX_ENV, Policy, TrialWatch, failure_kind, launch,
                           requeue_stopped, retry_failed, run_worker, storage_url)
from test_sweeps import ENV, TINY, write_study

SPACE_1 = {"schedule": {"type": "categorical", "choices": ["linear"], "arg": "model.init_args.schedule"}}


def long_study(tmp_path: Path, steps: int, **overrides) -> Path:
    """One trial of ``steps`` steps, validated once at its end."""
    return write_study(tmp_path, search_space=SPACE_1,
                       args=[*TINY, f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}"], **overrides)


def open_(study_file: Path) -> optuna.Study:
    spec = load_spec(study_file)
    return optuna.load_study(study_name=spec.name, storage=open_storage(storage_url(spec)))


def start_worker(study_file: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", str(study_file)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout: float) -> None:
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, "timed out waiting"
        time.sleep(0.1)


def processes_mentioning(text: str) -> list[int]:
    """Live (not zombie) processes whose command line contains ``text``, from /proc."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z" and int(proc.name) != os.getpid():
            found.append(int(proc.name))
    return found


# -- real processes ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkilled_worker_leaves_no_trial_process_and_its_rerun_resumes(tmp_path):
    """kill -9 of the worker mid-trial: the trial's processes end (parent-death SIGTERM: they save
    last.ckpt and exit), and the rerun resumes in the same folder from the step reached."""
    study_file = long_study(tmp_path, steps=400)
    trial_dir = tmp_path / "study" / "trial_0000"
    worker = start_worker(study_file, tmp_path)
    try:
        wait_for(lambda: read_progress(trial_dir).get("step", 0) >= 5, timeout=120)
    finally:
        worker.send_signal(signal.SIGKILL)  # the worker alone: its trial must follow by itself
        worker.communicate()
    reached = read_progress(trial_dir)["step"]
    wait_for(lambda: not processes_mentioning(str(trial_dir)), timeout=30)
    assert (trial_dir / "resume" / "last.ckpt").is_file()

    rerun = start_worker(study_file, tmp_path)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    trials = open_(study_file).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].user_attrs["trial_dir"] == str(trial_dir)
    result = json.loads((trial_dir / "result.rank0.json").read_text())
    assert result["start_step"] >= reached > 0 and result["step"] == 400
    assert trials[1].values == [result["metrics"]["val/nelbo"]]
    assert sorted(p.name for p in (tmp_path / "study").glob("trial_*")) == ["trial_0000"]
    assert not (trial_dir / "resume").exists()  # resume checkpoints go once the trial is COMPLETE


@pytest.mark.slow
def test_paused_worker_result_is_told_once_to_the_rerun(tmp_path):
    """SIGSTOP the worker past the grace period: another worker fails its trial as stale and queues
    a rerun. After SIGCONT the paused worker's finished run is told to that rerun: one COMPLETE
    trial with the run's value, no traceback, nothing trained twice."""
    # Long enough that progress.json (written once a second) shows a step before the run ends.
    study_file = long_study(tmp_path, steps=1200)
    trial_dir = tmp_path / "study" / "trial_0000"
    worker = start_worker(study_file, tmp_path)
    try:
        wait_for(lambda: read_progress(trial_dir).get("step", 0) >= 1, timeout=120)
        worker.send_signal(signal.SIGSTOP)
        time.sleep(4)  # grace period 3 s
        spec = load_spec(study_file)  # what another worker does:
        other = optuna.load_study(study_name=spec.name, storage=open_storage(storage_url(spec), 1, 3, 2))
        fail_stale_trials(other, grace_period=3, max_retry=2)
        assert [t.state for t in open_(study_file).get_trials()] == [TrialState.FAIL, TrialState.WAITING]
        wait_for((trial_dir / "result.rank0.json").is_file, timeout=120)  # the run goes on meanwhile
    finally:
        worker.send_signal(signal.SIGCONT)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "telling its outcome to its rerun, trial 1" in out
    trials = open_(study_file).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    result = json.loads((trial_dir / "result.rank0.json").read_text())
    assert trials[1].values == [result["metrics"]["val/nelbo"]] and result["start_step"] == 0
    assert (trial_dir / "stderr.log").read_text().count("Trainer.fit` stopped") == 1  # trained once


@pytest.mark.slow
def test_a_failed_heartbeat_write_does_not_kill_the_trial(tmp_path, monkeypatch):
    """One beat raising (a locked SQLite file) is retried; the trial completes."""
    calls = {"n": 0}
    record = optuna.storages.RDBStorage.record_heartbeat

    def flaky(self, trial_id):
        calls["n"] += 1
        if calls["n"] == 2:  # the first beat while the run trains
            raise RuntimeError("database is locked")
        return record(self, trial_id)

    monkeypatch.setattr(optuna.storages.RDBStorage, "record_heartbeat", flaky)
    study = run_worker(load_spec(long_study(tmp_path, steps=60)))
    assert calls["n"] > 2
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


# -- the supervisor's limits ----------------------------------------------------------------------
FAMILY = """
import json, os, subprocess, sys, time
# A trial that leaves processes behind: a child in its group, a grandchild in a session of its own
# (as torchrun starts its ranks), all ignoring SIGTERM; it ends by itself after 20 s.
ignore = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(20)"
kids = [subprocess.Popen([sys.executable, "-c", ignore]),
        subprocess.Popen([sys.executable, "-c", ignore], start_new_session=True)]
json.dump([os.getpid()] + [k.pid for k in kids], open("pids.json", "w"))
step = 0
for _ in range(200):
    if {advance}:
        step += 1
    json.dump({{"step": step}}, open("progress.json.tmp", "w"))
    os.replace("progress.json.tmp", "progress.json")
    time.sleep(0.1)
"""


@pytest.mark.parametrize("limit,advance,line", [("no_progress_s", "False", NO_PROGRESS),
                                                ("wall_clock_s", "True", WALL_CLOCK)])
@pytest.mark.slow
def test_limits_stop_every_process_of_the_trial(tmp_path, limit, advance, line):
    """A hung run (no new step) and a run past its wall-clock limit are stopped: SIGTERM, then
    SIGKILL after the grace time, the processes in other sessions too; the line says which limit."""
    watch = TrialWatch(lambda: True, Policy(**{limit: 2.0, "kill_grace_s": 1.0}))
    script = tmp_path / "family.py"
    script.write_text(FAMILY.format(advance=advance))
    start = time.monotonic()
    old_cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = launch([sys.executable, str(script)], tmp_path, watch, 0.5)
    finally:
        os.chdir(old_cwd)
    assert time.monotonic() - start < 10
    assert code < 0 and line in (tmp_path / "stderr.log").read_text()
    pids = json.loads((tmp_path / "pids.json").read_text())
    assert not [p for p in pids if Path(f"/proc/{p}").exists()
                and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]


# -- the failure policy (runs stubbed) --------------------------------------------------------------
def stub_runs(monkeypatch, outcome) -> list[tuple[dict, Path]]:
    """Replace the run by ``outcome(params, attempt) -> (returncode, stderr, value | None)``; returns
    the attempts made, (params, trial_dir) each."""
    import sweeps.worker as worker

    attempts: list[tuple[dict, Path]] = []

    def launch(command, trial_dir, watch, interval):
        watch()
        params = json.loads(next(a.split("=", 1)[1] for a in command
                                 if a.startswith("--trainer.callbacks.init_args.params=")))
        attempts.append((params, trial_dir))
        code, stderr, value = outcome(params, sum(p == params for p, _ in attempts))
        with open(trial_dir / "stderr.log", "a") as f:
            f.write(stderr)
        (trial_dir / "progress.json").write_text(json.dumps({"step": len(attempts)}))
        if value is not None:
            (trial_dir / "result.rank0.json").write_text(json.dumps({"pruned": False, "step": 3,
                                                                     "metrics": {"val/nelbo": value}}))
        return code

    monkeypatch.setattr(worker, "launch", launch)
    return attempts


GRID_3 = {"schedule": {"type": "categorical", "choices": ["linear", "cosine", "geometric"],
                       "arg": "model.init_args.schedule"}}


def test_infrastructure_failures_are_retried_and_training_errors_are_not(tmp_path, monkeypatch):
    """linear: killed by a signal, then an NCCL error, then preempted (exit 143), then done: each
    rerun in the same folder. cosine: a NaN, final. geometric: killed every time, rerun
    max_infra_retries times."""
    def outcome(params, attempt):
        if params["schedule"] == "linear":
            return [(-9, "", None), (1, "RuntimeError: NCCL communicator was aborted\n", None),
                    (143, "md4: SIGTERM: saved last.ckpt\n", None), (0, "", 1.5)][attempt - 1]
        if params["schedule"] == "cosine":
            return 1, "FloatingPointError: refused to save a checkpoint at step 7\n", None
        return -9, "", None

    attempts = stub_runs(monkeypatch, outcome)
    spec = load_spec(write_study(tmp_path, search_space=GRID_3, failures={"max_infra_retries": 2,
                                                                            "max_consecutive": 10}))
    trials = run_worker(spec).get_trials()
    by = {s: [t for t in trials if t.params["schedule"] == s] for s in ("linear", "cosine", "geometric")}
    assert [t.state for t in by["linear"]] == [TrialState.FAIL] * 3 + [TrialState.COMPLETE]
    assert by["linear"][-1].value == 1.5
    assert [t.user_attrs["failure"] for t in by["linear"][:3]] == ["infra", "infra", "preempted"]
    assert [t.state for t in by["cosine"]] == [TrialState.FAIL] and by["cosine"][0].user_attrs["failure"] == "training"
    assert [t.state for t in by["geometric"]] == [TrialState.FAIL] * 3  # 1 + max_infra_retries
    for runs in by.values():  # every rerun in the folder of its original trial
        assert len({d for p, d in attempts if p == runs[0].params}) == 1


def test_consecutive_failures_stop_the_study_and_retry_failed_reruns_them(tmp_path, monkeypatch):
    """An environment error fails every trial: the study stops after max_consecutive failures with
    the error, instead of failing the whole grid; once fixed, retry_failed reruns those trials."""
    broken = {"on": True}
    stub_runs(monkeypatch, lambda p, a: (1, "Traceback ...\nModuleNotFoundError: No module named 'flash_attn'\n", None)
              if broken["on"] else (0, "", 1.0))
    grid = {"lr": {"type": "categorical", "choices": [1, 2, 3, 4, 5, 6], "arg": "model.init_args.optim.lr"}}
    spec = load_spec(write_study(tmp_path, search_space=grid, failures={"max_consecutive": 3}))
    with pytest.raises(StudyError, match=r"last 3 trials failed \(trials 0, 1, 2\); 3 of them with: "
                                         r"ModuleNotFoundError: No module named 'flash_attn'"):
        run_worker(spec)
    study = open_(write_study(tmp_path, search_space=grid, failures={"max_consecutive": 3}))
    assert len(study.get_trials()) == 3
    broken["on"] = False
    assert retry_failed(study, spec) == [0, 1, 2]
    trials = run_worker(spec).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 6 and len(trials) == 9


# -- the wiring: fingerprint, objective check, redaction, md4-sweep run flags ----------------------
def test_a_worker_with_an_edited_study_file_is_refused(tmp_path, monkeypatch):
    stub_runs(monkeypatch, lambda p, a: (0, "", 1.0))
    run_worker(load_spec(write_study(tmp_path, search_space=GRID_3)))
    edited = write_study(tmp_path, search_space=GRID_3, args=[*TINY, "--trainer.max_steps=8"])
    with pytest.raises(StudyError, match=r"created from another version of this study file \(differs in: args\[1[0-9]\]"):
        run_worker(load_spec(edited))
    assert len(open_(edited).get_trials()) == 3  # nothing ran under the edited file


@pytest.mark.slow
def test_a_misspelt_objective_fails_the_trial_at_its_first_validation(tmp_path):
    """A real run of 400 steps validated every 2, the second of two objectives misspelt (a
    multi-objective study, which reports nothing for pruning): the run stops at its first
    validation, and the failure is a training one, not retried."""
    study_file = write_study(tmp_path, search_space=SPACE_1, args=[*TINY, "--trainer.max_steps=400"],
                             objectives=[{"metric": "val/nelbo"}, {"metric": "val/nelbx"}])
    trials = run_worker(load_spec(study_file)).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL]
    assert trials[0].user_attrs["failure"] == "training"
    error = trials[0].user_attrs["error"]
    assert "ObjectiveNotLogged: objectives: metric 'val/nelbx' was not logged at the first validation" in error
    assert "val/nelbo" in error.split("logged: ")[-1]
    assert read_progress(tmp_path / "study" / "trial_0000")["step"] <= 2


class FakeStrategy:
    def __init__(self, rank_zero_says: str | None) -> None:
        self.rank_zero_says, self.calls = rank_zero_says, 0

    def broadcast(self, obj, src=0):
        self.calls += 1
        return self.rank_zero_says


class FakeTrainer:
    sanity_checking = False
    global_step = 2

    def __init__(self, rank: int, metrics: dict, strategy: FakeStrategy) -> None:
        self.is_global_zero, self.callback_metrics, self.strategy = rank == 0, metrics, strategy


def test_every_rank_raises_when_rank_zero_misses_an_objective(tmp_path):
    """Rank 0 alone checks the logged metrics; the other ranks raise too, from its broadcast
    decision, instead of waiting in their next collective for the DDP timeout."""
    callback = OptunaTrial("sqlite://", "s", 0, str(tmp_path), objectives=["val/nelbo", "val/nelbx"])
    strategy = FakeStrategy("objectives: metric 'val/nelbx' was not logged at the first validation; logged: x")
    with pytest.raises(ObjectiveNotLogged, match="'val/nelbx' was not logged"):
        callback.on_validation_end(FakeTrainer(1, {}, strategy), None)
    fine = OptunaTrial("sqlite://", "s", 0, str(tmp_path), objectives=["val/nelbo"])
    quiet = FakeStrategy(None)
    for _ in range(3):
        fine.on_validation_end(FakeTrainer(1, {}, quiet), None)
    assert quiet.calls == 1  # one collective, at the first validation only


def test_secrets_in_errors_are_redacted(tmp_path, monkeypatch, capsys):
    """A run's stderr, a failed heartbeat and a refused report may name the storage URL: the
    trial's error attribute and the printed lines show it without its password."""
    url = "postgresql://sweeper:hunter2@db.example/optuna"
    stub_runs(monkeypatch, lambda p, a: (1, f"sqlalchemy.exc.OperationalError: cannot reach {url}\n", None))
    (trial,) = run_worker(load_spec(write_study(tmp_path, search_space=SPACE_1))).get_trials()
    assert "postgresql://sweeper:***@db.example/optuna" in trial.user_attrs["error"]

    class Unreachable:
        _storage = None

    monkeypatch.setattr("sweeps.storage.record_heartbeat", lambda study, trial_id: (_ for _ in ()).throw(
        OSError(f"cannot reach {url}")))
    monkeypatch.setattr("sweeps.storage.time.sleep", lambda s: None)
    assert beat_with_retry(Unreachable(), 0) is False
    callback = OptunaTrial("sqlite://", "s", 0, str(tmp_path), metric="val/nelbo")

    class BrokenTrial:
        def report(self, value, step):
            raise OSError(f"cannot reach {url}")

    callback._trial = BrokenTrial()
    assert callback._report(1.0, 2) is False

    class Trial:
        number = 7

    def unreachable_tell(*args):
        raise OSError(f"cannot reach {url}")

    # A stopping worker's requeue, when the storage is what failed.
    monkeypatch.setattr("sweeps.worker.tell", unreachable_tell)
    monkeypatch.setattr("sweeps.worker.run_outcome", lambda *args, **kwargs: None)
    requeue_stopped(None, None, Trial(), tmp_path, 0)
    printed = capsys.readouterr()
    assert "hunter2" not in printed.out + printed.err and printed.err.count("sweeper:***@db.example") == 3


@pytest.mark.slow
def test_run_retry_failed_requeues_the_failed_trials(tmp_path, monkeypatch):
    """md4-sweep run --retry-failed: the trial that failed (a training error, final) runs again in
    its folder, and the study completes."""
    broken = {"on": True}
    attempts = stub_runs(monkeypatch, lambda p, a: (1, "FloatingPointError: nan\n", None)
                         if broken["on"] and p["schedule"] == "cosine" else (0, "", 1.0))
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # keep pytest's own SIGTERM handling
    study_file = write_study(tmp_path, search_space=GRID_3)
    cli.main(["run", str(study_file)])
    cli.main(["run", str(study_file)])  # without the flag a final failure stays failed
    assert [t.state for t in open_(study_file).get_trials()] == [TrialState.COMPLETE, TrialState.FAIL,
                                                                 TrialState.COMPLETE]
    broken["on"] = False
    cli.main(["run", str(study_file), "--retry-failed"])
    trials = open_(study_file).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE,
                                         TrialState.COMPLETE]
    assert trials[3].system_attrs["failed_trial"] == 1 and trials[3].params == trials[1].params
    assert [d.name for p, d in attempts if p == trials[1].params] == ["trial_0001", "trial_0001"]


def test_a_missing_objective_is_a_training_failure_whatever_else_broke():
    """The rank that raised ObjectiveNotLogged may take its peers' collectives down with it: their
    connection errors must not make a misspelt metric look like infrastructure (retried)."""
    stderr = ("RuntimeError: [gloo] Connection reset by peer\n"
              "sweeps.callback.ObjectiveNotLogged: objectives: metric 'val/nelbx' was not logged\n")
    assert failure_kind(1, stderr) == "training"
    assert failure_kind(1, stderr.splitlines()[0]) == "infra"


def test_run_worker_index_picks_the_workers_gpus(tmp_path, monkeypatch):
    """md4-sweep run --worker-index 1 with 2 devices per trial: GPUs 2 and 3 of those visible."""
    import sweeps.worker as worker

    seen = []
    monkeypatch.setattr(worker, "launch", lambda command, trial_dir, watch, interval: seen.append(
        watch.env["CUDA_VISIBLE_DEVICES"]) or 1)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7,8")
    monkeypatch.delenv(WORKER_INDEX_ENV, raising=False)  # restored after the test, whatever main sets
    study_file = write_study(tmp_path, search_space=SPACE_1, launcher={"kind": "torchrun", "devices": 2})
    cli.main(["run", str(study_file), "--worker-index", "1"])
    assert seen == ["6,7"]
