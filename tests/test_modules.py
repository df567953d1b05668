"""LightningModule glue: optimiser groups, noise keyed for reproducibility and DDP, GenMD4 options."""

import pytest
import torch

from conftest import TINY_NETWORK
from lightning_md4.modules import GenMD4, MD4, OptimConfig
from lightning_md4.modules.base import warmup_cosine
from lightning_md4.nets import TransformerConfig

TINY = TransformerConfig(**TINY_NETWORK)


class FakeTrainer:
    world_size, global_rank, global_step, log_every_n_steps, accumulate_grad_batches = 1, 0, 0, 50, 1


def groups_by_size(module):
    return {id(p): g for g in module.param_groups() for p in g["params"]}


def test_weight_decay_only_on_matrices():
    m = MD4(5, 8, network=TINY, optim=OptimConfig(weight_decay=0.1))
    groups = groups_by_size(m)
    for name, p in m.named_parameters():
        expected = 0.1 if p.ndim >= 2 and "embed" not in name else 0.0
        assert groups[id(p)]["weight_decay"] == expected, name


def test_genmd4_exponents_excluded_from_decay_unless_asked_and_own_lr():
    m = GenMD4(5, 8, network=TINY, optim=OptimConfig(weight_decay=0.1, lr=1e-3), w_lr=5e-2)
    g = groups_by_size(m)[id(m.schedule.raw)]
    assert g["weight_decay"] == 0.0 and g["lr"] == 5e-2
    assert sum(len(gr["params"]) for gr in m.param_groups()) == len(list(m.parameters()))
    official = GenMD4(5, 8, network=TINY, optim=OptimConfig(weight_decay=0.1), decay_w=True)
    assert groups_by_size(official)[id(official.schedule.raw)]["weight_decay"] == 0.1
    torch.testing.assert_close(m.schedule.w, torch.ones(5))


def test_warmup_then_cosine():
    assert warmup_cosine(0, 10, 110, 0.0) == 0.1
    assert warmup_cosine(9, 10, 110, 0.0) == 1.0
    assert abs(warmup_cosine(60, 10, 110, 0.0) - 0.5) < 1e-12
    assert warmup_cosine(110, 10, 110, 0.1) == 0.1


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_every_groups_learning_rate_is_warmup_then_cosine_at_every_step(tmp_path, warmup):
    """The lr of each optimiser step of a run, and after its last (the end of the schedule), is the
    closed form times the group's own lr: GenMD4's w_lr group decays to min_lr_ratio * w_lr too."""
    import math

    import lightning.pytorch as pl

    from datamodules import DigitsDataModule

    total, lr, w_lr, min_ratio = 7, 1e-3, 5e-2, 0.1

    def closed_form(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    class RecordLR(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[list[float]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    m = GenMD4(17, 64, network=TINY, w_lr=w_lr,
               optim=OptimConfig(lr=lr, warmup_steps=warmup, min_lr_ratio=min_ratio))
    record = RecordLR()
    trainer = pl.Trainer(max_steps=total, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         limit_val_batches=0, default_root_dir=tmp_path, callbacks=[record])
    trainer.fit(m, DigitsDataModule(batch_size=4))
    record.seen.append([g["lr"] for g in trainer.optimizers[0].param_groups])
    assert len(record.seen) == total + 1
    for step, lrs in enumerate(record.seen):
        assert lrs == pytest.approx([lr * closed_form(step)] * 2 + [w_lr * closed_form(step)], rel=1e-12, abs=0), step
    assert record.seen[-1][-1] == pytest.approx(min_ratio * w_lr, rel=1e-12)


def test_epoch_metrics_are_logged_as_metric_objects_that_lightning_computes_and_resets(tmp_path, tiny_digits):
    """``val/nelbo`` and ``val/bpt`` are torchmetrics objects logged from the step: Lightning computes
    and resets them, so a subclass whose epoch-end hook skips super() still reports them, a second
    validation is not averaged with the first, and bpt is the reduced mean / ln 2 exactly."""
    import math

    import lightning.pytorch as pl

    class OwnEpochEnd(MD4):
        def on_validation_epoch_end(self) -> None:
            pass

    torch.manual_seed(0)
    m = OwnEpochEnd(17, 64, network=TINY)
    dm = tiny_digits
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, limit_val_batches=2, default_root_dir=tmp_path)
    trainer.validate(m, dm, verbose=False)
    nats, bits = trainer.callback_metrics["val/nelbo"], trainer.callback_metrics["val/bpt"]
    assert torch.equal(bits, nats / math.log(2))
    dm.setup("validate")
    batches = [batch for _, batch in zip(range(2), dm.val_dataloader())]
    m.eval()
    with torch.no_grad():
        expected = torch.cat([m.eval_nelbo(batch) / 64 for batch in batches]).mean()
    assert float(nats) == pytest.approx(float(expected), rel=1e-6)
    trainer.validate(m, dm, verbose=False)
    assert torch.equal(trainer.callback_metrics["val/nelbo"], nats)


def test_training_noise_is_stratified_over_the_global_batch():
    """Two ranks x two accumulated micro-batches of 2 sequences take disjoint strata of one 8-sequence batch."""
    m = MD4(5, 6, network=TINY)
    batch = {"x0": torch.zeros(2, 6, dtype=torch.long), "index": torch.arange(2)}
    times = []
    for micro_index in (0, 1):
        for rank in (0, 1):
            trainer = FakeTrainer()
            trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches = 2, rank, 2
            m._trainer = trainer  # the noise only reads the layout and the step
            m.micro_index = micro_index
            times.append(m.train_noise(batch)[0])
    strata = sorted((torch.cat(times) * 8).floor().long().tolist())
    assert strata == list(range(8))


class RecordingMD4(MD4):
    """MD4 that records the times each training micro-batch draws, by optimiser step."""

    def train_noise(self, batch, draw=0):
        t, noise = super().train_noise(batch, draw)
        self.times.setdefault(self.global_step, []).append(t)
        return t, noise


def test_accumulated_micro_batches_share_one_stratified_set(tmp_path):
    """Under accumulate_grad_batches=2 the two micro-batches of a step hit each of the 2B strata once."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    m = RecordingMD4(5, 6, network=TINY)
    m.times = {}
    data = [{"x0": torch.randint(0, 5, (6,)), "index": torch.tensor(i)} for i in range(16)]
    trainer = pl.Trainer(max_steps=2, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(m, DataLoader(data, batch_size=4))
    assert sorted(m.times) == [0, 1]
    for step, micro_batches in m.times.items():
        assert len(micro_batches) == 2
        strata = sorted((torch.cat(micro_batches) * 8).floor().long().tolist())  # MD4: t = u
        assert strata == list(range(8)), step


def test_no_training_draw_repeats_another_at_any_step():
    """An example never gets the same uniform as a time and as a mask, or at two steps or draws.

    The old streams (time 3 + step, masks 2**16 + 2 step + draw) met at step 65533.
    """
    m = MD4(5, 6, network=TINY, antithetic=False)
    m._trainer = FakeTrainer()
    batch = {"x0": torch.zeros(4, 6, dtype=torch.long), "index": torch.arange(4)}
    first_uniforms = []  # one [4] row per (purpose, step, draw)
    for step in (0, 1, 2, 65533, 65534, 65535, 1 << 20):
        m._trainer.global_step = step
        for draw in (0, 1):
            t, noise = m.train_noise(batch, draw)
            first_uniforms.append(noise[:, 0])
        first_uniforms.append(t)  # MD4: t = u
    per_example = torch.stack(first_uniforms, 1)  # [4, draws]
    for row in per_example:
        assert len(set(row.tolist())) == len(row)


def test_evaluation_noise_depends_only_on_the_example():
    m = MD4(5, 6, network=TINY)
    a = m.eval_noise({"x0": torch.zeros(4, 6, dtype=torch.long), "index": torch.tensor([0, 1, 2, 3])})
    b = m.eval_noise({"x0": torch.zeros(2, 6, dtype=torch.long), "index": torch.tensor([3, 1])})
    torch.testing.assert_close(b[0], a[0][[3, 1]], rtol=0, atol=0)
    torch.testing.assert_close(b[1], a[1][[3, 1]], rtol=0, atol=0)


def test_genmd4_rloo_uses_two_independent_masks_and_reports_the_nelbo():
    m = GenMD4(5, 32, network=TINY)
    m._trainer = FakeTrainer()
    batch = {"x0": torch.randint(0, 5, (8, 32)), "index": torch.arange(8)}
    t0, n0 = m.train_noise(batch, draw=0)
    t1, n1 = m.train_noise(batch, draw=1)
    torch.testing.assert_close(t0, t1)
    assert not torch.equal(n0, n1)
    assert (t0 >= m.process.t_min).all()
    objective, nelbo = m.train_objective(batch)
    assert objective.requires_grad and not nelbo.requires_grad
    objective.mean().backward()
    assert m.schedule.raw.grad is not None and m.schedule.raw.grad.abs().sum() > 0


def test_a_diverged_run_stops_with_a_clear_error(tmp_path, tiny_digits):
    import lightning.pytorch as pl
    import pytest

    m = MD4(17, 64, network=TINY)
    with torch.no_grad():
        m.net.head.bias.fill_(float("nan"))
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         limit_val_batches=0, default_root_dir=tmp_path, log_every_n_steps=1)
    with pytest.raises(FloatingPointError, match="not finite"):
        trainer.fit(m, tiny_digits)


def test_d3pm_exact_test_sums_all_steps(tmp_path):
    import lightning.pytorch as pl

    from datamodules import DigitsDataModule
    from lightning_md4.modules import D3PM

    torch.manual_seed(0)
    m = D3PM(17, 64, T=6, exact_test=True, network=TINY)
    for p in m.net.parameters():  # away from adaLN-Zero's uniform start, so the draws matter
        torch.nn.init.normal_(p, std=0.3)
    dm = DigitsDataModule(batch_size=16, eval_batch_size=16)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, limit_test_batches=1, default_root_dir=tmp_path)
    nats = trainer.test(m, dm, verbose=False)[0]["test/nelbo"]
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    x0 = batch["x0"]
    m.eval()
    expected = m.process.nelbo_exact(m.net, x0, batch_T=8, step_noise=m.exact_test_noise(batch["index"], 64)).mean() / 64
    one_draw = m.process.nelbo(m.net, x0, generator=torch.Generator().manual_seed(0)).mean() / 64
    assert abs(nats - expected.item()) < 1e-5 and abs(nats - one_draw.item()) > 1e-3


def test_a_checkpoint_saved_before_a_network_field_existed_still_loads():
    """A network field added later (with its default) must not make older checkpoints 'another model'."""
    from dataclasses import asdict

    from lightning_md4.modules import MD4
    from lightning_md4.modules.base import CheckpointError

    m = MD4(17, 8, network=TINY)
    theirs = {"_class_path": "lightning_md4.modules.MD4", "vocab_size": 17, "seq_len": 8,
              "network": asdict(m.net.cfg)}
    theirs["network"].pop("rope_base")  # as if saved before the field existed; it takes its default
    m.on_load_checkpoint({"hyper_parameters": theirs})
    theirs["network"]["d_model"] = 2 * theirs["network"]["d_model"]
    with pytest.raises(CheckpointError, match="network"):
        m.on_load_checkpoint({"hyper_parameters": theirs})
