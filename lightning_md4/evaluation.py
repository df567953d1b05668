"""Language-model evaluations beyond one ``md4 test``: the zero-shot table and generative perplexity,
the computations of ``md4 zeroshot`` and ``md4 genppl`` (their command lines: :mod:`lightning_md4.commands`).

The zero-shot table runs ``trainer.test`` of one model on each zero-shot set
(:mod:`datamodules.zeroshot`) with the NELBO averaged over several keyed time draws per sequence.
Perplexity is ``exp(total nats / total tokens)`` over a whole set: a per-token average, not an
average of per-sequence perplexities.

Generative perplexity: samples of a model (categorical draws in float64, see
:mod:`lightning_md4.diffusion.sampling`), decoded to text, are retokenized for a causal language
model (GPT-2 large by default, from the hub or a local folder) that scores them; the samples'
unigram entropy exposes low-diversity samples that a low generative perplexity would flatter.
The scorer may instead be an AR checkpoint of this suite (:func:`load_ar_scorer`), trained on
the same data module and vocabulary, which scores the sampled token ids themselves
(:func:`ar_nll`): no download, and no retokenization.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from datamodules.zeroshot import ZeroShotDataModule
from lightning_md4.checkpoints import FitCheckpoint, first_line, resolve_class
from lightning_md4.modules.ar import AR
from lightning_md4.modules.base import CheckpointError, DiffusionModule
from lightning_md4.tables import markdown_table


@dataclass
class ZeroShotRow:
    """One line of the zero-shot table; ``nelbo`` in nats per token."""

    data: str
    tokens: int
    nelbo: float
    draws: int
    T: int | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nelbo)


def perplexity(total_nats: float, total_tokens: int) -> float:
    """``exp(total nats / total tokens)``: the per-token perplexity of a whole corpus."""
    return math.exp(total_nats / total_tokens)


def format_table(rows: Sequence[ZeroShotRow], title: str) -> str:
    """A Markdown table: data set, tokens, NELBO (nats/token), bits per token, perplexity, time draws."""
    bound = "continuous" if rows[0].T is None else f"T={rows[0].T}"
    table = markdown_table([{"data set": r.data, "tokens": f"{r.tokens:,}", "NELBO (nats/token)": f"{r.nelbo:.4f}",
                             "bits/token": f"{r.nelbo / math.log(2):.4f}", "perplexity": f"{r.perplexity:.2f}",
                             "time draws": r.draws} for r in rows], align="-rrrrr", pad=False)
    return f"{title} ({bound} NELBO upper bound)\n\n{table}"


# -- zero-shot -------------------------------------------------------------------------------
def zeroshot_table(model: DiffusionModule, sets: dict[str, str | None], trainer_kwargs: dict[str, Any],
                   tokenizer: str, data_dir: str, batch_size: int, draws: int, T: int | None = None,
                   num_workers: int = 0) -> list[ZeroShotRow]:
    """Test ``model`` on each set (name -> local file or ``None`` for the hub); one row per set."""
    model.configure_evaluation(draws, T)
    rows = []
    for name, path in sets.items():
        data = ZeroShotDataModule(name, path=path, tokenizer=tokenizer, data_dir=data_dir,
                                  seq_len=model.hparams.seq_len, eval_batch_size=batch_size, num_workers=num_workers)
        trainer = pl.Trainer(logger=False, enable_checkpointing=False, **trainer_kwargs)
        trainer.test(model, datamodule=data, verbose=False)
        # The test metric is the mean over sequences of nats per token; every block has seq_len
        # tokens, so it equals total nats / total tokens.
        rows.append(ZeroShotRow(name, data.num_tokens, float(trainer.callback_metrics["test/nelbo"]), draws, T))
    return rows


# -- generative perplexity -------------------------------------------------------------------
def unigram_entropy(tokens: Tensor) -> Tensor:
    """Entropy in nats of each sample's empirical token distribution, float64 ``[batch]``.

    ``tokens``: LongTensor ``[batch, seq]``.
    """
    counts = torch.zeros(tokens.shape[0], int(tokens.max()) + 1, dtype=torch.float64, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.float64))
    p = counts / tokens.shape[1]
    return -(p * torch.log(p.where(p > 0, 1.0))).sum(-1)


def score_windows(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, first)`` that score a sequence of ``length`` tokens with a causal LM of
    ``context`` positions: the LM reads tokens ``begin:end`` and scores ``first:end`` with all
    the tokens of the window before each.

    A sequence that fits is one window, every token scored with all its predecessors. A longer one
    is Hugging Face's sliding window: full windows ending ``stride`` tokens apart (the last one at
    the end of the sequence), each scoring only the tokens the previous ones did not, so every
    token has at least ``context - stride`` tokens of context (all of them in the first window).
    Token 0 is never scored.
    """
    if not 1 <= stride < context:
        raise ValueError(f"stride must be in [1, {context - 1}] for a {context}-token context, got {stride}")
    if length <= context:
        return [(0, length, 1)]
    windows = [(0, context, 1)]
    while windows[-1][1] < length:
        scored_to = windows[-1][1]
        end = min(scored_to + stride, length)
        windows.append((end - context, end, scored_to))
    return windows


@torch.no_grad()
def causal_lm_nll(texts: Sequence[str], model: Any, tokenizer: Any, batch_size: int = 8,
                  stride: int | None = None) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of ``texts`` under a causal LM, and the tokens scored.

    Each text is tokenized by the scorer's own tokenizer behind its BOS token, so every text token
    is scored. A text that fits the scorer's context is scored in one pass; a longer one (a
    1024-token sample is 1025 tokens with the BOS) by sliding windows (:func:`score_windows`,
    ``stride`` default half the context), so that no token is scored with a short context.
    """
    context = model.config.max_position_embeddings
    stride = context // 2 if stride is None else stride
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    windows = []  # (token ids read, offset of the first scored token in them)
    for text in texts:
        ids = [bos, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        windows += [(ids[begin:end], first - begin) for begin, end, first in score_windows(len(ids), context, stride)]
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        width = max(len(w) for w, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        valid = torch.zeros(len(batch), width, dtype=torch.bool, device=device)
        scored = torch.zeros(len(batch), width, dtype=torch.bool, device=device)
        for row, (window, first) in enumerate(batch):
            ids[row, : len(window)] = torch.tensor(window, device=device)
            valid[row, : len(window)] = True
            scored[row, first : len(window)] = True
        logits = model(input_ids=ids, attention_mask=valid.long()).logits[:, :-1].double()
        nll = -logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        target = scored[:, 1:]
        total += float(nll[target].sum())
        count += int(target.sum())
    return total, count


def load_causal_lm(name_or_path: str, device: str) -> tuple[Any, Any]:
    """A ``transformers`` causal LM and its tokenizer from a local folder or the hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy import, only for this command

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path).to(device).eval()
    except (OSError, ValueError) as err:
        first = (str(err).splitlines() or [""])[0]
        raise FileNotFoundError(f"could not load the causal language model {name_or_path!r} ({first}); "
                                "pass --scorer with a local model folder or a hub name") from None
    return model, tokenizer


# -- an AR checkpoint of this suite as the scorer --------------------------------------------
def is_checkpoint_path(scorer: str) -> bool:
    """Whether ``--scorer`` names a checkpoint of this suite (a ``.ckpt`` path or any file) rather
    than a causal LM (a hub name or a local model folder)."""
    from pathlib import Path

    return scorer.endswith(".ckpt") or Path(scorer).expanduser().is_file()


def vocabulary(ckpt: FitCheckpoint) -> dict[str, Any]:
    """What fixes the meaning of a checkpoint's token ids: its data module class, the model's
    ``vocab_size``, and the data module's vocabulary setting where it has one: the characters of a
    ``CharDataModule`` (``vocab``, in token order) or the tokenizer (``tokenizer``) of a word-piece
    module. Other data modules (text8, digits, images) have one fixed vocabulary per class."""
    data = ckpt.data_hparams
    found = {"data module": data.get("_class_path"), "vocab_size": ckpt.contents["hyper_parameters"].get("vocab_size")}
    for key in ("vocab", "tokenizer"):
        if key in data:
            found[key] = data[key]
    return found


def vocabulary_difference(scorer: dict[str, Any], sampled: dict[str, Any]) -> str | None:
    """The first way two :func:`vocabulary` descriptions differ, in words; ``None`` when the same.

    Two tokenizers given by different names are the same when their serialised vocabularies,
    merges and settings are (the fingerprint of :func:`datamodules.tokenizer.load_tokenizer`)."""
    for key in ("data module", "vocab", "tokenizer", "vocab_size"):
        mine, theirs = scorer.get(key), sampled.get(key)
        if mine == theirs:
            continue
        if key == "tokenizer" and mine is not None and theirs is not None:
            from datamodules.tokenizer import load_tokenizer

            if load_tokenizer(mine).fingerprint == load_tokenizer(theirs).fingerprint:
                continue
        if key == "vocab" and mine is not None and theirs is not None:
            only_scorer = "".join(sorted(set(mine) - set(theirs)))
            only_sampled = "".join(sorted(set(theirs) - set(mine)))
            if only_scorer or only_sampled:
                return (f"its characters differ (only the scorer's: {only_scorer!r}, only the sampled model's: "
                        f"{only_sampled!r})")
            return "its characters are the same set in another token order"
        return f"its {key} is {mine!r}, the sampled model's is {theirs!r}"
    return None


def load_ar_scorer(path: str, sampled: FitCheckpoint, device: str) -> AR:
    """The AR model of checkpoint ``path`` (EMA weights, eval mode) on ``device``, to score samples
    of the model of ``sampled``.

    Raises:
        CheckpointError: ``path`` is missing or unreadable, is not an AR model, or was trained on
            another vocabulary (:func:`vocabulary`): its token ids would mean other tokens.
    """
    from pathlib import Path

    if not Path(path).expanduser().is_file():
        raise CheckpointError(f"--scorer {path}: no such checkpoint; pass an AR checkpoint of md4 fit (.ckpt), or a "
                              "causal language model's hub name or folder")
    try:
        scorer = FitCheckpoint.read(Path(path).expanduser())
        cls = resolve_class(scorer.contents["hyper_parameters"]["_class_path"], DiffusionModule)
    except CheckpointError as err:
        raise CheckpointError(f"--scorer: {first_line(err)}") from None
    if not issubclass(cls, AR):
        raise CheckpointError(f"--scorer {path} holds a model of class {cls.__name__}; a checkpoint scorer must be an "
                              "AR model (exact next-token likelihoods): train one with md4 fit --model AR on the same data")
    difference = vocabulary_difference(vocabulary(scorer), vocabulary(sampled))
    if difference is not None:
        raise CheckpointError(f"--scorer {path} was trained on another vocabulary than {sampled.path}: {difference}; "
                              "a checkpoint scorer needs the same data module and vocabulary")
    return scorer.model(device).eval()


@torch.no_grad()
def ar_nll(model: AR, tokens: Tensor, batch_size: int = 16, stride: int | None = None) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of the sequences ``tokens`` ``[B, N]`` under an AR
    model of the same vocabulary, and the tokens scored (``B * N``: every token, the first one
    from BOS, as in the AR model's own NLL).

    A sequence no longer than the model's ``seq_len`` is scored in one pass (its exact NLL). A
    longer one by windows of ``seq_len`` tokens (:func:`score_windows`, ``stride`` default half of
    it), each read behind BOS, as training crops are, and scoring the tokens no earlier window did.
    """
    model.eval()
    context, length = model.hparams.seq_len, tokens.shape[1]
    stride = context // 2 if stride is None else stride
    windows = [(0, length, 0)] if length <= context else score_windows(length, context, stride)
    total, device = 0.0, model.device
    for begin, end, first in windows:
        first = 0 if begin == 0 else first  # the first window scores its first token too (from BOS)
        for i in range(0, tokens.shape[0], batch_size):
            rows = tokens[i : i + batch_size, begin:end].to(device)
            logp = model.process.token_log_probs(model.net, rows)
            total -= float(logp[:, first - begin :].double().sum())
    return total, tokens.shape[0] * length
