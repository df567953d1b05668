"""OpenWebText with GPT-2 tokens in 1024-token blocks (the MD4 and SEDD protocol).

Documents come from the Hugging Face hub (``Skylion007/openwebtext``) or from local ``.jsonl``,
``.parquet`` or text files (one document per text file). They are tokenized once, in
``prepare_data`` (one process per node, not every rank), EOS appended after each document,
concatenated and cut into blocks, and cached on disk (see :mod:`datamodules.packing`); every rank
then memory-maps the cache.
"""

from __future__ import annotations

import glob
import itertools
from functools import cached_property
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor

from datamodules.base import DataError, TokenDataModule
from datamodules.packing import BlockCache, count_documents, file_identity, hub_documents, read_documents
from datamodules.tokenizer import TextTokenizer, load_tokenizer

PATHS_KEY = "data.init_args.paths"
MASK_TEXT = "_"


class OpenWebTextDataModule(TokenDataModule):
    """OpenWebText (or any document collection) as GPT-2 token blocks.

    OpenWebText has only a train split: the last ``val_docs`` documents are held out for
    validation (MDLM's and SEDD's choice, 100,000), and ``md4 test`` reports on the same held-out
    blocks. Training takes the train blocks in shuffled order; validation takes them in order,
    each example's ``index`` being its block number.

    Args:
        paths: local files or glob patterns (``.jsonl``, ``.parquet`` or text, one document per
            text file), read in sorted order; ``None`` loads ``hf_dataset`` from the hub.
        hf_dataset: hub name of the data set used when ``paths`` is ``None``.
        text_field: the documents' field in ``.jsonl`` / ``.parquet`` files and hub rows.
        tokenizer: ``gpt2`` or a local tokenizer (see :func:`datamodules.tokenizer.load_tokenizer`).
        data_dir: folder of the token caches.
        seq_len: tokens per block.
        val_docs: documents held out, from the end, for validation.
        batch_size, eval_batch_size, num_workers, global_batch_size, val_examples: see
            :class:`TokenDataModule`.
    """

    def __init__(
        self,
        paths: list[str] | None = None,
        hf_dataset: str = "Skylion007/openwebtext",
        text_field: str = "text",
        tokenizer: str = "gpt2",
        data_dir: str = "~/.cache/lightning_md4/openwebtext",
        seq_len: int = 1024,
        val_docs: int = 100_000,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        global_batch_size: int | None = None,
        val_examples: int | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, global_batch_size, val_examples)
        self.save_hyperparameters()
        if val_docs < 1:
            raise DataError(f"data.init_args.val_docs is {val_docs}; hold out at least one document")
        self.tokenizer = load_tokenizer(tokenizer)

    @cached_property
    def files(self) -> list[Path] | None:
        """The local files, or ``None`` for the hub. Resolved on first use, not in ``__init__``, so
        ``md4 sample`` can rebuild this module from a checkpoint where the corpus is absent."""
        return None if self.hparams.paths is None else _expand(self.hparams.paths)

    @cached_property
    def cache(self) -> BlockCache:
        """The token cache, keyed on everything its tokens depend on."""
        hp = self.hparams
        source = {"hub": hp.hf_dataset} if self.files is None else {"files": file_identity(self.files)}
        key = {"tokenizer": self.tokenizer.fingerprint, "seq_len": hp.seq_len, "source": source,
               "text_field": hp.text_field, "val_docs": hp.val_docs}
        return BlockCache(Path(hp.data_dir), "openwebtext", key)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def seq_len(self) -> int:
        return self.hparams.seq_len

    def prepare_data(self) -> None:
        if self.cache.meta() is not None:
            return
        docs, total = self._documents()
        val_docs = self.hparams.val_docs
        if total <= val_docs:
            raise DataError(f"the corpus has {total:,} documents, not more than val_docs={val_docs:,}; "
                            "lower data.init_args.val_docs or add documents")
        train = itertools.islice(docs, total - val_docs)  # consumed first, then the rest is validation
        self.cache.build({"train": (train, total - val_docs), "val": (docs, val_docs)}, self.tokenizer, self.seq_len)

    def _build(self) -> None:
        self.prepare_data()  # a no-op when the cache is complete (as it is after md4's prepare_data)
        self.train_set = self.cache.blocks("train")
        self.val_set = self.cache.blocks("val")
        for split, data in (("train", self.train_set), ("validation", self.val_set)):
            if len(data) == 0:
                raise DataError(f"the {split} documents make no complete {self.seq_len}-token block; "
                                "add documents, change data.init_args.val_docs or lower seq_len")
        self.test_set = self.val_set

    def decode(self, tokens: Tensor) -> list[str]:
        """Text for ``tokens`` ``[batch, seq]``; each mask id shows as ``'_'``."""
        return [decode_with_masks(row, self.tokenizer) for row in tokens.detach().cpu()]

    def _documents(self) -> tuple[Iterator[str], int]:
        if self.files is None:
            return hub_documents(self.hparams.hf_dataset, None, "train", self.hparams.text_field,
                                 f"pass local .jsonl/.parquet/text files with {PATHS_KEY}")
        field = self.hparams.text_field
        docs = itertools.chain.from_iterable(read_documents(path, field) for path in self.files)
        return docs, sum(count_documents(path) for path in self.files)


def decode_with_masks(tokens: Tensor, tokenizer: TextTokenizer) -> str:
    """Text of one sequence ``[seq]``: runs of real tokens decoded, each mask id (``>= V``) as ``'_'``."""
    is_mask = tokens >= tokenizer.vocab_size
    parts = []
    for masked, run in itertools.groupby(zip(tokens.tolist(), is_mask.tolist()), key=lambda pair: pair[1]):
        ids = [token for token, _ in run]
        parts.append(MASK_TEXT * len(ids) if masked else tokenizer.decode(ids))
    return "".join(parts)


def _expand(patterns: list[str]) -> list[Path]:
    """The files matching each pattern, sorted; a pattern matching nothing is an error."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not matches:
            raise DataError(f"{PATHS_KEY}: no file matches {pattern!r}")
        files.extend(Path(m) for m in matches if Path(m).is_file())
    return files
