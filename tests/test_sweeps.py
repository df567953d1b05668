"""Sweeps: study files, and Optuna studies whose trials are (DDP) `md4 fit` runs on the CPU.

Trials train a one-layer model on the digits for a few steps; what is checked is the bookkeeping:
trials in the storage, their values against the runs' own results, TensorBoard runs, pruning on
every rank, crash recovery and workers sharing a study.
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
import torch
import yaml
from optuna.trial import TrialState

from conftest import DIGITS, TINY_NET_ARGS
from sweeps.callback import read_progress
from sweeps.report import result_rows, trials_table
from sweeps.spec import StudyError, load_spec, make_pruner, make_sampler, parse_spec
from sweeps.storage import open_storage
from sweeps.worker import SURPLUS, build_command, counted_trials, storage_url

ROOT = Path(__file__).resolve().parents[1]
BASE = [DIGITS, str(ROOT / "sweeps" / "studies" / "tiny_digits.yaml")]
TINY = ["--trainer.accelerator=cpu", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
        "--data.init_args.val_examples=16", "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1",
        *TINY_NET_ARGS, "--data.init_args.global_batch_size=16", "--data.init_args.eval_batch_size=16"]
# One thread per training process: the runs are tiny, and several share the CI machine's cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
GRID_2x2 = {"schedule": {"type": "categorical", "choices": ["linear", "cosine"], "arg": "model.init_args.schedule"},
            "antithetic": {"type": "categorical", "choices": [True, False], "arg": "model.init_args.antithetic"}}


def write_study(tmp_path: Path, name: str = "s", **overrides) -> Path:
    study = {"name": name, "base_configs": BASE, "args": TINY, "search_space": GRID_2x2,
             "sampler": {"name": "grid"}, "pruner": {"name": "none"}, "study_dir": str(tmp_path / "study"),
             "launcher": {"kind": "python", "devices": 1}, "heartbeat": {"interval": 1, "grace_period": 3}}
    study.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def sweep(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def load(study_file: Path) -> optuna.Study:
    spec = load_spec(study_file)
    return optuna.load_study(study_name=spec.name, storage=open_storage(storage_url(spec)))


def result(trial: optuna.trial.FrozenTrial, rank: int) -> dict:
    return json.loads((Path(trial.user_attrs["trial_dir"]) / f"result.rank{rank}.json").read_text())


# -- study files ---------------------------------------------------------------------------------
def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(StudyError, match="unknown key 'n_trial'"):
        load_spec(write_study(tmp_path, n_trial=3))
    bad_space = {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "logg": True}}
    with pytest.raises(StudyError, match=r"search_space.lr: unknown key 'logg'"):
        load_spec(write_study(tmp_path, search_space=bad_space))
    with pytest.raises(StudyError, match=r"launcher: unknown key 'gpus'"):
        load_spec(write_study(tmp_path, launcher={"gpus": 2}))
    with pytest.raises(StudyError, match="sampler.name 'bayes' is not one of"):
        load_spec(write_study(tmp_path, sampler={"name": "bayes"}))
    with pytest.raises(StudyError, match="no arguments for choice 'cosine'"):
        load_spec(write_study(tmp_path, search_space={
            "s": {"type": "categorical", "choices": ["linear", "cosine"], "args": {"linear": ["--x=1"]}}}))
    with pytest.raises(StudyError, match="n_trials: a grid study runs its 4 .*once"):
        load_spec(write_study(tmp_path, n_trials=5))
    with pytest.raises(StudyError, match="cannot prune multi-objective"):
        load_spec(write_study(tmp_path, sampler={"name": "nsga2"}, n_trials=4, pruner={"name": "median"},
                              objectives=[{"metric": "val/nelbo"}, {"metric": "val/bpt"}]))


def test_grid_and_arguments_of_a_trial(tmp_path):
    space = {**GRID_2x2, "layers": {"type": "int", "low": 1, "high": 3, "step": 2, "arg": "model.init_args.network.n_layers"},
             "method": {"type": "categorical", "choices": ["md4", "genmd4"],
                        "args": {"md4": ["--model=MD4"], "genmd4": ["--model=GenMD4", "--x=1"]}}}
    spec = load_spec(write_study(tmp_path, search_space=space, launcher={"kind": "torchrun", "devices": 2}))
    assert spec.n_trials == 2 * 2 * 2 * 2
    assert spec.grid()[-1] == {"schedule": "cosine", "antithetic": False, "layers": 3, "method": "genmd4"}
    assert spec.search_space["antithetic"].cli_args(False) == ["--model.init_args.antithetic=false"]
    assert spec.search_space["method"].cli_args("genmd4") == ["--model=GenMD4", "--x=1"]

    class FakeTrial:
        _trial_id, number = 7, 3

    cmd = build_command(spec, FakeTrial(), {"schedule": "cosine", "antithetic": True, "layers": 1, "method": "md4"},
                        tmp_path / "study" / "trial_0003")
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for arg in ("--model.init_args.schedule=cosine", "--model.init_args.antithetic=true", "--model=MD4",
                "--trainer.devices=2", "--trainer.num_nodes=1",
                '--trainer.strategy={"class_path": "lightning.pytorch.strategies.DDPStrategy", "init_args": {"timeout": "0:10:00"}}',
                "--trainer.callbacks+=sweeps.callback.OptunaTrial", "--trainer.callbacks.init_args.trial_id=7",
                f"--trainer.default_root_dir={tmp_path / 'study' / 'trial_0003'}"):
        assert arg in cmd, arg
    assert cmd.index("--model=MD4") > cmd.index(TINY[-1])  # trial arguments come after the study's


@pytest.mark.parametrize("name", ["grid", "tpe", "cmaes", "nsga2", "random"])
def test_every_sampler_and_pruner_builds(tmp_path, name):
    space = {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True, "step": None}} if name != "grid" else GRID_2x2
    spec = load_spec(write_study(tmp_path, search_space=space, sampler={"name": name, "seed": 1},
                                 n_trials=None if name == "grid" else 3))
    assert isinstance(make_sampler(spec), optuna.samplers.BaseSampler)
    for pruner in ("median", "hyperband", "threshold", "none"):
        spec.pruner = {"name": pruner, **({"upper": 1.0} if pruner == "threshold" else {})}
        assert isinstance(make_pruner(spec), optuna.pruners.BasePruner)


def test_shipped_studies_parse():
    sizes = {name: load_spec(ROOT / "sweeps" / "studies" / f"{name}.yaml").n_trials
             for name in ("schedules", "dropout", "variance")}
    assert sizes == {"schedules": 6 * 3, "dropout": 3 * 3, "variance": 4 * 3}  # configurations x 3 seeds


def test_counted_trials_skip_retried_and_surplus_trials():
    study = optuna.create_study()
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={"x": 0.5}, distributions=dist))  # 0: died
    study.add_trial(optuna.create_trial(state=TrialState.COMPLETE, value=1.0, params={"x": 0.5}, distributions=dist,
                                        system_attrs={"failed_trial": 0, "retry_history": [0]}))  # 1: its rerun
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={"x": 0.1}, distributions=dist,
                                        user_attrs={"error": "boom"}))  # 2: a failed run counts
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, user_attrs={SURPLUS: True}))  # 3: surplus
    assert [t.number for t in counted_trials(study.get_trials())] == [1, 2]
    spec = parse_spec(yaml.safe_load(write_study_text()), ROOT)
    rows = result_rows(study, spec)
    assert [r["note"] for r in rows] == ["worker died (heartbeat lapsed)", "rerun of trial 0", "boom"]
    assert trials_table(rows).count("\n") == 2 + 3


def write_study_text() -> str:
    return yaml.safe_dump({"name": "t", "base_configs": BASE, "sampler": {"name": "random"}, "n_trials": 3,
                           "search_space": {"x": {"type": "float", "low": 0, "high": 1}}})


# -- studies of real runs --------------------------------------------------------------------------
@pytest.mark.slow
def test_grid_study_of_ddp_trials_by_two_workers_sharing_a_journal(tmp_path):
    """2 x 2 grid, every trial a 2-process gloo DDP run under torchrun, two workers sharing one
    journal file: exactly 4 trials, each point run once by one worker, their values in the storage,
    one TensorBoard run each (rank 0's training events, the study's session start and end), and the
    results table."""
    study_file = write_study(tmp_path, launcher={"kind": "torchrun", "devices": 2},
                             storage=f"journal:{tmp_path / 'study.log'}")
    workers = [subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", str(study_file)], cwd=tmp_path,
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=900) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-3000:] for _, err in outputs]
    all_trials = load(study_file).get_trials()
    trials = [t for t in all_trials if not t.user_attrs.get(SURPLUS)]
    assert all(t.user_attrs.get(SURPLUS) and t.state == TrialState.FAIL for t in all_trials if t not in trials)
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted((t.params["schedule"], t.params["antithetic"]) for t in trials) == sorted(
        (s, a) for s in ("linear", "cosine") for a in (True, False))
    ran = [{int(line.split(" trial ")[1].split(":")[0]) for line in out.splitlines() if line.endswith("}")}
           for out, _ in outputs]
    assert not ran[0] & ran[1] and ran[0] | ran[1] == {t.number for t in trials}, ran
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for t in trials:
        ranks = [result(t, r) for r in (0, 1)]
        assert t.value == ranks[0]["metrics"]["val/nelbo"] and ranks[0]["step"] == ranks[1]["step"] == 4
        assert ranks[0]["metrics"]["val/nelbo"] == ranks[1]["metrics"]["val/nelbo"]  # synced over ranks
        run = Path(t.user_attrs["trial_dir"])
        assert run.name == f"trial_{t.number:04d}" and run.parent == tmp_path / "study"
        files = [f.name for f in run.glob("events.out.tfevents.*")]
        assert len(files) == 3 and sum(f.endswith(".session") for f in files) == 2
        acc = EventAccumulator(str(run))
        acc.Reload()
        assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
        assert "final/val/nelbo" in acc.Tags()["scalars"] and "val/nelbo" in acc.Tags()["scalars"]
    assert len({t.value for t in trials}) == 4  # the parameters reached the runs
    table = (tmp_path / "study" / "results.md").read_text()
    assert table.count("| COMPLETE |") == 4 and "| trial | state | schedule | antithetic | seed | val/nelbo |" in table


@pytest.mark.slow
def test_pruned_trial_stops_every_rank(tmp_path):
    """A threshold no value passes prunes at the first validation (step 2 of 4); both DDP ranks
    (Lightning's own launcher this time) stop there and the trial is PRUNED in the storage."""
    space = {"schedule": {"type": "categorical", "choices": ["cosine"], "arg": "model.init_args.schedule"}}
    study_file = write_study(tmp_path, search_space=space, pruner={"name": "threshold", "upper": 0.0},
                             launcher={"kind": "python", "devices": 2}, args=[*TINY, "--trainer.strategy=ddp"])
    sweep("run", str(study_file), cwd=tmp_path)
    (trial,) = load(study_file).get_trials()
    assert trial.state == TrialState.PRUNED
    assert trial.intermediate_values == {2: result(trial, 0)["metrics"]["val/nelbo"]}
    for rank in (0, 1):
        assert result(trial, rank)["pruned"] is True and result(trial, rank)["step"] == 2


def _wait_for(condition, timeout: float) -> None:
    end = time.time() + timeout
    while not condition():
        if time.time() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.5)


@pytest.mark.slow
def test_killed_worker_restarts_without_lost_or_duplicate_trials(tmp_path):
    """Kill a worker's process group mid-trial (the trial, a session of its own, gets its
    parent-death SIGTERM and saves last.ckpt). A worker with an edited study file is refused in one
    line; restarted with the same file, the worker fails the trial once its heartbeat lapses,
    reruns it in its folder from the step it reached and completes the grid: nothing lost, nothing
    run twice."""
    space = {"schedule": {"type": "categorical", "choices": ["linear", "cosine"], "arg": "model.init_args.schedule"}}
    steps = 2000  # long enough for the SIGTERM to land mid-training (progress.json is written once a second)
    long_args = [*TINY, f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}",
                 "--trainer.log_every_n_steps=50"]
    study_file = write_study(tmp_path, search_space=space, args=long_args)
    trial_dir = tmp_path / "study" / "trial_0000"
    worker = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", str(study_file)], cwd=tmp_path,
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: read_progress(trial_dir).get("step", 0) >= 20, timeout=300)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    _wait_for((trial_dir / "resume" / "last.ckpt").is_file, timeout=60)
    reached = read_progress(trial_dir)["step"]
    assert [t.state for t in load(study_file).get_trials()] == [TrialState.RUNNING]

    write_study(tmp_path, search_space=space)  # the same study with short runs: another study
    edited = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", str(study_file)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert edited.returncode == 2 and "Traceback" not in edited.stderr
    assert edited.stderr.splitlines()[-1].startswith(
        f"md4-sweep: error: {study_file}: study 's' was created from another version of this study file "
        "(differs in: args[12], args[13], args[14]);")
    assert len(load(study_file).get_trials()) == 1

    write_study(tmp_path, search_space=space, args=long_args)  # the file restored
    sweep("run", str(study_file), cwd=tmp_path)
    trials = load(study_file).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert sorted(t.params["schedule"] for t in trials[1:]) == ["cosine", "linear"]
    rerun = next(t for t in trials if t.system_attrs.get("failed_trial") == 0)
    assert rerun.params == trials[0].params and rerun.user_attrs["trial_dir"] == str(trial_dir)
    resumed = result(rerun, 0)
    assert resumed["start_step"] >= reached > 0 and resumed["step"] == steps
    assert rerun.values == [resumed["metrics"]["val/nelbo"]]
    folders = sorted(p.name for p in (tmp_path / "study").glob("trial_*"))
    assert len(folders) == 2 and folders == sorted(Path(t.user_attrs["trial_dir"]).name for t in trials[1:])


@pytest.mark.slow
def test_two_torchrun_nodes_on_localhost(tmp_path):
    """The multi-node path: two torchrun "nodes" of 1 process each on localhost, global batch 16."""
    port = 29500 + os.getpid() % 1000
    args = ["--config", BASE[0], *TINY, "--data.init_args.batch_size=null", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    env = {**ENV, "PYTHON": sys.executable, "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    nodes = [subprocess.Popen(["bash", str(ROOT / "scripts" / "torchrun.sh"), *args], cwd=tmp_path,
                              env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    outputs = [n.communicate(timeout=600) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [o[1][-2000:] for o in outputs]
    assert "Starting with 2 processes" in outputs[0][1] + outputs[0][0]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4


@pytest.mark.slow
def test_slurm_script_resumes_a_requeued_run_from_its_newest_checkpoint(tmp_path):
    """train.sbatch with a stand-in srun that prints its command: fresh run, then after a requeue."""
    (tmp_path / "bin").mkdir()
    fake_srun = tmp_path / "bin" / "srun"
    fake_srun.write_text('#!/bin/bash\necho "$@"\n')
    fake_srun.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_NNODES": "2",
           "SLURM_NTASKS_PER_NODE": "4", "PYTHON": sys.executable}
    run = tmp_path / "run"

    def submit() -> str:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch"), "configs/text8.yaml", str(run),
                               "--trainer.max_steps=10"], env=env, capture_output=True, text=True, check=True)
        return proc.stdout

    fresh = submit()
    assert "--trainer.num_nodes 2 --trainer.devices 4" in fresh and "--ckpt_path" not in fresh
    (run / "checkpoints").mkdir(parents=True)
    loadable = {"state_dict": {}, "hyper_parameters": {"_class_path": "lightning_md4.modules.MD4"}}
    torch.save(loadable, run / "checkpoints" / "last.ckpt")
    assert f"--ckpt_path {run / 'checkpoints' / 'last.ckpt'}" in submit()
    time.sleep(0.05)
    torch.save(loadable, run / "hpc_ckpt_1.ckpt")  # Lightning's save on SIGUSR1, newer than last.ckpt
    assert f"--ckpt_path {run / 'hpc_ckpt_1.ckpt'}" in submit()
    time.sleep(0.05)
    (run / "checkpoints" / "step=9.ckpt").write_text("x")  # newest, but torn: skipped
    assert f"--ckpt_path {run / 'hpc_ckpt_1.ckpt'}" in submit()


def _stub_runs(monkeypatch, outcome) -> None:
    """Replace the training launch by ``outcome(params, trial_dir) -> (returncode, metrics | None)``."""
    import sweeps.worker as worker

    def launch(command, trial_dir, beat, interval):
        beat()
        params = json.loads(next(a.split("=", 1)[1] for a in command if a.startswith("--trainer.callbacks.init_args.params=")))
        code, metrics = outcome(params, trial_dir)
        (trial_dir / "stderr.log").write_text(f"Traceback ...\nRuntimeError: run of {params} broke\n")
        if metrics is not None:
            (trial_dir / "result.rank0.json").write_text(json.dumps({"pruned": False, "step": 3, "metrics": metrics}))
        return code

    monkeypatch.setattr(worker, "launch", launch)


@pytest.mark.slow
def test_multi_objective_nsga2_study_and_report(tmp_path, monkeypatch):
    """Two objectives (e.g. NELBO against sampling cost) with NSGA-II: values told in order, Pareto plot."""
    _stub_runs(monkeypatch, lambda p, d: (0, {"val/nelbo": p["x"] ** 2, "val/nfe": (p["x"] - 2) ** 2, "other": 1.0}))
    spec = load_spec(write_study(tmp_path, search_space={"x": {"type": "float", "low": 0.0, "high": 2.0}},
                                 sampler={"name": "nsga2", "seed": 0}, n_trials=5, pruner={"name": "none"},
                                 objectives=[{"metric": "val/nelbo"}, {"metric": "val/nfe"}], report_metrics=["other"]))
    from sweeps.report import write_report
    from sweeps.worker import run_worker

    study = run_worker(spec)
    trials = study.get_trials()
    assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        assert t.values == [t.params["x"] ** 2, (t.params["x"] - 2) ** 2]
    table = write_report(study, spec)
    assert "| trial | state | x | val/nelbo | val/nfe | other | step | seconds | note |" in table
    assert (tmp_path / "study" / "pareto_front.png").stat().st_size > 0


def test_a_failed_run_is_recorded_with_its_error(tmp_path, monkeypatch):
    _stub_runs(monkeypatch, lambda p, d: (1, None) if p["schedule"] == "cosine" else (0, {"val/nelbo": 1.0}))
    space = {"schedule": GRID_2x2["schedule"]}
    spec = load_spec(write_study(tmp_path, search_space=space))
    from sweeps.worker import run_worker

    trials = run_worker(spec).get_trials()
    assert len(trials) == 2
    failed = next(t for t in trials if t.params["schedule"] == "cosine")
    assert failed.state == TrialState.FAIL and failed.user_attrs["error"].startswith("exit code 1: Traceback")
    assert "RuntimeError: run of {'schedule': 'cosine', 'seed': 0} broke" in failed.user_attrs["error"]
    assert next(t for t in trials if t is not failed).state == TrialState.COMPLETE
    rows = result_rows(load(write_study(tmp_path, search_space=space)), spec)
    assert rows[[r["schedule"] for r in rows].index("cosine")]["note"] == "RuntimeError: run of {'schedule': 'cosine', 'seed': 0} broke"


def test_journal_stale_trial_is_failed_and_requeued_once(tmp_path):
    """Optuna 5's journal storage has no heartbeat: the worker's own beat attribute plays its part."""
    from sweeps.storage import BEAT_ATTR, fail_stale_trials, record_heartbeat

    storage = open_storage(f"journal:{tmp_path / 'j.log'}")
    study = optuna.create_study(storage=storage, study_name="j")
    alive, dead = study.ask(), study.ask()
    for trial in (alive, dead):
        trial.suggest_float("x", 0, 1)
        record_heartbeat(study, trial._trial_id)
    study._storage.set_trial_system_attr(dead._trial_id, BEAT_ATTR, time.time() - 100)
    other = optuna.load_study(study_name="j", storage=open_storage(f"journal:{tmp_path / 'j.log'}"))
    for s in (study, other, study):  # two workers noticing it, one of them twice
        fail_stale_trials(s, grace_period=10, max_retry=2)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING]
    assert trials[2].params == trials[1].params and trials[2].system_attrs["failed_trial"] == dead.number
    assert study.ask().number == 2  # the next ask picks the rerun up
