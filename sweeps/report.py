"""The results of a study: a per-trial table, per-configuration statistics over seeds, paired
differences against a baseline configuration (Markdown and CSV), and plots (PNG).

Seeds come in two forms, both read here:

- grid studies run one (configuration, seed) per trial: the seed is the categorical parameter
  ``seed`` in ``trial.params``;
- TPE/CMA-ES studies run a configuration's seeds inside one trial: ``trial.user_attrs["seed_values"]
  = {"0": v0, "1": v1, ...}`` (objective value per seed) and the trial's value is their mean.

A configuration is the searched parameters without ``seed``; a trial with neither form counts as one
run of seed ``-`` (before the seeds axis every trial used seed 0). The statistics are over seeds:
per configuration the mean, standard deviation and standard error of the objective over its finished
seeds; against the baseline (``baseline:`` in the study file, e.g. ``{schedule: linear}``) the
difference configuration - baseline on each seed that both finished, with a 95% interval
``mean +- t_{0.975, n-1} sd / sqrt(n)``. Pairing removes what a seed shares between configurations
(initialisation, data order), so it resolves smaller differences than two independent means would.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState
from scipy import stats

from lightning_md4.tables import format_cell, markdown_table
from sweeps.spec import StudySpec
from sweeps.worker import SURPLUS, counted_trials

SEED = "seed"  # a grid study's seed parameter
SEED_VALUES = "seed_values"  # a TPE/CMA-ES trial's user attribute: {str(seed): objective value}
NO_SEED = "-"  # the seed of a trial that names none
CONFIGURATION = "configuration"  # column: the configuration as text, e.g. "schedule=linear, dropout=0.0"
LEVEL = 0.95  # of the paired-difference interval
FLOAT_FORMAT = ".4g"


def result_rows(study: optuna.Study, spec: StudySpec) -> list[dict[str, Any]]:
    """One row per trial: state, parameters, objective values, report metrics, steps, duration, note."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS)]
    names = list(spec.search_space)
    if SEED not in names and any(SEED in t.params for t in trials):
        names.append(SEED)  # the seeds axis may be a parameter outside the searched ones
    rows = []
    for t in trials:
        metrics = t.user_attrs.get("metrics", {})
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name}
        row.update({name: t.params.get(name) for name in names})
        for i, obj in enumerate(spec.objectives):
            row[obj.metric] = t.values[i] if t.values else metrics.get(obj.metric)
        row.update({m: metrics.get(m) for m in spec.report_metrics})
        row["step"] = t.user_attrs.get("step")
        row["seconds"] = round(t.duration.total_seconds(), 1) if t.duration else None
        note = ""
        if (original := t.system_attrs.get("failed_trial")) is not None:
            note = f"rerun of trial {original}"
        elif t.state == TrialState.FAIL:
            error = t.user_attrs.get("error", "worker died (heartbeat lapsed)")
            note = error.strip().splitlines()[-1][:120] if error.strip() else error
        row["note"] = note
        rows.append(row)
    return rows


def trials_table(rows: list[dict[str, Any]]) -> str:
    """The per-trial Markdown table, one unpadded line per trial (the CLI prints it; tools grep it)."""
    return markdown_table(rows, floatfmt=".6g", pad=False) + "\n" if rows else "(no trials)\n"


def _seed_key(seed: Any) -> str:
    """A seed as text, the same in both forms: a grid trial's 0 (0.0 once pandas has put a NaN in
    the column) and a ``seed_values`` key "0"."""
    if isinstance(seed, (float, np.floating)) and float(seed).is_integer():
        return str(int(seed))
    return str(seed)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _objective_column(spec: StudySpec, i: int) -> str:
    """The column of objective ``i`` in ``study.trials_dataframe()``."""
    return f"values_{i}" if spec.multi_objective else "value"


def configuration_names(spec: StudySpec, trials: pd.DataFrame) -> list[str]:
    """The parameters that make a configuration: the searched ones (study-file order), then any other
    parameter the trials hold, without the seed."""
    held = [c.removeprefix("params_") for c in trials.columns if c.startswith("params_")]
    return [n for n in dict.fromkeys([*spec.search_space, *held]) if n != SEED and n in held]


def seed_observations(study: optuna.Study, spec: StudySpec) -> pd.DataFrame:
    """One row per (trial, seed) from ``study.trials_dataframe()``: columns ``number``, ``state``,
    ``configuration``, the configuration's parameters, ``seed`` and one column per objective metric.

    Only finished (COMPLETE) trials carry values: a pruned trial keeps its last intermediate value as
    its Optuna value, which is not a result over the whole run. Surplus trials and failed trials that
    were rerun are left out (the rerun counts instead), as for ``n_trials``.
    """
    trials = study.trials_dataframe()
    metrics = [o.metric for o in spec.objectives]
    if trials.empty:
        return pd.DataFrame(columns=["number", "state", CONFIGURATION, SEED, *metrics])
    counted = {t.number for t in counted_trials(study.get_trials(deepcopy=False))}
    trials = trials[trials["number"].isin(counted)]
    names = configuration_names(spec, trials)
    rows = []
    for _, trial in trials.iterrows():
        configuration = {n: trial[f"params_{n}"] for n in names if not _missing(trial[f"params_{n}"])}
        row = {"number": trial["number"], "state": trial["state"],
               CONFIGURATION: ", ".join(f"{n}={format_cell(v, '.6g')}" for n, v in configuration.items()),
               **configuration}
        finished = trial["state"] == TrialState.COMPLETE.name
        per_seed = trial.get(f"user_attrs_{SEED_VALUES}")
        if finished and isinstance(per_seed, dict):
            for seed, value in per_seed.items():
                values = value if isinstance(value, (list, tuple)) else [value]
                rows.append({**row, SEED: _seed_key(seed), **dict(zip(metrics, map(float, values)))})
        else:
            seed = trial.get(f"params_{SEED}")
            rows.append({**row, SEED: NO_SEED if _missing(seed) else _seed_key(seed),
                         **{m: trial[_objective_column(spec, i)] if finished else math.nan
                            for i, m in enumerate(metrics)}})
    return pd.DataFrame(rows)


def _seed_order(seed: str) -> tuple[int, float, str]:
    try:
        return (0, float(seed), seed)
    except ValueError:
        return (1, 0.0, seed)


def seed_values(observations: pd.DataFrame, metric: str) -> pd.DataFrame:
    """[configuration, seed] the metric of each finished seed (NaN where a seed did not finish).

    A (configuration, seed) run twice (a TPE configuration proposed again) is averaged: its runs
    share the seed, so they are not two independent seeds.
    """
    done = observations[np.isfinite(observations[metric].astype(float))]  # only finished seeds carry values
    values = done.pivot_table(index=CONFIGURATION, columns=SEED, values=metric, aggfunc="mean")
    order = [c for c in observations[CONFIGURATION].unique() if c in values.index]
    return values.reindex(index=order, columns=sorted(values.columns, key=_seed_order))


def configuration_stats(observations: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per configuration (in trial order): the finished seeds, the mean, standard deviation (n - 1)
    and standard error of ``metric`` over them, and the trials pruned, failed and not yet finished
    (in a TPE/CMA-ES study one trial holds all of a configuration's seeds)."""
    configurations = list(observations[CONFIGURATION].unique())
    values = seed_values(observations, metric).reindex(configurations)
    finished = values.count(axis=1)
    sd = values.std(axis=1, ddof=1)
    trials = observations.drop_duplicates("number")
    states = pd.crosstab(trials[CONFIGURATION], trials["state"]).reindex(configurations, fill_value=0)

    def count(*names: str) -> pd.Series:
        return sum((states[n] if n in states else 0 for n in names), pd.Series(0, index=configurations))

    return pd.DataFrame({
        "finished seeds": finished,
        "seeds": [" ".join(values.columns[row.notna()]) for _, row in values.iterrows()],
        "mean": values.mean(axis=1), "sd": sd, "se": sd / np.sqrt(finished),
        "pruned": count(TrialState.PRUNED.name), "failed": count(TrialState.FAIL.name),
        "running": count(TrialState.RUNNING.name, TrialState.WAITING.name),
    }, index=pd.Index(configurations, name=CONFIGURATION))


@dataclass(frozen=True)
class Paired:
    """A paired difference (candidate - baseline) over ``n`` common seeds; ``low``, ``high`` the
    interval ``mean +- t * se`` with ``t`` the t-distribution's (1 + level) / 2 quantile, n - 1 dof."""

    n: int
    unpaired: int
    mean: float
    sd: float
    se: float
    t: float
    low: float
    high: float


def paired_difference(candidate: pd.Series, baseline: pd.Series, level: float = LEVEL) -> Paired:
    """[seed] -> value for a configuration and the baseline; seeds that only one of them finished
    are left out (counted in ``unpaired``), since their difference would mix in the seed's effect."""
    candidate, baseline = candidate.dropna(), baseline.dropna()
    common = candidate.index.intersection(baseline.index)
    d = (candidate[common] - baseline[common]).to_numpy(dtype=float)
    n = len(d)
    unpaired = len(candidate) + len(baseline) - 2 * n
    if n < 2:
        mean = float(d.mean()) if n else math.nan
        return Paired(n, unpaired, mean, math.nan, math.nan, math.nan, math.nan, math.nan)
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    t = float(stats.t.ppf((1 + level) / 2, n - 1))
    mean = float(d.mean())
    return Paired(n, unpaired, mean, sd, se, t, mean - t * se, mean + t * se)


def verdict(p: Paired, direction: str, level: float = LEVEL) -> str:
    """The difference in words a reader can act on: resolved (and better or worse), within noise, or
    not enough common seeds."""
    if p.n < 2:
        return (f"not enough seeds: {p.n} in common with the baseline, an interval needs 2; "
                "run more seeds of both")
    interval = f"{level:.0%} interval [{p.low:.3g}, {p.high:.3g}]"
    if p.low <= 0 <= p.high:
        return f"within noise: the {interval} includes 0; more seeds needed"
    lower = p.high < 0
    better = lower == (direction == "minimize")
    return (f"{'lower' if lower else 'higher'} than the baseline by {abs(p.mean):.3g} +- {p.t * p.se:.3g}: "
            f"resolved ({'better' if better else 'worse'}; {interval})")


def find_baseline(observations: pd.DataFrame, baseline: dict[str, Any]) -> tuple[str | None, str]:
    """The configuration that matches every key of the study file's ``baseline``, or None and why."""
    configurations = observations.drop_duplicates(CONFIGURATION)
    found = [row[CONFIGURATION] for _, row in configurations.iterrows()
             if all(not _missing(row.get(name)) and bool(row.get(name) == value) for name, value in baseline.items())]
    if len(found) == 1:
        return found[0], ""
    what = f"{len(found)} configurations ({'; '.join(found)}); name more parameters" if found else "no configuration"
    return None, f"baseline {baseline} matches {what}"


def paired_table(observations: pd.DataFrame, metric: str, baseline: str, direction: str) -> pd.DataFrame:
    """Every other configuration against ``baseline``: the paired difference of ``metric``, its
    interval and the verdict."""
    values = seed_values(observations, metric)
    reference = values.loc[baseline] if baseline in values.index else pd.Series(dtype=float)
    rows = {}
    for configuration in observations[CONFIGURATION].unique():
        if configuration == baseline:
            continue
        candidate = values.loc[configuration] if configuration in values.index else pd.Series(dtype=float)
        p = paired_difference(candidate, reference)
        rows[configuration] = {"common seeds": p.n, "unpaired seeds": p.unpaired, "difference": p.mean,
                               "sd": p.sd, "se": p.se, "t": p.t, "low": p.low, "high": p.high,
                               "verdict": verdict(p, direction)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(CONFIGURATION)


def statistics_sections(observations: pd.DataFrame, spec: StudySpec) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """The Markdown of the statistics, and the per-configuration and paired tables (all objectives)."""
    if observations.empty:
        return "", pd.DataFrame(), pd.DataFrame()
    baseline = getattr(spec, "baseline", None)
    label, problem = find_baseline(observations, baseline) if baseline else (None, "")
    text, per_configuration, paired = [], [], []
    for objective in spec.objectives:
        metric = objective.metric
        table = configuration_stats(observations, metric)
        per_configuration.append(table.assign(metric=metric))
        text += [f"## {metric} ({objective.direction}) per configuration, over seeds\n",
                 markdown_table(table, index=True, floatfmt=FLOAT_FORMAT), "",
                 "sd: standard deviation over the finished seeds (n - 1); se = sd / sqrt(n). Pruned and failed "
                 "trials are counted, not averaged.\n"]
        if not baseline:
            text.append("No baseline configuration in the study file (`baseline:`), so no paired differences.\n")
            continue
        if label is None:
            text.append(f"No paired differences: {problem}.\n")
            continue
        differences = paired_table(observations, metric, label, objective.direction)
        paired.append(differences.assign(metric=metric, baseline=label))
        text += [f"## {metric}: paired difference against the baseline {label}\n",
                 markdown_table(differences, index=True, floatfmt=FLOAT_FORMAT), "",
                 f"difference: configuration - baseline on the same seed, mean over the seeds both finished "
                 f"(unpaired seeds are left out); low, high: the {LEVEL:.0%} interval mean +- t se, t the "
                 f"t-distribution's {(1 + LEVEL) / 2} quantile with n - 1 degrees of freedom.\n"]
    frames = (pd.concat(per_configuration) if per_configuration else pd.DataFrame(),
              pd.concat(paired) if paired else pd.DataFrame())
    return "\n".join(text), *frames


def write_report(study: optuna.Study, spec: StudySpec) -> str:
    """Write the report into the study folder; returns its Markdown and the plot notes.

    results.md: the per-trial table and the statistics; results.csv: the per-trial table;
    trials.csv: ``study.trials_dataframe()`` as is (every attribute); configurations.csv and
    differences.csv: the statistics; PNG plots. The per-trial Markdown table keeps one unpadded row
    per trial (``trials_table``) that the CLI prints and tools grep; the statistics tables are padded.
    """
    out = Path(spec.study_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = result_rows(study, spec)
    study.trials_dataframe().to_csv(out / "trials.csv", index=False)
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    observations = seed_observations(study, spec)
    statistics, per_configuration, paired = statistics_sections(observations, spec)
    per_configuration.to_csv(out / "configurations.csv")
    paired.to_csv(out / "differences.csv")
    report = f"# Study {spec.name}\n\n## Trials\n\n{trials_table(rows)}\n{statistics}"
    (out / "results.md").write_text(report)
    notes = write_plots(study, spec, out, observations)
    return report + "".join(f"\n{n}" for n in notes)

def plot_configuration_means(observations: pd.DataFrame, spec: StudySpec) -> np.ndarray:
    """Per objective, each configuration's mean over seeds with the standard error as error bar.
    Drawn with matplotlib directly: Optuna's plots show trials, not groups of trials."""
    import matplotlib.pyplot as plt

    tables = [(o.metric, configuration_stats(observations, o.metric).dropna(subset=["mean"]))
              for o in spec.objectives]
    if observations.empty or all(t.empty for _, t in tables):
        raise ValueError("no finished seeds")
    longest = max(len(t) for _, t in tables)
    figure, axes = plt.subplots(1, len(tables), squeeze=False, figsize=(6 * len(tables), 1.0 + 0.4 * longest))
    for ax, (metric, table) in zip(axes.flat, tables):
        # A single seed has no standard error: its bar is left out rather than drawn as zero.
        ax.errorbar(table["mean"], range(len(table)), xerr=table["se"].fillna(0), fmt="o", capsize=4)
        ax.set_yticks(range(len(table)), [f"{c} (n={n})" for c, n in zip(table.index, table["finished seeds"])])
        ax.invert_yaxis()
        ax.set_xlabel(f"{metric}: mean over seeds +- standard error")
    figure.tight_layout()
    return axes


def write_plots(study: optuna.Study, spec: StudySpec, out: Path, observations: pd.DataFrame) -> list[str]:
    """PNG plots: the per-configuration means with standard errors, each trial's intermediate values,
    parallel coordinates of the configuration parameters, and the optimisation history and parameter
    importances (or the Pareto front of a multi-objective study); a plot that cannot be drawn yet
    (e.g. importances from fewer than two finished trials) is skipped with a note instead of failing
    the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    first = spec.objectives[0].metric
    names = [c for c in observations.columns if c in configuration_names(spec, study.trials_dataframe())] or None
    # Several objectives: Optuna plots one target at a time; the parallel coordinates show the first.
    target = (lambda t: t.values[0]) if spec.multi_objective else None
    plots = {"configuration_means": lambda: plot_configuration_means(observations, spec),
             "intermediate_values": lambda: ovm.plot_intermediate_values(study),
             "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(study, params=names, target=target,
                                                                         target_name=first)}
    if spec.multi_objective:
        plots["pareto_front"] = lambda: ovm.plot_pareto_front(study, target_names=[o.metric for o in spec.objectives])
    else:
        plots["history"] = lambda: ovm.plot_optimization_history(study)
        plots["param_importances"] = lambda: ovm.plot_param_importances(study)
    notes = []
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = plot()
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            figure.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
            plt.close(figure)
            notes.append(f"plot: {out / f'{name}.png'}")
        except Exception as err:  # Optuna raises several types when a study is too small to plot
            plt.close("all")
            notes.append(f"plot {name} skipped: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return notes
