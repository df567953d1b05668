"""scikit-learn's bundled 8x8 handwritten digits as 64-token sequences with their class labels
(no download needed). Items are ``{"x0": LongTensor[64], "index": int, "y": int}``, ``y`` the digit
0..9, which a class-conditional network (``network.num_classes: 10``) is trained on.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import Tensor

from datamodules.base import Item, TokenDataModule, TokenRows

_LEVELS = 17  # pixel values are the integers 0..16
_SIDE = 8
_NUM_VAL = 180
_NUM_TEST = 180  # of 1797 images, leaving 1437 for training
_CLASSES = 10


class LabelledRows(TokenRows):
    """Row ``i`` of ``rows`` ``[num_examples, seq_len]`` with the class label ``labels[i]``."""

    def __init__(self, rows: Tensor, labels: Tensor) -> None:
        super().__init__(rows)
        if labels.shape != rows.shape[:1]:
            raise ValueError(f"{labels.shape[0]} labels for {rows.shape[0]} rows")
        self.labels = labels.long()

    def __getitem__(self, index: int) -> Item:
        return {**super().__getitem__(index), "y": int(self.labels[index])}


class DigitsDataModule(TokenDataModule):
    """The 1797 digits, each pixel a token in ``0..16``, 64 tokens in row-major order.

    A fixed permutation (seeded by ``split_seed``) splits them into 1437 train / 180 val / 180 test.
    Training items carry their digit as the label ``y``. Validation and test items carry it too, so
    a class-conditional network reports the conditional NELBO (a bound on ``-log p(x | y)``), or with
    ``eval_null_label`` the null label ``num_classes``: the unconditional NELBO (a bound on
    ``-log p(x)``, the number an unconditional model reports), which label dropout trains the same
    network for. Unconditional networks ignore ``y``.

    Args:
        split_seed: seed of the permutation that assigns images to splits.
        eval_null_label: give validation and test items the null label instead of their digit.
        batch_size, eval_batch_size, num_workers, global_batch_size, val_examples: see
            :class:`TokenDataModule`.
    """

    # Masked pixels render as mid grey. That is also the shade of level 8, but real digits are
    # mostly 0 (black) and 16 (white), so a grey block stands out in a partly unmasked sample.
    MASK_GREY = 0.5
    num_classes = _CLASSES

    def __init__(
        self,
        split_seed: int = 0,
        eval_null_label: bool = False,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        global_batch_size: int | None = None,
        val_examples: int | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, global_batch_size, val_examples)
        self.save_hyperparameters()

    @property
    def vocab_size(self) -> int:
        return _LEVELS

    @property
    def seq_len(self) -> int:
        return _SIDE * _SIDE

    def _build(self) -> None:
        digits = load_digits()
        pixels, labels = torch.from_numpy(digits.data).long(), torch.from_numpy(digits.target).long()  # [1797, 64], [1797]
        generator = torch.Generator().manual_seed(self.hparams.split_seed)
        order = torch.randperm(pixels.shape[0], generator=generator)
        num_train = pixels.shape[0] - _NUM_VAL - _NUM_TEST
        train, val, test = order.split([num_train, _NUM_VAL, _NUM_TEST])
        eval_labels = torch.full_like(labels, self.num_classes) if self.hparams.eval_null_label else labels
        self.train_set = LabelledRows(pixels[train], labels[train])
        self.val_set = LabelledRows(pixels[val], eval_labels[val])
        self.test_set = LabelledRows(pixels[test], eval_labels[test])

    def to_images(self, tokens: Tensor) -> Tensor:
        """Grey-scale images ``[batch, 1, 8, 8]`` in ``[0, 1]`` (level / 16) from ``tokens`` ``[batch, 64]``.

        Mask ids (``>= 17``) show as :attr:`MASK_GREY`.
        """
        tokens = tokens.detach().cpu()
        images = torch.where(tokens < _LEVELS, tokens.float() / (_LEVELS - 1), self.MASK_GREY)
        return images.reshape(-1, 1, _SIDE, _SIDE)
