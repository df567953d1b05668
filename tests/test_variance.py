"""Variance of the NELBO estimator and of its gradient: exact statistics on a toy estimate, the
m-samples estimate, and the callback's logged numbers reproduced from the trained model."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from conftest import TINY_NETWORK
from datamodules import DigitsDataModule
from lightning_md4.callbacks import EstimatorVarianceMonitor
from lightning_md4.diffusion import MaskedDiffusion
from lightning_md4.diffusion.variance import estimator_stats, nelbo_estimate
from lightning_md4.modules import MD4
from lightning_md4.nets import TransformerConfig
from lightning_md4.diffusion.schedules import Cosine

TINY = TransformerConfig(**TINY_NETWORK)


def test_estimator_stats_of_a_linear_toy_estimate():
    # estimate_k = z_k . w, so its gradient is z_k: every statistic is a plain sample statistic of z.
    z = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5], [-2.0, 4.0]], dtype=torch.float64)
    w = torch.tensor([2.0, -1.0], dtype=torch.float64, requires_grad=True)
    draws = iter(z)
    stats = estimator_stats(lambda: next(draws) @ w, [w], draws=4)
    values = z @ w.detach()
    norms = z.norm(dim=1)
    assert stats.nelbo_mean == pytest.approx(float(values.mean()))
    assert stats.nelbo_var == pytest.approx(float(((values - values.mean()) ** 2).sum() / 3))
    assert stats.grad_norm_mean == pytest.approx(float(norms.mean()))
    assert stats.grad_norm_var == pytest.approx(float(((norms - norms.mean()) ** 2).sum() / 3))
    assert stats.grad_var == pytest.approx(float(((z - z.mean(0)) ** 2).sum() / 3))


def test_estimator_stats_needs_two_draws():
    w = torch.ones(1, requires_grad=True)
    with pytest.raises(ValueError, match="draws must be >= 2"):
        estimator_stats(lambda: w.sum(), [w], draws=1)


def _denoiser(V: int):
    torch.manual_seed(0)
    table = torch.randn(V + 1, V, dtype=torch.float64)
    return lambda xt, t: table[xt]  # logits depend on the (possibly masked) token only


@pytest.mark.parametrize("antithetic", [True, False])
def test_m_samples_estimate_is_the_mean_over_repeated_sequences(antithetic):
    V, process = 5, MaskedDiffusion(Cosine(), 5)
    x0 = torch.randint(0, V, (3, 7))
    f = _denoiser(V)
    got = nelbo_estimate(process, f, x0, samples_per_sequence=4, antithetic=antithetic,
                         generator=torch.Generator().manual_seed(1))
    repeated = torch.stack([row for row in x0 for _ in range(4)])  # each sequence 4 times in a row
    want = process.nelbo(f, repeated, antithetic=antithetic, generator=torch.Generator().manual_seed(1)).mean() / 7
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="samples_per_sequence"):
        nelbo_estimate(process, f, x0, samples_per_sequence=0)


def test_more_samples_per_sequence_reduce_the_variance():
    # Averaging m independent draws divides the variance by about m (here m = 8, with slack).
    V, process = 5, MaskedDiffusion(Cosine(), 5)
    x0 = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(0))
    f, gen = _denoiser(V), torch.Generator().manual_seed(2)
    w = torch.zeros((), dtype=torch.float64, requires_grad=True)  # a parameter for the gradient part

    def var(m: int) -> float:
        return estimator_stats(lambda: nelbo_estimate(process, f, x0, m, False, gen) + 0 * w, [w], 200).nelbo_var

    assert var(8) < var(1) / 4


def test_callback_logs_what_the_functions_give_for_the_final_model(tmp_path):
    model = MD4(17, 64, network=TINY)
    monitor = EstimatorVarianceMonitor(draws=3, num_sequences=4, samples_per_sequence=[1, 2], seed=5)
    trainer = pl.Trainer(max_steps=2, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[monitor],
                         default_root_dir=tmp_path, accelerator="cpu")
    dm = DigitsDataModule(batch_size=8)
    trainer.fit(model, dm)
    logged = trainer.callback_metrics
    x0 = torch.stack([dm.val_set[i]["x0"] for i in range(4)])
    model.eval()
    for m in (1, 2):
        gen = torch.Generator().manual_seed(5)
        params = [p for p in model.parameters() if p.requires_grad]
        stats = estimator_stats(lambda: nelbo_estimate(model.process, model.net, x0, m, True, gen), params, 3)
        assert float(logged[f"val/nelbo_estimator_var_m{m}"]) == pytest.approx(stats.nelbo_var, rel=1e-5)
        assert float(logged[f"val/grad_norm_var_m{m}"]) == pytest.approx(stats.grad_norm_var, rel=1e-4)
        assert float(logged[f"val/grad_var_m{m}"]) == pytest.approx(stats.grad_var, rel=1e-4)
        assert stats.nelbo_var > 0 and stats.grad_var > 0


class _LabelEcho(torch.nn.Module):
    """A class-conditional net that predicts its label at every position, confidently (null label: uniform)."""

    time_conditioned = False

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.num_classes, self.vocab = vocab, vocab
        self.scale = torch.nn.Parameter(torch.tensor(30.0))

    def forward(self, xt, t, y=None):
        B, N = xt.shape
        if y is None:
            y = torch.full((B,), self.num_classes)
        onehot = torch.nn.functional.one_hot(y, self.num_classes + 1)[:, : self.vocab].float()
        return (self.scale * onehot)[:, None, :].expand(B, N, self.vocab)


class _LabelledTokens(torch.utils.data.Dataset):
    """Sequence i is label i % V repeated: a model that sees the right label predicts it exactly."""

    def __init__(self, n: int, vocab: int, seq_len: int) -> None:
        self.n, self.vocab, self.seq_len = n, vocab, seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"x0": torch.full((self.seq_len,), i % self.vocab), "index": i, "y": i % self.vocab}


class _LabelledData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.val_set = _LabelledTokens(8, 4, 6)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=4)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=4)


def test_callback_gives_a_class_conditional_network_each_row_its_label(tmp_path):
    """With m = 2 noised copies per sequence the labels must follow the copies' row order: then the
    label-echo network is exact and the estimator has no variance; wrong or missing labels give
    cross-entropies of tens of nats."""
    # lr must be > 0 (OptimConfig checks it); 1e-12 leaves the weights as they are
    model = MD4(4, 6, network=TINY, optim={"lr": 1e-12, "warmup_steps": 1})
    model.net = _LabelEcho(4)
    monitor = EstimatorVarianceMonitor(draws=4, num_sequences=4, samples_per_sequence=[2], seed=1)
    trainer = pl.Trainer(max_steps=1, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[monitor],
                         default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(model, _LabelledData())
    assert float(trainer.callback_metrics["val/nelbo_estimator_var_m2"]) < 1e-12
