"""The methods benchmark's statistics against hand computations, and its in-process scoring
against what `md4 test` prints."""

import math
import re

import pandas as pd
import pytest

from benchmarks.compare_methods import ROWS
from benchmarks.scoring import compare, score
from lightning_md4.modules.registry import method_names
from conftest import ROOT, TINY_NET_ARGS, md4

T_975_2 = 4.302652729911275  # the 97.5% quantile of Student's t with 2 degrees of freedom


def test_compare_gives_mean_se_and_paired_t_intervals_by_seed():
    results = pd.DataFrame({
        "method": ["MD4"] * 3 + ["X"] * 3,
        "seed": [0, 1, 2, 2, 0, 1],  # X's seeds out of order: pairs are by seed, not by position
        "bpt": [3.0, 3.2, 3.4, 3.1, 2.9, 3.0],
    })
    table = compare(results, baseline="MD4").set_index("method")
    assert table.loc["MD4", "mean"] == pytest.approx(3.2)
    assert table.loc["MD4", "se"] == pytest.approx(0.2 / math.sqrt(3))
    d = [2.9 - 3.0, 3.0 - 3.2, 3.1 - 3.4]  # X - MD4 at seeds 0, 1, 2
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = T_975_2 * sd / math.sqrt(3)
    assert table.loc["X", "difference"] == pytest.approx(mean)
    assert table.loc["X", "low"] == pytest.approx(mean - half)
    assert table.loc["X", "high"] == pytest.approx(mean + half)
    assert mean - half < 0 < mean + half and table.loc["X", "verdict"].startswith("within noise")


def test_a_difference_on_every_seed_is_resolved_in_the_right_direction():
    results = pd.DataFrame({"method": ["MD4"] * 3 + ["lower"] * 3 + ["higher"] * 3, "seed": [0, 1, 2] * 3,
                            "bpt": [3.0, 3.2, 3.4, 2.7, 2.91, 3.1, 3.3, 3.52, 3.69]})
    table = compare(results, baseline="MD4").set_index("method")
    assert table.loc["lower", "high"] < 0 and "resolved (better" in table.loc["lower", "verdict"]
    assert table.loc["higher", "low"] > 0 and "resolved (worse" in table.loc["higher", "verdict"]


def test_an_interval_across_zero_is_within_noise():
    results = pd.DataFrame({"method": ["MD4"] * 3 + ["X"] * 3, "seed": [0, 1, 2] * 2,
                            "bpt": [3.0, 3.2, 3.4, 3.1, 3.1, 3.4]})
    row = compare(results, baseline="MD4").set_index("method").loc["X"]
    assert row["low"] < 0 < row["high"]
    assert row["verdict"].startswith("within noise")


@pytest.mark.slow
def test_score_is_what_md4_test_prints_and_measures_its_own_spread(tmp_path):
    run = tmp_path / "run"
    common = ["--config", str(ROOT / "configs" / "digits.yaml"), f"--trainer.default_root_dir={run}",
              "--trainer.enable_progress_bar=false", "--model.init_args.network.n_layers=1",
              "--model.init_args.network.d_model=32", "--model.init_args.network.n_heads=2",
              "--model.init_args.network.d_cond=16"]
    md4("fit", *common, "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--data.init_args.val_examples=8",
        cwd=ROOT)
    ckpt = run / "checkpoints" / "last.ckpt"
    printed = md4("test", *common, f"--ckpt_path={ckpt}", "--eval_draws=3", cwd=ROOT).stdout
    nats = float(re.search(r"test: NELBO ([0-9.]+) nats/token", printed).group(1))
    one = score(ckpt, replicas=1, draws=3)
    assert one.bpt == pytest.approx(nats / math.log(2), abs=2e-6)  # md4 test prints 6 decimals of nats
    four = score(ckpt, replicas=4, draws=3)
    assert four.bpt != one.bpt and 0 < four.sd_one < 0.5  # other eval seeds: other draws, a measured spread
    assert four.se == pytest.approx(four.sd_one / 2)
    assert four.exact_bpt is None  # MD4 has no T-term sum


@pytest.mark.slow
def test_d3pms_exact_sum_is_what_md4_test_prints_with_exact_test(tmp_path):
    run = tmp_path / "d3pm"
    common = ["--config", str(ROOT / "configs" / "digits.yaml"), f"--trainer.default_root_dir={run}",
              "--trainer.enable_progress_bar=false", "--model=D3PM", "--model.init_args.T=10", *TINY_NET_ARGS]
    md4("fit", *common, "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--data.init_args.val_examples=8",
        cwd=ROOT)
    ckpt = run / "checkpoints" / "last.ckpt"
    printed = md4("test", *common, f"--ckpt_path={ckpt}", "--model.init_args.exact_test=true", cwd=ROOT).stdout
    nats = float(re.search(r"test: NELBO ([0-9.]+) nats/token", printed).group(1))
    scored = score(ckpt, replicas=1, draws=1, exact_examples=10**6)  # every test sequence
    assert scored.exact_sequences == scored.sequences and scored.exact_bpt == pytest.approx(nats / math.log(2), abs=2e-6)
    assert scored.drawn_bpt == pytest.approx(scored.bpt)  # the draws on the same (all) sequences


def test_every_registered_method_has_a_row_and_every_row_a_registered_method():
    assert {row.method for row in ROWS} == set(method_names())
