"""Character-level modelling of any local UTF-8 text file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from datamodules.base import DataError, TokenChunks, TokenCrops, TokenDataModule, decode_chars
from lightning_md4.paths import not_a_file

PATH_KEY = "data.init_args.path"
_MASK_CANDIDATES = ("_", "\u2588", "\ufffd")  # '_', then a full block, for texts that use '_'


class CharDataModule(TokenDataModule):
    """Characters of a UTF-8 text file as tokens, ``seq_len``-character examples.

    The vocabulary is the sorted set of characters in the file, worked out in ``__init__`` and
    saved as the ``vocab`` hyperparameter, so a checkpoint rebuilds the same token mapping even if
    the file changes. The file is split into consecutive train / validation / test parts;
    validation and test examples are consecutive non-overlapping chunks (remainder dropped),
    training examples random crops of the train part, ``train_chars // seq_len`` per epoch.

    Args:
        path: the text file.
        seq_len: characters per example.
        val_fraction, test_fraction: shares of the file (from its end) for validation and test.
        vocab: the characters, token ``k`` being ``vocab[k]``; ``None`` derives it from the file.
            A file character missing from a given ``vocab`` is an error.
        batch_size, eval_batch_size, num_workers, global_batch_size, val_examples: see
            :class:`TokenDataModule`.
    """

    def __init__(
        self,
        path: str,
        seq_len: int = 128,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        vocab: str | None = None,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        global_batch_size: int | None = None,
        val_examples: int | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, global_batch_size, val_examples)
        self.save_hyperparameters()
        self.path = Path(path).expanduser()
        text = self._read()
        # Checkpoints store ``self.hparams``, so recording the derived vocabulary there lets them
        # rebuild the same mapping. (LightningCLI hands save_hyperparameters() the config values,
        # so rebinding the ``vocab`` argument before that call would not be enough.)
        self.hparams.vocab = _check_vocab(text, vocab, self.path)
        self.split = _split_sizes(len(text), seq_len, val_fraction, test_fraction, self.path)
        self.mask_char = next(c for c in _MASK_CANDIDATES if c not in self.hparams.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.hparams.vocab)

    @property
    def seq_len(self) -> int:
        return self.hparams.seq_len

    def _build(self) -> None:
        tokens = _encode(self._read(), self.hparams.vocab, self.path)
        num_train, num_val, _ = self.split
        self.train_set = TokenCrops(tokens[:num_train], self.seq_len)
        self.val_set = TokenChunks(tokens[num_train : num_train + num_val], self.seq_len)
        self.test_set = TokenChunks(tokens[num_train + num_val :], self.seq_len)

    def decode(self, tokens: Tensor) -> list[str]:
        """Text for ``tokens`` ``[batch, seq]``; mask ids show as ``mask_char`` ('_' unless the text uses it)."""
        return decode_chars(tokens, self.hparams.vocab, self.mask_char)

    def _read(self) -> str:
        """The file's text; a missing or non-UTF-8 file is a :class:`DataError`."""
        if not self.path.is_file():
            raise DataError(f"text file {self.path} {not_a_file(self.path)}. Set {PATH_KEY} to a local UTF-8 text file.")
        try:
            return self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{self.path} is not UTF-8 text ({error}).") from error


def _check_vocab(text: str, vocab: str | None, path: Path) -> str:
    """``vocab`` if it covers ``text`` and has no repeats; the sorted characters of ``text`` if ``None``."""
    if vocab is None:
        return "".join(sorted(set(text)))
    if len(set(vocab)) != len(vocab):
        raise ValueError(f"vocab {vocab!r} repeats characters")
    missing = set(text) - set(vocab)
    if missing:
        raise DataError(f"{path} has characters outside the given vocab: {''.join(sorted(missing))!r}")
    return vocab


def _split_sizes(
    length: int, seq_len: int, val_fraction: float, test_fraction: float, path: Path
) -> tuple[int, int, int]:
    """``(train, val, test)`` character counts; each part must hold at least one example."""
    num_val, num_test = int(length * val_fraction), int(length * test_fraction)
    sizes = (length - num_val - num_test, num_val, num_test)
    if min(sizes) < seq_len:
        raise DataError(
            f"{path} has {length:,} characters: split {sizes} leaves a part shorter than seq_len={seq_len}"
        )
    return sizes


def _encode(text: str, vocab: str, path: Path) -> np.ndarray:
    """Tokens ``[len(text)]`` (smallest unsigned dtype that fits), token ``k`` being ``vocab[k]``."""
    # Vectorised lookup: search each code point among the vocab's sorted code points.
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab_points = np.array([ord(c) for c in vocab], dtype=np.uint32)
    order = np.argsort(vocab_points)
    position = np.searchsorted(vocab_points[order], code_points).clip(max=len(vocab) - 1)
    if not np.array_equal(vocab_points[order][position], code_points):
        raise DataError(f"{path} changed: it now has characters outside the vocab")
    return order[position].astype(np.min_scalar_type(len(vocab) - 1))
