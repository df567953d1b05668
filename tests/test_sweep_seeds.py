"""The seeds axis of a study, the evaluation draws of its objective, and proposals that differ across
workers sharing one storage (sweeps/spec.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import optuna
import pytest
import yaml

from sweeps.spec import (DEFAULT_EVAL_DRAWS, SEED_PARAM, StudyError, StudySpec, fingerprint, load_spec, make_sampler,
                         trial_seeds)
from sweeps.storage import open_storage

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
