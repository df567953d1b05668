"""The global batch is split over nodes x devices x accumulated batches, or fails with a clear error."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from conftest import DIGITS, md4
from datamodules import DigitsDataModule
from datamodules.base import DEFAULT_BATCH_SIZE, DataError, per_device_batch


def _attached(dm: DigitsDataModule, devices: int, num_nodes: int, accumulate: int) -> DigitsDataModule:
    # Building a DDP Trainer launches nothing; it only records the layout the data module reads.
    dm.trainer = pl.Trainer(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy="ddp",
                            accumulate_grad_batches=accumulate, logger=False, enable_progress_bar=False)
    return dm


def test_per_device_batch_divides():
    assert per_device_batch(512, 2, 8, 4) == 8
    assert per_device_batch(512, 1, 8, 1) == 64
    assert per_device_batch(6, 1, 3, 2) == 1


def test_per_device_batch_names_the_layout_when_it_does_not_divide():
    with pytest.raises(DataError, match=r"global_batch_size 512 does not divide over 3 node\(s\) x 8 device\(s\) "
                                        r"x 1 accumulated batch\(es\) = 24"):
        per_device_batch(512, 3, 8, 1)


def test_datamodule_splits_global_batch_over_the_trainer_layout():
    dm = _attached(DigitsDataModule(global_batch_size=96), devices=2, num_nodes=2, accumulate=3)
    dm.setup("fit")
    assert dm.batch_size == 8 and dm.eval_batch_size == 8
    assert next(iter(dm.train_dataloader()))["x0"].shape == (8, 64)
    dm = _attached(DigitsDataModule(global_batch_size=96, eval_batch_size=5), devices=2, num_nodes=1, accumulate=1)
    dm.setup("fit")
    assert (dm.batch_size, dm.eval_batch_size) == (48, 5)


def test_batch_size_alone_is_per_device_and_default_is_documented():
    dm = _attached(DigitsDataModule(batch_size=7), devices=2, num_nodes=2, accumulate=3)
    dm.setup("fit")
    assert dm.batch_size == 7
    assert DigitsDataModule().batch_size == DEFAULT_BATCH_SIZE


def test_both_set_must_agree():
    dm = _attached(DigitsDataModule(batch_size=16, global_batch_size=64), devices=2, num_nodes=1, accumulate=2)
    dm.setup("fit")
    assert dm.batch_size == 16
    dm = _attached(DigitsDataModule(batch_size=8, global_batch_size=64), devices=2, num_nodes=1, accumulate=2)
    with pytest.raises(DataError, match="batch_size 8 .* disagrees with .*global_batch_size 64, which gives 16"):
        dm.setup("fit")


@pytest.mark.slow
def test_cli_reports_an_indivisible_global_batch_in_one_line(tmp_path):
    proc = md4(
        "validate", "--config", DIGITS,
        "--data.init_args.batch_size=null", "--data.init_args.global_batch_size=64",
        "--trainer.accumulate_grad_batches=3", "--trainer.accelerator=cpu", "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false", "--random_weights=true",
        cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("md4: error: data.init_args.global_batch_size 64 does not divide"), proc.stderr[-2000:]


def test_every_training_data_module_takes_the_global_batch():
    """Configs fix the global batch and the validation subset for any data set, so every module that
    trains must accept both."""
    import inspect

    import datamodules
    from datamodules.base import TokenDataModule
    from datamodules.tokens import TokenFileDataModule

    classes = {getattr(datamodules, name) for name in datamodules.__all__} | {TokenFileDataModule}
    trainable = [c for c in classes if isinstance(c, type) and issubclass(c, TokenDataModule)
                 and c is not TokenDataModule and c.__name__ != "ZeroShotDataModule"]
    assert len(trainable) >= 7
    for cls in trainable:
        parameters = inspect.signature(cls.__init__).parameters
        assert "global_batch_size" in parameters and "val_examples" in parameters, cls.__name__
