"""text8: the first 10^8 characters of a cleaned English Wikipedia dump, letters a-z and space.

The archive is downloaded once (in ``prepare_data``, so only one process per node does it),
checked, decoded to a ``uint8`` token array saved as ``.npy`` beside it, and memory-mapped.
"""

from __future__ import annotations

import http.client
import itertools
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
from torch import Tensor

# tqdm ships with lightning, so the progress bar costs no extra dependency.
from tqdm.auto import tqdm

from datamodules.base import DataError, LazyMemmap, TokenChunks, TokenCrops, TokenDataModule, decode_chars
from lightning_md4.atomic import atomic_file
from lightning_md4.paths import not_a_file

URL = "http://mattmahoney.net/dc/text8.zip"
ZIP_BYTES = 31_344_016
MEMBER = "text8"
ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # token k is ALPHABET[k]: ' ' = 0, 'a'..'z' = 1..26
DEFAULT_SPLIT = (90_000_000, 5_000_000, 5_000_000)  # train, validation, test characters
MASK_CHAR = "_"
PATH_KEY = "data.init_args.path"
_INVALID = 255  # marks bytes outside the alphabet during decoding


class Text8DataModule(TokenDataModule):
    """Character-level text8: 27 tokens, ``seq_len``-character examples.

    The file is split into consecutive train / validation / test parts (90M / 5M / 5M characters).
    Validation and test examples are consecutive non-overlapping chunks (remainder dropped);
    training examples are random crops of the train part, ``train_chars // seq_len`` per epoch.

    Args:
        data_dir: folder the archive is downloaded to and the token cache kept in.
        path: a local ``text8`` or ``text8.zip``; when set, nothing is downloaded and the token
            cache is kept beside it.
        download: whether ``prepare_data`` may download the archive when it is not cached.
        seq_len: characters per example.
        split: ``(train, val, test)`` character counts; the file must hold exactly their sum.
            ``None`` means the standard ``(90_000_000, 5_000_000, 5_000_000)``.
        batch_size, eval_batch_size, num_workers, global_batch_size, val_examples: see
            :class:`TokenDataModule`.
    """

    def __init__(
        self,
        data_dir: str = "~/.cache/lightning_md4/text8",
        path: str | None = None,
        download: bool = True,
        seq_len: int = 256,
        split: tuple[int, int, int] | None = None,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        global_batch_size: int | None = None,
        val_examples: int | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, global_batch_size, val_examples)
        self.save_hyperparameters()
        self.split = DEFAULT_SPLIT if split is None else tuple(split)
        if len(self.split) != 3 or min(self.split) < seq_len:
            raise ValueError(f"split {self.split} must be three character counts, each at least seq_len={seq_len}")
        if path is None:
            self.source = Path(data_dir).expanduser() / "text8.zip"
            self.remedy = f"Delete it and rerun to download it again, or set {PATH_KEY} to a good local copy."
        else:
            self.source = Path(path).expanduser()
            self.remedy = f"Set {PATH_KEY} to a good copy of text8 or text8.zip."
            if not self.source.is_file():
                raise DataError(f"text8 file {self.source} {not_a_file(self.source)}. {self.remedy}")
        self.cache = self.source.with_suffix(".npy")

    @property
    def vocab_size(self) -> int:
        return len(ALPHABET)

    @property
    def seq_len(self) -> int:
        return self.hparams.seq_len

    def prepare_data(self) -> None:
        self._ensure_cache()

    def _build(self) -> None:
        cache = self._ensure_cache()
        starts = [0, *itertools.accumulate(self.split)]
        train, val, test = (LazyMemmap(cache, a, b) for a, b in itertools.pairwise(starts))
        self.train_set = TokenCrops(train, self.seq_len)
        self.val_set = TokenChunks(val, self.seq_len)
        self.test_set = TokenChunks(test, self.seq_len)

    def decode(self, tokens: Tensor) -> list[str]:
        """Text for ``tokens`` ``[batch, seq]``; mask ids show as ``'_'``."""
        return decode_chars(tokens, ALPHABET, MASK_CHAR)

    def _ensure_cache(self) -> Path:
        """The ``.npy`` token cache, downloading and decoding the archive first where needed."""
        length = sum(self.split)
        if _cache_is_fresh(self.cache, self.source, length):
            return self.cache
        if not self.source.is_file():
            if self.hparams.path is not None or not self.hparams.download:
                raise DataError(
                    f"text8 not found at {self.source} and download is off. "
                    f"Set data.init_args.download=true or point {PATH_KEY} at a local text8 or text8.zip."
                )
            _download(URL, self.source)
        tokens = _read_text8(self.source, length, self.remedy)
        with atomic_file(self.cache) as file:
            np.save(file, tokens)
        return self.cache


def _cache_is_fresh(cache: Path, source: Path, length: int) -> bool:
    """Whether ``cache`` holds ``length`` uint8 tokens and is not older than ``source``."""
    try:
        tokens = np.load(cache, mmap_mode="r")
    except (OSError, ValueError):  # missing, or a truncated/garbled file: rebuild it
        return False
    # A replaced source file makes the cache stale even when the length still matches.
    newer = not source.exists() or cache.stat().st_mtime >= source.stat().st_mtime
    return tokens.shape == (length,) and tokens.dtype == np.uint8 and newer


def _read_text8(source: Path, length: int, remedy: str) -> np.ndarray:
    """Tokens ``uint8[length]`` of a ``text8`` file or ``.zip`` archive, checked strictly."""
    raw = _read_member(source, remedy) if source.suffix == ".zip" else source.read_bytes()
    if len(raw) != length:
        raise DataError(f"{source}: text8 holds {len(raw):,} characters, expected {length:,}. {remedy}")
    return _encode(raw, source, remedy)


def _read_member(archive_path: Path, remedy: str) -> bytes:
    """The bytes of the ``text8`` member; zip's CRC check catches corrupt content."""
    try:
        with zipfile.ZipFile(archive_path) as archive:
            return archive.read(MEMBER)
    except KeyError as error:
        raise DataError(f"{archive_path} has no member {MEMBER!r}. {remedy}") from error
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise DataError(f"{archive_path} is not a valid zip archive ({error}). {remedy}") from error


def _encode(raw: bytes, source: Path, remedy: str) -> np.ndarray:
    """Map text8 bytes to tokens ``uint8[len(raw)]``; any byte outside the alphabet is an error."""
    table = np.full(256, _INVALID, dtype=np.uint8)
    table[np.frombuffer(ALPHABET.encode(), dtype=np.uint8)] = np.arange(len(ALPHABET))
    tokens = table[np.frombuffer(raw, dtype=np.uint8)]
    bad = np.flatnonzero(tokens == _INVALID)
    if bad.size:
        offset = int(bad[0])
        raise DataError(
            f"{source}: byte {raw[offset : offset + 1]!r} at offset {offset:,} is not text8's "
            f"alphabet (a-z and space). {remedy}"
        )
    return tokens


def _download(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest``, which appears only once complete and of the expected size."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_file(dest) as file:
            total = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"Downloading {url}") as bar:
                while chunk := response.read(1 << 20):
                    file.write(chunk)
                    bar.update(len(chunk))
            if file.tell() != ZIP_BYTES:
                raise DataError(
                    f"downloading {url} gave {file.tell():,} bytes, expected {ZIP_BYTES:,}. Rerun to try "
                    f"again, or download it yourself and set {PATH_KEY}."
                )
    except (OSError, http.client.HTTPException) as error:
        raise DataError(
            f"could not download {url} to {dest} ({error}). Download it yourself and set {PATH_KEY}."
        ) from error
