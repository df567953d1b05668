"""Small image data sets in the real release formats, for tests and CPU runs.

    python tests/image_fixtures.py runs/cifar10_fixture     # a CIFAR-10-format folder, 600 images
    python tests/image_fixtures.py runs/cifar10_fixture runs/random_inception.pth   # and random Inception weights

Images are synthetic but structured, so a tiny model learns something in a few hundred steps:
each class has its own background colour and a square of a second colour at a random place.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190]], dtype=np.int64)


def synthetic_images(num: int, side: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pixels uint8 [num, 3 * side * side], labels [num])``, rows channel by channel (R, G, B)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num)
    images = np.empty((num, 3, side, side), dtype=np.int64)
    for i, y in enumerate(labels):
        images[i] = PALETTE[y % len(PALETTE)][:, None, None]
        size = side // 4
        r, c = rng.integers(0, side - size, 2)
        images[i, :, r : r + size, c : c + size] = PALETTE[(y + 5) % len(PALETTE)][:, None, None]
    images += rng.integers(-8, 9, images.shape)
    return np.clip(images, 0, 255).astype(np.uint8).reshape(num, -1), labels


def write_cifar10(folder: Path, per_batch: int = 100, num_test: int = 100, seed: int = 0) -> Path:
    """A ``cifar-10-batches-py``-style folder: five training batches and a test batch, pickled as in
    the release (``b"data"`` uint8 ``[n, 3072]``, ``b"labels"`` list of ints)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        pixels, labels = synthetic_images(num_test if name == "test_batch" else per_batch, 32, 10, seed + k)
        batch = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": pixels,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))]}
        with (folder / name).open("wb") as file:
            pickle.dump(batch, file)
    return folder


def write_imagenet64(folder: Path, train_batches: int = 2, per_batch: int = 6, num_val: int = 4,
                     seed: int = 0) -> Path:
    """Downsampled-ImageNet-style ``.npz`` files: ``train_data_batch_{i}.npz`` and ``val_data.npz``
    with ``data`` uint8 ``[n, 12288]`` and 1-based ``labels``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, train_batches + 1):
        pixels, labels = synthetic_images(per_batch, 64, 1000, seed + i)
        np.savez(folder / f"train_data_batch_{i}.npz", data=pixels, labels=(labels + 1).tolist(), mean=pixels.mean(0))
    pixels, labels = synthetic_images(num_val, 64, 1000, seed)
    np.savez(folder / "val_data.npz", data=pixels, labels=(labels + 1).tolist())
    return folder


def write_random_inception_weights(path: Path) -> Path:
    """A randomly initialised state dict of torch-fidelity's InceptionV3 (the right keys and shapes,
    no download): FID and IS computed with it are consistent but mean nothing about image quality."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(0)
    empty = path.with_suffix(".empty")
    torch.save({}, empty)
    # The constructor loads weights from a file; skip that to keep PyTorch's random initialisation.
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["64"], feature_extractor_weights_path=str(empty))
    empty.unlink()
    torch.save(net.state_dict(), path)
    return path


if __name__ == "__main__":
    print(write_cifar10(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cifar10_fixture")))
    if len(sys.argv) > 2:
        print(write_random_inception_weights(Path(sys.argv[2])))
