"""Shared helpers of the benchmark scripts that train and test through the real `md4` CLI."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def md4(args: list[str]) -> str:
    """Run ``md4 ARGS`` in the project root; its stdout, or an error with its stderr's tail."""
    proc = subprocess.run([sys.executable, "-m", "lightning_md4.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"md4 {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def train_and_test(root: Path, args: list[str], steps: int) -> dict:
    """``md4 fit`` for ``steps`` steps into ``root``, then ``md4 test`` of its last checkpoint (EMA).

    Returns the test NELBO (nats and bits per token), the fit's wall time (start-up included) and
    GenMD4's exponents if the model has them.
    """
    common = [*args, f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false"]
    start = time.perf_counter()
    # The fit's validation is a progress check (the reported number is the test split's): 64 fixed
    # examples keep it short and the same whatever batch size the benchmark's config has.
    md4(["fit", *common, f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}",
         "--data.init_args.val_examples=64"])
    seconds = time.perf_counter() - start
    text = md4(["test", *common, f"--ckpt_path={root / 'checkpoints' / 'last.ckpt'}"])
    nats = float(re.search(r"test: NELBO ([0-9.]+) nats/token", text).group(1))
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    raw = ckpt["state_dict"].get("schedule.raw")
    return {"steps": steps, "fit_s": round(seconds, 1), "test_nats": nats, "test_bpt": nats / 0.6931471805599453,
            "w": F.softplus(raw).tolist() if raw is not None else None}


def markdown_table(table: pd.DataFrame) -> str:
    """``table`` as markdown with its cells as formatted (tabulate would reprint 3.6000 as 3.6)."""
    return table.to_markdown(index=False, disable_numparse=True)
