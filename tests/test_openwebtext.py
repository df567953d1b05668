"""OpenWebText data module: packing and EOS placement, the held-out split, the token cache, GPT-2's tokenizer."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from datamodules import packing
from datamodules.base import DataError
from datamodules.openwebtext import OpenWebTextDataModule
from datamodules.tokenizer import load_tokenizer
from textdata import documents, train_bpe, write_jsonl

SEQ = 32


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def make(tmp_path, bpe, docs, **kwargs) -> OpenWebTextDataModule:
    path = tmp_path / "docs.jsonl"
    if not path.exists():
        write_jsonl(path, docs)
    args = {"tokenizer": str(bpe), "data_dir": str(tmp_path / "cache"), "seq_len": SEQ, "val_docs": 5,
            "batch_size": 4, **kwargs}
    dm = OpenWebTextDataModule(paths=[str(path)], **args)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def expected_blocks(docs: list[str], tokenizer, seq_len: int) -> np.ndarray:
    """The protocol spelled out one document at a time: tokens, EOS, concatenate, drop the remainder."""
    stream = []
    for doc in docs:
        stream += tokenizer.tokenizer.encode(doc).ids + [tokenizer.eos_id]
    full = len(stream) // seq_len
    return np.array(stream[: full * seq_len]).reshape(full, seq_len)


def rows(dataset) -> np.ndarray:
    return np.stack([dataset[i]["x0"].numpy() for i in range(len(dataset))])


def test_blocks_hold_documents_with_eos_after_each_and_the_last_documents_held_out(tmp_path, bpe, monkeypatch):
    monkeypatch.setattr(packing, "ENCODE_BATCH", 7)  # documents cross tokenizer batches and blocks
    docs = documents(60)
    dm = make(tmp_path, bpe, docs)
    tok = load_tokenizer(str(bpe))
    np.testing.assert_array_equal(rows(dm.train_set), expected_blocks(docs[:-5], tok, SEQ))
    np.testing.assert_array_equal(rows(dm.val_set), expected_blocks(docs[-5:], tok, SEQ))
    assert dm.test_set is dm.val_set
    # EOS exactly after each document (the small BPE never makes EOS from text).
    flat = rows(dm.train_set).ravel()
    ends = np.cumsum([len(tok.tokenizer.encode(doc).ids) + 1 for doc in docs[:-5]]) - 1
    np.testing.assert_array_equal(np.flatnonzero(flat == tok.eos_id), ends[ends < len(flat)])
    assert [dm.val_set[i]["index"] for i in range(len(dm.val_set))] == list(range(len(dm.val_set)))


def test_batches_are_x0_and_index(tmp_path, bpe):
    dm = make(tmp_path, bpe, documents(60))
    batch = next(iter(dm.train_dataloader()))
    assert batch["x0"].shape == (4, SEQ) and batch["x0"].dtype == torch.long and batch["index"].shape == (4,)
    assert int(batch["x0"].max()) < dm.vocab_size == 300


def test_cache_is_reused_and_rebuilt_when_tokenizer_block_size_or_file_change(tmp_path, bpe, monkeypatch):
    docs = documents(60)
    first = make(tmp_path, bpe, docs)
    folder, train_rows = first.cache.folder, rows(first.train_set)

    def refuse(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache was complete")

    with monkeypatch.context() as patch:
        patch.setattr(packing, "pack_documents", refuse)
        again = make(tmp_path, bpe, docs)
    assert again.cache.folder == folder
    np.testing.assert_array_equal(rows(again.train_set), train_rows)

    other_bpe = train_bpe(tmp_path / "other.json", vocab_size=280)
    assert make(tmp_path, other_bpe, docs).cache.folder != folder
    assert make(tmp_path, bpe, docs, seq_len=SEQ // 2).cache.folder != folder
    # A truncated token file makes the cache incomplete, so it is rebuilt (unlink first: a file
    # truncated in place under a live memory map would crash this process).
    data = (folder / "train.bin").read_bytes()
    (folder / "train.bin").unlink()
    (folder / "train.bin").write_bytes(data[:10])
    rebuilt = make(tmp_path, bpe, docs)
    np.testing.assert_array_equal(rows(rebuilt.train_set), train_rows)
    # A replaced data file (new size or time) is a new source.
    write_jsonl(tmp_path / "docs.jsonl", documents(61))
    assert make(tmp_path, bpe, docs).cache.folder != folder


def test_text_files_are_one_document_each(tmp_path, bpe):
    docs = documents(12)
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i:02d}.txt").write_text(doc)
    dm = OpenWebTextDataModule(paths=[str(tmp_path / "doc*.txt")], tokenizer=str(bpe), data_dir=str(tmp_path / "c"),
                               seq_len=SEQ, val_docs=2)
    dm.setup("fit")
    np.testing.assert_array_equal(rows(dm.train_set), expected_blocks(docs[:-2], load_tokenizer(str(bpe)), SEQ))


def test_gpt2_tokenizer_ships_with_the_package():
    tok = load_tokenizer("gpt2")
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.encode(["Hello world", " Hello, world!"]) == [[15496, 995], [18435, 11, 995, 0]]
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"


def test_decode_shows_masks(tmp_path, bpe):
    dm = make(tmp_path, bpe, documents(60))
    x0 = dm.val_set[0]["x0"].clone()
    x0[2:5] = dm.vocab_size
    head = dm.tokenizer.decode(x0[:2].tolist())
    assert dm.decode(x0[None])[0].startswith(head + "___")


def test_bad_inputs_are_one_line_data_errors(tmp_path, bpe, monkeypatch):
    missing = OpenWebTextDataModule(paths=[str(tmp_path / "missing*.jsonl")], tokenizer=str(bpe))
    with pytest.raises(DataError, match="no file matches"):
        missing.prepare_data()
    with pytest.raises(DataError, match="does not exist"):
        OpenWebTextDataModule(paths=[str(tmp_path / "x.jsonl")], tokenizer=str(tmp_path / "nope.json"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "wrong field"}\n')
    dm = OpenWebTextDataModule(paths=[str(tmp_path / "bad.jsonl")], tokenizer=str(bpe), data_dir=str(tmp_path), val_docs=1)
    with pytest.raises(DataError, match="line 2"):
        dm.prepare_data()
    write_jsonl(tmp_path / "few.jsonl", documents(3))
    dm = OpenWebTextDataModule(paths=[str(tmp_path / "few.jsonl")], tokenizer=str(bpe), data_dir=str(tmp_path), val_docs=3)
    with pytest.raises(DataError, match="not more than val_docs"):
        dm.prepare_data()
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: never touches the network
    dm = OpenWebTextDataModule(tokenizer=str(bpe), data_dir=str(tmp_path))
    with pytest.raises(DataError, match="data.init_args.paths"):
        dm.prepare_data()
