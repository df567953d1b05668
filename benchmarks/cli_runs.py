"""Shared helpers of the benchmark scripts that train and test through the real `md4` CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# The benchmark scripts' tables: cells kept as formatted (tabulate would reprint 3.6000 as 3.6).
from lightning_md4.tables import markdown_table  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[1]


def md4(args: list[str]) -> str:
    """Run ``md4 ARGS`` in the project root; its stdout, or an error with its stderr's tail."""
    proc = subprocess.run([sys.executable, "-m", "lightning_md4.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"md4 {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def train(root: Path, args: list[str], steps: int) -> tuple[Path, float | None]:
    """``md4 fit`` for ``steps`` steps into ``root``; its last checkpoint (EMA weights) and the fit's
    wall time, start-up included. A folder whose fit already finished is kept (None for the time):
    delete it to retrain."""
    last = root / "checkpoints" / "last.ckpt"
    if last.exists():
        return last, None
    start = time.perf_counter()
    # The fit's validation is a progress check (the benchmarks score the test split): 64 fixed
    # examples keep it short and the same whatever batch size the benchmark's config has.
    md4(["fit", *args, f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
         f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}", "--data.init_args.val_examples=64"])
    return last, round(time.perf_counter() - start, 1)


def learned_exponents(ckpt: Path) -> list[float] | None:
    """GenMD4's per-token exponents w in a checkpoint; None for a model without them."""
    raw = torch.load(ckpt, weights_only=True)["state_dict"].get("schedule.raw")
    return F.softplus(raw).tolist() if raw is not None else None
