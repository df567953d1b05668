"""Language-model evaluations beyond one ``md4 test``: the zero-shot table and generative perplexity.

``md4 zeroshot`` runs ``trainer.test`` of one checkpoint on each zero-shot set
(:mod:`datamodules.zeroshot`) with the NELBO averaged over several keyed time draws per sequence,
and prints and saves one table. Perplexity is ``exp(total nats / total tokens)`` over a whole set:
a per-token average, not an average of per-sequence perplexities.

``md4 genppl`` samples from a checkpoint (categorical draws in float64, see
:mod:`lightning_md4.diffusion.sampling`), decodes the samples to text, retokenizes them for a causal
language model (GPT-2 large by default, from the hub or a local folder) and reports its
perplexity on them with the samples' unigram entropy, which exposes low-diversity samples that a
low generative perplexity would flatter.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from datamodules.tokenizer import load_tokenizer
from datamodules.zeroshot import SETS, ZeroShotDataModule
from lightning_md4.cli import OneLineParser, load_checkpoint, positive_int, resolve_class
from lightning_md4.modules.base import DiffusionModule
from lightning_md4.modules.legacy import upgrade_hparams
from lightning_md4.diffusion.sampling import GRIDS


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
    lines = [f"{title} ({bound} NELBO upper bound)", "",
             "| data set | tokens | NELBO (nats/token) | bits/token | perplexity | time draws |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.data} | {r.tokens:,} | {r.nelbo:.4f} | {r.nelbo / math.log(2):.4f} | {r.perplexity:.2f} | "
              f"{r.draws} |" for r in rows]
    return "\n".join(lines)


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


def zeroshot_main(argv: list[str]) -> None:
    """``md4 zeroshot``: the zero-shot perplexity table of one checkpoint, printed and saved."""
    p = OneLineParser(prog="md4 zeroshot", description=zeroshot_main.__doc__)
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by md4 fit")
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, from {', '.join(SETS)}")
    p.add_argument("--paths", nargs="*", default=[], metavar="SET=FILE",
                   help="local files of the sets (the others are loaded from the Hugging Face hub)")
    p.add_argument("--data_dir", default="~/.cache/lightning_md4/zeroshot", help="folder of the token caches")
    p.add_argument("--tokenizer", default=None, help="default: the checkpoint's data tokenizer, else gpt2")
    p.add_argument("--eval_draws", type=positive_int, default=1000, help="time draws averaged per sequence (SEDD: 1000)")
    p.add_argument("--eval_T", type=positive_int, default=None, help="report the T-step discrete-time bound instead")
    p.add_argument("--batch_size", type=positive_int, default=8, help="sequences per device and batch")
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--devices", default="auto", help="devices per node (Lightning's trainer.devices)")
    p.add_argument("--num_nodes", type=positive_int, default=1)
    p.add_argument("--output", default=None, help="table file (.md; a .json twin is written); "
                                                  "default: zeroshot-<checkpoint name>.md beside the checkpoint")
    args = p.parse_args(argv)
    sets = _parse_sets(p, args.sets, args.paths)
    model, ckpt = load_model(args.ckpt_path, "cpu")  # the Trainer moves it to its devices
    tokenizer = args.tokenizer or checkpoint_tokenizer(ckpt)
    # Lightning picks DDP for several devices; each rank tests its share of the blocks.
    trainer_kwargs = {"devices": int(args.devices) if args.devices.isdigit() else args.devices,
                      "num_nodes": args.num_nodes, "precision": default_precision()}
    try:
        rows = zeroshot_table(model, sets, trainer_kwargs, tokenizer, args.data_dir, args.batch_size,
                              args.eval_draws, args.eval_T, args.num_workers)
    except ValueError as err:  # a bad evaluation setting, e.g. eval_T for a method without that bound
        p.error(str(err))
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    ckpt_path = Path(args.ckpt_path)
    table = format_table(rows, f"{type(model).__name__} {ckpt_path}: zero-shot perplexity")
    output = Path(args.output) if args.output else ckpt_path.parent / f"zeroshot-{ckpt_path.stem}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(table + "\n")
    output.with_suffix(".json").write_text(json.dumps([{**asdict(r), "perplexity": r.perplexity} for r in rows],
                                                      indent=1) + "\n")
    print(table)
    print(f"\nsaved to {output} and {output.with_suffix('.json')}")


def _parse_sets(p: argparse.ArgumentParser, names: str, paths: list[str]) -> dict[str, str | None]:
    sets: dict[str, str | None] = {name.strip(): None for name in names.split(",") if name.strip()}
    if not sets:
        p.error(f"--sets names no set; choose from {', '.join(SETS)}")
    for name in sets:
        if name not in SETS:
            p.error(f"unknown zero-shot set {name!r}; choose from {', '.join(SETS)}")
    for item in paths:
        name, sep, path = item.partition("=")
        if not sep or name not in sets:
            p.error(f"--paths takes SET=FILE with SET one of --sets ({', '.join(sets)}); got {item!r}")
        sets[name] = path
    return sets


def load_model(path: str, device: str) -> tuple[DiffusionModule, dict[str, Any]]:
    """The model of an ``md4 fit`` checkpoint (its EMA weights) and the checkpoint itself."""
    ckpt = load_checkpoint(path)
    model_cls = resolve_class(ckpt["hyper_parameters"]["_class_path"], DiffusionModule)
    # upgrade_hparams: checkpoints saved under old hyper-parameter names load as what they were.
    return model_cls.load_from_checkpoint(path, map_location=device, **upgrade_hparams(ckpt["hyper_parameters"])), ckpt


def checkpoint_tokenizer(ckpt: dict[str, Any]) -> str:
    """The tokenizer the checkpoint's data module used (``gpt2`` if it names none)."""
    return ckpt.get("datamodule_hyper_parameters", {}).get("tokenizer", "gpt2")


def default_precision() -> str:
    """bf16 autocast on a GPU, float32 on the CPU (the CLI's rule for ``precision: null``)."""
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


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


def genppl_main(argv: list[str]) -> None:
    """``md4 genppl``: generative perplexity and unigram entropy of samples from a checkpoint."""
    p = OneLineParser(prog="md4 genppl", description=genppl_main.__doc__)
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by md4 fit")
    p.add_argument("--scorer", default="gpt2-large", help="causal LM: hub name or local folder")
    p.add_argument("--num_samples", type=positive_int, default=64)
    p.add_argument("--steps", type=positive_int, default=1000, help="sampling steps")
    p.add_argument("--grid", choices=GRIDS, default="uniform", help="time grid of the sampler")
    p.add_argument("--batch_size", type=positive_int, default=16, help="samples drawn and scored per batch")
    p.add_argument("--tokenizer", default=None, help="default: the checkpoint's data tokenizer, else gpt2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default=None, help="JSON with the numbers and the sample texts; default: "
                                                  "genppl-<checkpoint name>.json beside the checkpoint")
    args = p.parse_args(argv)
    model, ckpt = load_model(args.ckpt_path, args.device)
    text_tokenizer = load_tokenizer(args.tokenizer or checkpoint_tokenizer(ckpt))
    scorer, scorer_tokenizer = load_causal_lm(args.scorer, args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    samples = []
    for start in range(0, args.num_samples, args.batch_size):
        count = min(args.batch_size, args.num_samples - start)
        tokens, _ = model.sample(count, args.steps, args.grid, generator=generator)
        samples.append(tokens.cpu())
    tokens = torch.cat(samples)
    texts = [text_tokenizer.decode(row.tolist()) for row in tokens]
    nll, count = causal_lm_nll(texts, scorer, scorer_tokenizer, args.batch_size)
    result = {"checkpoint": str(args.ckpt_path), "scorer": args.scorer, "num_samples": args.num_samples,
              "steps": args.steps, "grid": args.grid, "generative_perplexity": perplexity(nll, count),
              "scored_tokens": count, "unigram_entropy": float(unigram_entropy(tokens).mean()), "samples": texts}
    ckpt_path = Path(args.ckpt_path)
    output = Path(args.output) if args.output else ckpt_path.parent / f"genppl-{ckpt_path.stem}.json"
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{type(model).__name__} {ckpt_path}: {args.num_samples} samples, {args.steps} steps ({args.grid} grid); "
          f"generative perplexity under {args.scorer} {result['generative_perplexity']:.2f} over {count:,} tokens, "
          f"unigram entropy {result['unigram_entropy']:.3f} nats; saved to {output}")
