"""The paper configs: each builds through ``md4 fit`` (in-process, networks on the meta device, no
data read) and holds the values that configs/README.md sets against the MD4 paper and the official
code (google-deepmind/md4, md4/configs/md4/*.py and md4/configs/genmd4/*.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_md4 import cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# The two sampling settings of the paper's FID numbers, (schedule, time grid): both take the same
# steps in alpha, the cosine grid warping a linear schedule into the cosine one.
PAPER_FID_SETTINGS = {("linear", "cosine"), ("cosine", "uniform")}


@dataclass(frozen=True)
class Fidelity:
    """What configs/README.md tabulates for one paper run."""

    method: str
    schedule: str | None  # None: GenMD4's learned per-token schedule
    dropout: float
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_steps: int
    max_steps: int
    global_batch_size: int
    clip_eps: float = 1e-4  # the official schedule clipping alpha in [eps, 1 - eps]
    gradient_clip_val: float | None = None  # the official code clips nothing
    time_conditioning: bool = True  # the official code feeds t to the network everywhere
    label_dropout: float | None = None  # class-conditional runs only


TEXT8 = dict(dropout=0.05, lr=3e-4, betas=(0.9, 0.999), weight_decay=0.03, warmup_steps=2000, max_steps=1_000_000,
             global_batch_size=512)
OWT = {**TEXT8, "dropout": 0.02}
# The official image configs (the paper states no image optimiser values).
IMAGES = dict(lr=2e-4, betas=(0.9, 0.99), weight_decay=0.01, warmup_steps=100, max_steps=2_000_000, dropout=0.1)

PAPER_RUNS: dict[str, tuple[tuple[str, ...], Fidelity]] = {
    "text8": (("text8",), Fidelity("MD4", "linear", **TEXT8)),
    "genmd4_text8": (("text8", "genmd4_text8"), Fidelity("GenMD4", None, **TEXT8)),
    "owt_small": (("owt_small",), Fidelity("MD4", "linear", **OWT)),
    "owt_medium": (("owt_small", "owt_medium"), Fidelity("MD4", "cosine", **{**OWT, "dropout": 0.0})),
    "genmd4_owt": (("owt_small", "genmd4_owt"), Fidelity("GenMD4", None, **OWT)),
    "cifar10": (("cifar10",), Fidelity("MD4", "linear", global_batch_size=256, **IMAGES)),
    "cifar10_cond": (("cifar10", "cifar10_cond"),
                     Fidelity("MD4", "linear", global_batch_size=256, label_dropout=0.1, **IMAGES)),
    "imagenet64": (("imagenet64",), Fidelity("MD4", "linear", global_batch_size=512, **IMAGES)),
    "imagenet64_cond": (("imagenet64", "imagenet64_cond"),
                        Fidelity("MD4", "cosine", global_batch_size=512, label_dropout=0.0, **IMAGES)),
}


def build(stack: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LightningCLI:
    """Run ``md4 fit --config A.yaml [--config B.yaml]`` in this process up to the built model,
    trainer and data module; the fit itself is skipped."""
    built: list[LightningCLI] = []
    monkeypatch.setattr(LightningCLI, "_run_subcommand", lambda self, subcommand: built.append(self))
    monkeypatch.setattr(sys, "argv", ["md4"])  # pytest's own arguments are not the command's
    args = ["fit", *(a for name in stack for a in ("--config", str(CONFIGS / f"{name}.yaml"))),
            f"--trainer.default_root_dir={tmp_path / 'run'}"]
    if stack[0] == "imagenet64":  # the release needs an account; the module only checks the folder
        args.append(f"--data.init_args.path={tmp_path}")
    with torch.device("meta"):  # paper-size networks without allocating their weights
        cli.main(args)
    assert len(built) == 1
    return built[0]


def fidelity_of(built: LightningCLI) -> Fidelity:
    """The values that were instantiated, read off the built objects rather than the YAML."""
    model, trainer, data = built.model, built.trainer, built.datamodule
    net: dict[str, Any] = model.hparams.network
    is_md4 = type(model).__name__ == "MD4"
    optim = model.optim_cfg
    return Fidelity(
        method=type(model).__name__,
        schedule=model.hparams.schedule if is_md4 else None,
        dropout=net["dropout"],
        lr=optim.lr,
        betas=tuple(optim.betas),
        weight_decay=optim.weight_decay,
        warmup_steps=optim.warmup_steps,
        max_steps=trainer.max_steps,
        global_batch_size=data.hparams.global_batch_size,
        clip_eps=model.process.schedule.clip_eps if is_md4 else model.hparams.eps,
        gradient_clip_val=trainer.gradient_clip_val,
        time_conditioning=model.net.time_conditioned,
        label_dropout=net["label_dropout"] if net.get("num_classes") else None,
    )


@pytest.mark.parametrize("run", list(PAPER_RUNS))
def test_paper_config_builds_with_the_tabulated_values(run, tmp_path, monkeypatch):
    stack, expected = PAPER_RUNS[run]
    assert asdict(fidelity_of(build(stack, tmp_path, monkeypatch))) == asdict(expected)


def test_every_paper_config_is_covered():
    covered = {name for stack, _ in PAPER_RUNS.values() for name in stack}
    shipped = {p.stem for p in CONFIGS.glob("*.yaml")}
    not_paper = {"digits", "tiny_text", "owt_tiny", "genmd4_digits", "cifar10_fixture", "fid", "mdlm_tiny_text",
                 "ar_tiny_text"}
    assert shipped - not_paper == covered


def fid_command_grid(config: str) -> str:
    """The time grid the documented ``md4 evaluate-samples`` line of ``config`` samples on:
    configs/fid.yaml's, unless the line overrides it."""
    grid = yaml.safe_load((CONFIGS / "fid.yaml").read_text())["grid"]
    lines = [line for line in (CONFIGS / config).read_text().splitlines() if "md4 evaluate-samples" in line]
    for line in lines:
        words = line.split()
        if "--grid" in words:
            grid = words[words.index("--grid") + 1]
    return grid


@pytest.mark.parametrize("run", ["cifar10", "cifar10_cond", "imagenet64", "imagenet64_cond"])
def test_fid_sampling_is_one_of_the_papers_two_settings(run, tmp_path, monkeypatch):
    stack, _ = PAPER_RUNS[run]
    schedule = build(stack, tmp_path, monkeypatch).model.hparams.schedule
    assert (schedule, fid_command_grid(f"{stack[-1]}.yaml")) in PAPER_FID_SETTINGS
