"""Scoring a checkpoint's test split so that its decimals mean something, and comparing methods over seeds.

A one-draw NELBO per sequence is an unbiased but noisy estimate: on a 500-step text model one draw
and sixteen differ by 0.075 bits per character, more than the gaps between methods. ``score``
averages ``replicas x draws`` keyed time/mask draws per test sequence through the module's own
``eval_nelbo`` (the numbers ``md4 test --eval_draws`` prints), and measures the estimate's own
spread: each replica uses another ``eval_seed``, so the sd of the replica means is the sd of one
``draws``-draw estimate, measured rather than assumed. A D3PM model adds its exact T-term sum (no
time draw: only the forward draws, keyed per example and step) on the first test sequences, with
the draw estimate on the same sequences beside it (T network passes per sequence: minutes on a CPU).

``compare`` turns per-seed results into mean +- se over seeds and paired differences against a
baseline with the sweep report's t intervals and verdicts (``sweeps.report``), so the benchmark and
the sweeps state uncertainty the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lightning_md4.checkpoints import FitCheckpoint
from sweeps.report import CONFIGURATION, SEED, paired_table, seed_values

LN2 = math.log(2)


@dataclass
class Score:
    """Test-split NELBO of one checkpoint, in bits per token.

    ``bpt``: the mean over ``replicas x draws`` draws per sequence; ``sd_one``: the sd over replicas
    of a ``draws``-draw estimate; ``se``: the standard error of ``bpt`` (``sd_one / sqrt(replicas)``);
    ``exact_bpt``: D3PM's T-term sum on the first ``exact_sequences`` test sequences, and
    ``drawn_bpt`` the draw estimate on those same sequences (None for other methods).
    """

    bpt: float
    sd_one: float
    se: float
    replicas: int
    draws: int
    sequences: int
    exact_sequences: int = 0
    exact_bpt: float | None = None
    drawn_bpt: float | None = None


@torch.no_grad()
def score(ckpt: str | Path, replicas: int = 4, draws: int = 8, exact_examples: int = 128, batch_T: int = 8) -> Score:
    """Score ``ckpt``'s test split (EMA weights) on the CPU; see the module docstring. A D3PM model's
    exact T-term sum (T network passes per sequence) runs on the first ``exact_examples`` test
    sequences (0: none), beside the draw estimate on the same sequences."""
    fit = FitCheckpoint.read(ckpt)
    model = fit.model("cpu").eval()
    datamodule = fit.datamodule()
    datamodule.setup("test")
    model.configure_evaluation(draws=draws)
    base_seed = model.hparams.eval_seed
    per_replica = []
    for r in range(replicas):
        model.hparams.eval_seed = base_seed + r  # another keyed stream per replica (AR's exact NLL: the same)
        per_replica.append(torch.cat([model.eval_nelbo(batch) / batch["x0"].shape[1]
                                      for batch in datamodule.test_dataloader()]))
    means = torch.stack(per_replica).mean(1) / LN2  # [replicas] bits per token
    model.hparams.eval_seed = base_seed
    sd_one = float(means.std()) if replicas > 1 else math.nan
    exact_bpt = drawn_bpt = None
    exact_sequences = 0
    if exact_examples and hasattr(model, "exact_nelbo"):  # D3PM: md4 test's exact_test sum
        totals = []
        for batch in datamodule.test_dataloader():  # in order: the first exact_examples sequences
            totals.append(model.exact_nelbo(batch, batch_T) / batch["x0"].shape[1])
            if sum(map(len, totals)) >= exact_examples:
                break
        exact = torch.cat(totals)[:exact_examples]
        exact_bpt, exact_sequences = float(exact.mean()) / LN2, len(exact)
        drawn_bpt = float(torch.stack(per_replica)[:, :len(exact)].mean()) / LN2
    return Score(float(means.mean()), sd_one, sd_one / math.sqrt(replicas), replicas, draws,
                 len(per_replica[0]), exact_sequences, exact_bpt, drawn_bpt)


def compare(results: pd.DataFrame, baseline: str, value: str = "bpt") -> pd.DataFrame:
    """One row per method of ``results`` (columns ``method``, ``seed``, ``value``): mean +- se over
    seeds and the paired difference against ``baseline`` by seed (``difference``, ``low``, ``high``,
    ``verdict``): the sweep report's tables, with methods as its configurations."""
    observations = results.rename(columns={"method": CONFIGURATION}).astype({SEED: str})
    values = seed_values(observations, value)
    seeds = values.count(axis=1)
    stats = pd.DataFrame({"seeds": seeds, "mean": values.mean(axis=1), "sd": values.std(axis=1, ddof=1)})
    stats["se"] = stats["sd"] / np.sqrt(seeds)
    paired = paired_table(observations, value, baseline, "minimize")[["difference", "low", "high", "verdict"]]
    return stats.join(paired).rename_axis("method").reset_index()


def cached_score(ckpt: Path, replicas: int = 4, draws: int = 8, exact_examples: int = 128) -> Score:
    """``score``, kept beside the checkpoint (D3PM's exact sum takes minutes) and reused while the
    checkpoint file is the one it was computed from."""
    cache = ckpt.with_name(f"{ckpt.stem}.score_{replicas}x{draws}_exact{exact_examples}.json")
    stamp = ckpt.stat().st_mtime_ns
    if cache.exists() and (saved := json.loads(cache.read_text()))["checkpoint_mtime_ns"] == stamp:
        return Score(**saved["score"])
    result = score(ckpt, replicas, draws, exact_examples)
    cache.write_text(json.dumps({"checkpoint_mtime_ns": stamp, "score": asdict(result)}))
    return result
