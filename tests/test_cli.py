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

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits.yaml")
TINY_NET = ["--model.init_args.network.n_layers=1", "--model.init_args.network.d_model=32",
            "--model.init_args.network.n_heads=2", "--model.init_args.network.d_cond=16"]


def md4(*args: str, cwd: Path, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lightning_md4.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"md4 {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


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


def test_help_lists_subcommands(tmp_path):
    out = md4("--help", cwd=tmp_path)
    for word in ("fit", "validate", "test", "sample"):
        assert word in out.stdout


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
    cmd = [sys.executable, "-m", "lightning_md4.cli", "fit", "--config", DIGITS, f"--trainer.default_root_dir={run}",
           "--trainer.max_steps=100000", "--trainer.val_check_interval=5", "--trainer.limit_val_batches=1",
           "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=16", *TINY_NET]
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


@pytest.mark.parametrize("method", ["GenMD4", "SEDD", "D3PM"])
def test_every_method_trains_tests_and_samples_through_one_switch(method, tmp_path):
    run = tmp_path / method
    fit_digits(run, 4, f"--model={method}")
    last = str(run / "checkpoints" / "last.ckpt")
    out = md4("test", "--config", DIGITS, f"--model={method}", *TINY_NET, f"--trainer.default_root_dir={run}",
              "--trainer.enable_progress_bar=false", "--ckpt_path", last, cwd=tmp_path)
    assert f"{method} on DigitsDataModule test: NELBO" in out.stdout
    md4("sample", "--ckpt_path", last, "--num_samples", "2", "--steps", "4", "--output", str(run / "s.png"), cwd=tmp_path)
    assert (run / "s.png").is_file()
