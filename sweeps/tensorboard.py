"""One TensorBoard view of a study: ``tensorboard --logdir runs/sweeps/<study>``.

- The study root holds the HPARAMS experiment, written once (:func:`write_experiment`): every searched
  parameter with its domain (a categorical one as a discrete set, so its values can be filtered), the
  seed, and as metrics the objectives and report metrics (``final/<metric>``), the trial's state, the
  step it reached and its wall time.
- Each run of a trial (its folder, or one folder per seed when a trial runs several) is one session:
  :func:`write_session_start` before the run starts, :func:`write_session_end` once its outcome is
  final. ``final/<metric>`` is written only for a COMPLETE run, at the step it was measured, so a pruned
  run never shows its prune-step value as a final one; a failed run still appears, with its state.
- A custom-scalars layout puts the objective curve of every run of one configuration (all its seeds)
  on one chart: the session copies the run's curve to the tag ``by_configuration/<configuration>/<metric>``
  (:func:`copy_curves`) and adds its chart to the layout, which TensorBoard merges over runs.

Why the session's start is written before the run: TensorBoard keeps the first metadata of a tag in a
run, and the training run writes an HPARAMS entry of its own (``md4 fit``'s run record); the trial's
start comes first, so its hyperparameters are the session's. For the same reason the state is a metric
(``trial/state``: 0 complete, 1 pruned, 2 failed; a metric's last value counts), not a hyperparameter.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import summary_v2 as hp
from tensorboard.util import tensor_util
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from sweeps.spec import SEED_PARAM, Param, StudySpec, cli_value

FINAL_PREFIX = "final/"  # a metric's value at the end of a COMPLETE run
STATE_METRIC = "trial/state"
STEP_METRIC = "trial/step"
SECONDS_METRIC = "trial/seconds"
CURVE_PREFIX = "by_configuration/"
STATE_CODES = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2}
SESSION_STATUS = {"COMPLETE": api_pb2.STATUS_SUCCESS, "PRUNED": api_pb2.STATUS_SUCCESS,
                  "FAIL": api_pb2.STATUS_FAILURE}
EXPERIMENT_SUFFIX = ".study"  # the root's event file, so a worker can see that it is already written
SESSION_SUFFIX = ".session"


# -- values as TensorBoard takes them ------------------------------------------------------------
def _discrete_type(choices: list[Any]) -> type:
    """The one type TensorBoard's discrete domain allows: bool, float (numbers) or str (anything mixed)."""
    if all(isinstance(c, bool) for c in choices):
        return bool
    if all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices):
        return float
    return str


def hparam_value(param: Param, value: Any) -> bool | float | str:
    """``value`` of ``param`` as its HPARAMS column holds it (the type of its domain)."""
    if param.type == "categorical":
        kind = _discrete_type(param.choices)
        return cli_value(value) if kind is str else kind(value)
    return float(value)


def hparam_domain(param: Param) -> hp.Discrete | hp.IntInterval | hp.RealInterval:
    if param.type == "categorical":
        kind = _discrete_type(param.choices)
        return hp.Discrete([hparam_value(param, c) for c in param.choices], dtype=kind)
    if param.type == "int":
        return hp.IntInterval(int(param.low), int(param.high))
    return hp.RealInterval(float(param.low), float(param.high))


def configuration_label(spec: StudySpec, params: Mapping[str, Any]) -> str:
    """A configuration as text, ``name=value`` over the searched parameters (the seed left out)."""
    return ", ".join(f"{name}={cli_value(params[name])}" for name in spec.search_space if name in params)


def metric_names(spec: StudySpec) -> list[str]:
    """The metrics shown beside the parameters: the objectives, then the report metrics."""
    names = [o.metric for o in spec.objectives]
    return names + [m for m in spec.report_metrics if m not in names]


def curve_tag(label: str, metric: str) -> str:
    return f"{CURVE_PREFIX}{label}/{metric}"


# -- writing -------------------------------------------------------------------------------------
def _write(run_dir: Path, suffix: str, summaries: list[tuple[summary_pb2.Summary, int]]) -> None:
    """Append ``(summary, step)`` events to a new event file of the TensorBoard run ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(run_dir), filename_suffix=suffix)
    for summary, step in summaries:
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    writer.close()


def _scalar(tag: str, value: float) -> summary_pb2.Summary:
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))])


def experiment_summary(spec: StudySpec) -> summary_pb2.Summary:
    """The study's HPARAMS experiment: its columns and their domains."""
    hparams = [hp.HParam(name, hparam_domain(p)) for name, p in spec.search_space.items()]
    hparams.append(hp.HParam(SEED_PARAM, hp.Discrete([float(s) for s in spec.seeds])))
    metrics = [hp.Metric(f"{FINAL_PREFIX}{m}", display_name=m, description=f"{m} at the end of a COMPLETE run")
               for m in metric_names(spec)]
    metrics += [hp.Metric(STATE_METRIC, display_name="state (0 complete, 1 pruned, 2 failed)"),
                hp.Metric(STEP_METRIC, display_name="step reached"),
                hp.Metric(SECONDS_METRIC, display_name="wall time (s)")]
    return hp.hparams_config_pb(hparams, metrics)


def write_experiment(spec: StudySpec, study_dir: Path) -> bool:
    """Write the study's HPARAMS experiment into ``study_dir`` unless it is there already; whether it
    was written. Every worker calls it; the study file's fingerprint makes their experiments equal."""
    study_dir = Path(study_dir)
    if any(study_dir.glob(f"events.out.tfevents.*{EXPERIMENT_SUFFIX}")):
        return False
    _write(study_dir, EXPERIMENT_SUFFIX, [(experiment_summary(spec), 0)])
    return True


def session_hparams(spec: StudySpec, params: Mapping[str, Any], seed: int) -> dict[str, bool | float | str]:
    values = {name: hparam_value(p, params[name]) for name, p in spec.search_space.items() if name in params}
    return {**values, SEED_PARAM: float(seed)}


def layout_summary(spec: StudySpec, label: str) -> summary_pb2.Summary:
    """The custom-scalars chart of configuration ``label``: one per objective metric, every run (seed)
    of the configuration a line."""
    categories = [layout_pb2.Category(title=f"{metric} by configuration (all seeds)", chart=[layout_pb2.Chart(
        title=label, multiline=layout_pb2.MultilineChartContent(tag=[f"^{re.escape(curve_tag(label, metric))}$"]))])
        for metric in (o.metric for o in spec.objectives)]
    return custom_scalar_metadata_summary(layout_pb2.Layout(category=categories))


def custom_scalar_metadata_summary(layout: layout_pb2.Layout) -> summary_pb2.Summary:
    """``layout`` as the custom-scalars plugin reads it (TensorBoard's own writer of it needs TensorFlow)."""
    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(
        plugin_name=custom_scalar_metadata.PLUGIN_NAME))
    tensor = tensor_util.make_tensor_proto(layout.SerializeToString())
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=custom_scalar_metadata.CONFIG_SUMMARY_TAG, metadata=metadata, tensor=tensor)])


def session_end_summary(status: int) -> summary_pb2.Summary:
    """The HPARAMS session end with ``status`` (TensorBoard's own writer of it needs TensorFlow)."""
    data = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(
        status=status, end_time_secs=time.time()))
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=hparams_metadata.SESSION_END_INFO_TAG, metadata=hparams_metadata.create_summary_metadata(data),
        tensor=hparams_metadata.NULL_TENSOR)])


def write_session_start(spec: StudySpec, run_dir: Path, params: Mapping[str, Any], seed: int) -> None:
    """The session of one run (a configuration at one seed): its hyperparameters, and its chart in the
    custom-scalars layout. Before the run starts (see the module's docstring)."""
    start = hp.hparams_pb(session_hparams(spec, params, seed), trial_id=str(run_dir.name))
    _write(Path(run_dir), SESSION_SUFFIX, [(start, 0), (layout_summary(spec, configuration_label(spec, params)), 0)])


def write_session_end(spec: StudySpec, run_dir: Path, params: Mapping[str, Any], state: str, step: int | None,
                      seconds: float | None, metrics: Mapping[str, float] | None = None) -> None:
    """The final outcome of a run: ``state`` (COMPLETE, PRUNED or FAIL), the step it reached and its
    wall time at that step, ``final/<metric>`` there for a COMPLETE run only, the session status, and
    the objective curves copied under the configuration's tag (:func:`copy_curves`)."""
    run_dir, step = Path(run_dir), int(step or 0)
    label = configuration_label(spec, params)
    summaries = copy_curves(run_dir, [o.metric for o in spec.objectives], label)
    summaries += [(_scalar(STATE_METRIC, STATE_CODES[state]), step), (_scalar(STEP_METRIC, step), step)]
    if seconds is not None:
        summaries.append((_scalar(SECONDS_METRIC, seconds), step))
    if state == "COMPLETE":
        summaries += [(_scalar(f"{FINAL_PREFIX}{m}", v), step) for m, v in (metrics or {}).items()
                      if m in metric_names(spec)]
    summaries.append((session_end_summary(SESSION_STATUS[state]), step))
    _write(run_dir, SESSION_SUFFIX, summaries)


def copy_curves(run_dir: Path, metrics: list[str], label: str) -> list[tuple[summary_pb2.Summary, int]]:
    """The run's curves of ``metrics`` under ``by_configuration/<label>/<metric>``: a tag the runs of
    one configuration share, so that a chart (or the Scalars tab's card of that tag) shows their seeds
    together. A step logged twice (a resumed run repeats steps after its checkpoint) keeps its last value."""
    accumulator = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    tags = set(accumulator.Tags().get(event_accumulator.SCALARS, []))
    copied = []
    for metric in metrics:
        if metric in tags:
            by_step = {e.step: e.value for e in accumulator.Scalars(metric)}
            copied += [(_scalar(curve_tag(label, metric), v), s) for s, v in sorted(by_step.items())]
    return copied
