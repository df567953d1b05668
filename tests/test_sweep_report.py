"""Sweep report statistics over seeds: per-configuration mean, sd and se, and the paired difference
against a baseline with its t interval, checked against hand computations on small fixed tables.

The studies are built in memory (``study.add_trial``), in both seed forms: a grid study's trial is one
(configuration, seed) with the seed a parameter; a TPE/CMA-ES trial runs a configuration's seeds
and holds their values in ``user_attrs["seed_values"]``.
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from sweeps.report import (Paired, configuration_stats, paired_difference, paired_table, seed_observations, verdict,
                           write_report)
from sweeps.spec import Param, StudySpec

SCHEDULES = ["linear", "cosine", "poly2"]
SEEDS = [0, 1, 2, 3, 4]
# val/nelbo per schedule and seed. linear is the baseline; cosine's seed 4 and linear's seed 0 have
# no partner, and cosine's seed 4 is far off, so an unpaired difference would move a lot.
# Seeds 1, 2, 3 are common: an unpaired seed sorts first (0 for linear) or last (4 for cosine).
NELBO = {"linear": {0: 2.00, 1: 1.95, 2: 1.93, 3: 1.90},
         "cosine": {1: 1.90, 2: 1.85, 3: 1.88, 4: 1.00},
         "poly2": {1: 1.85, 2: 1.81, 3: 1.79}}
# t_{0.975, 2} in closed form: with 2 degrees of freedom the t quantile is (2p - 1) / sqrt(2 p (1 - p)).
T_2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # 4.302652729749464

# Hand computations on NELBO (paired over seeds 1, 2, 3):
# cosine - linear = -0.05, -0.08, -0.02: mean -0.05, deviations 0, -0.03, 0.03, sd = sqrt(0.0018 / 2) = 0.03,
#   se = 0.03 / sqrt(3), interval -0.05 +- T_2 * se = [-0.1245, 0.0245]: includes 0 (within noise). With the
#   normal quantile 1.96 it would be [-0.0839, -0.0161] and wrongly resolved.
# poly2 - linear = -0.10, -0.12, -0.11: mean -0.11, sd = sqrt(0.0002 / 2) = 0.01, se = 0.01 / sqrt(3),
#   interval [-0.1348, -0.0852]: resolved, lower.
# linear alone over seeds 0, 1, 2, 3: mean 7.78 / 4 = 1.945, squared deviations sum to 0.0053, sd = sqrt(0.0053 / 3).
# poly2 alone: mean 5.45 / 3, squared deviations sum to 0.0028 / 1.5 = 0.0018667, sd = sqrt(0.0028 / 3).


def make_spec(tmp_path: Path, baseline: dict | None = {"schedule": "linear"}, direction: str = "minimize") -> StudySpec:
    spec = StudySpec(name="s", base_configs=[], study_dir=tmp_path / "study",
                     search_space={"schedule": Param(name="schedule", type="categorical", choices=SCHEDULES)})
    spec.objectives[0].direction = direction
    spec.baseline = baseline  # the study file's `baseline:` (read with getattr: the key may be absent)
    return spec


def grid_study(extra: bool = True) -> optuna.Study:
    """One trial per (schedule, seed); with ``extra`` poly2 also has a pruned seed 4 (whose Optuna value
    is its last intermediate value, 0.5) and a failed seed 0."""
    study = optuna.create_study()
    distributions = {"schedule": CategoricalDistribution(SCHEDULES), "seed": CategoricalDistribution(SEEDS)}
    for schedule, per_seed in NELBO.items():
        for seed, value in per_seed.items():
            study.add_trial(create_trial(params={"schedule": schedule, "seed": seed}, distributions=distributions,
                                         value=value, intermediate_values={1: value + 0.5, 2: value}))
    if extra:
        study.add_trial(create_trial(params={"schedule": "poly2", "seed": 4}, distributions=distributions,
                                     state=TrialState.PRUNED, value=0.5, intermediate_values={1: 0.5}))
        study.add_trial(create_trial(params={"schedule": "poly2", "seed": 0}, distributions=distributions,
                                     state=TrialState.FAIL))
    return study


def tpe_study() -> optuna.Study:
    """One trial per schedule running its seeds: the same numbers in the ``seed_values`` form."""
    study = optuna.create_study()
    distributions = {"schedule": CategoricalDistribution(SCHEDULES)}
    for schedule, per_seed in NELBO.items():
        study.add_trial(create_trial(params={"schedule": schedule}, distributions=distributions,
                                     value=sum(per_seed.values()) / len(per_seed),
                                     user_attrs={"seed_values": {str(s): v for s, v in per_seed.items()}}))
    study.add_trial(create_trial(params={"schedule": "poly2"}, distributions=distributions, state=TrialState.PRUNED,
                                 value=0.5, intermediate_values={1: 0.5}, user_attrs={"seed_values": {"4": 0.5}}))
    return study


def test_paired_difference_against_a_hand_computation():
    baseline = pd.Series({"0": 1.95, "1": 1.93, "2": 1.90})
    p = paired_difference(pd.Series({"0": 1.90, "1": 1.85, "2": 1.88}), baseline)
    se = 0.03 / math.sqrt(3)
    assert p.n == 3 and p.unpaired == 0
    assert p.mean == pytest.approx(-0.05, abs=1e-12)
    assert p.sd == pytest.approx(0.03, abs=1e-12)
    assert p.se == pytest.approx(se, abs=1e-12)
    assert p.t == pytest.approx(T_2, rel=1e-12)
    assert (p.low, p.high) == pytest.approx((-0.05 - T_2 * se, -0.05 + T_2 * se), abs=1e-12)
    assert (p.low, p.high) == pytest.approx((-0.12452413135251, 0.02452413135251), abs=1e-12)


def test_paired_difference_ignores_unpaired_seeds():
    """Seed 4 only in the candidate and seed 0 only in the baseline: the difference is over 1, 2, 3."""
    p = paired_difference(pd.Series(NELBO["cosine"]), pd.Series(NELBO["linear"]))
    assert (p.n, p.unpaired) == (3, 2)
    assert (p.mean, p.sd) == pytest.approx((-0.05, 0.03), abs=1e-12)


@pytest.mark.parametrize("make_study", [grid_study, tpe_study], ids=["grid seeds", "seed_values"])
def test_both_seed_forms_give_the_hand_statistics(tmp_path, make_study):
    observations = seed_observations(make_study(), make_spec(tmp_path))
    table = configuration_stats(observations, "val/nelbo")
    assert list(table.index) == ["schedule=linear", "schedule=cosine", "schedule=poly2"]
    linear, poly2 = table.loc["schedule=linear"], table.loc["schedule=poly2"]
    assert (linear["finished seeds"], linear["seeds"]) == (4, "0 1 2 3")
    assert linear["mean"] == pytest.approx(1.945, abs=1e-12)
    assert linear["sd"] == pytest.approx(math.sqrt(0.0053 / 3), abs=1e-12)
    assert linear["se"] == pytest.approx(math.sqrt(0.0053 / 3) / 2, abs=1e-12)
    # poly2's pruned trial (Optuna value 0.5) is counted, not averaged.
    assert (poly2["finished seeds"], poly2["pruned"]) == (3, 1)
    assert poly2["mean"] == pytest.approx(5.45 / 3, abs=1e-12)
    assert poly2["sd"] == pytest.approx(math.sqrt(0.0028 / 3), abs=1e-12)

    differences = paired_table(observations, "val/nelbo", "schedule=linear", "minimize")
    assert list(differences.index) == ["schedule=cosine", "schedule=poly2"]
    cosine, poly2 = differences.loc["schedule=cosine"], differences.loc["schedule=poly2"]
    assert (cosine["common seeds"], cosine["unpaired seeds"], poly2["common seeds"]) == (3, 2, 3)
    assert (cosine["difference"], cosine["low"], cosine["high"]) == pytest.approx(
        (-0.05, -0.05 - T_2 * 0.03 / math.sqrt(3), -0.05 + T_2 * 0.03 / math.sqrt(3)), abs=1e-12)
    assert (poly2["difference"], poly2["sd"], poly2["low"], poly2["high"]) == pytest.approx(
        (-0.11, 0.01, -0.11 - T_2 * 0.01 / math.sqrt(3), -0.11 + T_2 * 0.01 / math.sqrt(3)), abs=1e-12)


def test_failed_and_pruned_trials_are_counted_not_averaged(tmp_path):
    table = configuration_stats(seed_observations(grid_study(), make_spec(tmp_path)), "val/nelbo")
    poly2 = table.loc["schedule=poly2"]
    assert (poly2["finished seeds"], poly2["pruned"], poly2["failed"], poly2["running"]) == (3, 1, 1, 0)
    assert poly2["seeds"] == "1 2 3"
    assert poly2["mean"] == pytest.approx(5.45 / 3, abs=1e-12)
    assert table["failed"].sum() == 1 and table["pruned"].sum() == 1


def test_verdicts_in_words():
    observations = seed_observations(grid_study(), make_spec(Path("unused")))
    differences = paired_table(observations, "val/nelbo", "schedule=linear", "minimize")
    assert differences.loc["schedule=cosine", "verdict"] == (
        "within noise: the 95% interval [-0.125, 0.0245] includes 0; more seeds needed")
    assert differences.loc["schedule=poly2", "verdict"] == (
        "lower than the baseline by 0.11 +- 0.0248: resolved (better; 95% interval [-0.135, -0.0852])")
    # The same difference is worse when the objective is maximised.
    maximised = paired_table(observations, "val/nelbo", "schedule=linear", "maximize")
    assert maximised.loc["schedule=poly2", "verdict"].startswith("lower than the baseline by 0.11 +- 0.0248: "
                                                                  "resolved (worse")
    one = Paired(n=1, unpaired=3, mean=-0.2, sd=math.nan, se=math.nan, t=math.nan, low=math.nan, high=math.nan)
    assert verdict(one, "minimize").startswith("not enough seeds: 1 in common with the baseline")
    assert paired_difference(pd.Series({"0": 1.0, "1": 2.0}), pd.Series({"0": 1.5})).n == 1


def test_report_writes_markdown_csv_and_plots(tmp_path):
    spec = make_spec(tmp_path)
    text = write_report(grid_study(), spec)
    out = tmp_path / "study"
    per_configuration = pd.read_csv(out / "configurations.csv", index_col="configuration")
    assert per_configuration.loc["schedule=linear", "mean"] == pytest.approx(1.945, abs=1e-12)
    assert per_configuration.loc["schedule=poly2", "finished seeds"] == 3
    differences = pd.read_csv(out / "differences.csv", index_col="configuration")
    assert differences.loc["schedule=poly2", "verdict"].startswith("lower than the baseline by 0.11")
    assert differences.loc["schedule=cosine", "high"] == pytest.approx(-0.05 + T_2 * 0.03 / math.sqrt(3), abs=1e-12)
    assert len(pd.read_csv(out / "trials.csv")) == 13 and len(pd.read_csv(out / "results.csv")) == 13
    markdown = (out / "results.md").read_text()
    assert markdown in text
    assert "| trial | state | schedule | seed | val/nelbo | step | seconds | note |" in markdown
    assert "## val/nelbo: paired difference against the baseline schedule=linear" in markdown
    assert "within noise: the 95% interval [-0.125, 0.0245] includes 0; more seeds needed" in markdown
    for plot in ("configuration_means", "intermediate_values", "parallel_coordinate", "history"):
        assert (out / f"{plot}.png").stat().st_size > 0, plot


def test_report_says_why_there_are_no_differences(tmp_path):
    assert "No baseline configuration in the study file" in write_report(grid_study(), make_spec(tmp_path, None))
    text = write_report(grid_study(), make_spec(tmp_path, {"schedule": "geometric"}))
    assert "No paired differences: baseline {'schedule': 'geometric'} matches no configuration" in text


def test_a_configuration_proposed_twice_counts_each_seed_once(tmp_path):
    """TPE may propose poly2 again: its seeds rerun, and a rerun seed is not a new independent seed
    (on the CPU it is bit-identical), so the two runs of seed 1 are averaged into one value."""
    study = tpe_study()
    distributions = {"schedule": CategoricalDistribution(SCHEDULES)}
    study.add_trial(create_trial(params={"schedule": "poly2"}, distributions=distributions, value=1.84,
                                 user_attrs={"seed_values": {"1": 1.87, "5": 1.81}}))
    table = configuration_stats(seed_observations(study, make_spec(tmp_path)), "val/nelbo")
    poly2 = table.loc["schedule=poly2"]
    # seeds 1: (1.85 + 1.87) / 2 = 1.86, 2: 1.81, 3: 1.79, 5: 1.81; mean 7.27 / 4
    assert (poly2["finished seeds"], poly2["seeds"]) == (4, "1 2 3 5")
    assert poly2["mean"] == pytest.approx(7.27 / 4, abs=1e-12)
