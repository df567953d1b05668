"""Zero-shot language-modelling sets with the SEDD / MD4 protocol.

Each set is detokenized (its published text is word-tokenized; GPT-2 expects natural text), GPT-2
tokenized with EOS after each example, concatenated and cut into ``seq_len``-token blocks, the
remainder dropped, and cached like OpenWebText (:mod:`datamodules.packing`). WikiText2 is scored on
its train split, the others on their test splits. A set too short for one block is an error.

Local files (no network): LAMBADA as OpenAI's ``lambada_test.jsonl`` (field ``text``); WikiText as
``wiki.train.raw`` / ``wiki.test.raw`` (one example per line, newline kept, as the hub's rows);
PTB as ``ptb.test.txt`` and 1BW as a text file of test sentences (one per line). Any set also
takes a ``.jsonl`` or ``.parquet`` export of the hub's rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.base import DataError, TokenDataModule
from datamodules.openwebtext import decode_with_masks
from datamodules.packing import BlockCache, count_documents, file_identity, hub_documents, read_documents
from datamodules.tokenizer import load_tokenizer
from lightning_md4.paths import not_a_file

PATH_KEY = "data.init_args.path"
DETOKENIZER_VERSION = 2  # part of the cache key: bump when a detokenizer changes


# -- detokenizers ----------------------------------------------------------------------------
# SEDD's evaluation rules (Lou et al. 2024, whose protocol MD4 follows), in SEDD's order and with
# its quirks, so that zero-shot perplexities compare with the published ones: each rule is a
# literal replacement (str.replace) or a regular expression substitution, applied once.

Rule = tuple[str | re.Pattern[str], str]  # (literal or compiled pattern, replacement)


def _apply(rules: tuple[Rule, ...], text: str) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text) if isinstance(pattern, re.Pattern) else text.replace(pattern, replacement)
    return text


def _strip_inside(opening: str, closing: str) -> Rule:
    """``( a b )`` -> ``(a b)``: the whitespace just inside each pair goes, pairs taken left to right
    without nesting (for quotes, opening = closing pairs them in order of appearance)."""
    o, c = re.escape(opening), re.escape(closing)
    return re.compile(rf"{o}\s*([^{c}]*?)\s*{c}"), rf"{opening}\1{closing}"


_WIKITEXT: tuple[Rule, ...] = (
    ("s '", "s'"),  # plural possessive
    # (SEDD's next rule, re.sub(r"/' [0-9]/", r"/'[0-9]/"), matches only the literal text "/' <digit>/"
    # and never fires on WikiText; it is left out.)
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),  # hyphen, thousands comma, decimal point in a word
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    _strip_inside("(", ")"), _strip_inside("[", "]"), _strip_inside("{", "}"),
    _strip_inside('"', '"'), _strip_inside("'", "'"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),  # headings
    (" \u00b0 ", "\u00b0"),  # degree sign
    (" \n", "\n"), ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
)

_PTB: tuple[Rule, ...] = (
    (" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/"),
    # SEDD replaces " N " ten times over; two passes already reach every N between spaces (a pass
    # skips only the second of two adjacent ones), which is what the lookarounds do in one.
    (re.compile(r"(?<= )N(?= )"), "1"),
    ("$ 1", "$1"), ("# 1", "#1"),
    ("<unk>", "?"),
)

_LM1B: tuple[Rule, ...] = (
    ("http : / / ", "http://"), ("https : / / ", "https://"),
    (re.compile(r" '(\w+)"), r"'\1"),  # clitics ('s, 're) and opening single quotes join the word before
    (re.compile(r" (\w+) \. "), r" \1. "), (re.compile(r" (\w+) \.$"), r" \1."),
    (" ? ", "? "), (re.compile(r" \?$"), "?"), (" ! ", "! "), (re.compile(r" !$"), "!"),
    (" , ", ", "), (" : ", ": "), (" ; ", "; "), (" / ", "/"),
    (re.compile(r'" ([^"]+) "'), r'"\1"'), (re.compile(r"' ([^']+) '"), r"'\1'"),
    (re.compile(r"\( ([^()]+) \)"), r"(\1)"), (re.compile(r"\[ ([^\[\]]+) \]"), r"[\1]"),
    ("$ ", "$"), ("\u00a3 ", "\u00a3"),
)


def wikitext_detokenize(text: str) -> str:
    """WikiText: ``@-@``, ``@,@`` and ``@.@`` inside words, ``= = Title = =`` headings, punctuation
    and brackets standing apart. As SEDD's, it leaves ``n't`` and ``%`` split off."""
    return _apply(_WIKITEXT, text)


def ptb_detokenize(text: str) -> str:
    """Penn Treebank (lower case, numbers as ``N``, rare words as ``<unk>``, clitics split, ``\\/``
    for ``/``): ``N`` between spaces becomes ``1`` (one at either end of a sentence stays), ``<unk>``
    becomes ``?``."""
    return _apply(_PTB, text)


def lambada_detokenize(text: str) -> str:
    """LAMBADA (OpenAI's version is already natural text): curly double quotes become straight, and
    each passage starts on a new line."""
    return "\n" + text.replace("\u201c", '"').replace("\u201d", '"').strip()


def lm1b_detokenize(text: str) -> str:
    """One Billion Word: news sentences with punctuation, brackets, quotes, clitics, currency and URLs
    split off by spaces. As SEDD's, it joins a full stop only to a plain word (``p.m .`` stays) and
    leaves ``n't`` split off."""
    return _apply(_LM1B, text)


@dataclass(frozen=True)
class ZeroShotSet:
    """How to read and clean one zero-shot set."""

    detokenize: Callable[[str], str]
    hub: tuple[str, str | None, str]  # hub name, config, split
    field: str  # the text field of hub rows and of .jsonl / .parquet files
    keep_newline: bool  # whether lines of a local text file keep their newline (as the hub's rows do)


SETS = {
    "lambada": ZeroShotSet(lambada_detokenize, ("EleutherAI/lambada_openai", "default", "test"), "text", False),
    "wikitext2": ZeroShotSet(wikitext_detokenize, ("Salesforce/wikitext", "wikitext-2-raw-v1", "train"), "text", True),
    "wikitext103": ZeroShotSet(wikitext_detokenize, ("Salesforce/wikitext", "wikitext-103-raw-v1", "test"), "text",
                               True),
    "ptb": ZeroShotSet(ptb_detokenize, ("ptb_text_only", None, "test"), "sentence", False),
    "lm1b": ZeroShotSet(lm1b_detokenize, ("lm1b", None, "test"), "text", False),
}


class ZeroShotDataModule(TokenDataModule):
    """One zero-shot set for ``md4 test`` / ``md4 validate`` (it has no training data).

    Args:
        name: ``lambada``, ``wikitext2``, ``wikitext103``, ``ptb`` or ``lm1b``.
        path: a local file of the set (see the module docstring); ``None`` loads it from the hub.
        tokenizer: ``gpt2`` or a local tokenizer (the one the model was trained with).
        data_dir: folder of the token caches.
        seq_len: tokens per block (the model's sequence length).
        eval_batch_size: sequences per device and batch (default: :class:`TokenDataModule`'s).
        num_workers: data loader worker processes.

    Switching ``md4 test`` from an OpenWebText config with ``--data datamodules.ZeroShotDataModule``
    keeps the settings the two share (tokenizer, seq_len, data_dir, eval_batch_size, num_workers).
    """

    def __init__(
        self,
        name: str,
        path: str | None = None,
        tokenizer: str = "gpt2",
        data_dir: str = "~/.cache/lightning_md4/zeroshot",
        seq_len: int = 1024,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(eval_batch_size=eval_batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        if name not in SETS:
            raise DataError(f"unknown zero-shot set {name!r}; choose one of {', '.join(SETS)}")
        self.set = SETS[name]
        self.path = None if path is None else Path(path).expanduser()
        if self.path is not None and not self.path.is_file():
            raise DataError(f"zero-shot file {self.path} {not_a_file(self.path)}; set {PATH_KEY} to a local copy of {name}")
        self.tokenizer = load_tokenizer(tokenizer)
        source = {"hub": list(self.set.hub)} if self.path is None else {"files": file_identity([self.path])}
        key = {"set": name, "detokenizer": DETOKENIZER_VERSION, "tokenizer": self.tokenizer.fingerprint,
               "seq_len": seq_len, "source": source}
        self.cache = BlockCache(Path(data_dir), name, key)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def seq_len(self) -> int:
        return self.hparams.seq_len

    @property
    def num_tokens(self) -> int:
        """Tokens scored: complete blocks times ``seq_len`` (after ``setup``)."""
        return len(self.test_set) * self.seq_len

    def prepare_data(self) -> None:
        if self.cache.meta() is None:
            docs, count = self._examples()
            self.cache.build({"test": (map(self.set.detokenize, docs), count)}, self.tokenizer, self.seq_len)

    def _build(self) -> None:
        self.prepare_data()  # a no-op when the cache is complete
        blocks = self.cache.blocks("test")
        if len(blocks) == 0:
            dropped = self.cache.meta()["splits"]["test"]["dropped_tokens"]
            raise DataError(f"zero-shot set {self.hparams.name} has {dropped:,} tokens, fewer than one "
                            f"{self.seq_len}-token block; pass the whole set, or a model with a shorter seq_len")
        self.train_set = self.val_set = self.test_set = blocks

    def train_dataloader(self) -> DataLoader:
        raise DataError("zero-shot sets are for evaluation only: use md4 test or md4 validate with them")

    def decode(self, tokens: Tensor) -> list[str]:
        """Text for ``tokens`` ``[batch, seq]``; each mask id shows as ``'_'``."""
        return [decode_with_masks(row, self.tokenizer) for row in tokens.detach().cpu()]

    def _examples(self) -> tuple[Iterator[str], int]:
        name, config, split = self.set.hub
        if self.path is None:
            return hub_documents(name, config, split, self.set.field,
                                 f"download {self.hparams.name} and pass the file with {PATH_KEY} "
                                 f"(md4 zeroshot: --paths.{self.hparams.name} FILE)")
        per_line = self.path.suffix not in (".jsonl", ".parquet")
        docs = read_documents(self.path, self.set.field, per_line=per_line)
        if per_line and not self.set.keep_newline:
            docs = (line.rstrip("\r\n") for line in docs)
        return docs, count_documents(self.path, per_line=per_line)
