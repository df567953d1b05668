"""DDP with 2 CPU processes (gloo) reports the same validation NELBO as 1 process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import TINY_NET_ARGS, TINY_TEXT, md4

pytestmark = pytest.mark.slow  # md4 subprocesses, one of them a 2-process DDP run


def validate(tmp_path: Path, corpus: Path, devices: int, global_batch_size: int, accumulate: int) -> float:
    """``md4 validate`` on the first 13 of the corpus's 15 validation chunks; the per-device batch
    (training and evaluation) is ``global_batch_size / (devices * accumulate)``."""
    args = ["validate", "--config", TINY_TEXT,
            f"--data.init_args.path={corpus}", "--data.init_args.seq_len=16", "--data.init_args.val_fraction=0.2",
            "--data.init_args.val_examples=13", "--data.init_args.batch_size=null",
            f"--data.init_args.global_batch_size={global_batch_size}", f"--trainer.accumulate_grad_batches={accumulate}",
            f"--trainer.default_root_dir={tmp_path / f'run{devices}'}", "--trainer.accelerator=cpu",
            f"--trainer.devices={devices}", "--trainer.enable_progress_bar=false", "--random_weights=true",
            *TINY_NET_ARGS]
    if devices > 1:
        args.append("--trainer.strategy=ddp")
    proc = md4(*args, cwd=tmp_path)
    match = re.search(r"val: NELBO ([0-9.]+) nats/token", proc.stdout)
    assert match, proc.stdout[-2000:]
    return float(match.group(1))


def test_ddp_validation_on_a_fixed_subset_matches_single_process(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the cat sat on mat {i * 7 % 13}.\n" for i in range(40)))
    # 1 process in batches of 8 (8 + 5) against 2 processes x accumulation 2 in batches of 3
    # (rank 0: 3 + 3 + 1, rank 1: 3 + 3): the examples are the same 13, an odd number, so the
    # shards and last batches differ in size and double counting or a dropped example would move
    # the mean; a per-rank batch limit would have kept other examples on each layout.
    single = validate(tmp_path, corpus, devices=1, global_batch_size=8, accumulate=1)
    double = validate(tmp_path, corpus, devices=2, global_batch_size=12, accumulate=2)
    assert abs(single - double) < 1e-5, (single, double)
