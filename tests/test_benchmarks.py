"""The benchmark scripts: the speed harness end to end at a tiny size, its sizes read from the
configs, and the tables of the BPC comparisons. Speeds themselves are never asserted."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
import yaml

from benchmarks import bare_loop, compare_methods, genmd4_vs_md4, speed
from datamodules.base import DataError
from datamodules.tokens import TokenFileDataModule
from lightning_md4.modules.registry import method_names
from lightning_md4.tables import markdown_table

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
    """The bare-loop anchor, then every method through `md4 fit` at the config's size, one table row
    each, and sampling gives the same tokens with the output cache on as off."""
    config = write_config(tmp_path, "tiny", TINY)
    stem = speed.main(["--config", str(config), "--methods", "all", "--levers", "1", "--warmup", "1", "--steps", "2",
                       "--no-sample-compile", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    record = json.loads(stem.with_suffix(".json").read_text())
    bare, *rows = record["train"]
    assert [r["method"] for r in rows] == list(speed.METHODS)
    assert all("error" not in r for r in [bare, *rows]), rows
    # The anchor trains MD4's network at the same shape, in a process with the fit rows' thread count.
    assert (bare["method"], bare["levers"]) == ("MD4", speed.BARE_LOOP)
    assert (bare["batch"], bare["seq_len"], bare["params"], bare["threads"]) == \
        (4, 64, rows[0]["params"], rows[0]["threads"])
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
    assert [line.split("|")[1].strip() for line in train[2:]] == ["MD4", *speed.METHODS]
    assert train[2].split("|")[speed.TRAIN_COLUMNS.index("vs bare loop") + 1].strip() == "1.00x"


def test_bare_loop_does_the_work_of_a_fit_step(tmp_path: Path) -> None:
    """The anchor measures the same work as `md4 fit`: on the batches a Trainer fed the module, its
    loss equals training_step's at step 0 (same network, batch and keyed noise) and at the steps
    after (same AdamW, param groups, clipping and learning-rate schedule), and so do the weights."""
    config = copy.deepcopy(TINY)
    config["trainer"]["gradient_clip_val"] = 0.05  # small enough to clip every step
    config["model"]["init_args"]["optim"] = {"lr": 3e-2, "warmup_steps": 1, "weight_decay": 0.5}
    shape = speed.config_shape([write_config(tmp_path, "tiny", config)])
    steps = 4
    tokens = speed.token_file(shape, steps, tmp_path)

    fed: list[tuple[dict, float]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            fed.append(({k: v.clone() for k, v in batch.items()}, float(outputs["loss"])))

    torch.manual_seed(0)
    module = speed.build_module(shape, "MD4")
    data = TokenFileDataModule(str(tokens), shape.vocab_size, shape.seq_len, val_tokens=shape.seq_len,
                               test_tokens=shape.seq_len, batch_size=shape.batch)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision="32-true",
                         gradient_clip_val=shape.gradient_clip_val, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Record()])
    trainer.fit(module, data)

    torch.manual_seed(0)
    loop = bare_loop.BareLoop(shape, total_steps=steps)
    losses = [float(loop.step(batch)) for batch, _ in fed]
    assert losses[0] == pytest.approx(fed[0][1], rel=1e-6)
    assert losses == pytest.approx([loss for _, loss in fed], rel=1e-5)
    assert len(set(losses)) == steps  # the weights moved
    for name, value in module.net.state_dict().items():
        torch.testing.assert_close(loop.module.net.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    # Its in-memory batches are the token file's chunks, with the indices the noise is keyed on.
    batches = bare_loop.memory_batches(tokens, shape.batch, shape.seq_len, 2, "cpu")
    assert [b["x0"].shape for b in batches] == [(shape.batch, shape.seq_len)] * 2
    assert batches[1]["index"].tolist() == list(range(shape.batch, 2 * shape.batch))
    assert batches[0]["x0"].dtype == torch.long


def test_bare_loop_refuses_a_precision_it_does_not_replicate() -> None:
    assert bare_loop.autocast_dtype("32-true") is None
    assert bare_loop.autocast_dtype("bf16-mixed") is torch.bfloat16
    with pytest.raises(ValueError, match="16-mixed"):
        bare_loop.autocast_dtype("16-mixed")


def test_every_row_has_its_ratio_to_the_bare_loop() -> None:
    """"vs bare loop" is each row's steps/s over the anchor's; "vs baseline" over the first fit row's."""
    common = {"params": 10, "batch": 2, "seq_len": 4, "mfu": None, "peak_memory_gib": 1.0, "cpu_s_per_step": 0.1}
    rows = [{"method": "MD4", "levers": speed.BARE_LOOP, "steps_per_s": 10.0, "tokens_per_s": 80.0, **common},
            {"method": "MD4", "levers": "baseline", "steps_per_s": 9.0, "tokens_per_s": 72.0, **common},
            {"method": "MD4", "levers": "foreach EMA", "steps_per_s": 12.0, "tokens_per_s": 96.0, **common},
            {"method": "SEDD", "levers": "all levers that apply", "error": "exit 1: boom"}]
    table = speed.train_table(rows)
    assert list(table.columns) == speed.TRAIN_COLUMNS
    assert table["vs bare loop"].tolist()[:3] == ["1.00x", "0.90x", "1.20x"]
    assert table["vs baseline"].tolist()[:3] == ["-", "1.00x", "1.33x"]
    rows[2]["cpu_s_per_step"] = 0.125  # more CPU time per step than the anchor's 0.1
    assert speed.train_table(rows)["vs bare loop, CPU time"].tolist()[:3] == ["1.00x", "1.00x", "0.80x"]
    assert table["steps/s"].tolist()[3] == "failed: exit 1: boom"


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


def test_compare_methods_table_states_settings_uncertainty_and_verdicts() -> None:
    results = pd.DataFrame({"method": ["MD4"] * 2 + ["D3PM"] * 2, "seed": [0, 1, 0, 1],
                            "bpt": [3.5, 3.6, 3.4, 3.45], "se": [0.001, 0.002, 0.003, 0.001],
                            "exact_sequences": [0, 0, 64, 64], "exact_bpt": [None, None, 3.3, 3.35],
                            "drawn_bpt": [None, None, 3.5, 3.45]})
    table = compare_methods.compare_table(results, {r.name: r for r in compare_methods.ROWS})
    records = table.to_dict("records")
    assert records[0]["test BPC, mean +- se over seeds"] == "3.5500 +- 0.0500"
    assert records[0]["evaluation se (largest seed)"] == "0.0020"
    exact = "exact T-sum BPC vs the draws on the same sequences"
    assert records[0]["verdict"] == "baseline" and records[0][exact] == "-"
    assert records[1]["settings"].startswith("absorbing, T 1000")
    assert records[1][exact] == "3.3250 vs drawn 3.4750 (first 64 sequences, mean over seeds)"
    assert records[1]["paired diff vs MD4 [95% t interval]"].startswith("-0.1250 [")
    # The markdown keeps the cells as formatted: tabulate would print 3.6000 as 3.6.
    assert "| 3.5500 +- 0.0500 " in markdown_table(table)


def test_genmd4_vs_md4_table() -> None:
    results = [{"data": "chars", "run": "md4_linear", "steps": 10, "passes": 10, "fit_s": 1.5, "test_bpt": 3.75381,
                "eval_se": 0.00123},
               {"data": "chars", "run": "genmd4_rloo", "steps": 10, "passes": 20, "fit_s": 2.5, "test_bpt": 3.6,
                "eval_se": 0.002,
                "w_most_frequent": {"' '": 1.007, "e": 0.997}, "w_least_frequent": {"'3'": 0.976}}]
    records = genmd4_vs_md4.results_table(results).to_dict("records")
    assert records[0]["test NELBO (bits/token) +- evaluation se"] == "3.7538 +- 0.0012" and records[0]["w of most frequent"] == "-"
    assert records[1]["w of most frequent"] == "' ': 1.007, e: 0.997"
    assert records[1]["w of least frequent"] == "'3': 0.976"
