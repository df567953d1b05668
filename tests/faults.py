"""Helpers of the fault-tolerance tests: callbacks that the ``md4 fit`` subprocesses load by class
path (the tests put ``tests/`` on their PYTHONPATH), the tiny digits run, and checkpoint comparisons.

Kept out of ``conftest.py`` so that the subprocesses import only this small file.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits.yaml")
# A 1-layer network of width 32 (tests/test_cli.py's TINY_NET).
TINY_NET = ["--model.init_args.network.n_layers=1", "--model.init_args.network.d_model=32",
            "--model.init_args.network.n_heads=2", "--model.init_args.network.d_cond=16"]


class LossLog(pl.Callback):
    """Appends ``step loss examples`` (the global step after the batch, the loss to 10 significant
    digits, the batch's example indices) after every training batch to ``path`` (``{rank}`` in it
    is replaced by the global rank)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(self.path.format(rank=trainer.global_rank), "a") as f:
            index = batch["index"] if isinstance(batch, dict) and "index" in batch else None
            examples = "" if index is None else " " + ",".join(map(str, index.tolist()))
            f.write(f"{trainer.global_step} {float(loss):.10e}{examples}\n")
            f.flush()


class SigtermAt(pl.Callback):
    """Sends SIGTERM to this process when training step ``step`` starts (global rank ``rank`` only),
    as a preemption would: md4's PreemptionCheckpoint saves ``last.ckpt`` at the end of that batch
    (global step ``step + 1``) and exits with code 143. Only in the first attempt of a run: a run
    resumed from a checkpoint (global step already past ``step`` or a marker file present) goes on."""

    def __init__(self, step: int, rank: int = 0, marker: str | None = None) -> None:
        self.step, self.rank, self.marker = step, rank, marker

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step != self.step or trainer.global_rank != self.rank:
            return
        if self.marker is not None:
            if os.path.exists(self.marker):
                return
            Path(self.marker).write_text(f"{self.step}\n")
        os.kill(os.getpid(), signal.SIGTERM)


def read_losses(path: Path) -> dict[int, float]:
    """``{step: loss}`` of a LossLog file; a step logged twice (a resumed run repeating it) must agree."""
    losses: dict[int, float] = {}
    for line in path.read_text().splitlines():
        step, loss = line.split()[:2]
        losses.setdefault(int(step), float(loss))
    return losses


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights and EMA weights of a checkpoint, keyed ``model/NAME`` and ``ema/NAME``."""
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    ema = ckpt["state_dict"]
    model = ckpt.get("current_model_state", ema)
    return {**{f"model/{k}": v for k, v in model.items()}, **{f"ema/{k}": v for k, v in ema.items()}}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def callbacks_config(path: Path, loss_log: Path, *extra: str) -> Path:
    """A config that replaces digits.yaml's callbacks by its checkpoints, its EMA and a LossLog
    (no sample grids, which would dominate a tiny run's time), plus ``extra`` callbacks (YAML list
    items, e.g. ``"{class_path: faults.SigtermAt, init_args: {step: 5}}"``)."""
    items = ['{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: '
             '"${trainer.default_root_dir}/checkpoints", save_last: true, monitor: val/nelbo, filename: "best-{step}"}}',
             '{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: '
             '"${trainer.default_root_dir}/checkpoints", save_top_k: 2, monitor: step, mode: max}}',
             "{class_path: lightning_md4.speed_callbacks.ForeachEMA, init_args: {decay: 0.995, warmup: true}}",
             f"{{class_path: faults.LossLog, init_args: {{path: '{loss_log}'}}}}", *extra]
    path.write_text("trainer:\n  callbacks:\n" + "".join(f"    - {item}\n" for item in items))
    return path


def digits_fit(run: Path, steps: int, config: Path, *extra: str) -> list[str]:
    """``md4 fit`` arguments of a tiny digits run into ``run``: the 1-layer network, batches of 64
    (22 an epoch), validation on 32 examples every 10 steps (each saving checkpoints)."""
    return ["fit", "--config", DIGITS, "--config", str(config), f"--trainer.default_root_dir={run}",
            f"--trainer.max_steps={steps}", "--trainer.val_check_interval=10", "--data.init_args.val_examples=32",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", *TINY_NET, *extra]


def env(**more: str) -> dict[str, str]:
    """The environment of a test's subprocesses: one thread, ``tests/`` importable (these callbacks)."""
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **more}
