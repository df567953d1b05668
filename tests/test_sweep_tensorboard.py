"""One TensorBoard view of a study (sweeps/tensorboard.py), read back through TensorBoard's own
HPARAMS and custom-scalars backends, as ``tensorboard --logdir runs/sweeps/<study>`` shows it."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml
from tensorboard import context as tb_context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins import base_plugin
from tensorboard.plugins.custom_scalar import custom_scalars_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from torch.utils.tensorboard.summary import hparams as torch_hparams

from sweeps import tensorboard as stb
from sweeps.spec import load_spec

pytestmark = pytest.mark.slow  # each test's study view sleeps 4 s (event files are named by the second)

ROOT = Path(__file__).resolve().parents[1]
BASE = [str(ROOT / "configs" / "digits.yaml")]
SPACE = {"schedule": {"type": "categorical", "choices": ["linear", "cosine"], "arg": "model.init_args.schedule"},
         "dropout": {"type": "categorical", "choices": [0.0, 0.05], "arg": "model.init_args.network.dropout"},
         "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True, "arg": "model.init_args.optim.lr"}}
# (run, parameters, seed, state, step reached, val/nelbo at steps 125 and 250 as far as it got)
RUNS = [("trial_0000", {"schedule": "linear", "dropout": 0.0, "lr": 1e-3}, 0, "COMPLETE", 250, [2.0, 1.5]),
        ("trial_0001", {"schedule": "linear", "dropout": 0.0, "lr": 1e-3}, 1, "COMPLETE", 250, [2.1, 1.6]),
        ("trial_0002", {"schedule": "cosine", "dropout": 0.05, "lr": 1e-3}, 0, "PRUNED", 125, [3.0]),
        ("trial_0003", {"schedule": "cosine", "dropout": 0.05, "lr": 1e-3}, 1, "FAIL", 130, [2.9])]


def training_run(run_dir: Path, curve: list[float]) -> None:
    """What ``md4 fit`` writes into a trial's folder: its own HPARAMS entry (a successful session of
    other columns), then val/nelbo at each validation."""
    writer = EventFileWriter(str(run_dir))
    for summary in torch_hparams({"method": "MD4"}, {"val/nelbo": 0.0}):
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))
    for step, value in zip((125, 250), curve):
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=stb._scalar("val/nelbo", value)))
    writer.close()


@pytest.fixture
def study_view(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base_configs": BASE, "search_space": SPACE, "n_trials": 2,
                                    "sampler": {"name": "tpe"}, "seeds": [0, 1], "report_metrics": ["train/nelbo"]}, sort_keys=False))
    spec, root = load_spec(path), tmp_path / "study"
    assert stb.write_experiment(spec, root) and not stb.write_experiment(spec, root)  # once per study
    for run, params, seed, state, step, curve in RUNS:
        stb.write_session_start(spec, root / run, params, seed)
        time.sleep(1.01)  # event files are named by the second they were opened in
        training_run(root / run, curve)
        stb.write_session_end(spec, root / run, params, state, step, 60.0 + seed,
                              {"val/nelbo": curve[-1], "train/nelbo": 1.0, "other": 5.0})
    multiplexer = plugin_event_multiplexer.EventMultiplexer().AddRunsFromDirectory(str(root))
    multiplexer.Reload()
    context = base_plugin.TBContext(logdir=str(root), multiplexer=multiplexer,
                                    data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(root)))
    return spec, root, context


def test_one_hparams_experiment_with_every_column_and_its_domain(study_view):
    _, root, context = study_view
    experiment = get_experiment.Handler(tb_context.RequestContext(), backend_context.Context(context), "",
                                        api_pb2.GetExperimentRequest()).run()
    infos = {h.name: h for h in experiment.hparam_infos}
    assert set(infos) == {"schedule", "dropout", "lr", "seed"}  # not the training run's own "method"
    assert [v.string_value for v in infos["schedule"].domain_discrete.values] == ["cosine", "linear"]
    assert [v.number_value for v in infos["dropout"].domain_discrete.values] == [0.0, 0.05]
    assert [v.number_value for v in infos["seed"].domain_discrete.values] == [0.0, 1.0]
    assert (infos["lr"].domain_interval.min_value, infos["lr"].domain_interval.max_value) == (1e-4, 1e-2)
    assert [m.name.tag for m in experiment.metric_infos] == ["final/val/nelbo", "final/train/nelbo", "trial/state",
                                                             "trial/step", "trial/seconds"]
    assert len(list(root.glob("events.out.tfevents.*"))) == 1


def test_every_run_is_a_session_with_its_state_step_and_final_values_where_measured(study_view):
    _, _, context = study_view
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100, aggregation_type=api_pb2.AGGREGATION_AVG,
                                               allowed_statuses=[api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS,
                                                                 api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING])
    groups = list_session_groups.Handler(tb_context.RequestContext(), backend_context.Context(context), "",
                                         request).run().session_groups
    sessions = {g.name: g for g in groups}
    assert set(sessions) == {run for run, *_ in RUNS}  # the failed and the pruned run too
    for run, params, seed, state, step, curve in RUNS:
        group = sessions[run]
        hparams = {k: v.string_value or v.number_value for k, v in group.hparams.items()}
        assert hparams == {**params, "seed": seed}
        metrics = {m.name.tag: (m.value, m.training_step) for m in group.metric_values}
        assert metrics["trial/state"] == (stb.STATE_CODES[state], step)
        assert metrics["trial/step"] == (step, step) and metrics["trial/seconds"] == (60.0 + seed, step)
        if state == "COMPLETE":
            assert metrics["final/val/nelbo"] == (pytest.approx(curve[-1]), step)
            assert metrics["final/train/nelbo"] == (1.0, step)
        else:  # a pruned run's last value is not a final one
            assert "final/val/nelbo" not in metrics and "final/train/nelbo" not in metrics


def test_custom_scalars_put_the_seeds_of_a_configuration_on_one_chart(study_view):
    spec, _, context = study_view
    layout = json.loads(custom_scalars_plugin.CustomScalarsPlugin(context).layout_impl(tb_context.RequestContext(), ""))
    (category,) = layout["category"]
    assert category["title"] == "val/nelbo by configuration (all seeds)"
    charts = {c["title"]: c["multiline"]["tag"] for c in category["chart"]}
    assert set(charts) == {"schedule=linear, dropout=0.0, lr=0.001", "schedule=cosine, dropout=0.05, lr=0.001"}
    multiplexer = context.multiplexer
    for title, (pattern,) in charts.items():
        lines = {run: [(e.step, e.tensor_proto) for e in multiplexer.Tensors(run, tag)]
                 for run, tags in multiplexer.Runs().items() for tag in tags["tensors"] if re.search(pattern, tag)}
        expected = {run: curve for run, params, _, _, _, curve in RUNS if stb.configuration_label(spec, params) == title}
        assert set(lines) == set(expected)  # every seed of the configuration, no other run
        for run, curve in expected.items():
            assert [s for s, _ in lines[run]] == [125, 250][:len(curve)]
            assert [v.float_val[0] for _, v in lines[run]] == pytest.approx(curve)
