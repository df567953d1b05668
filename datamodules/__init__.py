"""Lightning data modules yielding fixed-length integer token batches ``{"x0": [batch, seq], "index": [batch]}``."""

from datamodules.base import DataError, TokenDataModule, UnrepeatedDistributedSampler
from datamodules.chars import CharDataModule
from datamodules.digits import DigitsDataModule
from datamodules.images import CIFAR10DataModule, ImageNet64DataModule
from datamodules.openwebtext import OpenWebTextDataModule
from datamodules.text8 import Text8DataModule
from datamodules.zeroshot import ZeroShotDataModule

__all__ = [
    "CharDataModule",
    "CIFAR10DataModule",
    "DataError",
    "DigitsDataModule",
    "ImageNet64DataModule",
    "OpenWebTextDataModule",
    "Text8DataModule",
    "TokenDataModule",
    "UnrepeatedDistributedSampler",
    "ZeroShotDataModule",
]
