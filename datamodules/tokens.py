"""A data module over an already tokenized corpus: one 1-D integer ``.npy`` file, memory-mapped."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.base import DataError, LazyMemmap, TokenChunks, TokenDataModule
from lightning_md4.paths import not_a_file


class TokenFileDataModule(TokenDataModule):
    """Consecutive ``seq_len`` chunks of a token stream stored as a 1-D ``.npy`` array.

    The file is memory-mapped in each worker, so a corpus larger than memory loads at disk speed.
    The last ``val_tokens`` and ``test_tokens`` of the stream are the validation and test splits;
    the rest is training data.

    Args:
        path: the ``.npy`` file (any unsigned or signed integer dtype).
        vocab_size: number of token ids; every id must be below it (checked on a prefix).
        seq_len: tokens per example.
        val_tokens, test_tokens: sizes of the held-out splits, in tokens (at least ``seq_len``).
        batch_size, eval_batch_size, num_workers, global_batch_size, val_examples: see
            :class:`TokenDataModule`.
    """

    def __init__(self, path: str, vocab_size: int, seq_len: int = 1024, val_tokens: int = 1 << 16, test_tokens: int = 1 << 16,
                 batch_size: int | None = None, eval_batch_size: int | None = None, num_workers: int = 0,
                 global_batch_size: int | None = None, val_examples: int | None = None) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, global_batch_size, val_examples)
        self.save_hyperparameters()
        self._vocab_size, self._seq_len = vocab_size, seq_len

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def _build(self) -> None:
        path = Path(self.hparams.path)
        if not path.is_file():
            raise DataError(f"token file {path} {not_a_file(path)}; pass data.init_args.path with a 1-D .npy token array")
        try:
            tokens = np.load(path, mmap_mode="r")
        except ValueError as err:
            raise DataError(f"{path} is not a readable .npy file ({err}); write it with numpy.save") from None
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"{path} holds a {tokens.ndim}-D {tokens.dtype} array; a 1-D integer array is needed")
        prefix = np.asarray(tokens[: 1 << 20])
        if prefix.size and (prefix.min() < 0 or prefix.max() >= self.vocab_size):
            raise DataError(f"{path} has token ids outside 0..{self.vocab_size - 1} (seen {prefix.min()}.."
                            f"{prefix.max()}); set data.init_args.vocab_size to the tokenizer's vocabulary size")
        n, val, test = len(tokens), self.hparams.val_tokens, self.hparams.test_tokens
        if min(val, test) < self.seq_len:
            raise DataError(f"val_tokens {val} and test_tokens {test} must each hold one sequence of {self.seq_len}")
        if n - val - test < self.seq_len:
            raise DataError(f"{path} has {n} tokens: too few for {val} validation + {test} test tokens and one "
                            f"training sequence of {self.seq_len}")
        self.train_set = TokenChunks(LazyMemmap(path, 0, n - val - test), self.seq_len)
        self.val_set = TokenChunks(LazyMemmap(path, n - val - test, n - test), self.seq_len)
        self.test_set = TokenChunks(LazyMemmap(path, n - test, n), self.seq_len)
