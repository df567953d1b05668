"""The speed levers change how the loss is computed, never its value (issue 8).

Each optimised path is compared with the plain one: exactly in float64 where the arithmetic is
the same, within float32 rounding where compilation reorders it.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from conftest import TINY_NETWORK
from datamodules.base import DataError
from datamodules.tokens import TokenFileDataModule
from lightning_md4.diffusion.cross_entropy import cross_entropy
from lightning_md4.diffusion.masked import MaskedDiffusion
from lightning_md4.modules import MD4
from lightning_md4.nets import TransformerConfig
from lightning_md4.nets.transformer import Transformer
from lightning_md4.diffusion.schedules import Cosine, Linear
from lightning_md4.speed_callbacks import CompileNetwork, ForeachEMA

TINY = TransformerConfig(**TINY_NETWORK, time_conditioning=True)


def float64_net(vocab: int = 7) -> Transformer:
    torch.manual_seed(0)
    net = Transformer(vocab, TINY).double()
    for p in net.parameters():  # adaLN-Zero starts at zero; random weights make every path matter
        torch.nn.init.normal_(p, std=0.3)
    return net


@pytest.mark.parametrize("schedule", [Linear(), Cosine()])
def test_head_on_masked_tokens_gives_the_same_nelbo_and_gradients(schedule):
    vocab, B, N = 7, 6, 10
    x0 = torch.randint(vocab, (B, N), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 0.4, 0.5, 0.6, 0.8, 1.0], dtype=torch.float64)
    noise = torch.rand(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    for logits_at, chunk_rows in (("all", None), ("masked", 7)):
        net = float64_net(vocab)
        process = MaskedDiffusion(schedule, vocab, logits_at=logits_at, ce_chunk_rows=chunk_rows)
        nelbo = process.nelbo(net, x0, t=t, noise=noise)
        discrete = process.nelbo_discrete(net, x0, 10, t=t, noise=noise)
        (nelbo.sum() + discrete.sum()).backward()
        results.append((nelbo.detach(), discrete.detach(), [p.grad.clone() for p in net.parameters()]))
    (n_all, d_all, g_all), (n_masked, d_masked, g_masked) = results
    assert n_all[0] == 0 and (n_all[1:] > 0).all()  # t = 0 masks nothing; the rest have masks
    assert all(torch.isfinite(g).all() for g in g_all)  # the infinite weight at t = 0 must not leak NaN
    torch.testing.assert_close(n_masked, n_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_masked, d_all, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_all, g_masked):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_masked_logits_are_the_rows_of_the_full_logits():
    net = float64_net()
    xt = torch.randint(8, (3, 5))
    t = torch.rand(3, dtype=torch.float64)
    positions = torch.rand(3, 5) < 0.5
    torch.testing.assert_close(net(xt, t, positions=positions), net(xt, t)[positions], rtol=0, atol=0)


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 64])
def test_chunked_cross_entropy_equals_the_plain_one_with_gradients(chunk_rows):
    torch.manual_seed(0)
    logits = (3 * torch.randn(23, 9, dtype=torch.float64)).requires_grad_()
    target = torch.randint(9, (23,))
    weights = torch.rand(23, dtype=torch.float64)  # a weighted sum, like the NELBO's
    plain = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    (g_plain,) = torch.autograd.grad((weights * plain).sum(), logits)
    chunked = cross_entropy(logits, target, chunk_rows)
    (g_chunked,) = torch.autograd.grad((weights * chunked).sum(), logits)
    torch.testing.assert_close(chunked, plain, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(g_chunked, g_plain, rtol=1e-12, atol=1e-13)
    assert torch.autograd.gradcheck(lambda z: cross_entropy(z, target, chunk_rows), (logits,))


def test_chunked_cross_entropy_of_bf16_logits_is_computed_in_float32():
    torch.manual_seed(0)
    logits = (4 * torch.randn(50, 300)).bfloat16().requires_grad_()
    target = torch.randint(300, (50,))
    reference = torch.nn.functional.cross_entropy(logits.double(), target, reduction="none")
    chunked = cross_entropy(logits, target, 16)
    assert chunked.dtype == torch.float32 and cross_entropy(logits, target).dtype == torch.float32
    torch.testing.assert_close(chunked.double(), reference, rtol=1e-6, atol=1e-5)
    chunked.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    expected = torch.softmax(logits.double(), -1) - torch.nn.functional.one_hot(target, 300)
    torch.testing.assert_close(logits.grad.double(), expected, rtol=1e-2, atol=4e-3)  # bf16 rounding of the grad


def test_unknown_logits_at_is_refused():
    with pytest.raises(ValueError, match="logits_at"):
        MaskedDiffusion(Linear(), 5, logits_at="some")


@pytest.mark.slow
def test_compiled_network_gives_the_plain_loss_and_gradients():
    torch.manual_seed(0)
    vocab, B, N = 11, 4, 16
    plain = Transformer(vocab, TINY)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.1)
    compiled = copy.deepcopy(plain)
    compiled.compile(dynamic=False)
    process = MaskedDiffusion(Cosine(), vocab)
    x0 = torch.randint(vocab, (B, N))
    t = torch.rand(B, dtype=torch.float64)
    noise = torch.rand(B, N, dtype=torch.float64)
    losses = []
    for net in (plain, compiled):
        loss = process.nelbo(net, x0, t=t, noise=noise)
        loss.sum().backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def token_data(tmp_path, vocab=13, seq_len=16, n=4096) -> TokenFileDataModule:
    path = tmp_path / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, vocab, n, dtype=np.uint16))
    return TokenFileDataModule(str(path), vocab, seq_len, val_tokens=64, test_tokens=64, batch_size=8)


def fit(data: TokenFileDataModule, tmp_path, callbacks, steps: int = 6, **model_kwargs) -> tuple[MD4, list[float]]:
    pl.seed_everything(0)
    model = MD4(data.vocab_size, data.seq_len, network=TINY, optim={"lr": 1e-2, "warmup_steps": 1}, **model_kwargs)
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         limit_val_batches=0, callbacks=[*callbacks, Record()], default_root_dir=tmp_path,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    return model, losses


def test_all_levers_together_train_like_the_plain_run(tmp_path):
    """EMA weights, losses and the final EMA state agree between the plain and the optimised run."""
    data = token_data(tmp_path)
    plain, plain_losses = fit(data, tmp_path, [EMAWeightAveraging(decay=0.9)])
    fast, fast_losses = fit(data, tmp_path, [ForeachEMA(decay=0.9, warmup=False), CompileNetwork()], logits_at="masked",
                            ce_chunk_rows=24)
    np.testing.assert_allclose(fast_losses, plain_losses, rtol=1e-4)
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):  # after fit these are the EMA weights
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_foreach_ema_equals_lightnings_ema_and_resumes(tmp_path):
    data = token_data(tmp_path)
    ref, _ = fit(data, tmp_path, [EMAWeightAveraging(decay=0.8)], steps=5)
    ema = ForeachEMA(decay=0.8, warmup=False)
    mine, _ = fit(data, tmp_path, [ema], steps=5)
    for (name, a), b in zip(ref.named_parameters(), mine.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    assert int(ema._average_model.n_averaged) == 5
    # A resumed EMA continues from its restored count instead of copying the weights afresh.
    restored = ForeachEMA(decay=0.8, warmup=False)
    restored.setup(None, mine, "fit")
    restored._average_model.load_state_dict(ema._average_model.state_dict())
    before = [p.detach().clone() for p in restored._average_model.module.parameters()]
    with torch.no_grad():
        for p in mine.parameters():
            p.add_(1.0)
    restored._average_model.update_parameters(mine)
    for old, new, cur in zip(before, restored._average_model.module.parameters(), mine.parameters()):
        torch.testing.assert_close(new, 0.8 * old + 0.2 * cur)


class Scalar(pl.LightningModule):
    """One float64 parameter ``theta`` the tests set by hand, standing for a network."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))


def warmed_up_ema(values: list[float], **ema_args) -> float:
    """The EMA of ``theta`` after one update per value in ``values`` (the model at update k)."""
    model = Scalar()
    ema = ForeachEMA(**ema_args)
    ema.setup(None, model, "fit")
    for value in values:
        with torch.no_grad():
            model.theta.fill_(value)
        ema._average_model.update_parameters(model)
    assert int(ema._average_model.n_averaged) == len(values)
    return float(ema._average_model.module.theta.detach())


def test_warmup_ema_is_the_closed_form_weighted_sum():
    """After N updates with model values x_1..x_N, the EMA is sum_k w_k x_k with
    w_k = (1 - d_{k-1}) prod_{j=k}^{N-1} d_j and d_n = min(decay, 1 - (1 + n / inv_gamma)^-power)
    (d_0 = 0: the first update copies). x_1 stands for the initialisation: its weight is prod_j d_j."""
    decay, inv_gamma, power, N = 0.9, 2.0, 0.75, 60  # the cap binds from n = 41 on
    d = [min(decay, 1.0 - (1.0 + n / inv_gamma) ** -power) for n in range(N)]
    assert d[0] == 0.0 and d[10] < decay and d[-1] == decay
    weights = [(1.0 - d[k - 1]) * float(np.prod(d[k:N], dtype=np.float64)) for k in range(1, N + 1)]
    assert abs(sum(weights) - 1.0) < 1e-12
    x = np.random.default_rng(0).normal(size=N).tolist()
    args = {"decay": decay, "inv_gamma": inv_gamma, "power": power}
    assert warmed_up_ema(x, **args) == pytest.approx(float(np.dot(weights, x)), rel=1e-12, abs=1e-14)
    # The first weights alone: an impulse at update 1.
    first_weight = warmed_up_ema([1.0] + [0.0] * (N - 1), **args)
    assert first_weight == pytest.approx(float(np.prod(d[1:], dtype=np.float64)), rel=1e-12, abs=0)
    # What the warm-up buys: a constant 0.9 would keep 0.9^59 of them, 150 times more.
    assert warmed_up_ema([1.0] + [0.0] * (N - 1), decay=decay, warmup=False) == pytest.approx(decay ** (N - 1))
    assert first_weight < decay ** (N - 1) / 100


def test_resumed_ema_continues_its_warmup(tmp_path):
    """A checkpoint holds the EMA weights and the update count; a resumed run's next update uses
    the decay of that count, d_3 = 1 - 4^-0.75 = 0.646 here, not the first update's copy or the cap."""
    data = token_data(tmp_path)

    def run(steps: int, folder: str, ckpt_path: str | None = None) -> None:
        pl.seed_everything(0)
        model = MD4(data.vocab_size, data.seq_len, network=TINY, optim={"lr": 1e-2, "warmup_steps": 1})
        checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, every_n_train_steps=1, save_top_k=-1,
                                                   filename="{step}")
        trainer = pl.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, limit_val_batches=0,
                             callbacks=[ForeachEMA(decay=0.999), checkpoints], default_root_dir=tmp_path,
                             enable_model_summary=False)
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)

    run(3, "first")
    run(4, "resumed", ckpt_path=str(tmp_path / "first" / "step=3.ckpt"))
    before = torch.load(tmp_path / "first" / "step=3.ckpt", weights_only=True)
    after = torch.load(tmp_path / "resumed" / "step=4.ckpt", weights_only=True)
    assert int(before["averaging_state"]["n_averaged"]) == 3 and int(after["averaging_state"]["n_averaged"]) == 4
    d3 = 1.0 - 4.0 ** -0.75
    floats = [k for k, v in after["state_dict"].items() if v.is_floating_point()]
    assert floats
    for k in floats:
        ema, model = before["state_dict"][k], after["current_model_state"][k]
        torch.testing.assert_close(after["state_dict"][k], d3 * ema + (1 - d3) * model, rtol=1e-5, atol=1e-6, msg=k)


def test_ema_warmup_settings_are_checked():
    with pytest.raises(ValueError, match="decay"):
        ForeachEMA(decay=1.5)
    with pytest.raises(ValueError, match="inv_gamma"):
        ForeachEMA(power=0.0)


def test_token_file_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        TokenFileDataModule(str(tmp_path / "missing.npy"), 10, 8).setup("fit")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.arange(100, dtype=np.int64))
    with pytest.raises(DataError, match="outside 0..9"):
        TokenFileDataModule(str(bad), 10, 8, val_tokens=8, test_tokens=8).setup("fit")
    dm = TokenFileDataModule(str(bad), 100, 8, val_tokens=16, test_tokens=8, batch_size=2)
    dm.setup("fit")
    assert len(dm.train_set) == 9 and len(dm.val_set) == 2 and len(dm.test_set) == 1
    assert dm.test_set[0]["x0"].tolist() == list(range(92, 100))
