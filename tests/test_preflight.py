"""A new user's first hour: each mistake a one-line ``md4: error:`` (or the right behaviour), the
command-line mistakes refused before torch is imported, and no Lightning banner before an error.

In-process calls of ``main`` (fast); the two that import Lightning are marked slow.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import get_args

import pytest
import yaml

from lightning_md4 import cli
from conftest import one_line_error
from lightning_md4.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits.yaml")
TINY_TEXT = str(ROOT / "configs" / "tiny_text.yaml")
BAD_YAML = "trainer:\n  max_steps: 5\nmodel:\n  init_args: {schedule: cosine\ndata: 3\n"


@pytest.fixture
def no_lightning(monkeypatch):
    """Fail the test if ``md4 fit|validate|test`` gets as far as LightningCLI (torch, seconds)."""
    def reached(argv):
        raise AssertionError(f"md4 {' '.join(argv or [])} reached LightningCLI: not refused before torch")

    monkeypatch.setattr(cli, "lightning_cli", reached)


# -- a --config that is not YAML, not there or a directory ----------------------------------------
def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path, no_lightning):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    for command in ("fit", "test"):
        message = one_line_error([command, "--config", DIGITS, "--config", str(bad)])
        assert str(bad) in message and "line 5, column 5" in message, message  # where the parser stopped
        assert "line 4" in message, message  # where the unclosed mapping began
    message = one_line_error(["sample", "--config", str(bad), "--ckpt_path", "x.ckpt"])
    assert str(bad) in message and "line 5" in message


def test_a_directory_given_as_a_file_says_so(tmp_path, no_lightning):
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert one_line_error(["fit", "--config", str(folder)]).endswith(f"{folder} is a directory, not a YAML file")
    message = one_line_error(["test", "--config", DIGITS, "--ckpt_path", str(folder)])
    assert f"{folder} is a directory, not a file" in message
    message = one_line_error(["sample", "--ckpt_path", str(folder)])
    assert f"{folder} is a directory, not a file" in message and "does not exist" not in message
    assert "nowhere.yaml does not exist" in one_line_error(["fit", "--config", str(tmp_path / "nowhere.yaml")])


def test_a_data_file_that_is_a_directory_says_so(tmp_path):
    from datamodules import CharDataModule, DataError

    with pytest.raises(DataError, match=f"text file {re.escape(str(tmp_path))} is a directory, not a file"):
        CharDataModule(path=str(tmp_path))


# -- names and options ------------------------------------------------------------------------
def test_an_unknown_data_module_lists_the_data_modules(no_lightning):
    import datamodules

    message = one_line_error(["fit", "--config", DIGITS, "--data", "FooDataModule"])
    data_modules = [name for name in datamodules.__all__ if name.endswith("DataModule") and name != "TokenDataModule"]
    assert "FooDataModule is not a data module" in message
    assert data_modules and all(name in message for name in data_modules), message


def test_unknown_options_are_refused_before_torch_with_a_suggestion(tmp_path, no_lightning):
    message = one_line_error(["fit", "--config", DIGITS, "--model.init_args.schedul", "cosine"])
    assert message.startswith("md4: error: --model.init_args.schedul: MD4 has no option schedul; did you mean "
                              "schedule?")
    assert "eval_draws?" in one_line_error(["test", "--config", DIGITS, "--eval_draw", "3"])
    # The class in effect is the one chosen last: GenMD4 has no schedule, DigitsDataModule no path.
    assert "GenMD4 has no option schedule" in one_line_error(
        ["fit", "--config", DIGITS, "--model", "GenMD4", "--model.init_args.schedule", "cosine"])
    assert "DigitsDataModule has no option path" in one_line_error(
        ["fit", "--config", DIGITS, "--data.init_args.path", "x.txt"])
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  init_args:\n    schedul: cosine\n")
    message = one_line_error(["fit", "--config", DIGITS, "--config", str(typo)])
    assert str(typo) in message and "schedul" in message and "schedule?" in message
    assert "is not a method" in one_line_error(["fit", "--config", DIGITS, "--model", "MD5"])


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if p.name != "fid.yaml"))
def test_every_shipped_config_passes_the_checks(config):
    from lightning_md4.preflight import check_command_line

    base = {"genmd4_digits.yaml": "digits.yaml", "genmd4_text8.yaml": "text8.yaml", "genmd4_owt.yaml": "owt_small.yaml",
            "owt_medium.yaml": "owt_small.yaml", "cifar10_cond.yaml": "cifar10.yaml",
            "imagenet64_cond.yaml": "imagenet64.yaml"}.get(config)
    configs = [str(ROOT / "configs" / name) for name in (base, config) if name]
    check_command_line(["fit", *[arg for path in configs for arg in ("--config", path)],
                        "--model.init_args.network.n_layers=1", "--trainer.max_steps=2", "--ckpt_path", "last"])


def test_the_mistakes_a_command_line_shows_are_refused_without_importing_torch(tmp_path):
    bad, folder = tmp_path / "bad.yaml", tmp_path / "folder"
    bad.write_text(BAD_YAML)
    folder.mkdir()
    cases = [["fit", "--config", str(bad)], ["fit", "--config", str(folder)], ["test", "--ckpt_path", str(folder)],
             ["fit", "--config", DIGITS, "--data", "FooDataModule"], ["fit", "--config", DIGITS, "--model", "MD5"],
             ["fit", "--config", DIGITS, "--model.init_args.schedul", "cosine"], ["validate", "--eval_draw", "1"]]
    code = ("import sys\nfrom lightning_md4.cli import main\n"
            f"for argv in {cases!r}:\n"
            "    try:\n        main(argv)\n    except SystemExit as err:\n        print(err.code)\n"
            "    else:\n        raise AssertionError(argv)\n"
            "assert 'torch' not in sys.modules, 'imported torch'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == len(cases) and all(line.startswith("md4: error: ") for line in lines), out.stdout


# -- the model options are discoverable -----------------------------------------------------------
def test_schedule_options_list_their_choices():
    import inspect

    from lightning_md4.diffusion.schedules import SCHEDULES, ScheduleName
    from lightning_md4.modules import MD4, MDLM

    assert get_args(ScheduleName) == tuple(SCHEDULES)
    for method in (MD4, MDLM):
        annotation = inspect.signature(method.__init__, eval_str=True).parameters["schedule"].annotation
        assert set(get_args(annotation)) == set(SCHEDULES), method


def test_fit_help_says_where_the_model_and_data_options_are():
    from lightning_md4.modules.registry import method_names
    from lightning_md4.preflight import options_epilog

    text = " ".join(options_epilog().split())
    assert "--model.help MD4" in text and "--data.help DigitsDataModule" in text
    assert all(name in text for name in method_names())


@pytest.mark.slow  # builds LightningCLI's parser in-process (imports Lightning)
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_fit_help_ends_with_the_model_options_and_its_options_are_the_checked_sections(capsys):
    from lightning_md4.preflight import SECTIONS

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model.help MD4" in " ".join(out.split())
    top = set(re.findall(r"^  (?:-\w(?: \w+)?, )?--(\w+)", out, flags=re.M))
    assert top == set(SECTIONS)
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "MD4"])
    assert re.search(r"--model\.schedule \{linear,loglinear,polynomial,cosine,geometric\}", capsys.readouterr().out)


# -- no banner before an error --------------------------------------------------------------------
def test_the_banner_is_held_until_released_and_dropped_on_an_error():
    from lightning_md4.preflight import HeldBanner

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("lightning.pytorch")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # as Lightning sets it
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            banner = HeldBanner().hold()
            logging.getLogger("lightning.pytorch.trainer").info("GPU available: False")
            warnings.warn("held")
            banner.drop()
            assert seen == [] and warned == []
            banner = HeldBanner().hold()
            logging.getLogger("lightning.pytorch.trainer").info("GPU available: False")
            warnings.warn("shown")
            assert seen == [] and warned == []
            banner.release()
            assert seen == ["GPU available: False"] and [str(w.message) for w in warned] == ["shown"]
            logging.getLogger("lightning.pytorch.trainer").info("after")
            assert seen[-1] == "after" and logger.handlers[-1] is handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.slow  # builds the data module in-process (imports Lightning)
@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_no_banner_line_precedes_an_error_found_as_the_run_is_built(tmp_path, capfd):
    message = one_line_error(["fit", "--config", TINY_TEXT, f"--data.init_args.path={tmp_path}",
                              f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert "is a directory, not a file" in message
    printed = capfd.readouterr()
    assert "Seed set" not in printed.err + printed.out and "available" not in printed.err + printed.out


# -- md4 sample: a device the machine lacks, an output of the wrong kind ---------------------------
def save_checkpoint(path: Path, data: dict, vocab_size: int, seq_len: int) -> str:
    """A checkpoint as md4 fit writes it (hyper-parameters of the model and data), without a fit."""
    import lightning
    import torch

    from lightning_md4.modules import MD4
    from lightning_md4.nets import TransformerConfig

    model = MD4(vocab_size, seq_len, network=TransformerConfig(n_layers=1, d_model=32, n_heads=2, d_cond=16))
    hparams = {**model.hparams, "_class_path": "lightning_md4.modules.MD4"}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams, "datamodule_hyper_parameters": data,
                "pytorch-lightning_version": lightning.__version__}, path)
    return str(path)


@pytest.fixture
def image_checkpoint(tmp_path) -> str:
    return save_checkpoint(tmp_path / "digits.ckpt", {"_class_path": "datamodules.DigitsDataModule"}, 17, 64)


@pytest.fixture
def text_checkpoint(tmp_path) -> str:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("ab c\nabc ba\n" * 50)
    data = {"_class_path": "datamodules.CharDataModule", "path": str(corpus), "vocab": "abc \n", "seq_len": 12}
    return save_checkpoint(tmp_path / "text.ckpt", data, 5, 12)


def test_a_device_the_machine_lacks_is_one_line(image_checkpoint, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for command in ("sample", "genppl"):
        message = one_line_error([command, "--ckpt_path", image_checkpoint, "--device", "cuda"])
        assert "--device cuda: this machine has no CUDA GPU" in message and "--device cpu" in message
    assert "is not a device" in one_line_error(["sample", "--ckpt_path", image_checkpoint, "--device", "gpu0"])


def test_sample_writes_what_the_output_asks_or_refuses(image_checkpoint, text_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = one_line_error(["sample", "--ckpt_path", image_checkpoint, "--output", "x.txt", "--num_samples", "2",
                              "--steps", "2", "--device", "cpu"])
    assert "--output x.txt" in message and "PNG" in message and "FILE.png" in message
    message = one_line_error(["sample", "--ckpt_path", text_checkpoint, "--output", "x.png", "--num_samples", "2",
                              "--steps", "2", "--device", "cpu"])
    assert "--output x.png" in message and "FILE.txt" in message
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.txt").exists()
    # Without --output: a PNG grid of an image model, a text file of a text model.
    main(["sample", "--ckpt_path", text_checkpoint, "--num_samples", "2", "--steps", "2", "--device", "cpu"])
    assert len((tmp_path / "samples.txt").read_text(encoding="utf-8").splitlines()) == 2
    assert not (tmp_path / "samples.png").exists()
    main(["sample", "--ckpt_path", image_checkpoint, "--num_samples", "2", "--steps", "2", "--device", "cpu"])
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the README's commands and the demo agree ---------------------------------------------------
def test_the_readme_examples_name_the_folder_the_demo_writes():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    demo = (ROOT / "scripts" / "demo.sh").read_text(encoding="utf-8")
    config_folder = yaml.safe_load(Path(DIGITS).read_text())["trainer"]["default_root_dir"]
    demo_folder = re.search(r"^\s*RUN=(\S+)\s*$", demo, flags=re.M).group(1)  # its first run's folder
    assert demo_folder == config_folder == "runs/digits"
    commands = [line.strip() for line in readme.splitlines() if re.match(r"    (md4|tensorboard) ", line)]
    digits_paths = [path for line in commands for path in re.findall(r"runs/digits[^\s/]*", line)]
    assert digits_paths and set(digits_paths) == {demo_folder}, digits_paths
    # Every checkpoint the README samples or tests from is one its own commands write.
    for line in commands:
        for ckpt in re.findall(r"--ckpt_path (runs/[^\s]+)", line):
            folder = ckpt.split("/checkpoints/")[0]
            assert any(folder in other for other in commands if other.startswith("md4 fit")) or \
                f"default_root_dir: {folder}" in "".join(p.read_text() for p in (ROOT / "configs").glob("*.yaml")), ckpt
