"""Study files checked before anything runs: one-line errors naming the key, ``md4-sweep check``,
the study-file fingerprint, storage URLs that keep their secrets, and the objective-metric check.

In-process and fast, except the ``check`` tests, which build ``md4 fit --print_config`` in
subprocesses (a few seconds each).
"""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import yaml

import sweeps.worker
from sweeps.cli import check, main
from sweeps.spec import (FINGERPRINT_ATTR, StudyError, check_fingerprint, check_objective_metric, fingerprint,
                         load_spec, redact_secrets, redact_url, resolve_storage)

ROOT = Path(__file__).resolve().parents[1]
BASE = [str(ROOT / "configs" / "digits.yaml"), str(ROOT / "sweeps" / "studies" / "tiny_digits.yaml")]
DROPOUT = {"type": "categorical", "choices": [0.05, 0.0], "arg": "model.init_args.network.dropout"}
SECRET = "s3cr3t-pa55"


def write_study(tmp_path: Path, name: str = "s", **overrides) -> Path:
    study = {"name": name, "base_configs": BASE, "args": ["--trainer.accelerator=cpu"],
             "search_space": {"dropout": DROPOUT}, "sampler": {"name": "grid"}, "pruner": {"name": "none"},
             "study_dir": str(tmp_path / "study"), "launcher": {"kind": "python", "devices": 1}}
    study.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def run_cli_error(capsys, monkeypatch, *argv: str) -> str:
    """``md4-sweep`` with ``argv``, which must fail as a bad study file: exit 2, one line on stderr,
    before the worker opens the study."""
    def touched(*args, **kwargs):
        raise AssertionError("the study was opened")

    monkeypatch.setattr(sweeps.worker, "run_worker", touched)
    monkeypatch.setattr(sweeps.worker, "open_study", touched)
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("md4-sweep: error: "), err
    return err.strip()


# -- one line per bad value ----------------------------------------------------------------------
TPE = {"sampler": {"name": "tpe"}, "search_space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}
BAD_VALUES = [
    ("args", {"args": "--trainer.accelerator=cpu"}),  # a string would be split into characters
    ("n_trials", {**TPE, "n_trials": "5"}),
    ("n_trials", {**TPE, "n_trials": 0}),
    ("heartbeat.grace_period", {"heartbeat": {"interval": 60, "grace_period": 60}}),
    ("heartbeat.interval", {"heartbeat": {"interval": "1m", "grace_period": 180}}),
    ("launcher.devices", {"launcher": {"kind": "python", "devices": 0}}),
    ("launcher.ddp_timeout_s", {"launcher": {"kind": "python", "ddp_timeout_s": -1}}),
    ("launcher.kind", {"launcher": {"kind": "mpirun"}}),
    ("max_retry", {"max_retry": -1}),
    ("limits.wall_clock_s", {"limits": {"wall_clock_s": 0}}),
    ("limits.no_progress_s", {"limits": {"no_progress_s": -60}}),
    ("limits.kill_grace_s", {"limits": {"kill_grace_s": "30s"}}),
    ("limits", {"limits": {"wall_clock": 3600}}),  # unknown key
    ("failures.max_consecutive", {"failures": {"max_consecutive": 0}}),
    ("failures.max_infra_retries", {"failures": {"max_infra_retries": -1}}),
    ("failures.max_consecutive", {"failures": {"max_consecutive": 2.5}}),
    ("search_space.lr.low", {**TPE, "n_trials": 3,  # YAML reads 1e-4 without a dot as a string
                             "search_space": {"lr": {"type": "float", "low": "1e-4", "high": 1e-2}}}),
    ("search_space.s.args.linear", {"search_space": {"s": {"type": "categorical", "choices": ["linear"],
                                                           "args": {"linear": "--model.init_args.schedule=linear"}}}}),
    ("search_space.n.low", {**TPE, "n_trials": 3, "search_space": {"n": {"type": "int", "low": 1.5, "high": 4}}}),
    ("objectives[0].direction", {"objectives": [{"metric": "val/nelbo", "direction": "min"}]}),
    ("objectives", {"objectives": "val/nelbo"}),
    ("report_metrics", {"report_metrics": "val/nelbo"}),
    ("sampler", {**TPE, "n_trials": 3, "sampler": {"name": "tpe", "n_startup": 3}}),
    ("base_configs[1]", {"base_configs": [BASE[0], "missing.yaml"]}),
    ("storage", {"storage": "env:1ABC"}),
    ("baseline.dropout", {"baseline": {"dropout": 0.5}}),
    ("baseline.schedule", {"baseline": {"schedule": "linear"}}),
]


@pytest.mark.parametrize("key,overrides", BAD_VALUES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD_VALUES)])
def test_bad_value_is_one_line_naming_the_key_before_any_storage(tmp_path, capsys, monkeypatch, key, overrides):
    path = write_study(tmp_path, **overrides)
    err = run_cli_error(capsys, monkeypatch, "run", str(path))
    assert err.startswith(f"md4-sweep: error: {path}: {key}: "), err
    assert not (tmp_path / "study").exists()  # the default SQLite storage was never opened
    with pytest.raises(StudyError, match=f"^{re.escape(f'{path}: {key}: ')}"):
        load_spec(path)


def test_unset_storage_variable_is_an_error_before_any_storage(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MD4_TEST_STORAGE", raising=False)
    path = write_study(tmp_path, storage="env:MD4_TEST_STORAGE")
    err = run_cli_error(capsys, monkeypatch, "run", str(path))
    assert err == f"md4-sweep: error: {path}: storage: environment variable MD4_TEST_STORAGE (storage: env:MD4_TEST_STORAGE) " \
                  "is not set"
    assert not (tmp_path / "study").exists()


def test_new_sections_parse_into_typed_fields(tmp_path):
    spec = load_spec(write_study(tmp_path, limits={"wall_clock_s": 3600, "no_progress_s": 600.5},
                                 failures={"max_consecutive": 2}, launcher={"kind": "torchrun", "devices": 2,
                                                                            "ddp_timeout_s": 120}))
    assert (spec.limits.wall_clock_s, spec.limits.no_progress_s, spec.limits.kill_grace_s) == (3600.0, 600.5, 30.0)
    assert isinstance(spec.limits.wall_clock_s, float)
    assert (spec.failures.max_consecutive, spec.failures.max_infra_retries) == (2, 3)
    assert (spec.launcher.kind, spec.launcher.devices, spec.launcher.ddp_timeout_s) == ("torchrun", 2, 120)
    assert load_spec(write_study(tmp_path, baseline={"dropout": 0.0})).baseline == {"dropout": 0.0}
    default = load_spec(write_study(tmp_path))
    assert (default.limits.wall_clock_s, default.limits.no_progress_s) == (None, None)
    assert default.launcher.ddp_timeout_s == 600 and default.args == ["--trainer.accelerator=cpu"]


# -- md4-sweep check -----------------------------------------------------------------------------
@pytest.mark.slow
def test_check_names_the_first_grid_point_that_does_not_build(tmp_path):
    # Point 0 builds; point 1 misspells an option, which only md4 fit's parser can tell.
    space = {"schedule": {"type": "categorical", "choices": ["linear", "cosine"],
                          "args": {"linear": ["--model.init_args.schedule=linear"],
                                   "cosine": ["--model.init_args.schedul=cosine"]}}}
    path = write_study(tmp_path, search_space=space)
    with pytest.raises(StudyError) as err:
        check(load_spec(path), str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: search_space: point 1 {{'schedule': 'cosine'}} does not build: md4: error:")
    assert "MD4 has no option schedul" in message and "\n" not in message


@pytest.mark.slow
def test_check_passes_on_a_shipped_study():
    study = ROOT / "sweeps" / "studies" / "dropout.yaml"
    assert check(load_spec(study), str(study)) == f"{study}: 3 grid points build (md4 fit --print_config)"


@pytest.mark.parametrize("study", ["dropout.yaml", "schedules.yaml", "variance.yaml"])
def test_shipped_studies_parse(study):
    spec = load_spec(ROOT / "sweeps" / "studies" / study)
    assert spec.check_points() == spec.grid() and len(spec.grid()) * len(spec.seeds) == spec.n_trials


def test_check_points_of_other_samplers_are_every_choice_and_both_ends(tmp_path):
    space = {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
             "layers": {"type": "int", "low": 1, "high": 6, "step": 2},
             "schedule": {"type": "categorical", "choices": ["linear", "cosine", "geometric"]}}
    spec = load_spec(write_study(tmp_path, search_space=space, sampler={"name": "tpe"}, n_trials=10))
    first = {"lr": 1e-4, "layers": 1, "schedule": "linear"}
    assert spec.check_points() == [first, {**first, "lr": 1e-2}, {**first, "layers": 5},
                                   {**first, "schedule": "cosine"}, {**first, "schedule": "geometric"}]


# -- fingerprint ---------------------------------------------------------------------------------
def test_fingerprint_ignores_formatting_and_where_the_study_runs(tmp_path):
    spec = load_spec(write_study(tmp_path))
    # The same study written in flow style, with a comment, defaults spelt out and another launcher.
    same = tmp_path / "same.yaml"
    same.write_text("# same study\n" + yaml.safe_dump(
        {"search_space": {"dropout": DROPOUT}, "name": "s", "base_configs": BASE, "args": ["--trainer.accelerator=cpu"],
         "sampler": {"name": "grid"}, "pruner": {"name": "none"}, "max_retry": 2, "heartbeat": {"interval": 60},
         "launcher": {"kind": "torchrun", "devices": 4}, "study_dir": str(tmp_path / "elsewhere")},
        default_flow_style=True))
    assert fingerprint(load_spec(same)) == fingerprint(spec)
    assert len(fingerprint(spec)) == 64


def test_worker_with_an_edited_study_file_cannot_join(tmp_path):
    study = optuna.create_study(study_name="s")
    check_fingerprint(study, load_spec(write_study(tmp_path)))
    assert study.user_attrs[FINGERPRINT_ATTR] == fingerprint(load_spec(write_study(tmp_path)))
    check_fingerprint(study, load_spec(write_study(tmp_path)))  # the same file joins
    edited = write_study(tmp_path, args=["--trainer.accelerator=cpu", "--trainer.max_steps=10"],
                         search_space={"dropout": {**DROPOUT, "choices": [0.05, 0.1]}})
    with pytest.raises(StudyError) as err:
        check_fingerprint(study, load_spec(edited))
    message = str(err.value)
    assert "(differs in: args[1], search_space.dropout.choices[1])" in message
    assert "restore the file" in message and "new study" in message


def test_an_edited_base_config_changes_the_fingerprint(tmp_path):
    base = tmp_path / "tiny.yaml"
    base.write_text((ROOT / "sweeps" / "studies" / "tiny_digits.yaml").read_text())
    study = optuna.create_study(study_name="s")
    check_fingerprint(study, load_spec(write_study(tmp_path, base_configs=[BASE[0], str(base)])))
    base.write_text(base.read_text().replace("max_steps: 250", "max_steps: 500"))
    with pytest.raises(StudyError, match=r"\(differs in: base_configs\[1\]\)"):
        check_fingerprint(study, load_spec(write_study(tmp_path, base_configs=[BASE[0], str(base)])))


# -- secrets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("url,redacted", [
    (f"postgresql://sweeper:{SECRET}@db.cluster:5432/optuna", "postgresql://sweeper:***@db.cluster:5432/optuna"),
    (f"mysql+pymysql://u:{SECRET}@h/db?charset=utf8mb4", "mysql+pymysql://u:***@h/db?charset=utf8mb4"),
    (f"postgresql://h/db?user=u&password={SECRET}", "postgresql://h/db?user=u&password=***"),
    ("postgresql://sweeper@db.cluster/optuna", "postgresql://sweeper@db.cluster/optuna"),
    ("sqlite:////shared/study.db", "sqlite:////shared/study.db"),
    ("journal:/shared/study.log", "journal:/shared/study.log"),
])
def test_redact_url(url, redacted):
    assert redact_url(url) == redacted
    assert redact_secrets(f"study in {url} failed") == f"study in {redacted} failed"


def test_a_password_in_the_storage_url_is_refused_and_never_printed(tmp_path, capsys, monkeypatch):
    url = f"postgresql://sweeper:{SECRET}@db.cluster/optuna"
    for argv in (["run", str(write_study(tmp_path, "in_file", storage=url))],
                 ["run", str(write_study(tmp_path, "on_command_line")), "--storage", url]):
        err = run_cli_error(capsys, monkeypatch, *argv)
        assert SECRET not in err
        assert "storage: the URL postgresql://sweeper:***@db.cluster/optuna holds a password" in err
        assert "storage: env:" in err


def test_storage_from_the_environment_stays_out_of_the_spec_and_the_study(tmp_path, monkeypatch):
    url = f"postgresql://sweeper:{SECRET}@db.cluster/optuna"
    monkeypatch.setenv("MD4_TEST_STORAGE", url)
    spec = load_spec(write_study(tmp_path, storage="env:MD4_TEST_STORAGE"))
    assert spec.storage == "env:MD4_TEST_STORAGE" and resolve_storage(spec.storage) == url
    assert resolve_storage("sqlite:////x/study.db") == "sqlite:////x/study.db"
    study = optuna.create_study(study_name="s")
    check_fingerprint(study, spec)
    assert SECRET not in repr(spec) and SECRET not in repr(study.user_attrs)


# -- objective metric ----------------------------------------------------------------------------
def test_misspelt_objective_metric_is_one_line_listing_the_logged_ones():
    logged = {"val/nelbo": 1.9, "train/nelbo": 2.0, "val/bpt": 2.7}
    check_objective_metric("val/nelbo", logged)
    with pytest.raises(StudyError) as err:
        check_objective_metric("val/nelb", logged)
    assert str(err.value) == ("objectives: metric 'val/nelb' was not logged at the first validation; "
                              "logged: train/nelbo, val/bpt, val/nelbo")
