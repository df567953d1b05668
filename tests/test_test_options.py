"""Model options given to ``md4 validate``/``md4 test`` with a checkpoint: the evaluation options
(``eval_seed``, D3PM's ``exact_test``) take effect, any other that differs from the checkpoint's is
refused in one line, an equal one passes. LightningCLI alone would put a checkpoint file's
hyper-parameters over all of them without a word."""

from __future__ import annotations

import functools
import inspect
import re
import subprocess
from pathlib import Path

import pytest

from conftest import md4, one_line_error
from lightning_md4.cli import conflict_line, eval_options, flat_options, reconcile_options, with_options
from lightning_md4.modules.registry import methods

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits.yaml")
TINY_NET = ["--model.init_args.network.n_layers=1", "--model.init_args.network.d_model=32",
            "--model.init_args.network.n_heads=2", "--model.init_args.network.d_cond=16"]
# Small test and validation sets: 2 batches of 16 digits.
SMALL = ["--data.init_args.batch_size=16", "--trainer.limit_test_batches=2", "--trainer.limit_val_batches=2",
         "--trainer.enable_progress_bar=false"]


# -- the classification, in-process ----------------------------------------------------------------

BUILT = {"_class_path": "lightning_md4.modules.MD4", "vocab_size": 17, "seq_len": 64, "schedule": "cosine",
         "schedule_kwargs": None, "eval_seed": 0, "seed": 0,
         "network": {"n_layers": 1, "d_model": 32, "dropout": 0.1},
         "optim": {"lr": 1e-3, "betas": (0.9, 0.999)}}


def test_equal_options_need_nothing():
    saved = {**BUILT, "optim": {"lr": 1e-3, "betas": [0.9, 0.999]}}  # a list from YAML, a tuple from Python
    assert reconcile_options(BUILT, saved, flat_options(BUILT)) == ({}, [])


def test_evaluation_options_given_take_effect_and_the_others_are_refused():
    saved = {**BUILT, "eval_seed": 3, "schedule": "linear", "network": {**BUILT["network"], "n_layers": 2}}
    given = {"eval_seed", "schedule", "network.n_layers"}
    from_checkpoint, conflicts = reconcile_options(BUILT, saved, given)
    assert from_checkpoint == {}  # eval_seed: the given 0 stays
    assert conflicts == [("schedule", "cosine", "linear"), ("network.n_layers", 1, 2)]
    message = conflict_line("test", conflicts)
    assert "\n" not in message and "md4 test" in message
    assert "--model.init_args.schedule cosine differs from the checkpoint's linear" in message
    assert "--model.init_args.network.n_layers 1 differs from the checkpoint's 2" in message


def test_options_not_given_are_the_checkpoints():
    saved = {**BUILT, "eval_seed": 3, "seed": 5, "network": {**BUILT["network"], "dropout": 0.0}}
    from_checkpoint, conflicts = reconcile_options(BUILT, saved, given={"schedule", "network.n_layers"})
    assert conflicts == [] and from_checkpoint == {"eval_seed": 3, "seed": 5, "network.dropout": 0.0}
    rebuilt = with_options(BUILT, from_checkpoint)
    assert rebuilt["network"] == {"n_layers": 1, "d_model": 32, "dropout": 0.0} and rebuilt["seed"] == 5
    assert BUILT["network"]["dropout"] == 0.1  # a copy


def test_a_whole_option_given_covers_its_keys_and_a_dict_against_none_is_compared():
    saved = {**BUILT, "schedule_kwargs": {"clip_eps": 1e-4}, "network": {**BUILT["network"], "d_model": 64}}
    _, conflicts = reconcile_options(BUILT, saved, given={"network", "schedule_kwargs"})
    assert conflicts == [("schedule_kwargs", None, {"clip_eps": 1e-4}), ("network.d_model", 32, 64)]
    _, conflicts = reconcile_options({**BUILT, "schedule_kwargs": {"clip_eps": 1e-3}}, BUILT,
                                     given={"schedule_kwargs.clip_eps"})
    assert conflicts == [("schedule_kwargs", {"clip_eps": 1e-3}, None)]
    assert "null" in conflict_line("validate", conflicts)


def test_linked_lightning_and_one_sided_options_are_left_to_the_model():
    saved = {**BUILT, "_class_path": "lightning_md4.modules.md4.MD4", "vocab_size": 257, "seq_len": 32,
             "removed_option": 1}
    built = {**BUILT, "added_option": 2, "network": {**BUILT["network"], "added_field": True}}
    assert reconcile_options(built, saved, flat_options(built)) == ({}, [])


def test_evaluation_options_are_each_methods_own_options():
    """Each method declares its evaluation options (registry); md4 validate/test read the model's."""
    for method in methods():
        assert set(method.eval_options) <= set(inspect.signature(method.cls).parameters), method.name
        assert eval_options(method.cls) == method.eval_options
    assert {m.name: m.eval_options for m in methods() if m.name in ("MD4", "D3PM", "AR")} == {
        "AR": (), "D3PM": ("eval_seed", "exact_test"), "MD4": ("eval_seed",)}


# -- md4 test and validate on checkpoints, in subprocesses -----------------------------------------

def fit(run: Path, *extra: str) -> Path:
    md4("fit", "--config", DIGITS, f"--trainer.default_root_dir={run}", "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", *SMALL, *TINY_NET, *extra, cwd=run.parent)
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def md4_ckpt(tmp_path_factory) -> Path:
    """An MD4 digits checkpoint (cosine schedule, eval_seed 0) after 2 steps."""
    return fit(tmp_path_factory.mktemp("options") / "md4")


@pytest.fixture(scope="module")
def d3pm_ckpt(tmp_path_factory) -> Path:
    """A D3PM digits checkpoint with T = 10 steps (so exact_test is 10 network passes)."""
    return fit(tmp_path_factory.mktemp("options") / "d3pm", "--model=D3PM", "--model.init_args.T=10")


@functools.cache
def score(command: str, ckpt: Path, *extra: str) -> float:
    """The NELBO that ``md4 COMMAND --ckpt_path CKPT EXTRA`` prints (the same arguments as the fit)."""
    out = md4(command, "--config", DIGITS, f"--trainer.default_root_dir={ckpt.parent.parent / 'scored'}", *SMALL,
              *TINY_NET, *extra, "--ckpt_path", str(ckpt), cwd=ckpt.parent)
    return float(re.search(r"NELBO ([0-9.]+) nats/token", out.stdout).group(1))


@pytest.mark.slow
def test_eval_seed_given_to_test_changes_the_number(md4_ckpt):
    assert score("test", md4_ckpt, "--model.init_args.eval_seed=1") != score("test", md4_ckpt)


@pytest.mark.slow
def test_exact_test_given_to_a_d3pm_test_changes_the_number(d3pm_ckpt):
    d3pm = ("--model=D3PM", "--model.init_args.T=10")
    assert score("test", d3pm_ckpt, *d3pm, "--model.init_args.exact_test=true") != score("test", d3pm_ckpt, *d3pm)


@pytest.mark.slow
def test_options_equal_to_the_checkpoints_pass_beside_evaluation_options(md4_ckpt):
    # The config's schedule and a seed typed on the command line, both the checkpoint's.
    seeded = score("test", md4_ckpt, "--model.init_args.eval_seed=1")
    same = score("test", md4_ckpt, "--model.init_args.schedule=cosine", "--model.init_args.seed=0",
                 "--model.init_args.eval_seed=1")
    assert same == seeded != score("test", md4_ckpt)
    assert score("validate", md4_ckpt, "--model.init_args.eval_seed=1") != score("validate", md4_ckpt)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")  # pytest's own argv
def test_other_options_that_differ_from_the_checkpoint_are_refused_in_one_line(md4_ckpt, d3pm_ckpt):
    run = md4_ckpt.parent.parent
    common = ["--config", DIGITS, f"--trainer.default_root_dir={run}", *SMALL]

    def refused(*argv: str) -> str:  # in-process: the refusal comes before anything runs
        return one_line_error(list(argv))

    for command in ("test", "validate"):
        for ckpt in (str(md4_ckpt), "last"):
            message = refused(command, *common, *TINY_NET, "--model.init_args.schedule=linear", "--ckpt_path", ckpt)
            assert "--model.init_args.schedule linear differs from the checkpoint's cosine" in message
            assert f"md4 {command} scores the model the checkpoint holds" in message
    # A value from the config file (4 layers) is given as much as one typed.
    message = refused("test", *common, "--ckpt_path", str(md4_ckpt))
    assert "--model.init_args.network.n_layers 4 differs from the checkpoint's 1" in message
    # The config's method is MD4; the checkpoint holds a D3PM.
    assert "pass --model D3PM" in refused("test", *common, *TINY_NET, "--ckpt_path", str(d3pm_ckpt))
    # Not an evaluation option of D3PM either.
    message = refused("test", *common, *TINY_NET, "--model=D3PM", "--model.init_args.T=20", "--ckpt_path",
                      str(d3pm_ckpt))
    assert "--model.init_args.T 20 differs from the checkpoint's 10" in message


@pytest.mark.slow
def test_refusal_is_the_last_line_of_the_command(md4_ckpt):
    proc: subprocess.CompletedProcess = md4(
        "test", "--config", DIGITS, f"--trainer.default_root_dir={md4_ckpt.parent.parent / 'refused'}", *SMALL,
        *TINY_NET, "--model.init_args.network.dropout=0.0", "--ckpt_path", str(md4_ckpt), cwd=md4_ckpt.parent,
        check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "NELBO" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("md4: error: --model.init_args.network.dropout 0.0 differs from the checkpoint's 0.1")


@pytest.mark.slow
def test_options_given_nowhere_are_the_checkpoints(tmp_path_factory):
    """A checkpoint fitted with eval_seed 1, scored with no eval_seed option: the model is rebuilt
    with the checkpoint's value (not the class default 0), so it prints eval_seed 1's number."""
    seeded_fit = fit(tmp_path_factory.mktemp("options") / "seeded", "--model.init_args.eval_seed=1")
    assert score("test", seeded_fit) == score("test", seeded_fit, "--model.init_args.eval_seed=1") \
        != score("test", seeded_fit, "--model.init_args.eval_seed=0")
