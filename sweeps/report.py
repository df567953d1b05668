"""The results of a study: a table (printed, CSV, Markdown) and Optuna's plots (PNG)."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from sweeps.spec import StudySpec
from sweeps.worker import SURPLUS


def result_rows(study: optuna.Study, spec: StudySpec) -> list[dict[str, Any]]:
    """One row per trial: state, parameters, objective values, report metrics, steps, duration, note."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(SURPLUS):
            continue
        metrics = t.user_attrs.get("metrics", {})
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name}
        row.update({name: t.params.get(name) for name in spec.search_space})
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


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(study: optuna.Study, spec: StudySpec) -> str:
    """Write ``results.csv``, ``results.md`` and the plots into the study folder; returns the table."""
    out = Path(spec.study_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = result_rows(study, spec)
    table = markdown_table(rows)
    (out / "results.md").write_text(f"# Study {spec.name}\n\n{table}")
    with open(out / "results.csv", "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    notes = write_plots(study, spec, out)
    return table + "".join(f"\n{n}" for n in notes)


def write_plots(study: optuna.Study, spec: StudySpec, out: Path) -> list[str]:
    """Optimisation history and parameter importances (or the Pareto front of a multi-objective
    study) as PNG files; a plot Optuna cannot draw yet (e.g. importances from fewer than two
    finished trials) is skipped with a note instead of failing the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    if spec.multi_objective:
        names = [o.metric for o in spec.objectives]
        plots = {"pareto_front": lambda: ovm.plot_pareto_front(study, target_names=names)}
    else:
        plots = {"history": lambda: ovm.plot_optimization_history(study),
                 "param_importances": lambda: ovm.plot_param_importances(study)}
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
            notes.append(f"plot {name} skipped: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return notes
