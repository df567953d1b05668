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

from sweeps.callback import read_progress
from sweeps.spec import StudyError, load_spec
from sweeps.storage import fail_stale_trials, open_storage
from sweeps.worker import NO_PROGRESS, WALL_CLOCK, Policy, TrialWatch, launch, retry_failed, run_worker, storage_url
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


def test_paused_worker_result_is_told_once_to_the_rerun(tmp_path):
    """SIGSTOP the worker past the grace period: another worker fails its trial as stale and queues
    a rerun. After SIGCONT the paused worker's finished run is told to that rerun: one COMPLETE
    trial with the run's value, no traceback, nothing trained twice."""
    study_file = long_study(tmp_path, steps=120)
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
