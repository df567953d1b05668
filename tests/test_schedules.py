import math

import pytest
import torch

from lightning_md4.diffusion.schedules import Cosine, Geometric, Linear, Polynomial, make_schedule

SCHEDULES = [Linear(), Cosine(), Polynomial(k=3.0), Polynomial(k=0.5), Geometric()]


@pytest.mark.parametrize("sch", SCHEDULES, ids=repr)
def test_derivative_matches_autograd(sch):
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(sch.alpha(t).sum(), t)
    torch.testing.assert_close(sch.dalpha(t.detach()), grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sch", SCHEDULES, ids=repr)
def test_complement_and_monotone(sch):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(sch.alpha(t) + sch.one_minus_alpha(t), torch.ones_like(t))
    assert (sch.alpha(t).diff() <= 0).all()
    assert (sch.loss_weight(t[1:]) > 0).all()


def test_formulas_against_reference_table():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(Linear().alpha(t), 1 - t)
    torch.testing.assert_close(Polynomial(k=2).alpha(t), 1 - t**2)
    torch.testing.assert_close(Cosine().alpha(t), 1 - torch.cos(math.pi / 2 * (1 - t)))
    torch.testing.assert_close(Geometric(1e-5, 20).alpha(t), torch.exp(-(1e-5 ** (1 - t)) * 20**t))
    torch.testing.assert_close(Linear().loss_weight(t[1:]), 1 / t[1:])


def test_precision_near_zero():
    t = torch.tensor([1e-12], dtype=torch.float64)
    # 1 - alpha computed as a difference would lose all digits here.
    torch.testing.assert_close(Cosine().one_minus_alpha(t), torch.sin(math.pi / 2 * t), rtol=1e-12, atol=0)
    torch.testing.assert_close(Cosine().loss_weight(t), math.pi / 2 / torch.tan(math.pi / 2 * t), rtol=1e-9, atol=0)


def test_clipping_matches_official_rule():
    sch = Cosine(clip_eps=1e-4)
    ends = sch.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.tensor([1 - 1e-4, 1e-4], dtype=torch.float64))
    t = torch.tensor([0.3], dtype=torch.float64)
    torch.testing.assert_close(sch.dalpha(t), (1 - 2e-4) * Cosine().dalpha(t))


def test_bad_names_and_parameters():
    with pytest.raises(ValueError, match="unknown schedule 'cosin'"):
        make_schedule("cosin")
    with pytest.raises(ValueError, match="k > 0"):
        Polynomial(k=0)
    assert isinstance(make_schedule("polynomial", k=2.0), Polynomial)
