"""The `md4` command end to end, in subprocesses, on small data the tests make."""

from __future__ import annotations

import hashlib
import signal
import time
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import md4, md4_command, one_line_error
from lightning_md4.commands import LINE_BREAK_MARK

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits.yaml")
TINY_NET = ["--model.init_args.network.n_layers=1", "--model.init_args.network.d_model=32",
            "--model.init_args.network.n_heads=2", "--model.init_args.network.d_cond=16"]

pytestmark = pytest.mark.slow  # subprocesses and training runs, seconds to a minute each


def fit_digits(run: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    return md4("fit", "--config", DIGITS, f"--trainer.default_root_dir={run}", f"--trainer.max_steps={steps}",
               "--trainer.val_check_interval=5", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
               "--data.init_args.batch_size=16", *TINY_NET, *extra, cwd=run.parent)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny digits run of 10 steps with checkpoints, shared by the tests below."""
    run = tmp_path_factory.mktemp("cli") / "run"
    fit_digits(run, 10)
    return run


def test_fit_writes_checkpoints_tensorboard_and_samples(trained):
    assert (trained / "checkpoints" / "last.ckpt").is_file()
    events = list((trained / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "samples" in tags["images"] and "val/nelbo" in tags["scalars"] and "val/bpt" in tags["scalars"]
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 10 and "current_model_state" in ckpt  # EMA weights in state_dict


def test_test_and_sample_commands(trained, tmp_path):
    last = str(trained / "checkpoints" / "last.ckpt")
    out = md4("test", "--config", DIGITS, f"--trainer.default_root_dir={tmp_path / 'eval'}", *TINY_NET,
              "--trainer.enable_progress_bar=false", "--ckpt_path", last, cwd=tmp_path)
    assert "bits per dimension" in out.stdout
    out = md4("sample", "--ckpt_path", last, "--num_samples", "4", "--steps", "8",
              "--output", str(tmp_path / "grid.png"), cwd=tmp_path)
    assert (tmp_path / "grid.png").stat().st_size > 0 and "network evaluations" in out.stdout


def test_help_lists_subcommands_without_importing_torch(tmp_path):
    # torch and Lightning take seconds to import; the overview needs neither.
    code = ("import sys\nfrom lightning_md4.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'md4 --help imported torch'")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    for word in ("fit", "validate", "test", "sample", "evaluate-samples", "zeroshot", "genppl", "--random_weights"):
        assert word in out.stdout
    assert "predict" not in out.stdout  # the models have no predict_step


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")  # pytest's own argv
def test_bad_commands_fail_in_one_line_before_touching_the_run_folder(tmp_path):
    run = tmp_path / "run"
    common = ["--config", DIGITS, f"--trainer.default_root_dir={run}", *TINY_NET]
    for command in ("test", "validate"):
        assert "--random_weights" in one_line_error([command, *common])
        assert str(run / "checkpoints") in one_line_error([command, *common, "--ckpt_path", "last"])
    assert str(run / "checkpoints") in one_line_error(["fit", *common, "--ckpt_path", "last", "--strict_resume", "true"])
    message = one_line_error(["fit", *common, "--model.init_args.schedule", "cosin"])
    assert all(name in message for name in ("linear", "cosine", "polynomial", "geometric"))
    assert "optim.lr" in one_line_error(["fit", *common, "--model.init_args.optim.lr", "-1"])
    assert "dropout" in one_line_error(["fit", *common, "--model.init_args.network.dropout", "1.5"])
    message = one_line_error(["fit", *common, "--model", "MD5"])
    assert all(name in message for name in ("MD4", "GenMD4", "SEDD", "D3PM"))
    assert "max_step" in one_line_error(["fit", *common, "--trainer.max_step", "50"])  # no abbreviations
    assert "predict" in one_line_error(["predict", *common])
    for option in ("--steps", "--num_samples"):
        assert option in one_line_error(["sample", "--ckpt_path", "x.ckpt", option, "0"])
    assert "steps" in one_line_error(["evaluate-samples", "--ckpt_path", "x.ckpt", "--steps", "0"])
    assert "--eval_draws" in one_line_error(["zeroshot", "--ckpt_path", "x.ckpt", "--eval_draws", "0"])
    assert not run.exists()
    # A torn last.ckpt behind --ckpt_path last.
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 torn")
    for command in ("fit", "test"):
        assert "corrupt" in one_line_error([command, *common, "--ckpt_path", "last"])
    assert [p.name for p in run.iterdir()] == ["checkpoints"]


def test_run_record_resume_tensorboard_and_text_samples(tmp_path):
    """One text run through its life: a first fit --ckpt_path last with nothing to resume, a
    resume, a test, text samples; the record, the TensorBoard run and the sample file after each."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the cat sat on the mat.\n" for i in range(300)))
    run, seq_len = tmp_path / "run", 32
    common = ["--config", str(ROOT / "configs" / "tiny_text.yaml"), f"--data.init_args.path={corpus}",
              f"--data.init_args.seq_len={seq_len}", "--data.init_args.batch_size=8", f"--trainer.default_root_dir={run}",
              "--trainer.enable_progress_bar=false", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
              "--trainer.log_every_n_steps=1", *TINY_NET]
    out = md4("fit", *common, "--trainer.max_steps=2", "--ckpt_path", "last", cwd=tmp_path)
    assert f"md4: nothing to resume: {run / 'checkpoints'} holds no checkpoint; starting a new run" in out.stderr
    assert "save_last" not in out.stderr  # Lightning's warning, with a wrong hint
    board = run / "tensorboard"
    record = (board / "config.yaml").read_text()
    md4("fit", *common, "--trainer.max_steps=4", "--ckpt_path", "last", cwd=tmp_path)
    assert "max_steps: 4" in (board / "config.resume-1.yaml").read_text()
    md4("test", *common, "--ckpt_path", "last", cwd=tmp_path)
    assert (board / "config.yaml").read_text() == record and "max_steps: 2" in record
    assert sorted(p.name for p in board.glob("config*")) == ["config.resume-1.yaml", "config.yaml"]
    assert not [p for p in board.iterdir() if p.is_dir()]  # one TensorBoard run, no version folders

    acc = EventAccumulator(str(board), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("test/nelbo")] == [4]  # the checkpoint's step
    assert "hp_metric" not in acc.Tags()["scalars"]
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert set(start.hparams) == {"method", "schedule", "network", "parameters", "lr", "data"}
    assert start.hparams["method"].string_value == "MD4" and start.hparams["schedule"].string_value == "linear"
    assert start.hparams["lr"].number_value == pytest.approx(1e-3)
    assert [m.name.tag for m in experiment.metric_infos] == ["val/nelbo", "test/nelbo"]

    samples = tmp_path / "samples.txt"
    md4("sample", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--num_samples", "5", "--steps", "4",
        "--output", str(samples), cwd=tmp_path)
    lines = samples.read_text(encoding="utf-8").splitlines()
    # One line per sample, its own line breaks shown as a mark of one character.
    assert len(lines) == 5 and all(len(line) == seq_len for line in lines)
    assert any(LINE_BREAK_MARK in line for line in lines)


def test_unknown_config_key_is_one_clear_line(tmp_path):
    proc = md4("fit", "--config", DIGITS, "--model.init_args.schedul=cosine", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("md4: error:") and "schedul" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_data_file_is_one_clear_line(tmp_path):
    proc = md4("fit", "--config", str(ROOT / "configs" / "tiny_text.yaml"),
               "--data.init_args.path=nowhere/corpus.txt", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("md4: error:") and "nowhere/corpus.txt" in last


def test_corrupt_and_foreign_checkpoints_are_refused_untouched(trained, tmp_path):
    last = trained / "checkpoints" / "last.ckpt"
    before = digest(last)
    # A checkpoint of another model (a character model) given to a digits run.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    proc = md4("fit", "--config", str(ROOT / "configs" / "tiny_text.yaml"), f"--data.init_args.path={corpus}",
               f"--trainer.default_root_dir={tmp_path / 'text'}", "--trainer.max_steps=2", *TINY_NET,
               "--ckpt_path", str(last), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "another model" in proc.stderr.strip().splitlines()[-1]
    # A corrupt file.
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(last.read_bytes()[:1000])
    for args in (["sample", "--ckpt_path", str(bad)],
                 ["fit", "--config", DIGITS, f"--trainer.default_root_dir={tmp_path / 'x'}", "--ckpt_path", str(bad)]):
        proc = md4(*args, cwd=tmp_path, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert "corrupt" in proc.stderr.strip().splitlines()[-1]
    assert digest(last) == before


def test_fresh_fit_never_overwrites_an_earlier_runs_checkpoints(trained):
    last = trained / "checkpoints" / "last.ckpt"
    before = digest(last)
    proc = md4(
        "fit", "--config", DIGITS, f"--trainer.default_root_dir={trained}", "--trainer.max_steps=2", *TINY_NET,
        cwd=trained.parent, check=False)
    assert proc.returncode != 0 and "--ckpt_path last" in proc.stderr.strip().splitlines()[-1]
    assert digest(last) == before


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    cmd = md4_command("fit", "--config", DIGITS, f"--trainer.default_root_dir={run}",
           "--trainer.max_steps=100000", "--trainer.val_check_interval=5", "--trainer.limit_val_batches=1",
           "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=16", *TINY_NET)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    step = 0
    try:
        while step < 10 and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                step = torch.load(last, weights_only=True)["global_step"]
            except Exception:  # not written yet, or caught mid-write
                continue
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert step >= 10
    saved = torch.load(last, weights_only=True)
    step = saved["global_step"]
    out = md4("fit", "--config", DIGITS, f"--trainer.default_root_dir={run}", f"--trainer.max_steps={step + 5}",
              "--trainer.val_check_interval=5", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
              "--data.init_args.batch_size=16", *TINY_NET, "--ckpt_path", "last", cwd=tmp_path)
    assert "Restoring states from the checkpoint" in out.stderr + out.stdout
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == step + 5
    # The optimiser and the EMA carried on rather than restarting.
    adam_steps = {int(s["step"]) for s in resumed["optimizer_states"][0]["state"].values()}
    assert adam_steps == {step + 5}
    assert "current_model_state" in resumed and "averaging_state" in resumed


# Every method training, testing and sampling through one switch (--model NAME) is part of the
# contract every registered method meets: tests/test_contract.py.
