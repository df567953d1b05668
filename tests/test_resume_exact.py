"""A preempted run resumed with ``--ckpt_path last`` is the run its user asked for: the same loss at
every step and the same final weights as the run left uninterrupted, also when it stops mid-epoch.

Before the training loader kept its place (``datamodules.base.ResumableLoader``), a digits run
stopped at step 27 (mid-epoch) ended 2.4e-3 away in its weights: the resumed epoch was shuffled
anew, and dropout drew from a reseeded RNG.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import md4_command
from datamodules import DigitsDataModule
from datamodules.base import ResumableLoader, ResumableSampler
from faults import callbacks_config, digits_fit, env, largest_difference, read_losses, weights
from lightning_md4.checkpointing import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow  # md4 fit subprocesses (the first two tests are in-process and fast)


def test_one_process_order_is_random_samplers():
    """One process trains on the order it always did (RandomSampler's, drop_last), RNG use included."""
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    torch.manual_seed(0)
    plain = [b["index"] for _ in range(2) for b in DataLoader(dm.train_set, batch_size=64, shuffle=True, drop_last=True)]
    after_plain = torch.get_rng_state()
    torch.manual_seed(0)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader) and len(loader) == 1437 // 64
    mine = [b["index"] for _ in range(2) for b in loader]
    assert len(mine) == len(plain) and all(torch.equal(a, b) for a, b in zip(mine, plain))
    assert torch.equal(torch.get_rng_state(), after_plain)


def test_ranks_split_each_global_batch_in_blocks_and_a_loader_resumes_mid_epoch():
    dm = DigitsDataModule(batch_size=48)
    dm.setup()
    torch.manual_seed(1)
    single = [b["index"] for b in dm.train_dataloader()]
    shards = []
    for rank in range(3):  # 3 ranks x 16: rank r takes part r of every global batch of 48
        torch.manual_seed(1)
        sampler = ResumableSampler(dm.train_set, 16, num_replicas=3, rank=rank)
        shards.append([b["index"] for b in DataLoader(dm.train_set, batch_size=16, sampler=sampler, drop_last=True)])
    assert [len(s) for s in shards] == [len(single)] * 3
    assert all(torch.equal(torch.cat([s[k] for s in shards]), single[k]) for k in range(len(single)))

    torch.manual_seed(2)
    loader = dm.train_dataloader()
    it = iter(loader)
    head = [next(it)["index"] for _ in range(7)]
    state = dm.state_dict()  # what a checkpoint keeps: the data module's part
    rest = [b["index"] for b in it]
    after = torch.rand(3)
    for made_first in (False, True):  # the loader made after the restore (max_steps) or before it (max_epochs)
        torch.manual_seed(99)  # a new process
        fresh = DigitsDataModule(batch_size=48)
        fresh.setup()
        if made_first:
            resumed = fresh.train_dataloader()
            fresh.load_state_dict(state)
        else:
            fresh.load_state_dict(state)
            resumed = fresh.train_dataloader()
        again = [b["index"] for b in resumed]
        assert len(head) + len(again) == len(loader) and all(torch.equal(a, b) for a, b in zip(again, rest))
        assert torch.equal(torch.rand(3), after)  # the global RNG goes on as in the uninterrupted epoch


def test_a_place_that_arrives_after_the_loader_was_iterated_is_refused_with_a_warning():
    dm = DigitsDataModule(batch_size=48)
    dm.setup()
    loader = dm.train_dataloader()
    next(iter(loader))
    state = dm.state_dict()
    late = DigitsDataModule(batch_size=48)
    late.setup()
    iter(late.train_dataloader())  # as FSDP's fit loop does before it restores the checkpoint
    with pytest.warns(UserWarning, match="arrived after the training loader was iterated"):
        late.load_state_dict(state)


@pytest.mark.parametrize("max_epochs", ["68", "-1"], ids=["loader made before the restore", "after it"])
def test_preempted_twice_at_an_epoch_end_and_mid_epoch_resumes_exactly(tmp_path, max_epochs):
    """Digits, 22 batches an epoch: SIGTERM during step 22 (the last batch of epoch 0) and during
    step 26 (mid-epoch 1), each time resumed with the same command plus --ckpt_path last, against
    the same 30 steps uninterrupted (run beside it). Dropout (0.1) and label dropout are on.
    digits.yaml sets max_epochs, so Lightning makes the loader before it restores the checkpoint;
    the paper configs set max_steps only (-1 here), and it makes the loader after."""
    steps = 30
    ref_log, log = tmp_path / "reference.loss", tmp_path / "preempted.loss"
    ref_cfg = callbacks_config(tmp_path / "reference.yaml", ref_log)
    cfg = callbacks_config(tmp_path / "preempted.yaml", log,
                           "{class_path: faults.SigtermAt, init_args: {step: 21}}",
                           "{class_path: faults.SigtermAt, init_args: {step: 25}}")
    epochs = f"--trainer.max_epochs={max_epochs}"
    reference = subprocess.Popen(md4_command(*digits_fit(tmp_path / "reference", steps, ref_cfg, epochs)), cwd=tmp_path,
                                 env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        codes, saved_at = [], []
        run = tmp_path / "preempted"
        for _ in range(3):  # bounded: two preemptions, then the run must finish
            proc = subprocess.run(md4_command(*digits_fit(run, steps, cfg, epochs, "--ckpt_path", "last")), cwd=tmp_path,
                                  env=env(), capture_output=True, text=True, timeout=300)
            codes.append(proc.returncode)
            if proc.returncode != PREEMPTED_EXIT_CODE:
                break
            saved_at.append(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"])
        assert codes == [PREEMPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, 0], proc.stderr[-3000:]
        assert saved_at == [22, 26]
        _, ref_err = reference.communicate(timeout=300)
        assert reference.returncode == 0, ref_err[-3000:]
    finally:
        reference.kill()

    expected, got = read_losses(ref_log), read_losses(log)
    assert sorted(got) == sorted(expected) == list(range(1, steps + 1))
    # The same examples at every step (the third column), and the same loss.
    assert [line.split()[2] for line in log.read_text().splitlines()] == \
        [line.split()[2] for line in ref_log.read_text().splitlines()]
    assert max(abs(got[s] - expected[s]) for s in expected) <= 1e-6
    final, ref_final = (Path(r) / "checkpoints" / "last.ckpt" for r in (run, tmp_path / "reference"))
    assert torch.load(final, weights_only=True)["global_step"] == steps
    assert largest_difference(weights(final), weights(ref_final)) <= 1e-6  # the weights and the EMA's
