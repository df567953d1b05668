"""Documents -> GPT-2 tokens -> fixed-length blocks, cached on disk as memory-mapped arrays.

The protocol of SEDD and MD4 for OpenWebText and the zero-shot sets: tokenize every document,
append the end-of-text token, concatenate, cut into ``seq_len``-token blocks and drop the
remainder. Blocks span document boundaries.

A cache is a folder named by a hash of everything its tokens depend on (the tokenizer's
fingerprint, the block size, the sources and the split settings): changing any of them gives a new
folder, so a stale cache is never read. It holds one raw ``<split>.bin`` token array per split and
a ``meta.json`` written last, whose presence marks the cache complete; the folder is built under a
temporary name and renamed into place, so concurrent builders (one per node) never see half a cache.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from datamodules.base import DataError, LazyMemmap, TokenChunks
from datamodules.tokenizer import TextTokenizer
from lightning_md4.atomic import atomic_path
from lightning_md4.paths import not_a_file

ENCODE_BATCH = 1024  # documents per tokenizer call: large enough to keep every core busy
FORMAT_VERSION = 1  # bump when the cache layout or the packing rule changes


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` for GPT-2's 50,257 tokens, ``uint32`` for larger vocabularies."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def pack_documents(docs: Iterable[str], tokenizer: TextTokenizer, seq_len: int, out: BinaryIO,
                   progress: tqdm | None = None) -> dict[str, int]:
    """Write the complete ``seq_len``-token blocks of ``docs`` (EOS after each) to ``out``.

    Returns ``{"documents", "blocks", "dropped_tokens"}``; the dropped tokens are the remainder
    after the last complete block.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    carry = np.empty(0, dtype=dtype)
    documents = blocks = 0
    for batch in _batched(docs, ENCODE_BATCH):
        ids = tokenizer.encode(batch)
        lengths = np.array([len(doc) for doc in ids], dtype=np.int64)
        flat = np.empty(int(lengths.sum()) + len(ids), dtype=dtype)
        is_eos = np.zeros(len(flat), dtype=bool)
        is_eos[np.cumsum(lengths + 1) - 1] = True  # each document's tokens, then its EOS
        flat[is_eos] = tokenizer.eos_id
        flat[~is_eos] = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
        stream = np.concatenate([carry, flat])
        full = len(stream) // seq_len
        out.write(stream[: full * seq_len].tobytes())
        carry = stream[full * seq_len :]
        documents, blocks = documents + len(batch), blocks + full
        if progress is not None:
            progress.update(len(batch))
    return {"documents": documents, "blocks": blocks, "dropped_tokens": len(carry)}


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class BlockCache:
    """The token blocks of named splits, cached under ``root/<name>-<hash of key>``.

    Args:
        root: folder of caches.
        name: readable prefix of the cache folder.
        key: everything the tokens depend on, JSON-serialisable; its hash names the folder.
    """

    def __init__(self, root: Path, name: str, key: dict[str, Any]) -> None:
        self.key = {"format": FORMAT_VERSION, **key}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root).expanduser() / f"{name}-{digest}"

    def meta(self) -> dict[str, Any] | None:
        """The cache's ``meta.json`` if the cache is complete and intact, else ``None``."""
        try:
            meta = json.loads((self.folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("key") != self.key:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split, info in meta["splits"].items():
            path = self.folder / f"{split}.bin"
            if not path.is_file() or path.stat().st_size != info["blocks"] * meta["seq_len"] * itemsize:
                return None  # truncated or replaced: rebuild
        return meta

    def build(self, splits: dict[str, tuple[Iterable[str], int | None]], tokenizer: TextTokenizer,
              seq_len: int) -> dict[str, Any]:
        """Tokenize and pack each split's documents unless the cache is already complete.

        ``splits`` maps a split name to ``(documents, number of documents or None)``; the count
        only sizes the progress bar. Returns the meta data.
        """
        meta = self.meta()
        if meta is not None:
            return meta
        meta = {"key": self.key, "seq_len": seq_len, "dtype": token_dtype(tokenizer.vocab_size).name, "splits": {}}
        try:
            # replaces a stale or broken cache of the same key
            with atomic_path(self.folder, folder=True) as tmp:
                for split, (docs, count) in splits.items():
                    with open(tmp / f"{split}.bin", "wb") as out, \
                            tqdm(total=count, unit="doc", desc=f"Tokenizing {self.folder.name} {split}") as bar:
                        meta["splits"][split] = pack_documents(docs, tokenizer, seq_len, out, bar)
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        except FileExistsError:  # another process renamed its identical cache into place first
            if self.meta() is None:
                raise
        return meta

    def blocks(self, split: str) -> TokenChunks:
        """The split's blocks as a data set of ``{"x0": [seq_len], "index"}`` items."""
        meta = self.meta()
        if meta is None:
            raise DataError(f"token cache {self.folder} is missing or incomplete; run prepare_data() first "
                            "(md4 does), or delete the folder to rebuild it")
        seq_len = meta["seq_len"]
        length = meta["splits"][split]["blocks"] * seq_len
        return TokenChunks(LazyMemmap(self.folder / f"{split}.bin", 0, length, dtype=meta["dtype"]), seq_len)


def read_documents(path: Path, field: str = "text", per_line: bool = False) -> Iterator[str]:
    """The documents of a local file.

    ``.jsonl``: one JSON object per line, its ``field``; ``.parquet``: the ``field`` column (needs
    ``pyarrow``); any other file is text: one document per file, or one per line if ``per_line``
    (lines keep their newline, as Hugging Face's line-based text data sets do).
    """
    if not path.is_file():
        raise DataError(f"data file {path} {not_a_file(path)}")
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path, field)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path, field)
    else:
        with open(path, encoding="utf-8", newline="") as file:
            if per_line:
                yield from file
            else:
                yield file.read()


def count_documents(path: Path, per_line: bool = False) -> int:
    """How many documents :func:`read_documents` yields for ``path`` (a fast pass, no parsing)."""
    if path.suffix == ".parquet":
        return _parquet_file(path).metadata.num_rows
    if path.suffix == ".jsonl" or per_line:
        with open(path, "rb") as file:
            lines = sum(1 for line in file if line.strip() or per_line)
        return lines
    return 1


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)[field]
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"{path} line {number}: not a JSON object with a {field!r} field ({err!r}); "
                                "set the text field name to the file's") from None


def _parquet_file(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    return pq.ParquetFile(path)


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    file = _parquet_file(path)
    if field not in file.schema_arrow.names:
        raise DataError(f"{path} has no column {field!r} (it has {file.schema_arrow.names}); set the text field name")
    for batch in file.iter_batches(columns=[field]):
        yield from batch.column(0).to_pylist()


def file_identity(paths: list[Path]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of each file: a cache key part that changes when a file is replaced."""
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def hub_documents(name: str, config: str | None, split: str, field: str, remedy: str) -> tuple[Iterator[str], int]:
    """The documents of a Hugging Face hub data set and their number (``datasets`` imported lazily).

    ``remedy`` says which setting takes local files instead; it ends every error message.
    """
    try:
        import datasets
    except ImportError:
        raise DataError(f"loading {name} from the hub needs the datasets package (pip install datasets); "
                        f"or {remedy}") from None
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, missing, or a script-based data set that recent versions refuse
        first = (str(err).splitlines() or [""])[0][:200]
        raise DataError(f"could not load {name} ({split}) from the hub ({type(err).__name__}: {first}). Recent "
                        f"datasets versions no longer run dataset scripts and offline machines cannot download: "
                        f"{remedy}") from None
    if field not in data.column_names:
        raise DataError(f"{name} has no column {field!r} (it has {data.column_names}); {remedy}")
    return (row[field] for row in data), len(data)
