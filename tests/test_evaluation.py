"""Evaluation: NELBO averaged over keyed time draws, per-token perplexity tables, generative perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY_NET_ARGS, TINY_NETWORK
from datamodules.zeroshot import ZeroShotDataModule
from lightning_md4.diffusion.streams import keyed_times, keyed_uniform
from lightning_md4.cli import main
from lightning_md4.evaluation import (ZeroShotRow, causal_lm_nll, format_table, load_causal_lm, perplexity,
                                      unigram_entropy, zeroshot_table)
from lightning_md4.modules import MD4, SEDD
from lightning_md4.modules.base import EVAL_DRAW_STREAM
from lightning_md4.nets.transformer import TransformerConfig
from textdata import documents, train_bpe, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = TransformerConfig(**TINY_NETWORK)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def test_perplexity_is_per_token_over_the_corpus():
    # Two sequences: 10 tokens with 20 nats, 30 tokens with 30 nats -> exp(50 / 40), not the mean
    # of exp(2) and exp(1).
    assert perplexity(20.0 + 30.0, 10 + 30) == pytest.approx(math.exp(1.25), rel=1e-15)
    row = ZeroShotRow("wikitext2", 2048, math.log(30.0), 4)
    assert row.perplexity == pytest.approx(30.0)
    table = format_table([row], "MD4 run")
    assert "| wikitext2 | 2,048 | 3.4012 | 4.9069 | 30.00 | 4 |" in table and "continuous" in table


def hand_draw(model, batch, k, draws):
    """Draw k of the documented protocol: time shifted by k / draws, mask stream of its own."""
    index, seq = batch["index"], batch["x0"].shape[1]
    t = torch.remainder(keyed_times(0, index) + k / draws, 1.0)  # linear schedule: t = u
    noise = keyed_uniform(0, index, seq, stream=0 if k == 0 else EVAL_DRAW_STREAM + k)
    return model.process.nelbo(model.net, batch["x0"], t=t, noise=noise)


@torch.no_grad()
def test_eval_nelbo_averages_keyed_draws_stratified_in_time():
    torch.manual_seed(0)
    model = MD4(7, 12, network=TINY).eval()
    batch = {"x0": torch.randint(0, 7, (3, 12)), "index": torch.tensor([4, 9, 2])}
    single = model.eval_nelbo(batch)
    torch.testing.assert_close(single, hand_draw(model, batch, 0, 1).double())  # one draw: unchanged protocol
    model.configure_evaluation(draws=5)
    times = torch.stack([model.eval_noise(batch, k)[0] for k in range(5)], 1)  # [B, K]
    gaps = torch.diff(torch.sort(times, 1).values, dim=1)
    torch.testing.assert_close(gaps, torch.full_like(gaps, 0.2))  # one time in each fifth of [0, 1)
    masks = [model.eval_noise(batch, k)[1] for k in range(5)]
    assert all(not torch.equal(masks[i], masks[j]) for i in range(5) for j in range(i))
    expected = torch.stack([hand_draw(model, batch, k, 5) for k in range(5)]).double().mean(0)
    torch.testing.assert_close(model.eval_nelbo(batch), expected)
    # Keyed on the example: any batch split gives each sequence the same value.
    part = {"x0": batch["x0"][1:], "index": batch["index"][1:]}
    torch.testing.assert_close(model.eval_nelbo(part), expected[1:])


@torch.no_grad()
def test_discrete_time_bound_and_methods_without_one():
    torch.manual_seed(0)
    model = MD4(7, 12, network=TINY).eval()
    batch = {"x0": torch.randint(0, 7, (3, 12)), "index": torch.arange(3)}
    model.configure_evaluation(draws=2, T=10)
    expected = []
    for k in range(2):
        t = torch.remainder(keyed_times(0, batch["index"]) + k / 2, 1.0)
        noise = keyed_uniform(0, batch["index"], 12, stream=0 if k == 0 else EVAL_DRAW_STREAM + k)
        expected.append(model.process.nelbo_discrete(model.net, batch["x0"], 10, t=t, noise=noise))
    torch.testing.assert_close(model.eval_nelbo(batch), torch.stack(expected).double().mean(0))
    with pytest.raises(ValueError, match="SEDD has no T-step discrete-time bound"):
        SEDD(7, 12, network=TINY).configure_evaluation(draws=1, T=100)
    with pytest.raises(ValueError, match="eval_draws is 0"):
        model.configure_evaluation(draws=0)


def test_zeroshot_table_reports_total_nats_over_total_tokens(tmp_path, bpe):
    lines = [d + "\n" for d in documents(40)]
    (tmp_path / "wiki.raw").write_text("".join(lines))
    torch.manual_seed(0)
    model = MD4(300, 16, network=TINY)
    trainer_kwargs = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "enable_progress_bar": False,
                      "enable_model_summary": False}
    rows = zeroshot_table(model, {"wikitext2": str(tmp_path / "wiki.raw")}, trainer_kwargs, str(bpe),
                          str(tmp_path / "cache"), batch_size=3, draws=3)
    data = ZeroShotDataModule("wikitext2", path=str(tmp_path / "wiki.raw"), tokenizer=str(bpe),
                              data_dir=str(tmp_path / "cache"), seq_len=16)
    data.setup("test")
    model.eval()
    with torch.no_grad():  # one block at a time: the batch size must not matter
        total = sum(float(model.eval_nelbo({"x0": item["x0"][None], "index": torch.tensor([item["index"]])}))
                    for item in (data.test_set[i] for i in range(len(data.test_set))))
    tokens = len(data.test_set) * 16
    assert rows[0].tokens == tokens and rows[0].draws == 3 and rows[0].data == "wikitext2"
    assert rows[0].nelbo == pytest.approx(total / tokens, rel=1e-5)
    assert rows[0].perplexity == pytest.approx(perplexity(total, tokens), rel=1e-5)


def test_unigram_entropy_by_hand():
    tokens = torch.tensor([[0, 0, 1, 2], [5, 5, 5, 5]])
    expected = torch.tensor([-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), 0.0], dtype=torch.float64)
    torch.testing.assert_close(unigram_entropy(tokens), expected)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, bpe):
    """A randomly initialised 1-layer GPT-2 with a 12-token context and the test BPE, saved like a hub model."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_positions=12, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_file=str(bpe), bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


@torch.no_grad()
def test_generative_perplexity_against_token_by_token_scoring(tiny_gpt2):
    model, tokenizer = load_causal_lm(str(tiny_gpt2), "cpu")
    texts = ["The cat sat.", " ".join(documents(3)), "A bird sang over the quiet river as children played."]
    nll, count = causal_lm_nll(texts, model, tokenizer, batch_size=2)
    bos, context, total, scored = tokenizer.bos_token_id, 12, 0.0, 0
    for text in texts:
        ids = [bos, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        for j in range(1, len(ids)):  # token j given the tokens of its window before it
            # 12-token windows ending at 12, 18, 24, ... (stride 6), the last one at the end of the text
            k = 0 if j < context else (j - context) // (context // 2) + 1
            start = max(0, min(context + k * (context // 2), len(ids)) - context)
            logits = model(input_ids=torch.tensor([ids[start:j]])).logits[0, -1].double()
            total -= float(logits.log_softmax(-1)[ids[j]])
            scored += 1
    assert count == scored > 3 * context  # the long text spans several windows
    assert nll == pytest.approx(total, rel=1e-6)
    with pytest.raises(FileNotFoundError, match="could not load the causal language model"):
        load_causal_lm(str(tiny_gpt2 / "missing"), "cpu")


def md4(capsys, *args: str) -> str:
    """Run the md4 command in this process (a subprocess would re-import torch each time); its stdout."""
    capsys.readouterr()
    main(list(args))
    return capsys.readouterr().out


@pytest.mark.slow
def test_fit_then_zeroshot_test_and_genppl_through_the_cli(tmp_path, bpe, tiny_gpt2, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "owt.jsonl", documents(120))
    (tmp_path / "wiki.raw").write_text("".join(d + "\n" for d in documents(30, seed=5)))
    (tmp_path / "ptb.txt").write_text("".join(d.lower() + "\n" for d in documents(30, seed=6)))
    run = tmp_path / "run"
    md4(capsys, "fit", "--config", str(ROOT / "configs" / "owt_tiny.yaml"), f"--trainer.default_root_dir={run}",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", f"--data.init_args.paths=[{tmp_path / 'owt.jsonl'}]",
        f"--data.init_args.tokenizer={bpe}", "--data.init_args.seq_len=16", "--data.init_args.val_docs=10",
        "--data.init_args.global_batch_size=4", *TINY_NET_ARGS)
    ckpt = run / "checkpoints" / "last.ckpt"
    out = md4(capsys, "zeroshot", "--ckpt_path", str(ckpt), "--sets", "wikitext2,ptb",
              f"--paths.wikitext2={tmp_path / 'wiki.raw'}", "--paths.ptb", str(tmp_path / "ptb.txt"), "--data_dir", str(tmp_path / "zs"),
              "--eval_draws", "2", "--devices", "1", "--num_workers", "0")
    saved = json.loads((run / "checkpoints" / "zeroshot-last.json").read_text())
    assert [r["data"] for r in saved] == ["wikitext2", "ptb"] and all(r["draws"] == 2 for r in saved)
    for r in saved:
        assert r["perplexity"] == pytest.approx(math.exp(r["nelbo"]))
        assert f"| {r['data']} | {r['tokens']:,} | {r['nelbo']:.4f} |" in out
    # md4 test on one zero-shot set with the same draws reports the same NELBO; the tokenizer and
    # seq_len carry over from the run's OpenWebText config.
    out = md4(capsys, "test", "--config", str(run / "tensorboard" / "config.yaml"), "--ckpt_path", str(ckpt),
              "--eval_draws", "2", "--data", "datamodules.ZeroShotDataModule", "--data.init_args.name=wikitext2",
              f"--data.init_args.path={tmp_path / 'wiki.raw'}", "--trainer.enable_progress_bar=false",
              "--trainer.logger=false")
    assert f"NELBO {saved[0]['nelbo']:.4f}" in out
    out = md4(capsys, "genppl", "--ckpt_path", str(ckpt), "--scorer", str(tiny_gpt2), "--num_samples", "3",
              "--steps", "4", "--batch_size", "2", "--device", "cpu")
    result = json.loads((run / "checkpoints" / "genppl-last.json").read_text())
    assert len(result["samples"]) == 3 and result["scored_tokens"] > 0 and 0 < result["unigram_entropy"] <= math.log(16)
    assert f"generative perplexity under {tiny_gpt2} {result['generative_perplexity']:.2f}" in out


def test_bad_evaluation_settings_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="^md4: error: unknown zero-shot set 'wiki'"):
        main(["zeroshot", "--ckpt_path", str(tmp_path / "none.ckpt"), "--sets", "wiki"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["zeroshot", "--ckpt_path", str(tmp_path / "none.ckpt"), "--sets", "ptb"])
