"""MDLM's SUBS process against exact float64 answers on a distribution over V^N = 27 sequences."""

import itertools

import numpy as np
import pytest
import torch

from exact import ExactDenoiser, empirical_tv, random_distribution
from lightning_md4.diffusion.schedules import Linear, LogLinear
from lightning_md4.diffusion.subs import SubsMaskedDiffusion

V, N = 3, 3
CONFIGS, PROBS = random_distribution(V, N, seed=0)
MASKS = torch.tensor(list(itertools.product([False, True], repeat=N)))  # [8, N]
ENTROPY = -(PROBS * PROBS.log()).sum().item()


class SubsOracle:
    """The exact posterior in MDLM's V + 1 layout, with what SUBS must override: a large mask logit
    and junk logits at unmasked positions."""

    time_conditioned = False

    def __init__(self, junk: float = 5.0) -> None:
        self.exact = ExactDenoiser(CONFIGS, PROBS, V)
        self.junk = junk

    def __call__(self, xt, t):
        logp = self.exact(xt, t)
        logits = torch.cat([logp, torch.full_like(logp[..., :1], self.junk)], -1)
        return torch.where((xt == V)[..., None], logits, self.junk * torch.randn_like(logits))


def expected_nelbo(process, denoiser, nodes: int = 12) -> float:
    """E_x0 of the NELBO, every mask enumerated (noise 0 masks a token, 1 keeps it) and t integrated
    by Gauss-Legendre: the integrand is a polynomial in t for the loglinear schedule's linear mask
    probability, so this is exact, without Monte Carlo."""
    x0 = CONFIGS.repeat_interleave(len(MASKS), 0)
    masks = MASKS.repeat(len(CONFIGS), 1)
    weight_x0 = PROBS.repeat_interleave(len(MASKS))
    noise = torch.where(masks, 0.0, 1.0).double()
    total = 0.0
    for node, w in zip(*np.polynomial.legendre.leggauss(nodes)):
        t = torch.full((len(x0),), (node + 1) / 2, dtype=torch.float64)
        p = process.schedule.one_minus_alpha(t)[:, None]
        p_mask = torch.where(masks, p, 1 - p).prod(-1)
        total += w / 2 * (weight_x0 * p_mask * process.nelbo(denoiser, x0, t=t, noise=noise)).sum().item()
    return total


def test_nelbo_of_the_exact_posterior_is_the_entropy():
    """The continuous-time NELBO is tight at the true posterior: its expectation is H(data). SUBS
    must ignore the mask logit and the unmasked positions' outputs; without it (a plain softmax over
    the V + 1 logits) the bound is far above the entropy. Equality needs alpha_1 = 0 (linear);
    MDLM's loglinear schedule (alpha_1 = eps) keeps a bound above it."""
    torch.manual_seed(0)
    process = SubsMaskedDiffusion(Linear(), V)
    assert expected_nelbo(process, SubsOracle()) == pytest.approx(ENTROPY, rel=1e-12)
    noisy = lambda xt, t: SubsOracle()(xt, t)[..., :V] + 0.5 * torch.randn(len(xt), N, V, dtype=torch.float64)
    assert expected_nelbo(process, noisy) > ENTROPY + 1e-3
    assert expected_nelbo(SubsMaskedDiffusion(LogLinear(eps=1e-3), V), SubsOracle()) > ENTROPY


def test_sampler_reproduces_the_distribution():
    process = SubsMaskedDiffusion(LogLinear(eps=1e-3), V)
    samples = process.sample(SubsOracle(), (4000, N), steps=200, generator=torch.Generator().manual_seed(1))
    assert (samples < V).all() and empirical_tv(samples, CONFIGS, PROBS) < 0.06
