import io
import pickle
import re
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DistributedSampler

import datamodules.text8 as text8_module
from datamodules import (
    CharDataModule,
    DataError,
    DigitsDataModule,
    Text8DataModule,
    UnrepeatedDistributedSampler,
)
from datamodules.base import ResumableSampler

SPLIT = (9000, 500, 500)
SEQ = 64  # 500 // 64 = 7 chunks per eval split, 52 characters dropped


def _text8_text(length: int = sum(SPLIT), seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(list(" abcdefghijklmnopqrstuvwxyz"), size=length))


def _zip(path: Path, content: str, member: str = "text8") -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, content)
    return path


def _text8(path: Path, **kwargs) -> Text8DataModule:
    return Text8DataModule(path=str(path), seq_len=SEQ, split=SPLIT, download=False, **kwargs)


def _indices(loader) -> list[int]:
    return [i for batch in loader for i in batch["index"].tolist()]


# --- sampler ---------------------------------------------------------------------------------------


def test_unrepeated_sampler_covers_each_index_once():
    data = list(range(11))
    shards = [list(UnrepeatedDistributedSampler(data, num_replicas=2, rank=r)) for r in range(2)]
    assert [len(UnrepeatedDistributedSampler(data, 2, r)) for r in range(2)] == [6, 5]
    assert [len(s) for s in shards] == [6, 5]
    assert sorted(shards[0] + shards[1]) == list(range(11))
    # Lightning only leaves a loader's sampler alone when it is a DistributedSampler.
    assert isinstance(UnrepeatedDistributedSampler(data, 2, 0), DistributedSampler)


def test_val_loader_shards_without_duplicates_under_fake_two_rank_trainer():
    dm = DigitsDataModule(batch_size=16, eval_batch_size=32)
    dm.setup()
    seen = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = dm.val_dataloader()
        assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
        seen += _indices(loader)
    assert sorted(seen) == list(range(180))


def test_loaders_single_process():
    dm = DigitsDataModule(batch_size=100, eval_batch_size=64)
    dm.setup()
    train = dm.train_dataloader()
    assert isinstance(train.sampler, ResumableSampler) and train.drop_last
    assert len(train) == 1437 // 100
    val = dm.val_dataloader()
    assert not val.drop_last and _indices(val) == list(range(180))  # in order, last batch kept
    assert _indices(dm.test_dataloader()) == list(range(180))


# --- digits ----------------------------------------------------------------------------------------


def test_digits_shapes_ranges_and_split():
    dm = DigitsDataModule(split_seed=0)
    assert (dm.vocab_size, dm.seq_len) == (17, 64)  # known before setup
    dm.setup()
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [1437, 180, 180]
    batch = next(iter(dm.train_dataloader()))
    assert batch["x0"].shape == (64, 64) and batch["x0"].dtype == torch.long
    assert batch["index"].shape == (64,)
    rows = torch.cat([s.rows for s in (dm.train_set, dm.val_set, dm.test_set)])
    assert rows.min() == 0 and rows.max() == 16
    # The three splits partition the data set: together they are exactly its rows.
    expected = torch.from_numpy(load_digits().data).long()
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, expected.tolist()))


def test_digits_split_is_deterministic():
    a, b, c = DigitsDataModule(split_seed=0), DigitsDataModule(split_seed=0), DigitsDataModule(split_seed=1)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.val_set.rows, b.val_set.rows) and torch.equal(a.train_set.rows, b.train_set.rows)
    assert not torch.equal(a.val_set.rows, c.val_set.rows)
    assert a.val_set[5]["index"] == 5 and torch.equal(a.val_set[5]["x0"], a.val_set.rows[5])


def test_digits_yield_sklearns_labels():
    """Every item's ``y`` is scikit-learn's target of the same image, in every split."""
    digits = load_digits()
    label_of = {}
    for pixels, target in zip(digits.data.astype(np.int64).tolist(), digits.target.tolist()):
        label_of.setdefault(tuple(pixels), set()).add(target)
    dm = DigitsDataModule(split_seed=0, batch_size=64)
    dm.setup()
    assert dm.num_classes == 10
    seen = []
    for split in (dm.train_set, dm.val_set, dm.test_set):
        for i in range(len(split)):
            item = split[i]
            assert item["y"] in label_of[tuple(item["x0"].tolist())]
            seen.append(item["y"])
    assert sorted(seen) == sorted(digits.target.tolist())  # each image once, labels 0..9 in sklearn's counts
    batch = next(iter(dm.train_dataloader()))
    assert batch["y"].shape == (64,) and batch["y"].dtype == torch.long
    for x0, y in zip(batch["x0"].tolist(), batch["y"].tolist()):
        assert y in label_of[tuple(x0)]


def test_digits_eval_null_label_keeps_training_labels():
    true, null = DigitsDataModule(split_seed=0), DigitsDataModule(split_seed=0, eval_null_label=True)
    for dm in (true, null):
        dm.setup()
    assert torch.equal(null.train_set.labels, true.train_set.labels)
    for split in ("val_set", "test_set"):
        assert torch.equal(getattr(null, split).rows, getattr(true, split).rows)
        assert (getattr(null, split).labels == 10).all() and getattr(true, split).labels.max() == 9
    assert null.test_set[3]["y"] == 10


def test_class_conditional_digits_grid_has_one_row_per_class(tmp_path):
    """Sample i drawn for class i % 10 is filled with level i % 10, so row r of the PNG must be level r."""
    from PIL import Image

    from lightning_md4.callbacks import save_samples

    dm = DigitsDataModule()
    labels = torch.arange(30) % 10
    tokens = labels[:, None].expand(30, 64)
    path = save_samples(tokens, dm, tmp_path / "grid.png", num_classes=10)
    grid = np.asarray(Image.open(path).convert("L"))
    cell = 2 + 64  # padding + an 8x8 digit upscaled 8 times
    assert grid.shape == (2 + 10 * cell, 2 + 3 * cell)
    for row in range(10):
        for col in range(3):
            assert grid[2 + row * cell + 32, 2 + col * cell + 32] == round(255 * row / 16)
    square = np.asarray(Image.open(save_samples(tokens, dm, tmp_path / "plain.png")).convert("L"))
    assert square.shape == (2 + 5 * cell, 2 + 6 * cell)  # unconditional: ceil(sqrt(30)) = 6 per row


def test_digits_to_images_shows_masks_grey():
    dm = DigitsDataModule()
    tokens = torch.zeros(2, 64, dtype=torch.long)
    tokens[0, 0], tokens[0, 9], tokens[1, 63] = 16, 17, 8
    images = dm.to_images(tokens)
    assert images.shape == (2, 1, 8, 8) and images.dtype == torch.float32
    assert images[0, 0, 0, 0] == 1.0 and images[0, 0, 1, 1] == DigitsDataModule.MASK_GREY
    assert images[1, 0, 7, 7] == 0.5 and images.min() == 0.0
    assert dm.decode(tokens) is None


# --- text8 -----------------------------------------------------------------------------------------


def test_text8_tokens_chunks_and_decode(tmp_path):
    text = _text8_text()
    dm = _text8(_zip(tmp_path / "text8.zip", text))
    assert (dm.vocab_size, dm.seq_len) == (27, SEQ)
    dm.prepare_data()
    dm.setup()
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [9000 // SEQ, 500 // SEQ, 500 // SEQ]
    val = torch.stack([dm.val_set[i]["x0"] for i in range(len(dm.val_set))])
    assert val.dtype == torch.long and val.shape == (7, SEQ)
    assert dm.decode(val) == [text[9000 + i * SEQ : 9000 + (i + 1) * SEQ] for i in range(7)]
    assert dm.decode(dm.test_set[6]["x0"][None]) == [text[9500 + 6 * SEQ : 9500 + 7 * SEQ]]
    with pytest.raises(IndexError):
        dm.val_set[7]
    # ' ' = 0, 'a'..'z' = 1..26; the mask id renders as '_'.
    assert dm.decode(torch.tensor([[0, 1, 26, 27]])) == [" az_"]
    cached = np.load(tmp_path / "text8.npy")
    assert cached.dtype == np.uint8 and cached.shape == (10_000,)
    assert cached[: len(text)].tolist() == [" abcdefghijklmnopqrstuvwxyz".index(c) for c in text]


def test_text8_train_crops_stay_in_train_region(tmp_path):
    text = _text8_text()
    dm = _text8(_zip(tmp_path / "text8.zip", text), batch_size=32)
    dm.setup()
    torch.manual_seed(0)
    crops = [dm.train_set[i] for i in range(len(dm.train_set))]
    assert [c["index"] for c in crops] == list(range(140))
    decoded = dm.decode(torch.stack([c["x0"] for c in crops]))
    # Random text: a 64-character window occurs once, so "in text[:9000]" pins it to the train part.
    assert all(s in text[:9000] for s in decoded)
    assert len({text.index(s) for s in decoded}) > 100  # offsets are random, not the chunk grid
    assert next(iter(dm.train_dataloader()))["x0"].shape == (32, SEQ)


def test_text8_plain_file_and_pickles_small(tmp_path):
    text = _text8_text()
    (tmp_path / "text8").write_text(text)
    dm = _text8(tmp_path / "text8")
    dm.setup()
    assert dm.decode(dm.val_set[0]["x0"][None]) == [text[9000 : 9000 + SEQ]]
    # Data sets travel to spawned workers as a path, not as a copy of the memory-mapped tokens.
    assert len(pickle.dumps(dm.train_set)) < 1000


def test_text8_cache_is_reused(tmp_path, monkeypatch):
    archive = _zip(tmp_path / "text8.zip", _text8_text())
    _text8(archive).setup()

    def fail(*args):
        raise AssertionError("decoded the archive again")

    monkeypatch.setattr(text8_module, "_read_text8", fail)
    dm = _text8(archive)
    dm.setup()
    assert len(dm.val_set) == 7


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda p: p.write_bytes(b"this is not a zip file" * 100), id="garbage"),
        pytest.param(lambda p: p.write_bytes(_zip(io.BytesIO(), _text8_text()).getvalue()[:3000]), id="truncated"),
        pytest.param(lambda p: _zip(p, _text8_text(9999)), id="short-member"),
        pytest.param(lambda p: _zip(p, _text8_text()[:-1] + "A"), id="bad-char"),
        pytest.param(lambda p: _zip(p, _text8_text(), member="other"), id="no-member"),
    ],
)
def test_text8_bad_archive_raises_data_error(tmp_path, write):
    archive = tmp_path / "text8.zip"
    write(archive)
    with pytest.raises(DataError, match=re.escape(str(archive))) as info:
        _text8(archive).setup()
    assert "data.init_args.path" in str(info.value)
    assert not (tmp_path / "text8.npy").exists()


def test_text8_bad_cached_download_says_delete_it(tmp_path):
    (tmp_path / "text8.zip").write_bytes(b"garbage")
    dm = Text8DataModule(data_dir=str(tmp_path), seq_len=SEQ, split=SPLIT, download=False)
    with pytest.raises(DataError, match="Delete it and rerun"):
        dm.prepare_data()


def test_text8_missing_path_raises_at_init(tmp_path):
    missing = tmp_path / "nope" / "text8.zip"
    with pytest.raises(DataError, match=re.escape(str(missing))) as info:
        _text8(missing)
    assert "data.init_args.path" in str(info.value)


def test_text8_no_download_and_nothing_cached(tmp_path):
    dm = Text8DataModule(data_dir=str(tmp_path / "cache"), seq_len=SEQ, split=SPLIT, download=False)
    assert dm.vocab_size == 27  # no data needed to know the vocabulary
    with pytest.raises(DataError, match="download"):
        dm.setup()


class _FakeResponse(io.BytesIO):
    headers: dict = {}


def test_text8_download(tmp_path, monkeypatch):
    text = _text8_text()
    payload = _zip(io.BytesIO(), text).getvalue()
    monkeypatch.setattr(text8_module, "ZIP_BYTES", len(payload))
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _FakeResponse(payload))
    dm = Text8DataModule(data_dir=str(tmp_path / "cache"), seq_len=SEQ, split=SPLIT)
    dm.prepare_data()
    dm.setup()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["text8.npy", "text8.zip"]
    assert dm.decode(dm.val_set[0]["x0"][None]) == [text[9000 : 9000 + SEQ]]


def test_text8_truncated_download_leaves_nothing(tmp_path, monkeypatch):
    payload = _zip(io.BytesIO(), _text8_text()).getvalue()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _FakeResponse(payload[:-10]))
    dm = Text8DataModule(data_dir=str(tmp_path), seq_len=SEQ, split=SPLIT)
    with pytest.raises(DataError, match="expected 31,344,016"):
        dm.prepare_data()
    assert list(tmp_path.iterdir()) == []


def test_text8_split_must_fit_seq_len(tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        Text8DataModule(data_dir=str(tmp_path), seq_len=600, split=SPLIT)


# --- chars -----------------------------------------------------------------------------------------


def test_chars_vocab_split_and_round_trip(tmp_path):
    text = "Hello, wörld!\n" * 200  # 2800 characters
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    dm = CharDataModule(str(path), seq_len=32, val_fraction=0.1, test_fraction=0.05)
    assert dm.hparams.vocab == "".join(sorted(set(text))) and dm.vocab_size == 12 and dm.seq_len == 32
    dm.setup()
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [2380 // 32, 280 // 32, 140 // 32]
    assert dm.decode(dm.val_set[1]["x0"][None]) == [text[2380 + 32 : 2380 + 64]]
    torch.manual_seed(0)
    crop = dm.decode(dm.train_set[0]["x0"][None])[0]
    assert crop in text[:2380]
    assert dm.decode(torch.tensor([[0, 12]])) == ["\n_"]  # the mask id shows as '_'


def test_chars_given_vocab_is_used_and_checkpoint_rebuilds(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("ab_" * 100)
    dm = CharDataModule(str(path), seq_len=8, vocab="_zba")
    assert dm.vocab_size == 4
    dm.setup()
    assert dm.val_set[0]["x0"].tolist()[:3] == [3, 2, 0]  # "ab_" under the given order
    assert dm.decode(torch.tensor([[4]])) == ["\u2588"]  # '_' is a real character here
    rebuilt = CharDataModule(**CharDataModule(str(path), seq_len=8).hparams)
    assert rebuilt.hparams.vocab == "_ab"


def test_chars_errors(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("abc" * 100)
    with pytest.raises(DataError, match="'c'"):
        CharDataModule(str(path), vocab="ab")
    with pytest.raises(DataError, match="data.init_args.path"):
        CharDataModule(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="shorter than seq_len"):
        CharDataModule(str(path), seq_len=128)
