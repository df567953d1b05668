"""The benchmark scripts: the speed harness end to end at a tiny size, its sizes read from the
configs, and the tables of the BPC comparisons. Speeds themselves are never asserted."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from benchmarks import cli_runs, compare_methods, genmd4_vs_md4, speed
from datamodules.base import DataError
from lightning_md4.modules.registry import method_names

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "trainer": {"gradient_clip_val": 1.0, "callbacks": [
        {"class_path": "lightning_md4.speed_callbacks.ForeachEMA", "init_args": {"decay": 0.99, "warmup": True}},
        {"class_path": "lightning_md4.callbacks.SampleLogger",
         "init_args": {"num_samples": 2, "steps": 4, "grid": "uniform"}}]},
    "model": {"class_path": "lightning_md4.modules.MD4", "init_args": {
        "schedule": "linear",
        "network": {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_cond": 8, "time_conditioning": False}}},
    "data": {"class_path": "datamodules.DigitsDataModule", "init_args": {"batch_size": 4}},
}


def write_config(folder: Path, name: str, config: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow  # an `md4 fit` process per row
def test_speed_harness_end_to_end(tmp_path: Path) -> None:
    """Every method trains through `md4 fit` at the config's size, one table row each, and sampling
    gives the same tokens with the output cache on as off."""
    config = write_config(tmp_path, "tiny", TINY)
    stem = speed.main(["--config", str(config), "--methods", "all", "--levers", "1", "--warmup", "1", "--steps", "2",
                       "--no-sample-compile", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    record = json.loads(stem.with_suffix(".json").read_text())
    rows = record["train"]
    assert [r["method"] for r in rows] == list(speed.METHODS)
    assert all("error" not in r for r in rows), rows
    for r in rows:
        assert (r["batch"], r["seq_len"]) == (4, 64)  # the config's batch, the digits' length
        assert r["tokens_per_s"] == pytest.approx(r["steps_per_s"] * 4 * 64, rel=1e-9)
        assert r["peak_memory_gib"] > 0
    shape = speed.config_shape([config])
    # GenMD4 turns time conditioning on, which adds parameters; the others build the config's network.
    for r in rows:
        assert r["params"] == sum(p.numel() for p in speed.build_module(shape, r["method"]).parameters())
    sampling = record["sample"]
    assert [(s["cache"], s["compile"]) for s in sampling["rows"]] == [(False, False), (True, False)]
    assert all(s["same_tokens"] for s in sampling["rows"])
    assert 0 < sampling["rss_before_model_gib"] <= sampling["peak_rss_gib"]

    blocks = stem.with_suffix(".md").read_text().split("\n\n")
    train = next(b.splitlines() for b in blocks if b.startswith("| method"))
    assert [cell.strip() for cell in train[0].strip("|").split("|")] == speed.TRAIN_COLUMNS
    assert [line.split("|")[1].strip() for line in train[2:]] == list(speed.METHODS)


def test_sizes_come_from_the_config(tmp_path: Path) -> None:
    """Changing the config's network and batch changes what the harness builds and trains."""
    small = speed.config_shape([write_config(tmp_path, "small", TINY)])
    network = {**TINY["model"]["init_args"]["network"], "d_model": 32}
    wider = {**TINY, "model": {**TINY["model"], "init_args": {**TINY["model"]["init_args"], "network": network}},
             "data": {**TINY["data"], "init_args": {"batch_size": 6}}}
    large = speed.config_shape([write_config(tmp_path, "large", wider)])
    assert (small.batch, large.batch) == (4, 6)
    params = [sum(p.numel() for p in speed.build_module(s, "MD4").parameters()) for s in (small, large)]
    assert params[0] < params[1]
    timing = speed.Timing(warmup=1, steps=2, available_flops=1.0)
    fit = speed.fit_config(large, "SEDD", {}, timing, tmp_path / "t.npy", tmp_path, tmp_path / "r.json")
    assert fit["model"]["init_args"]["network"]["d_model"] == 32
    assert fit["data"]["init_args"]["batch_size"] == 6
    assert speed.flops_per_step(small, "MD4") < speed.flops_per_step(large, "MD4")


def test_config_stack_and_global_batch() -> None:
    """A stack merges like `md4 fit --config A --config B`; a global batch is split over the config's devices;
    the vocabulary is the data module's (GPT-2's tokenizer) and the sampling is the SampleLogger's."""
    configs = ROOT / "configs"
    shape = speed.config_shape([configs / "owt_small.yaml", configs / "owt_medium.yaml"])
    network = shape.model["init_args"]["network"]
    assert (network["n_layers"], network["d_model"], shape.model["init_args"]["schedule"]) == (24, 1024, "cosine")
    assert (shape.vocab_size, shape.seq_len, shape.batch) == (50257, 1024, 512 // 8)
    assert (shape.sample_steps, shape.sample_grid) == (1000, "uniform")
    assert speed.config_shape([configs / "owt_small.yaml"], batch=32).batch == 32


def test_ema_and_batch_follow_md4_fits_rules(tmp_path: Path) -> None:
    """Lightning's own EMA callback counts as the config's EMA, and a global batch that does not
    split over the layout is refused as md4 fit refuses it (not silently floored)."""
    config = copy.deepcopy(TINY)
    config["trainer"]["callbacks"][0] = {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging",
                                         "init_args": {"decay": 0.95}}
    assert speed.config_shape([write_config(tmp_path, "lightning_ema", config)]).ema == {"decay": 0.95}
    config["data"]["init_args"] = {"batch_size": None, "global_batch_size": 6}
    config["trainer"]["devices"] = 4
    with pytest.raises(DataError, match="does not divide"):
        speed.config_shape([write_config(tmp_path, "odd_batch", config)])


def test_other_methods_take_only_the_shared_init_args(tmp_path: Path) -> None:
    """The config's MD4 ``schedule: linear`` is no SEDD schedule (SEDD's is loglinear or geometric)."""
    shape = speed.config_shape([write_config(tmp_path, "tiny", TINY)])
    assert speed.method_model(shape, "MD4", {})["init_args"]["schedule"] == "linear"
    for method in ("GenMD4", "SEDD", "D3PM"):
        init_args = speed.method_model(shape, method, {})["init_args"]
        assert "schedule" not in init_args and init_args["network"]["d_model"] == 16


def test_lever_chain_one_row_per_method() -> None:
    """MD4's levers accumulate; the other methods get one row each, without MD4's loss levers."""
    chain = speed.lever_chain(speed.METHODS, len(speed.LEVERS))
    assert sorted(speed.METHODS) == sorted(method_names())  # every registered method, MD4 first
    assert [m for m, _, _ in chain] == ["MD4"] * len(speed.LEVERS) + list(speed.METHODS[1:])
    assert chain[len(speed.LEVERS) - 1][2]["ce_chunked"] and chain[len(speed.LEVERS) - 1][2]["compile"]
    for _, _, levers in chain[len(speed.LEVERS):]:
        assert levers["compile"] and not set(levers) & set(speed.MD4_ONLY_LEVERS)
    assert [m for m, _, _ in speed.lever_chain(speed.METHODS, 1)] == list(speed.METHODS)


def test_baseline_turns_off_what_the_config_switches_on(tmp_path: Path) -> None:
    """owt_small chunks its cross-entropy and uses ForeachEMA: the baseline row must not."""
    shape = speed.config_shape([ROOT / "configs" / "owt_small.yaml"], batch=2)
    timing = speed.Timing(warmup=1, steps=1, available_flops=1.0)
    chain = speed.lever_chain(("MD4",), len(speed.LEVERS))
    base, chunked = (speed.fit_config(shape, "MD4", levers, timing, tmp_path, tmp_path, tmp_path)
                     for levers in (chain[0][2], chain[-1][2]))
    assert base["model"]["init_args"]["ce_chunk_rows"] is None
    assert base["trainer"]["callbacks"][0]["class_path"] == "lightning.pytorch.callbacks.EMAWeightAveraging"
    assert chunked["model"]["init_args"]["ce_chunk_rows"] == 16384
    assert chunked["trainer"]["callbacks"][0] == {"class_path": "lightning_md4.speed_callbacks.ForeachEMA",
                                                   "init_args": {"decay": 0.9999, "warmup": True}}


def test_compare_methods_table_is_bpc_only() -> None:
    rows = [{"method": "MD4", "bpc_mean": 3.5, "bpc_sd": 0.01, "bpc": [3.49, 3.51]},
            {"method": "SEDD", "bpc_mean": 3.6, "bpc_sd": 0.0, "bpc": [3.6]}]
    table = compare_methods.bpc_table(rows)
    assert list(table.columns) == ["method", "test BPC (mean +- sd over seeds)", "per seed"]
    assert table.to_dict("records")[0] == {"method": "MD4", "test BPC (mean +- sd over seeds)": "3.5000 +- 0.0100",
                                           "per seed": "3.4900, 3.5100"}
    # The markdown keeps the cells as formatted: tabulate would print a lone seed's 3.6000 as 3.6.
    assert "| 3.6000 " in cli_runs.markdown_table(table)


def test_genmd4_vs_md4_table() -> None:
    results = [{"data": "chars", "run": "md4_linear", "steps": 10, "passes": 10, "fit_s": 1.5, "test_bpt": 3.75381},
               {"data": "chars", "run": "genmd4_rloo", "steps": 10, "passes": 20, "fit_s": 2.5, "test_bpt": 3.6,
                "w_most_frequent": {"' '": 1.007, "e": 0.997}, "w_least_frequent": {"'3'": 0.976}}]
    records = genmd4_vs_md4.results_table(results).to_dict("records")
    assert records[0]["test NELBO (bits/token)"] == "3.7538" and records[0]["w of most frequent"] == "-"
    assert records[1]["w of most frequent"] == "' ': 1.007, e: 0.997"
    assert records[1]["w of least frequent"] == "'3': 0.976"
