"""Validation limited by a number of examples: the same examples, and the same NELBO, on any layout.

``trainer.limit_val_batches`` counts batches per rank, so the examples it keeps depend on devices,
batch size and (through ``global_batch_size``) accumulation; ``val_examples`` keeps the first K.
The 2-process (DDP) version of the invariance is in tests/test_distributed.py.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import default_collate

from datamodules import DigitsDataModule
from datamodules.base import DataError
from lightning_md4.modules import MD4
K = 11  # not a multiple of any per-rank batch below, so shards and last batches are ragged


def _indices(dm: DigitsDataModule, world_size: int) -> list[int]:
    """Example indices of all ranks' validation loaders, concatenated."""
    seen = []
    for rank in range(world_size):
        dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
        seen += [i for batch in dm.val_dataloader() for i in batch["index"].tolist()]
    return seen


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("eval_batch_size", [2, 4, 64])
def test_val_examples_are_the_first_k_once_on_any_layout(world_size, eval_batch_size):
    dm = DigitsDataModule(eval_batch_size=eval_batch_size, val_examples=K)
    dm.setup()
    assert sorted(_indices(dm, world_size)) == list(range(K))
    # The test split is not limited, and a limit above the split's size keeps the whole split.
    assert len(dm.test_dataloader().dataset) == 180
    big = DigitsDataModule(eval_batch_size=eval_batch_size, val_examples=1000)
    big.setup()
    assert sorted(_indices(big, world_size)) == list(range(180))


def test_val_examples_must_be_positive():
    with pytest.raises(DataError, match="val_examples is 0; it must be a positive integer"):
        DigitsDataModule(val_examples=0)


def _validate(model: MD4, global_batch_size: int, accumulate: int) -> float:
    dm = DigitsDataModule(global_batch_size=global_batch_size, val_examples=K)
    trainer = pl.Trainer(accelerator="cpu", devices=1, accumulate_grad_batches=accumulate, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(model, datamodule=dm, verbose=False)[0]["val/nelbo"]


def test_validation_nelbo_is_the_mean_over_the_first_k_for_any_batch_and_accumulation(tiny_network):
    torch.manual_seed(0)
    model = MD4(17, 64, network=tiny_network)
    # Reference: the first K validation digits in one float64 batch, noise keyed by their index.
    dm = DigitsDataModule()
    dm.setup()
    reference = model.double()
    with torch.no_grad():
        batch = default_collate([dm.val_set[i] for i in range(K)])
        expected = float(reference.eval_nelbo(batch).mean()) / 64
        whole = float(reference.eval_nelbo(default_collate([dm.val_set[i] for i in range(180)])).mean()) / 64
    assert abs(whole - expected) > 1e-3  # the subset is a different number from the whole split
    model.float()
    # Per-device eval batches of 8, 4 and 3 (the global batch split over accumulation).
    for global_batch_size, accumulate in ((8, 1), (8, 2), (6, 2)):
        got = _validate(model, global_batch_size, accumulate)
        assert got == pytest.approx(expected, rel=1e-5), (global_batch_size, accumulate)


def test_a_batch_limit_warns_that_it_depends_on_the_layout():
    dm = DigitsDataModule(val_examples=K)
    for limit, warns in ((3, True), (0.5, True), (None, False), (0, False)):
        dm.trainer = pl.Trainer(accelerator="cpu", devices=1, limit_val_batches=limit, logger=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dm.setup("fit")
        said = [w for w in caught if "per rank" in str(w.message) and "val_examples" in str(w.message)]
        assert bool(said) == warns, limit
