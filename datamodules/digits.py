"""scikit-learn's bundled 8x8 handwritten digits as 64-token sequences (no download needed)."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import Tensor

from datamodules.base import TokenDataModule, TokenRows

_LEVELS = 17  # pixel values are the integers 0..16
_SIDE = 8
_NUM_VAL = 180
_NUM_TEST = 180  # of 1797 images, leaving 1437 for training


class DigitsDataModule(TokenDataModule):
    """The 1797 digits, each pixel a token in ``0..16``, 64 tokens in row-major order.

    A fixed permutation (seeded by ``split_seed``) splits them into 1437 train / 180 val / 180 test.

    Args:
        split_seed: seed of the permutation that assigns images to splits.
        batch_size, eval_batch_size, num_workers, global_batch_size: see :class:`TokenDataModule`.
    """

    # Masked pixels render as mid grey. That is also the shade of level 8, but real digits are
    # mostly 0 (black) and 16 (white), so a grey block stands out in a partly unmasked sample.
    MASK_GREY = 0.5

    def __init__(
        self,
        split_seed: int = 0,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        global_batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, global_batch_size)
        self.save_hyperparameters()

    @property
    def vocab_size(self) -> int:
        return _LEVELS

    @property
    def seq_len(self) -> int:
        return _SIDE * _SIDE

    def _build(self) -> None:
        pixels = torch.from_numpy(load_digits().data).long()  # [1797, 64]
        generator = torch.Generator().manual_seed(self.hparams.split_seed)
        order = torch.randperm(pixels.shape[0], generator=generator)
        num_train = pixels.shape[0] - _NUM_VAL - _NUM_TEST
        train, val, test = order.split([num_train, _NUM_VAL, _NUM_TEST])
        self.train_set = TokenRows(pixels[train])
        self.val_set = TokenRows(pixels[val])
        self.test_set = TokenRows(pixels[test])

    def to_images(self, tokens: Tensor) -> Tensor:
        """Grey-scale images ``[batch, 1, 8, 8]`` in ``[0, 1]`` (level / 16) from ``tokens`` ``[batch, 64]``.

        Mask ids (``>= 17``) show as :attr:`MASK_GREY`.
        """
        tokens = tokens.detach().cpu()
        images = torch.where(tokens < _LEVELS, tokens.float() / (_LEVELS - 1), self.MASK_GREY)
        return images.reshape(-1, 1, _SIDE, _SIDE)
