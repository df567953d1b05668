"""Sample quality of image models: FID and Inception Score with torch-fidelity.

The reference is the training set; torch-fidelity caches its Inception features and FID
statistics under ``cache_root`` the first time, keyed by the data set, the number of reference
images, the feature layer and the weights file, so later evaluations only run the samples.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lightning_md4.paths import not_a_file

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
# Two tensors of torch-fidelity's InceptionV3 state dict, to recognise a weights file.
INCEPTION_SHAPES = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "fc.weight": (1008, 2048)}


class FidelityError(RuntimeError):
    """The Inception weights cannot be found, downloaded or read, or the options cannot work."""


class UInt8Images(Dataset):
    """Images ``uint8 [M, 3, H, W]`` as the Dataset torch-fidelity reads (one tensor per item)."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def inception_weights(path: str | Path | None = None) -> Path:
    """A local file of torch-fidelity's InceptionV3 weights: ``path`` when given, else the copy in
    torch hub's cache, downloaded there on first use (the place torch-fidelity itself uses)."""
    remedy = (f"On a machine without internet, download {INCEPTION_URL} elsewhere and pass its path "
              "(--inception_weights PATH)")
    if path is not None:
        weights = Path(path).expanduser()
        if not weights.is_file():
            raise FidelityError(f"Inception weights file {weights} {not_a_file(weights)}. {remedy}")
    else:
        weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]
        if not weights.is_file():
            weights.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(INCEPTION_URL, str(weights), progress=True)
            except Exception as err:  # URLError, HTTPError, timeouts, ...: all mean "no download"
                raise FidelityError(f"could not download the Inception weights from {INCEPTION_URL} "
                                    f"({type(err).__name__}: {err}). {remedy}") from None
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        ok = all(tuple(state[k].shape) == shape for k, shape in INCEPTION_SHAPES.items())
    except Exception:  # not a torch file, not a dict, missing keys
        ok = False
    if not ok:
        raise FidelityError(f"{weights} is not torch-fidelity's InceptionV3 state dict. {remedy}")
    return weights


def file_tag(path: Path) -> str:
    """A short content hash, so caches made with other weights are never reused."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def fid_and_inception_score(samples: Tensor, reference: Dataset, reference_name: str, weights: Path,
                            cache_root: str | Path, feature_layer_fid: str = "2048", isc: bool = True,
                            isc_splits: int = 10, batch_size: int = 64, cuda: bool | None = None,
                            verbose: bool = True) -> dict[str, float]:
    """FID of ``samples`` ``uint8 [M, 3, H, W]`` against ``reference`` (a Dataset of ``uint8
    [3, H, W]``), and their Inception Score when ``isc``.

    ``feature_layer_fid``: Inception feature of the FID (``2048`` is the standard one; ``64`` is
    small and fast for tests). Returns ``fid``, and ``inception_score``, ``inception_score_std``.
    """
    import torch_fidelity

    cuda = torch.cuda.is_available() if cuda is None else cuda
    metrics = torch_fidelity.calculate_metrics(
        input1=UInt8Images(samples), input2=reference, fid=True, isc=isc, isc_splits=isc_splits, cuda=cuda,
        batch_size=batch_size, feature_extractor="inception-v3-compat", feature_layer_fid=feature_layer_fid,
        feature_extractor_weights_path=str(weights), cache_root=str(cache_root),
        input2_cache_name=f"{reference_name}-n{len(reference)}-w{file_tag(weights)}", verbose=verbose,
        # On the CPU, load in-process: loader workers would only take cores from the Inception network.
        save_cpu_ram=not cuda)
    out = {"fid": float(metrics["frechet_inception_distance"])}
    if isc:
        out["inception_score"] = float(metrics["inception_score_mean"])
        out["inception_score_std"] = float(metrics["inception_score_std"])
    return out


@torch.no_grad()
def sample_images(model: Any, datamodule: Any, num_samples: int, steps: int, grid: str, guidance: float = 0.0,
                  batch_size: int = 256, seed: int = 0) -> tuple[Tensor, int]:
    """``num_samples`` images ``uint8 [num_samples, 3, H, W]`` from ``model`` in batches, with a
    progress bar, and the network evaluations per batch. A class-conditional model draws the
    classes in turn (sample ``i`` has label ``i % num_classes``)."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    images, nfe = [], 0
    with tqdm(total=num_samples, unit="img", desc=f"sampling ({steps} {grid} steps)") as bar:
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            labels = None
            if model.num_classes:
                labels = torch.arange(start, start + n, device=model.device) % model.num_classes
            tokens, nfe = model.sample(n, steps, grid, generator=generator, labels=labels, guidance=guidance)
            images.append((datamodule.to_images(tokens.cpu()) * 255).round().to(torch.uint8))
            bar.update(n)
    return torch.cat(images), nfe


def check_isc_splits(num_samples: int, isc_splits: int) -> None:
    """The Inception Score averages over ``isc_splits`` groups of samples; each needs a few."""
    if isc_splits < 1 or num_samples < 2 * isc_splits:
        raise FidelityError(f"{num_samples} samples cannot make {isc_splits} Inception Score splits of 2 or more; "
                         f"draw at least {2 * max(1, isc_splits)} samples or set --isc_splits between 1 and {num_samples // 2}")
