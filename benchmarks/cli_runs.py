"""Shared helpers of the benchmark scripts that train and test through the real `md4` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def md4(args: list[str]) -> str:
    """Run ``md4 ARGS`` in the project root; its stdout, or an error with its stderr's tail."""
    proc = subprocess.run([sys.executable, "-m", "lightning_md4.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"md4 {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def train(root: Path, args: list[str], steps: int) -> tuple[Path, float]:
    """``md4 fit`` for ``steps`` steps into ``root``; its last checkpoint (EMA weights) and the fit's
    wall time, start-up included.

    A finished fit is recorded in ``root/run.json`` (its steps, arguments and time) and reused by a
    rerun with the same steps and arguments; a folder made otherwise is refused, never reported
    under another budget."""
    last, record = root / "checkpoints" / "last.ckpt", root / "run.json"
    wanted = {"steps": steps, "args": [str(a) for a in args]}
    if record.exists() or last.exists():
        done = json.loads(record.read_text()) if record.exists() else {}
        if {k: done.get(k) for k in wanted} != wanted or not last.exists():
            raise RuntimeError(f"{root} holds a run of other steps or arguments (or an unfinished one); "
                               "delete it to retrain")
        return last, done["fit_s"]
    start = time.perf_counter()
    # The fit's validation is a progress check (the benchmarks score the test split): 64 fixed
    # examples keep it short and the same whatever batch size the benchmark's config has.
    md4(["fit", *args, f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
         f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}", "--data.init_args.val_examples=64"])
    fit_s = round(time.perf_counter() - start, 1)
    record.write_text(json.dumps({**wanted, "fit_s": fit_s}))
    return last, fit_s


def learned_exponents(ckpt: Path) -> list[float] | None:
    """GenMD4's per-token exponents w in a checkpoint; None for a model without them."""
    raw = torch.load(ckpt, weights_only=True)["state_dict"].get("schedule.raw")
    return F.softplus(raw).tolist() if raw is not None else None
