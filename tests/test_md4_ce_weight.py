"""MD4's flat cross-entropy weight (the hybrid ablation): objective and gradient against a hand
computation in float64; the reported NELBO stays the bound."""

import math

import pytest
import torch

from lightning_md4.diffusion import MaskedDiffusion
from lightning_md4.diffusion.schedules import Cosine, Linear
from lightning_md4.modules import MD4

V, N, B = 4, 5, 6


def by_hand(schedule, logits: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
            ce_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(objective, nelbo)`` written out: mask where noise < 1 - alpha_t, CE over masked tokens,
    bound weight -alpha'_t / (1 - alpha_t) by central differences of alpha (no library weight)."""
    mask = noise < schedule.one_minus_alpha(t)[:, None]
    logp = torch.log_softmax(logits, -1)
    ce = -(logp.gather(-1, x0[..., None])[..., 0] * mask).sum(-1)
    h = 1e-6
    d_alpha = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    weight = -d_alpha / schedule.one_minus_alpha(t)
    return weight * ce + ce_weight * ce, weight * ce


@pytest.mark.parametrize("schedule", [Linear(), Cosine()], ids=repr)
@pytest.mark.parametrize("ce_weight", [0.0, 10.0])
def test_objective_and_gradient_are_the_bound_plus_a_flat_cross_entropy(schedule, ce_weight):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(V, (B, N), generator=g)
    t = torch.linspace(0.1, 0.9, B, dtype=torch.float64)
    noise = torch.rand(B, N, dtype=torch.float64, generator=g)
    table = torch.randn(N, V, dtype=torch.float64, generator=g, requires_grad=True)
    denoiser = lambda xt, t_: table.expand(xt.shape[0], N, V)  # noqa: E731  (logits independent of xt)
    objective, nelbo = MaskedDiffusion(schedule, V).loss(denoiser, x0, t=t, noise=noise, ce_weight=ce_weight)
    want_objective, want_nelbo = by_hand(schedule, table.expand(B, N, V), x0, t, noise, ce_weight)
    torch.testing.assert_close(nelbo, want_nelbo, rtol=1e-8, atol=0)
    torch.testing.assert_close(objective, want_objective, rtol=1e-8, atol=0)
    grad, = torch.autograd.grad(objective.sum(), table)
    want_grad, = torch.autograd.grad(want_objective.sum(), table)
    torch.testing.assert_close(grad, want_grad, rtol=1e-7, atol=1e-10)  # finite-difference weight


def test_the_module_trains_on_the_weighted_objective_and_reports_the_bound(monkeypatch):
    torch.manual_seed(0)
    net = {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_cond": 8}
    plain, hybrid = MD4(V, N, network=net), MD4(V, N, network=net, ce_weight=10.0)
    hybrid.load_state_dict(plain.state_dict())
    batch = {"x0": torch.randint(V, (B, N)), "index": torch.arange(B)}
    t = torch.linspace(0.2, 0.8, B, dtype=torch.float64)
    noise = torch.rand(B, N, dtype=torch.float64)
    for module in (plain, hybrid):
        monkeypatch.setattr(module, "train_noise", lambda batch, draw=0: (t, noise))
    plain_objective, plain_nelbo = plain.train_objective(batch)
    hybrid_objective, hybrid_nelbo = hybrid.train_objective(batch)
    torch.testing.assert_close(hybrid_nelbo, plain_nelbo)  # reported: the bound, unweighted
    torch.testing.assert_close(plain_objective, plain_nelbo)
    # The flat term: CE / weight(t) = CE * t for linear, so objective - nelbo = 10 * t * nelbo here.
    torch.testing.assert_close(hybrid_objective - hybrid_nelbo, 10.0 * t.float() * plain_nelbo, rtol=1e-5, atol=1e-6)
    assert hybrid.hparams.ce_weight == 10.0


def test_a_negative_weight_is_refused():
    with pytest.raises(ValueError, match="ce_weight"):
        MD4(V, N, ce_weight=-1.0)
