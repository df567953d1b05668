"""The autoregressive baseline (issue 23): exact NLL, causality, the KV-cache sampler, prefix
conditioning, and an AR checkpoint as the offline scorer of ``md4 genppl``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import lightning
import pytest
import torch

from conftest import md4, one_line_error
from datamodules.base import decode_chars
from exact import empirical_tv, random_distribution
from lightning_md4.checkpoints import FitCheckpoint
from lightning_md4.cli import main
from lightning_md4.diffusion.autoregressive import Autoregressive
from lightning_md4.evaluation import ar_nll, vocabulary, vocabulary_difference
from lightning_md4.modules import AR, MD4
from lightning_md4.nets import Transformer, TransformerConfig, UNetConfig
from lightning_md4.nets.transformer import KVCache

TINY = TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_cond=8)


def random_causal_net(vocab_size: int = 5, num_classes: int = 0, seed: int = 0) -> Transformer:
    """A float64 causal transformer with every weight random (the adaLN-Zero gates too), so each
    block's attention and MLP change the output."""
    torch.manual_seed(seed)
    cfg = TransformerConfig(n_layers=2, d_model=16, n_heads=2, d_cond=8, time_conditioning=False, causal=True,
                            num_classes=num_classes)
    net = Transformer(vocab_size, cfg).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.4)
    return net


# -- the exact NLL -----------------------------------------------------------------------------
class BigramNet:
    """Logits known in closed form: the output at each position is ``table[input token]``, so the
    prediction of ``x_i`` depends only on the token read before it (BOS for ``x_0``)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # [V + 1, V]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.table[x]


def test_exact_nll_against_a_hand_computation():
    V = 4
    table = torch.randn(V + 1, V, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x0 = torch.tensor([[2, 0, 3, 3, 1], [1, 1, 1, 0, 2]])
    nll = Autoregressive(V).nll(BigramNet(table), x0)
    for row, seq in enumerate(x0.tolist()):
        total, previous = 0.0, V  # x_0 is predicted from BOS = V
        for token in seq:
            logits = table[previous].tolist()
            log_z = math.log(sum(math.exp(v) for v in logits))
            total -= logits[token] - log_z
            previous = token
        assert nll[row].item() == pytest.approx(total, rel=1e-14)
    assert nll.dtype == torch.float64


class ExactConditionals:
    """The exact next-token conditionals ``log p(x_i | x_<i)`` of a distribution over all V^N
    sequences, as a causal network: position i reads ``[BOS, x_0, ..., x_{i-1}]``."""

    def __init__(self, configs: torch.Tensor, probs: torch.Tensor, V: int) -> None:
        self.configs, self.probs, self.V = configs, probs, V

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        values = torch.arange(self.V)
        out = []
        for i in range(x.shape[1]):
            match = (self.configs[None, :, :i] == x[:, None, 1 : i + 1]).all(-1)  # [B, V^N]: x_<i agrees
            hits = match[:, :, None] & (self.configs[None, :, i, None] == values)  # [B, V^N, V]
            out.append((hits * self.probs[None, :, None]).sum(1).log())
        return torch.stack(out, dim=1)


def test_nll_of_the_exact_conditionals_is_minus_log_p_and_sampling_draws_p():
    V, N = 3, 3
    configs, probs = random_distribution(V, N, seed=1)
    net = ExactConditionals(configs, probs, V)
    process = Autoregressive(V)
    torch.testing.assert_close(process.nll(net, configs), -probs.log(), rtol=1e-12, atol=0)
    net.num_classes, net.vocab_size = 0, V
    generator = torch.Generator().manual_seed(0)
    samples, nfe = process.sample(net, (3000, N), generator, cache=False)
    assert nfe == N and empirical_tv(samples, configs, probs) < 0.03


def module(**network) -> AR:
    return AR(5, 12, network=TransformerConfig(**{**TINY.__dict__, **network}), optim={"warmup_steps": 1})


def test_module_loss_and_reported_number_are_the_exact_nll_token_by_token():
    model = module().double()
    with torch.no_grad():
        for p in model.net.parameters():
            p.normal_(0.0, 0.4)
    model.eval()
    x0 = torch.randint(5, (3, 12), generator=torch.Generator().manual_seed(0))
    batch = {"x0": x0, "index": torch.arange(3)}
    # The chain rule by hand: each token from the network run on BOS and the tokens before it only.
    expected = torch.zeros(3, dtype=torch.float64)
    for i in range(12):
        inp = torch.cat([torch.full((3, 1), 5), x0[:, :i]], dim=1)
        logp = model.net(inp, torch.zeros(3)).log_softmax(-1)[:, -1]
        expected -= logp.gather(-1, x0[:, i : i + 1])[:, 0]
    torch.testing.assert_close(model.eval_nelbo(batch), expected, rtol=1e-10, atol=0)
    objective, reported = model.train_objective(batch)
    torch.testing.assert_close(objective.detach(), expected, rtol=1e-10, atol=0)
    model.configure_evaluation(draws=7)  # exact: the draws change nothing
    torch.testing.assert_close(model.eval_nelbo(batch), expected, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="eval_T=10: AR's NLL is exact and has no T-step bound"):
        model.configure_evaluation(T=10)


def test_ar_is_the_shared_transformer_made_causal_without_time_input():
    model = module(time_conditioning=True)  # a config's time input is turned off
    assert model.net.cfg.causal and not model.net.cfg.time_conditioning
    assert model.hparams.network["causal"] and not model.hparams.network["time_conditioning"]
    same = MD4(5, 12, network=TransformerConfig(**{**TINY.__dict__, "time_conditioning": False}))
    assert [p.shape for p in model.net.parameters()] == [p.shape for p in same.net.parameters()]
    with pytest.raises(ValueError, match="AR needs the transformer"):
        AR(5, 12, network=UNetConfig())
    rebuilt = AR(**model.hparams)  # its hyper-parameters are its arguments (md4 test rebuilds it so)
    assert rebuilt.hparams == model.hparams


# -- causality ---------------------------------------------------------------------------------
def test_changing_a_later_token_never_changes_an_earlier_log_probability():
    """Fails when the causal mask is removed (checked by removing it, issue 23)."""
    net = random_causal_net()
    process = Autoregressive(5)
    x = torch.randint(5, (2, 10), generator=torch.Generator().manual_seed(1))

    def log_probs(x0: torch.Tensor) -> torch.Tensor:  # [B, N, V]: the distribution of each x_i given x_<i
        return net(process.inputs(x0), torch.zeros(2)).log_softmax(-1)

    base = log_probs(x)
    for j in range(9):
        changed = x.clone()
        changed[:, j] = (changed[:, j] + 1) % 5
        out = log_probs(changed)
        # x_j is read at input position j + 1, so the distributions of x_0..x_j do not move ...
        torch.testing.assert_close(out[:, : j + 1], base[:, : j + 1], rtol=0, atol=1e-12)
        torch.testing.assert_close(process.token_log_probs(net, changed)[:, :j],
                                   process.token_log_probs(net, x)[:, :j], rtol=0, atol=1e-12)
        # ... and the next one does (the test is not vacuous)
        assert (out[:, j + 1] - base[:, j + 1]).abs().max() > 1e-6


def test_decode_with_the_cache_equals_the_full_forward():
    net = random_causal_net()
    x = torch.randint(6, (2, 11), generator=torch.Generator().manual_seed(2))
    full = net(x, torch.zeros(2))
    cache = KVCache(11)
    pieces = [net.decode(x[:, :3], cache), *(net.decode(x[:, i : i + 1], cache) for i in range(3, 7)),
              net.decode(x[:, 7:], cache)]  # several new positions after cached ones: the offset mask
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-6, atol=1e-9)
    assert cache.length == 11
    with pytest.raises(ValueError, match="KVCache holds 11 positions"):
        net.decode(x[:, :1], cache)
    with pytest.raises(ValueError, match="needs a causal transformer"):
        Transformer(5, TINY).decode(x, KVCache(11))


# -- sampling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["unconditional", "prefixes", "guided"])
def test_kv_cache_sampler_equals_the_uncached_one_token_for_token(case):
    N, B = 12, 6
    net = random_causal_net(num_classes=3 if case == "guided" else 0)
    process = Autoregressive(5)
    kwargs, prefix = {}, 0
    if case == "prefixes":  # rows with given prefixes of different lengths (the shortest: 2)
        x = torch.full((B, N), 5)
        lengths = [2, 5, 2, 11, 3, 12]
        for row, length in enumerate(lengths):
            x[row, :length] = torch.randint(5, (length,), generator=torch.Generator().manual_seed(row))
        kwargs, prefix = {"x": x}, 2
    if case == "guided":
        kwargs = {"labels": torch.tensor([0, 1, 2, 0, 1, 2]), "guidance": 1.5}
    runs = []
    for cache in (True, False):
        generator = torch.Generator().manual_seed(3)
        runs.append(process.sample(net, (B, N), generator, cache=cache, **kwargs))
    (cached, nfe_cached), (uncached, nfe_uncached) = runs
    assert torch.equal(cached, uncached)
    assert nfe_cached == nfe_uncached == N - prefix
    assert cached.min() >= 0 and cached.max() < 5
    if case == "prefixes":
        given = kwargs["x"] != 5
        assert torch.equal(cached[given], kwargs["x"][given])


def test_module_sample_keeps_the_base_signature_and_refuses_a_non_prefix():
    model = module()
    generator = torch.Generator().manual_seed(0)
    tokens, nfe = model.sample(3, 64, "cosine", generator=generator)  # steps and grid are ignored
    assert tokens.shape == (3, 12) and nfe == 12
    x = torch.full((1, 12), 5)
    x[0, 4] = 1  # a given token after a position to generate
    with pytest.raises(ValueError, match="AR conditions on a prefix only"):
        model.sample(1, 1, x=x)


# -- the scorer ----------------------------------------------------------------------------------
CHARS = "abc \n"
TEXT = "ab c\nabc ba\ncab acb\n" * 40


def save_checkpoint(path: Path, model, data: dict) -> Path:
    """A checkpoint as md4 fit writes it (model and data module hyper-parameters), without a fit."""
    hparams = {**model.hparams, "_class_path": f"lightning_md4.modules.{type(model).__name__}"}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams, "datamodule_hyper_parameters": data,
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def char_data(corpus: Path, vocab: str = CHARS) -> dict:
    return {"_class_path": "datamodules.CharDataModule", "path": str(corpus), "vocab": vocab, "seq_len": 12}


def test_bad_scorer_arguments_are_one_line_errors(tmp_path, corpus):
    torch.manual_seed(0)
    sampled = save_checkpoint(tmp_path / "md4.ckpt", MD4(5, 12, network=TINY), char_data(corpus))
    ar = module()
    other_chars = save_checkpoint(tmp_path / "other.ckpt", ar, char_data(corpus, "abcd\n"))
    reordered = save_checkpoint(tmp_path / "reordered.ckpt", ar, char_data(corpus, "cba \n"))
    digits = save_checkpoint(tmp_path / "digits.ckpt", ar, {"_class_path": "datamodules.DigitsDataModule"})
    genppl = ["genppl", "--ckpt_path", str(sampled), "--device", "cpu", "--scorer"]
    assert one_line_error([*genppl, str(tmp_path / "missing.ckpt")]) == (
        f"md4: error: --scorer {tmp_path / 'missing.ckpt'}: no such checkpoint; pass an AR checkpoint of md4 fit "
        "(.ckpt), or a causal language model's hub name or folder")
    message = one_line_error([*genppl, str(sampled)])
    assert "holds a model of class MD4; a checkpoint scorer must be an AR model" in message
    assert ("trained on another vocabulary than" in (message := one_line_error([*genppl, str(other_chars)]))
            and "its characters differ (only the scorer's: 'd', only the sampled model's: ' ')" in message)
    assert "the same set in another token order" in one_line_error([*genppl, str(reordered)])
    assert ("its data module is 'datamodules.DigitsDataModule', the sampled model's is 'datamodules.CharDataModule'"
            in one_line_error([*genppl, str(digits)]))
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    assert one_line_error([*genppl, str(tmp_path / "junk.ckpt")]).startswith(
        f"md4: error: --scorer: checkpoint {tmp_path / 'junk.ckpt'} is corrupt or not a PyTorch checkpoint")


def test_a_model_of_no_text_is_refused_before_a_hub_scorer_loads(tmp_path, monkeypatch):
    digits = save_checkpoint(tmp_path / "digits.ckpt", MD4(17, 64, network=TINY),
                             {"_class_path": "datamodules.DigitsDataModule"})

    def never(*args, **kwargs):
        raise AssertionError("the causal LM was loaded before the checkpoint's data was checked")

    monkeypatch.setattr("lightning_md4.evaluation.load_causal_lm", never)
    message = one_line_error(["genppl", "--ckpt_path", str(digits), "--device", "cpu", "--scorer", "gpt2-large"])
    assert "is a model of datamodules.DigitsDataModule, not of text" in message


def test_vocabulary_of_word_piece_data_is_its_tokenizer():
    gpt2 = {"data module": "datamodules.OpenWebTextDataModule", "vocab_size": 50258, "tokenizer": "gpt2"}
    assert vocabulary_difference(gpt2, dict(gpt2)) is None
    assert vocabulary_difference(gpt2, {**gpt2, "data module": "datamodules.ZeroShotDataModule"}).startswith(
        "its data module is")
    assert vocabulary_difference({**gpt2, "vocab_size": 300}, gpt2) == (
        "its vocab_size is 300, the sampled model's is 50258")


def test_genppl_with_an_ar_checkpoint_scores_the_sampled_token_ids(tmp_path, corpus, capsys):
    torch.manual_seed(0)
    sampled = save_checkpoint(tmp_path / "md4.ckpt", MD4(5, 12, network=TINY), char_data(corpus))
    scorer = save_checkpoint(tmp_path / "ar.ckpt", module(), char_data(corpus))
    main(["genppl", "--ckpt_path", str(sampled), "--scorer", str(scorer), "--num_samples", "5", "--steps", "6",
          "--batch_size", "2", "--device", "cpu", "--output", str(tmp_path / "out.json")])
    result = json.loads((tmp_path / "out.json").read_text())
    tokens = torch.tensor([[CHARS.index(c) for c in text] for text in result["samples"]])
    assert tokens.shape == (5, 12) and result["scored_tokens"] == 60
    ar = FitCheckpoint.read(scorer).model("cpu").eval()
    with torch.no_grad():
        nll = ar.process.nll(ar.net, tokens).double().sum().item()
    assert result["generative_perplexity"] == pytest.approx(math.exp(nll / 60), rel=1e-6)
    assert f"generative perplexity under {scorer} {result['generative_perplexity']:.2f} over 60 tokens" in \
        capsys.readouterr().out


def test_ar_nll_of_long_samples_by_windows():
    model = module().double()
    with torch.no_grad():
        for p in model.net.parameters():
            p.normal_(0.0, 0.4)
    tokens = torch.randint(5, (3, 12), generator=torch.Generator().manual_seed(0))
    total, count = ar_nll(model, tokens, batch_size=2)  # seq_len 12: one pass, the exact NLL
    assert count == 36 and total == pytest.approx(model.process.nll(model.net, tokens).sum().item(), rel=1e-12)
    longer = torch.randint(5, (2, 30), generator=torch.Generator().manual_seed(1))
    total, count = ar_nll(model, longer, stride=4)
    # Windows of 12 ending 4 apart (the last at the end): each token once, with >= 8 tokens before it.
    expected = -model.process.token_log_probs(model.net, longer[:, :12]).sum().item()
    scored_to = 12
    while scored_to < 30:
        end = min(scored_to + 4, 30)
        window = model.process.token_log_probs(model.net, longer[:, end - 12 : end])
        expected -= window[:, scored_to - end :].sum().item()
        scored_to = end
    assert count == 60 and total == pytest.approx(expected, rel=1e-12)


def test_vocabulary_names_the_data_module_and_its_characters(tmp_path, corpus):
    ckpt = FitCheckpoint.read(save_checkpoint(tmp_path / "ar.ckpt", module(), char_data(corpus)))
    assert vocabulary(ckpt) == {"data module": "datamodules.CharDataModule", "vocab_size": 5, "vocab": CHARS}


# -- through md4 fit ---------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
TINY_FIT = ("--trainer.max_steps=30", "--trainer.val_check_interval=15", "--trainer.enable_progress_bar=false",
            "--data.init_args.seq_len=16", "--data.init_args.batch_size=8", "--data.init_args.val_examples=4",
            "--model.init_args.network.n_layers=1", "--model.init_args.network.d_model=32",
            "--model.init_args.network.n_heads=2", "--model.init_args.network.d_cond=16")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """An AR and an MD4 model fitted for a few steps on the same tiny corpus through md4 fit."""
    root = tmp_path_factory.mktemp("ar_fit")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT * 3)
    runs = {}
    for name, config in (("ar", "ar_tiny_text.yaml"), ("md4", "tiny_text.yaml")):
        md4("fit", "--config", str(ROOT / "configs" / config), f"--trainer.default_root_dir={root / name}",
            f"--data.init_args.path={corpus}", *TINY_FIT, cwd=root)
        runs[name] = root / name
    return root, runs


@pytest.mark.slow
def test_checkpoint_round_trip_through_md4(fitted):
    root, runs = fitted
    ckpt = runs["ar"] / "checkpoints" / "last.ckpt"
    model = FitCheckpoint.read(ckpt).model("cpu").eval()
    assert isinstance(model, AR) and model.net.cfg.causal and not model.net.cfg.time_conditioning
    data = FitCheckpoint.read(ckpt).datamodule()
    data.setup("test")
    with torch.no_grad():
        nll = torch.cat([model.eval_nelbo(batch) for batch in data.test_dataloader()])
    nats = float(nll.sum() / nll.numel() / 16)
    config = runs["ar"] / "tensorboard" / "config.yaml"
    out = md4("test", "--config", str(config), "--ckpt_path", str(ckpt), "--eval_draws", "4", cwd=root).stdout
    printed = re.search(r"AR on CharDataModule test: NELBO ([0-9.]+) nats/token", out)
    assert printed and float(printed.group(1)) == pytest.approx(nats, abs=2e-6)
    proc = md4("test", "--config", str(config), "--ckpt_path", str(ckpt), "--eval_T", "10", cwd=root, check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == (
        "md4: error: eval_T=10: AR's NLL is exact and has no T-step bound; drop eval_T")
    out = md4("sample", "--ckpt_path", str(ckpt), "--num_samples", "3", "--output", str(root / "s.txt"),
              "--device", "cpu", cwd=root).stdout
    assert "16 network evaluations" in out
    assert [len(line) for line in (root / "s.txt").read_text().splitlines()] == [16, 16, 16]


@pytest.mark.slow
def test_genppl_scores_md4_samples_with_the_ar_checkpoint_end_to_end(fitted):
    root, runs = fitted
    scorer = runs["ar"] / "checkpoints" / "last.ckpt"
    out = md4("genppl", "--ckpt_path", str(runs["md4"] / "checkpoints" / "last.ckpt"), "--scorer", str(scorer),
              "--num_samples", "4", "--steps", "8", "--batch_size", "2", "--device", "cpu", cwd=root).stdout
    result = json.loads((runs["md4"] / "checkpoints" / "genppl-last.json").read_text())
    assert result["scored_tokens"] == 64 and len(result["samples"]) == 4
    vocab = FitCheckpoint.read(scorer).data_hparams["vocab"]
    tokens = torch.tensor([[vocab.index(c) for c in text] for text in result["samples"]])
    assert decode_chars(tokens, vocab, "_") == result["samples"]
    total, count = ar_nll(FitCheckpoint.read(scorer).model("cpu"), tokens)
    assert result["generative_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert f"generative perplexity under {scorer} {result['generative_perplexity']:.2f} over 64 tokens" in out
