"""Pixel-level images with class labels: CIFAR-10 and downsampled ImageNet 64x64.

Token order: an image ``[C, H, W]`` of 8-bit values (256 levels, tokens ``0..255``) is flattened
channel by channel: all of R in row-major order, then all of G, then all of B (token
``c * H * W + h * W + w``). That is the order both releases store rows in, so rows are used as
they are: 3072 tokens for CIFAR-10, 12288 for ImageNet 64x64. Items are
``{"x0": LongTensor[C*H*W], "index": int, "y": int}`` with the class label ``y`` (0-based).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterable
from pathlib import Path
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.base import DataError, Item, LazyMemmap, TokenDataModule
from lightning_md4.atomic import atomic_file, atomic_path

LEVELS = 256
CHANNELS = 3

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"


class ImageRows(Dataset):
    """Image ``i``: row ``i`` of ``pixels`` ``[num_images, C*H*W]`` (uint8) and its label."""

    def __init__(self, pixels: np.ndarray | LazyMemmap, labels: np.ndarray) -> None:
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Item:
        row = np.asarray(self.pixels[index : index + 1][0], dtype=np.int64)
        return {"x0": torch.from_numpy(row), "index": index, "y": int(self.labels[index])}


class ReferenceImages(Dataset):
    """The first ``limit`` images of an :class:`ImageRows` as ``uint8 [C, H, W]`` tensors (the
    input torch-fidelity takes)."""

    def __init__(self, rows: ImageRows, side: int, limit: int | None = None) -> None:
        self.rows, self.side = rows, side
        self.size = len(rows) if limit is None else min(limit, len(rows))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Tensor:
        return self.rows[index]["x0"].to(torch.uint8).view(CHANNELS, self.side, self.side)


class ImageDataModule(TokenDataModule):
    """Shared part of the image data modules: 256 levels, 3 channels, labels, rendering."""

    MASK_GREY = 0.5  # masked values render as mid grey
    side: int
    num_classes: int

    @property
    def vocab_size(self) -> int:
        return LEVELS

    @property
    def seq_len(self) -> int:
        return CHANNELS * self.side * self.side

    def to_images(self, tokens: Tensor) -> Tensor:
        """RGB images ``[batch, 3, side, side]`` in ``[0, 1]`` from ``tokens`` ``[batch, seq_len]``;
        mask ids (``>= 256``) show as :attr:`MASK_GREY`."""
        tokens = tokens.detach().cpu()
        images = torch.where(tokens < LEVELS, tokens.float() / (LEVELS - 1), self.MASK_GREY)
        return images.view(-1, CHANNELS, self.side, self.side)

    def reference_images(self, limit: int | None = None) -> ReferenceImages:
        """The first ``limit`` training images (all when ``None``) for FID reference statistics."""
        self.setup("fit")
        return ReferenceImages(self.train_set, self.side, limit)

    @property
    def reference_name(self) -> str:
        """A name of the training set for caches of its statistics."""
        raise NotImplementedError


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 from the python-pickle release: 50000 training and 10000 test images, 10 classes.

    CIFAR-10 has no validation split; validation uses the test images (the paper reports test BPD).

    Args:
        data_dir: folder the archive is downloaded to (md5-checked) and extracted in.
        path: a local ``cifar-10-batches-py`` folder (``data_batch_1..5``, ``test_batch``); when
            set, nothing is downloaded.
        download: whether ``prepare_data`` may download the archive when it is not there.
        batch_size, eval_batch_size, num_workers, global_batch_size, val_examples: see
            :class:`TokenDataModule`.
    """

    side, num_classes = 32, 10

    def __init__(self, data_dir: str = "~/.cache/lightning_md4/cifar10", path: str | None = None,
                 download: bool = True, batch_size: int | None = None, eval_batch_size: int | None = None,
                 num_workers: int = 0, global_batch_size: int | None = None,
                 val_examples: int | None = None) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, global_batch_size, val_examples)
        self.save_hyperparameters()
        if path is None:
            self.folder = Path(data_dir).expanduser() / CIFAR10_FOLDER
            self.remedy = "Delete it to download it again, or set data.init_args.path to a good local copy."
        else:
            self.folder = Path(path).expanduser()
            self.remedy = "Set data.init_args.path to a good copy of the cifar-10-batches-py folder."
            if not self.folder.is_dir():
                raise DataError(f"CIFAR-10 folder {self.folder} does not exist. {self.remedy}")

    @property
    def reference_name(self) -> str:
        return f"cifar10-{_fingerprint(self.folder / name for name in CIFAR10_TRAIN)}"

    def prepare_data(self) -> None:
        if self.hparams.path is None and not (self.folder / CIFAR10_TEST).is_file():
            if not self.hparams.download:
                raise DataError(f"CIFAR-10 not found in {self.folder} and download is off. Set "
                                "data.init_args.download=true or point data.init_args.path at a cifar-10-batches-py folder.")
            _download_cifar10(self.folder.parent)

    def _build(self) -> None:
        self.prepare_data()
        train = [_read_cifar_batch(self.folder / name, self.remedy) for name in CIFAR10_TRAIN]
        pixels, labels = np.concatenate([p for p, _ in train]), np.concatenate([y for _, y in train])
        self.train_set = ImageRows(pixels, labels)
        self.val_set = self.test_set = ImageRows(*_read_cifar_batch(self.folder / CIFAR10_TEST, self.remedy))


class ImageNet64DataModule(ImageDataModule):
    """Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017) from its ``.npz`` release: 1000 classes.

    ``path`` is a folder holding (anywhere below it) ``train_data_batch_1.npz`` ...
    ``train_data_batch_10.npz`` and ``val_data.npz``; each holds ``data`` ``uint8 [n, 12288]`` and
    ``labels`` (1-based; made 0-based here). The release needs an image-net.org account, so there
    is no download. On first use each split is copied into one ``.npy`` array beside the files
    (``imagenet64_{split}_{pixels,labels}.npy``), memory-mapped afterwards; it is rebuilt when a
    source file is newer. Validation and test both use ``val_data.npz`` (the paper's split).

    Args:
        path: the folder with the ``.npz`` files.
        batch_size, eval_batch_size, num_workers, global_batch_size, val_examples: see
            :class:`TokenDataModule`.
    """

    side, num_classes = 64, 1000

    def __init__(self, path: str, batch_size: int | None = None, eval_batch_size: int | None = None,
                 num_workers: int = 0, global_batch_size: int | None = None,
                 val_examples: int | None = None) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, global_batch_size, val_examples)
        self.save_hyperparameters()
        self.folder = Path(path).expanduser()
        self.remedy = "Set data.init_args.path to the folder with the downsampled ImageNet 64x64 .npz files."
        if not self.folder.is_dir():
            raise DataError(f"ImageNet64 folder {self.folder} does not exist. {self.remedy}")

    @property
    def reference_name(self) -> str:
        return f"imagenet64-{_fingerprint(self._sources('train'))}"

    def prepare_data(self) -> None:
        for split in ("train", "val"):
            self._ensure_cache(split)

    def _build(self) -> None:
        self.train_set = self._rows("train")
        self.val_set = self.test_set = self._rows("val")

    def _rows(self, split: str) -> ImageRows:
        pixels, labels = self._ensure_cache(split)
        labels = np.load(labels)
        return ImageRows(LazyMemmap(pixels, 0, len(labels)), labels)

    def _sources(self, split: str) -> list[Path]:
        pattern = "train_data_batch_*.npz" if split == "train" else "val_data.npz"
        files = sorted(self.folder.rglob(pattern), key=lambda p: int("".join(filter(str.isdigit, p.stem)) or 0))
        if not files:
            raise DataError(f"no {pattern} under {self.folder}. {self.remedy}")
        return files

    def _ensure_cache(self, split: str) -> tuple[Path, Path]:
        """``(pixels.npy, labels.npy)`` of ``split``, built from the ``.npz`` files where needed."""
        sources = self._sources(split)
        pixels_path = self.folder / f"imagenet64_{split}_pixels.npy"
        labels_path = self.folder / f"imagenet64_{split}_labels.npy"
        newest = max(p.stat().st_mtime for p in sources)
        if all(p.is_file() and p.stat().st_mtime >= newest for p in (pixels_path, labels_path)):
            return pixels_path, labels_path
        labels = [_read_npz(p, "labels", self.remedy) for p in sources]
        for p, y in zip(sources, labels):
            if y.ndim != 1 or y.size == 0 or y.min() < 1 or y.max() > self.num_classes:
                raise DataError(f"{p}: labels must be 1..{self.num_classes} (1-based). {self.remedy}")
        total = sum(len(y) for y in labels)
        with atomic_path(pixels_path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(total, self.seq_len))
            start = 0
            for p, y in zip(sources, labels):
                data = _read_npz(p, "data", self.remedy)
                if data.dtype != np.uint8 or data.shape != (len(y), self.seq_len):
                    raise DataError(f"{p}: data is {data.dtype} {data.shape}, expected uint8 ({len(y)}, "
                                    f"{self.seq_len}) for 64x64 RGB images. {self.remedy}")
                out[start : start + len(y)] = data
                start += len(y)
            out.flush()
            del out
        with atomic_file(labels_path) as file:
            np.save(file, (np.concatenate(labels) - 1).astype(np.int16))
        return pixels_path, labels_path


def _read_cifar_batch(path: Path, remedy: str) -> tuple[np.ndarray, np.ndarray]:
    """``(pixels uint8 [n, 3072], labels int64 [n])`` of one pickled CIFAR-10 batch.

    The release is a Python pickle (it runs code when loaded); downloads are md5-checked first.
    torchvision's CIFAR10 class reads the same files but insists on the full release's checksums,
    so subsets and test fixtures could not be read with it.
    """
    if not path.is_file():
        raise DataError(f"CIFAR-10 file {path} does not exist. {remedy}")
    try:
        with path.open("rb") as file:
            batch = pickle.load(file, encoding="bytes")
        pixels = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise DataError(f"{path} is not a CIFAR-10 python batch ({type(error).__name__}: {error}). {remedy}") from None
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3072 or len(labels) != len(pixels):
        raise DataError(f"{path}: data is {pixels.dtype} {pixels.shape} with {len(labels)} labels, expected uint8 "
                        f"(n, 3072) with n labels. {remedy}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must be 0..9. {remedy}")
    return pixels, labels


def _download_cifar10(root: Path) -> None:
    """Download (md5-checked) and extract the CIFAR-10 python release into ``root``."""
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CIFAR10_URL, root, md5=CIFAR10_MD5, remove_finished=True)
    except (OSError, RuntimeError) as error:  # RuntimeError: torchvision's md5 mismatch
        raise DataError(f"could not download {CIFAR10_URL} to {root} ({error}). Download and extract it yourself "
                        "and set data.init_args.path to its cifar-10-batches-py folder.") from None


def _read_npz(path: Path, key: str, remedy: str) -> np.ndarray:
    """One array of an ``.npz`` file (only that member is read)."""
    try:
        with np.load(path) as archive:
            return archive[key]
    except KeyError:
        raise DataError(f"{path} has no {key!r} array. {remedy}") from None
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path} is not a readable .npz file ({error}). {remedy}") from None


def _fingerprint(paths: Iterable[Path]) -> str:
    """A short hash of the files' names, sizes and modification times (for cache names)."""
    digest = hashlib.sha256()
    for p in paths:
        stat = Path(p).stat()
        digest.update(f"{Path(p).name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:12]
