"""The seeds axis of a study, the evaluation draws of its objective, and proposals that differ across
workers sharing one storage (sweeps/spec.py); the worker running them (sweeps/worker.py: seeds,
evaluation draws, the study's TensorBoard sessions)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState
from tensorboard import context as tb_context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

from sweeps.report import configuration_stats, seed_observations
from sweeps.spec import (DEFAULT_EVAL_DRAWS, SEED_PARAM, SEEDS_ATTR, StudyError, StudySpec, fingerprint, load_spec,
                         make_sampler, trial_seeds)
from sweeps.storage import open_storage
from sweeps.tensorboard import STATE_CODES
from sweeps.worker import SESSION_FILE, run_worker, storage_url

ROOT = Path(__file__).resolve().parents[1]
BASE = [str(ROOT / "configs" / "digits.yaml"), str(ROOT / "sweeps" / "studies" / "tiny_digits.yaml")]
SPACE = {"schedule": {"type": "categorical", "choices": ["linear", "cosine", "poly2"], "arg": "model.init_args.schedule"},
         "antithetic": {"type": "categorical", "choices": [True, False], "arg": "model.init_args.antithetic"}}
FLOAT_SPACE = {"lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True, "arg": "model.init_args.optim.lr"},
               "dropout": {"type": "float", "low": 0.0, "high": 0.1, "arg": "model.init_args.network.dropout"}}


def spec_of(tmp_path: Path, **overrides) -> StudySpec:
    study = {"name": "s", "base_configs": BASE, "search_space": SPACE, "sampler": {"name": "grid"},
             "pruner": {"name": "none"}, "study_dir": str(tmp_path / "study")}
    study.update(overrides)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return load_spec(path)


def workers_on_one_journal(tmp_path: Path, spec: StudySpec, count: int = 2) -> list[optuna.Study]:
    """``count`` workers' views of one study in a journal file, each with the sampler its worker builds."""
    url = f"journal:{tmp_path / 'study.log'}"
    optuna.create_study(storage=open_storage(url), study_name=spec.name)
    return [optuna.load_study(study_name=spec.name, storage=open_storage(url), sampler=make_sampler(spec))
            for _ in range(count)]


def propose(study: optuna.Study, spec: StudySpec) -> optuna.Trial:
    """Ask a trial and draw its parameters as the worker does (search space, then its seeds); the trial
    stays RUNNING, as while the worker trains it."""
    trial = study.ask()
    for name, p in spec.search_space.items():
        if p.type == "categorical":
            trial.suggest_categorical(name, p.choices)
        else:
            trial.suggest_float(name, p.low, p.high, log=p.log)
    trial.set_user_attr("seeds", trial_seeds(spec, trial))
    return trial


# -- the seeds axis --------------------------------------------------------------------------------
def test_seeds_and_repeats_name_the_same_axis(tmp_path):
    listed, repeated = spec_of(tmp_path, seeds=[0, 1, 2]), spec_of(tmp_path, repeats=3)
    assert listed.seeds == repeated.seeds == [0, 1, 2]
    assert fingerprint(listed) == fingerprint(repeated)  # the same trials, however written
    assert spec_of(tmp_path).seeds == [0]
    assert listed.n_trials == 6 * 3  # a grid study: configuration x seed
    assert spec_of(tmp_path, seeds=[4, 7]).grid_space()[SEED_PARAM] == [4, 7]


@pytest.mark.parametrize(("keys", "message"), [
    ({"seeds": [0, 1], "repeats": 2}, "seeds: give seeds or repeats, not both"),
    ({"seeds": [0, 1, 0]}, "seeds: seed 0 is listed twice"),
    ({"seeds": []}, "seeds: is empty"),
    ({"seeds": [-1]}, "seeds[0]: must be at least 0, got -1"),
    ({"repeats": 0}, "repeats: must be at least 1, got 0"),
    ({"seeds": "0,1"}, "seeds: expected a list of integers"),
    ({"search_space": {**SPACE, "seed": {"type": "int", "low": 0, "high": 2}}}, "search_space.seed: the seed is the seeds axis"),
    ({"eval_draws": 0}, "eval_draws: must be at least 1, got 0"),
    ({"seeds": [0, 1], "n_trials": 6}, "n_trials: a grid study runs its 6 configurations x 2 seeds once; drop n_trials or set it to 12"),
])
def test_bad_seeds_and_draws_are_one_line_errors(tmp_path, keys, message):
    with pytest.raises(StudyError) as err:
        spec_of(tmp_path, **keys)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_run_follows_its_seed_and_keeps_the_evaluation_draws(tmp_path):
    spec = spec_of(tmp_path, repeats=2, eval_draws=8)
    assert spec.seed_args(1) == ["--seed_everything=1", "--model.init_args.seed=1"]
    assert not any("eval_seed" in a for a in spec.seed_args(1))  # every run is scored on the same draws
    assert spec.evaluation_args() == ["--eval_draws=8"]
    assert spec_of(tmp_path).eval_draws == DEFAULT_EVAL_DRAWS > 1  # the objective is not a one-draw estimate


def test_two_grid_workers_on_one_journal_run_each_configuration_and_seed_once(tmp_path):
    """18 (configuration, seed) points asked in turn by two workers with their own samplers: each runs
    once, whatever the grid sampler's seed (every worker shuffles the grid alike)."""
    spec = spec_of(tmp_path, seeds=[0, 1, 2], sampler={"name": "grid", "seed": 5})
    workers = workers_on_one_journal(tmp_path, spec)
    trials = [propose(workers[k % 2], spec) for k in range(spec.n_trials)]
    points = [(t.params["schedule"], t.params["antithetic"], t.params[SEED_PARAM]) for t in trials]
    assert all(t.user_attrs["seeds"] == [t.params[SEED_PARAM]] for t in workers[0].get_trials())
    expected = itertools.product(["linear", "cosine", "poly2"], [True, False], [0, 1, 2])
    assert sorted(points, key=str) == sorted(expected, key=str)


def test_a_proposing_sampler_runs_every_seed_in_its_trial(tmp_path):
    spec = spec_of(tmp_path, search_space=FLOAT_SPACE, sampler={"name": "tpe", "seed": 0}, n_trials=4, repeats=3)
    trial = propose(workers_on_one_journal(tmp_path, spec, 1)[0], spec)
    assert trial.user_attrs["seeds"] == [0, 1, 2] and SEED_PARAM not in trial.params


# -- proposals across workers ----------------------------------------------------------------------
@pytest.mark.parametrize("sampler", [{"name": "random", "seed": 0}, {"name": "tpe", "seed": 0},
                                     {"name": "tpe", "seed": 0, "n_startup_trials": 2}])
def test_seeded_workers_sharing_a_study_propose_different_points(tmp_path, sampler):
    """Two workers with one sampler seed, asking in turn while their trials run: all proposals differ
    (one seed per worker would give every worker the same draws)."""
    spec = spec_of(tmp_path, search_space=FLOAT_SPACE, sampler=sampler, n_trials=8)
    workers = workers_on_one_journal(tmp_path, spec)
    trials = []
    for k in range(8):
        trials.append(propose(workers[k % 2], spec))
        if k % 2:  # both workers' trials finish, then both ask again
            for t in trials[-2:]:
                workers[0].tell(t, t.params["lr"])
    points = {(t.params["lr"], t.params["dropout"]) for t in trials}
    assert len(points) == 8


def test_a_seeded_study_proposes_the_same_points_when_run_again(tmp_path):
    spec = spec_of(tmp_path, search_space=FLOAT_SPACE, sampler={"name": "tpe", "seed": 3}, n_trials=4)
    runs = []
    for name in ("first", "again"):
        study = optuna.create_study(study_name=name, sampler=make_sampler(spec))
        runs.append([propose(study, spec).params for _ in range(4)])
    assert runs[0] == runs[1]


def test_tpe_workers_assume_running_trials_score_badly_by_default(tmp_path, monkeypatch):
    """``constant_liar`` on unless the study file says otherwise, also under Optuna 4, whose default is off."""
    class Optuna4TPE(optuna.samplers.TPESampler):
        def __init__(self, *, constant_liar: bool = False, **kwargs) -> None:
            super().__init__(constant_liar=constant_liar, **kwargs)

    monkeypatch.setattr(optuna.samplers, "TPESampler", Optuna4TPE)
    spec = spec_of(tmp_path, search_space=FLOAT_SPACE, sampler={"name": "tpe"}, n_trials=4)
    assert make_sampler(spec)._constant_liar  # Optuna keeps the option private
    explicit = spec_of(tmp_path, search_space=FLOAT_SPACE, sampler={"name": "tpe", "constant_liar": False}, n_trials=4)
    assert not make_sampler(explicit)._constant_liar


# -- the worker: seeds, evaluation draws and the study's TensorBoard view (runs stubbed) ---------------
def stub_runs(monkeypatch, outcome) -> list[tuple[dict, Path, list[str]]]:
    """Replace each run by ``outcome(params, run_dir, attempt) -> (returncode, stderr, result | None)``,
    ``params`` with the run's seed as the worker hands them to the callback; returns the launches made,
    (params, run_dir, command) each."""
    import sweeps.worker as worker

    launches: list[tuple[dict, Path, list[str]]] = []

    def launch(command, run_dir, watch, interval):
        watch()
        params = json.loads(next(a.split("=", 1)[1] for a in command
                                 if a.startswith("--trainer.callbacks.init_args.params=")))
        launches.append((params, run_dir, command))
        code, stderr, result = outcome(params, run_dir, sum(p == params for p, _, _ in launches))
        with open(run_dir / "stderr.log", "a") as f:
            f.write(stderr)
        (run_dir / "progress.json").write_text(json.dumps({"step": 3}))
        if result is not None:
            (run_dir / "result.rank0.json").write_text(json.dumps({"step": 3, "pruned": False, **result}))
        return code

    monkeypatch.setattr(worker, "launch", launch)
    return launches


def nelbo(value: float) -> tuple[int, str, dict]:
    return 0, "", {"metrics": {"val/nelbo": value, "train/nelbo": value + 1.0}}


def arg(command: list[str], name: str) -> str | None:
    """The value of ``--name=value`` in ``command`` (the last one: later arguments win)."""
    values = [a.split("=", 1)[1] for a in command if a.startswith(f"--{name}=")]
    return values[-1] if values else None


def session_state(run_dir: Path) -> str | None:
    record = run_dir / SESSION_FILE
    return json.loads(record.read_text()).get("state") if record.is_file() else None


@pytest.mark.slow
def test_grid_worker_runs_each_configuration_and_seed_once_with_that_seed(tmp_path, monkeypatch):
    """schedule x seed [3, 5]: one run per point in the trial's own folder, seeded by the point's
    seed (initialisation and data order, training noise) after the configuration's arguments, every
    run with the study's evaluation draws."""
    launches = stub_runs(monkeypatch, lambda p, d, a: nelbo(len(p["schedule"]) + p[SEED_PARAM] / 10))
    spec = spec_of(tmp_path, search_space={"schedule": SPACE["schedule"]}, seeds=[3, 5], eval_draws=8)
    trials = run_worker(spec).get_trials()
    assert len(trials) == len(launches) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted((p["schedule"], p[SEED_PARAM]) for p, _, _ in launches) == sorted(
        itertools.product(["linear", "cosine", "poly2"], [3, 5]))
    for trial in trials:
        (params, run_dir, command), = [(p, d, c) for p, d, c in launches if p == trial.params]
        seed = trial.params[SEED_PARAM]
        assert run_dir == tmp_path / "study" / f"trial_{trial.number:04d}"  # no seed_<s> folder for one run
        assert arg(command, "seed_everything") == arg(command, "model.init_args.seed") == str(seed)
        assert arg(command, "eval_draws") == "8"
        assert command.index(f"--seed_everything={seed}") > command.index(f"--model.init_args.schedule={params['schedule']}")
        assert trial.value == len(params["schedule"]) + seed / 10 and SEEDS_ATTR not in trial.user_attrs


def test_a_proposing_sampler_runs_every_seed_in_one_trial_and_tells_their_mean(tmp_path, monkeypatch):
    """TPE with seeds [0, 1, 2]: each trial runs its configuration at each seed, one after another, in
    trial_<n>/seed_<s>; only the first seed reports for pruning; the trial's value is the mean over
    seeds, each seed's value in seed_values, and the report counts 3 finished seeds per configuration."""
    value = {0: 1.0, 1: 1.5, 2: 2.75}
    launches = stub_runs(monkeypatch, lambda p, d, a: nelbo(value[p[SEED_PARAM]] + p["dropout"]))
    spec = spec_of(tmp_path, search_space=FLOAT_SPACE, sampler={"name": "tpe", "seed": 0}, n_trials=2, repeats=3)
    trials = run_worker(spec).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 and len(launches) == 6
    for trial, runs in zip(trials, (launches[:3], launches[3:])):
        trial_dir = tmp_path / "study" / f"trial_{trial.number:04d}"
        assert [d for _, d, _ in runs] == [trial_dir / f"seed_{s}" for s in (0, 1, 2)]
        assert [arg(c, "seed_everything") for _, _, c in runs] == ["0", "1", "2"]
        assert [arg(c, "trainer.callbacks.init_args.metric") for _, _, c in runs] == ["val/nelbo", None, None]
        assert SEED_PARAM not in trial.params and all(p == {**trial.params, SEED_PARAM: s}
                                                      for (p, _, _), s in zip(runs, (0, 1, 2)))
        per_seed = {str(s): v + trial.params["dropout"] for s, v in value.items()}
        assert trial.user_attrs[SEEDS_ATTR] == pytest.approx(per_seed)
        assert trial.value == pytest.approx(sum(per_seed.values()) / 3)
        assert trial.user_attrs["metrics"]["train/nelbo"] == pytest.approx(trial.value + 1.0)
        assert all(session_state(d) == "COMPLETE" for _, d, _ in runs)
    stats = configuration_stats(seed_observations(optuna.load_study(study_name="s", storage=storage_url(spec)), spec),
                                "val/nelbo")
    assert list(stats["finished seeds"]) == [3, 3] and list(stats["seeds"]) == ["0 1 2", "0 1 2"]


def test_a_pruned_first_seed_prunes_the_trial(tmp_path, monkeypatch):
    launches = stub_runs(monkeypatch, lambda p, d, a: (0, "", {"pruned": True, "metrics": {"val/nelbo": 9.0}}))
    spec = spec_of(tmp_path, search_space=FLOAT_SPACE, sampler={"name": "tpe", "seed": 0}, n_trials=1, repeats=3)
    (trial,) = run_worker(spec).get_trials()
    assert trial.state == TrialState.PRUNED and SEEDS_ATTR not in trial.user_attrs
    assert [d.name for _, d, _ in launches] == ["seed_0"]  # the later seeds never run
    assert session_state(launches[0][1]) == "PRUNED"


def test_a_failed_seed_fails_the_trial_and_its_rerun_skips_the_finished_seeds(tmp_path, monkeypatch):
    """Seed 1 is killed (an infrastructure failure, requeued): the rerun resumes seed 1 in its folder
    without running seed 0 again. In the next trial seed 2 fails with a NaN: final, the trial FAIL."""
    def outcome(params, run_dir, attempt):
        first = run_dir.parent.name == "trial_0000"
        if params[SEED_PARAM] == 1 and first and attempt == 1:
            return -9, "", None
        if params[SEED_PARAM] == 2 and not first:
            return 1, "FloatingPointError: nan\n", None
        return nelbo(float(params[SEED_PARAM]))

    launches = stub_runs(monkeypatch, outcome)
    spec = spec_of(tmp_path, search_space=FLOAT_SPACE, sampler={"name": "tpe", "seed": 0}, n_trials=2, repeats=3)
    trials = run_worker(spec).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL]
    killed, rerun, nan = trials
    assert killed.user_attrs["failure"] == "infra" and killed.user_attrs["error"].startswith("seed 1: exit code -9")
    assert rerun.system_attrs["failed_trial"] == 0 and rerun.params == killed.params
    first = tmp_path / "study" / "trial_0000"
    assert [d for _, d, _ in launches if d.parent == first] == [first / "seed_0", first / "seed_1", first / "seed_1",
                                                                first / "seed_2"]
    assert rerun.value == pytest.approx(1.0) and rerun.user_attrs[SEEDS_ATTR] == {"0": 0.0, "1": 1.0, "2": 2.0}
    assert [session_state(first / f"seed_{s}") for s in (0, 1, 2)] == ["COMPLETE"] * 3
    assert nan.user_attrs["failure"] == "training" and "FloatingPointError: nan" in nan.user_attrs["error"]
    second = tmp_path / "study" / "trial_0002"
    assert [session_state(second / f"seed_{s}") for s in (0, 1, 2)] == ["COMPLETE", "COMPLETE", "FAIL"]


def session_groups(root: Path) -> dict[str, api_pb2.SessionGroup]:
    """The HPARAMS sessions of ``tensorboard --logdir root``, by run, as TensorBoard's backend lists them."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer().AddRunsFromDirectory(str(root))
    multiplexer.Reload()
    context = backend_context.Context(base_plugin.TBContext(
        logdir=str(root), multiplexer=multiplexer, data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(root))))
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100, aggregation_type=api_pb2.AGGREGATION_AVG,
                                               allowed_statuses=[api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS,
                                                                 api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING])
    groups = list_session_groups.Handler(tb_context.RequestContext(), context, "", request).run().session_groups
    return {g.name: g for g in groups}


def test_every_run_is_a_tensorboard_session_with_its_final_state(tmp_path, monkeypatch):
    """A grid of 2 schedules x seeds [0, 1]: one experiment at the study root, and a session per run
    with its parameters and seed, its state (a pruned and a failed run too) and final/* only where
    the run completed; a failure that is requeued ends no session until its rerun does."""
    def outcome(params, run_dir, attempt):
        if params == {"schedule": "cosine", SEED_PARAM: 0}:
            return 0, "", {"pruned": True, "metrics": {"val/nelbo": 4.0}}
        if params == {"schedule": "cosine", SEED_PARAM: 1}:
            return 1, "FloatingPointError: nan\n", None
        if params == {"schedule": "linear", SEED_PARAM: 1} and attempt == 1:
            assert session_state(run_dir) is None  # started, not ended
            return -9, "", None
        return nelbo(2.0 + params[SEED_PARAM])

    stub_runs(monkeypatch, outcome)
    space = {"schedule": {**SPACE["schedule"], "choices": ["linear", "cosine"]}}
    spec = spec_of(tmp_path, search_space=space, seeds=[0, 1], report_metrics=["train/nelbo"])
    trials = run_worker(spec).get_trials()
    sessions = session_groups(tmp_path / "study")
    assert len(sessions) == 4 == len(trials) - 1  # the killed attempt's rerun shares its folder
    state = {n: t for t in trials for n in [f"trial_{t.system_attrs.get('failed_trial', t.number):04d}"]}
    for name, group in sessions.items():
        trial = state[name]
        hparams = {k: v.string_value or v.number_value for k, v in group.hparams.items()}
        assert hparams == trial.params
        metrics = {m.name.tag: (m.value, m.training_step) for m in group.metric_values}
        assert metrics["trial/state"] == (STATE_CODES[trial.state.name], 3)
        if trial.state == TrialState.COMPLETE:
            assert metrics["final/val/nelbo"] == (trial.value, 3) and metrics["final/train/nelbo"] == (trial.value + 1, 3)
        else:
            assert "final/val/nelbo" not in metrics
    assert {t.state for t in state.values()} == {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}
    assert len(list((tmp_path / "study").glob("events.out.tfevents.*.study"))) == 1


# -- a real study --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_real_grid_study_with_two_seeds(tmp_path):
    """2 schedules x seeds [0, 1], tiny digits runs validated on 16 fixed examples with 2 draws: every
    configuration has 2 finished seeds in the report, its seeds differ (the seed reached the run), and
    each run's TensorBoard folder holds one HPARAMS entry (the study's) and final/* at the step measured."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from test_sweeps import sweep, write_study

    space = {"schedule": {"type": "categorical", "choices": ["linear", "cosine"], "arg": "model.init_args.schedule"}}
    study_file = write_study(tmp_path, search_space=space, seeds=[0, 1], eval_draws=2,
                             baseline={"schedule": "linear"})
    out = sweep("run", str(study_file), cwd=tmp_path).stdout
    spec = load_spec(study_file)
    study = optuna.load_study(study_name=spec.name, storage=storage_url(spec))
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    configurations = pd.read_csv(tmp_path / "study" / "configurations.csv", index_col=0)
    assert list(configurations["finished seeds"]) == [2, 2] and "| schedule=cosine |" in out
    by_seed = {(t.params["schedule"], t.params[SEED_PARAM]): t.value for t in trials}
    assert all(by_seed[(s, 0)] != by_seed[(s, 1)] for s in ("linear", "cosine"))
    for trial in trials:
        run = tmp_path / "study" / f"trial_{trial.number:04d}"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["seed_everything"] == config["model"]["init_args"]["seed"] == trial.params[SEED_PARAM]
        assert config["eval_draws"] == 2
        events = [(v.tag, e.step) for f in sorted(run.glob("events.out.tfevents.*"))
                  for e in EventFileLoader(str(f)).Load() for v in e.summary.value]
        assert [s for t, s in events if t == "final/val/nelbo"] == [4]
        assert events.count(("_hparams_/session_start_info", 0)) == 1  # md4 fit wrote no entry of its own
