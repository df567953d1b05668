"""CIFAR-10 and ImageNet64 data modules on small files in the real release formats."""

import os
import pickle

import numpy as np
import pytest
import torch

from datamodules import CIFAR10DataModule, DataError, ImageNet64DataModule
from datamodules import images as images_module
from image_fixtures import synthetic_images, write_cifar10, write_imagenet64


def read_pickle(path):
    with open(path, "rb") as file:
        return pickle.load(file, encoding="bytes")


def test_cifar10_items_are_the_file_rows_channel_by_channel(tmp_path):
    folder = write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=6, num_test=5)
    dm = CIFAR10DataModule(path=str(folder), batch_size=4)
    dm.setup("fit")
    assert (dm.vocab_size, dm.seq_len, len(dm.train_set), len(dm.val_set)) == (256, 3072, 30, 5)
    assert dm.test_set is dm.val_set  # CIFAR-10's test batch serves both
    second = read_pickle(folder / "data_batch_2")
    item = dm.train_set[6 + 3]  # fourth image of the second batch
    assert item["index"] == 9 and item["y"] == second[b"labels"][3]
    torch.testing.assert_close(item["x0"], torch.from_numpy(second[b"data"][3].astype(np.int64)))
    # Tokens 0..1023 are the red plane in row-major order, then green, then blue.
    image = dm.to_images(item["x0"][None])[0]
    plane = torch.from_numpy(second[b"data"][3].reshape(3, 32, 32).astype(np.float32)) / 255
    torch.testing.assert_close(image, plane)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x0", "index", "y"} and batch["x0"].shape == (4, 3072) and batch["y"].shape == (4,)
    reference = dm.reference_images(limit=7)
    assert len(reference) == 7 and reference[0].dtype == torch.uint8
    torch.testing.assert_close(reference[0].flatten().long(), dm.train_set[0]["x0"])


def test_masks_render_grey(tmp_path):
    dm = CIFAR10DataModule(path=str(write_cifar10(tmp_path / "c", per_batch=1, num_test=1)))
    tokens = torch.tensor([[0, 255, 256] + [0] * 3069])
    red = dm.to_images(tokens)[0, 0, 0, :3]
    torch.testing.assert_close(red, torch.tensor([0.0, 1.0, dm.MASK_GREY]))


def test_cifar10_bad_files_are_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        CIFAR10DataModule(path=str(tmp_path / "nowhere"))
    folder = write_cifar10(tmp_path / "c", per_batch=2, num_test=2)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3 is not a CIFAR-10 python batch"):
        CIFAR10DataModule(path=str(folder)).setup("fit")
    batch = read_pickle(folder / "data_batch_1")
    batch[b"data"] = batch[b"data"][:, :100]
    with open(folder / "data_batch_3", "wb") as file:
        pickle.dump(batch, file)
    with pytest.raises(DataError, match=r"expected uint8 \(n, 3072\)"):
        CIFAR10DataModule(path=str(folder)).setup("fit")
    with pytest.raises(DataError, match="download is off"):
        CIFAR10DataModule(data_dir=str(tmp_path / "cache"), download=False).prepare_data()


def test_cifar10_download_is_checksummed_and_failures_are_clear(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def fake_download(url, root, md5=None, remove_finished=False):
        calls.append((url, md5))
        write_cifar10(root / images_module.CIFAR10_FOLDER, per_batch=2, num_test=2)

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "cache"), batch_size=2)
    dm.prepare_data()
    dm.setup("fit")
    assert calls == [(images_module.CIFAR10_URL, images_module.CIFAR10_MD5)] and len(dm.train_set) == 10
    dm.prepare_data()  # present now: no second download
    assert len(calls) == 1

    def corrupt(url, root, md5=None, remove_finished=False):
        raise RuntimeError("File not found or corrupted.")  # torchvision's md5 mismatch

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", corrupt)
    with pytest.raises(DataError, match="could not download .*corrupted.*data.init_args.path"):
        CIFAR10DataModule(data_dir=str(tmp_path / "other")).prepare_data()


def test_imagenet64_labels_become_zero_based_and_rows_are_kept(tmp_path):
    folder = write_imagenet64(tmp_path / "in64", train_batches=2, per_batch=3, num_val=2)
    dm = ImageNet64DataModule(path=str(folder), batch_size=2)
    dm.setup("fit")
    assert (dm.seq_len, len(dm.train_set), len(dm.val_set)) == (12288, 6, 2)
    with np.load(folder / "train_data_batch_2.npz") as second:
        item = dm.train_set[3 + 1]
        assert item["y"] == second["labels"][1] - 1
        torch.testing.assert_close(item["x0"], torch.from_numpy(second["data"][1].astype(np.int64)))
    pixels, labels = synthetic_images(2, 64, 1000, 0)  # what write_imagenet64 put in val_data.npz
    assert [dm.val_set[i]["y"] for i in range(2)] == labels.tolist()
    assert dm.to_images(dm.val_set[1]["x0"][None]).shape == (1, 3, 64, 64)


def test_imagenet64_cache_is_reused_and_rebuilt_when_a_source_changes(tmp_path):
    folder = write_imagenet64(tmp_path / "in64", train_batches=2, per_batch=2, num_val=2)
    ImageNet64DataModule(path=str(folder)).prepare_data()
    cache = folder / "imagenet64_train_pixels.npy"
    built = cache.stat().st_mtime_ns
    ImageNet64DataModule(path=str(folder)).prepare_data()
    assert cache.stat().st_mtime_ns == built  # reused
    pixels, labels = synthetic_images(5, 64, 1000, 7)
    np.savez(folder / "train_data_batch_2.npz", data=pixels, labels=(labels + 1).tolist())
    later = built + 10**9
    os.utime(folder / "train_data_batch_2.npz", ns=(later, later))
    dm = ImageNet64DataModule(path=str(folder))
    dm.setup("fit")
    assert len(dm.train_set) == 7
    torch.testing.assert_close(dm.train_set[6]["x0"], torch.from_numpy(pixels[4].astype(np.int64)))


def test_imagenet64_bad_files_are_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageNet64DataModule(path=str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no train_data_batch"):
        ImageNet64DataModule(path=str(empty)).prepare_data()
    folder = write_imagenet64(tmp_path / "zero", train_batches=1, per_batch=2, num_val=1)
    pixels, _ = synthetic_images(2, 64, 1000, 0)
    np.savez(folder / "train_data_batch_1.npz", data=pixels, labels=[0, 3])  # 0 is not a 1-based label
    with pytest.raises(DataError, match="1-based"):
        ImageNet64DataModule(path=str(folder)).prepare_data()
    np.savez(folder / "train_data_batch_1.npz", data=pixels[:, :3072], labels=[1, 3])  # 32x32 rows
    with pytest.raises(DataError, match="64x64"):
        ImageNet64DataModule(path=str(folder)).prepare_data()
