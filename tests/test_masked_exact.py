"""MD4 against exact float64 answers on a distribution over V^N = 27 sequences."""

import itertools
import math

import numpy as np
import pytest
import torch

from exact import ExactDenoiser, empirical_tv, random_distribution
from lightning_md4.diffusion import MaskedDiffusion
from lightning_md4.diffusion.schedules import Cosine, Linear, Polynomial

V, N = 3, 3
CONFIGS, PROBS = random_distribution(V, N, seed=0)


def exact_discrete_nelbo(process: MaskedDiffusion, denoiser, x0: torch.Tensor, T: int) -> float:
    """Sum over all T steps and all 2^N mask patterns of the discrete-time NELBO, float64."""
    total = 0.0
    sch = process.schedule
    for i in range(1, T + 1):
        t, s = torch.tensor(i / T, dtype=torch.float64), torch.tensor((i - 1) / T, dtype=torch.float64)
        weight = float((sch.alpha(s) - sch.alpha(t)) / sch.one_minus_alpha(t))
        p_mask = float(sch.one_minus_alpha(t))
        masks = torch.tensor(list(itertools.product([False, True], repeat=N)))
        xt = torch.where(masks, process.mask_id, x0)
        logp = denoiser(xt, t.expand(len(masks)))  # [2^N, N, V]
        ce = -(logp.gather(-1, x0.expand(len(masks), N)[..., None])[..., 0] * masks).sum(-1)
        pm = (p_mask ** masks.sum(-1).double()) * ((1 - p_mask) ** (~masks).sum(-1).double())
        total += weight * float((pm * ce).sum())
    return total


@pytest.mark.parametrize("schedule", [Linear(), Cosine(), Polynomial(k=2.0)], ids=repr)
@pytest.mark.parametrize("which", [0, 13, 26])
def test_nelbo_is_unbiased_for_minus_log_likelihood(schedule, which):
    process = MaskedDiffusion(schedule, V)
    denoiser = ExactDenoiser(CONFIGS, PROBS, process.mask_id)
    x0 = CONFIGS[which].expand(20000, N)
    g = torch.Generator().manual_seed(which)
    est = process.nelbo(denoiser, x0, generator=g)
    assert est.dtype == torch.float64
    se = est.std().item() / math.sqrt(len(est))
    target = -math.log(PROBS[which].item())
    assert abs(est.mean().item() - target) < 4 * se + 1e-9, (est.mean().item(), target, se)


@pytest.mark.parametrize("schedule", [Linear(), Cosine(), Polynomial(k=2.0), Polynomial(k=0.5)], ids=repr)
def test_nelbo_integrates_exactly_to_minus_log_likelihood(schedule):
    """Deterministic check: Gauss-Legendre over t of `.nelbo` averaged over all 2^N masks (given as
    noise) equals -log p(x0) to quadrature precision, for every x0. Any error in the weight,
    the masking probability or the cross-entropy shows here, free of Monte Carlo noise."""
    process = MaskedDiffusion(schedule, V)
    denoiser = ExactDenoiser(CONFIGS, PROBS, process.mask_id)
    nodes, weights = np.polynomial.legendre.leggauss(64)
    # Substituting t = u^2 puts nodes near t = 0, where polynomial(k<1) masks fastest.
    u = torch.tensor((nodes + 1) / 2, dtype=torch.float64)
    wq = torch.tensor(weights / 2, dtype=torch.float64) * 2 * u
    t = u**2
    masks = torch.tensor(list(itertools.product([False, True], repeat=N)))  # [M, N]
    noise = torch.where(masks, 0.0, 1.0 - 1e-15).double()
    p = schedule.one_minus_alpha(t)[:, None, None]  # [Q, 1, 1]
    p_pattern = torch.where(masks[None], p, 1 - p).prod(-1)  # [Q, M]
    for which in range(len(CONFIGS)):
        x0 = CONFIGS[which].expand(len(t) * len(masks), N)
        est = process.nelbo(denoiser, x0, t=t.repeat_interleave(len(masks)), noise=noise.repeat(len(t), 1))
        value = (wq[:, None] * p_pattern * est.view(len(t), len(masks))).sum().item()
        assert value == pytest.approx(-math.log(PROBS[which].item()), rel=1e-6, abs=1e-8), which


def test_nelbo_detects_a_wrong_denoiser():
    """The same check with the product of marginals (a worse model) sits clearly above -log p."""
    process = MaskedDiffusion(Linear(), V)
    exact = ExactDenoiser(CONFIGS, PROBS, process.mask_id)

    def marginal(xt, t):
        return exact(torch.full_like(xt, process.mask_id), t)

    x0 = CONFIGS[torch.multinomial(PROBS, 20000, replacement=True, generator=torch.Generator().manual_seed(1))]
    est = process.nelbo(marginal, x0, generator=torch.Generator().manual_seed(2))
    entropy = -(PROBS * PROBS.log()).sum().item()
    se = est.std().item() / math.sqrt(len(est))
    assert est.mean().item() - entropy > 10 * se


def test_discrete_nelbo_decreases_to_continuous():
    process = MaskedDiffusion(Linear(), V)
    denoiser = ExactDenoiser(CONFIGS, PROBS, process.mask_id)
    x0 = CONFIGS[13]
    target = -math.log(PROBS[13].item())
    exact = {T: exact_discrete_nelbo(process, denoiser, x0, T) for T in (1, 10, 100, 1000)}
    values = list(exact.values())
    assert all(a > b for a, b in zip(values, values[1:])), exact
    assert values[-1] > target and values[-1] - target < 0.01 * (values[0] - target)
    for T in (1, 10, 100):
        est = process.nelbo_discrete(denoiser, x0.expand(20000, N), T, generator=torch.Generator().manual_seed(T))
        se = est.std().item() / math.sqrt(len(est))
        assert abs(est.mean().item() - exact[T]) < 4 * se + 1e-9, (T, est.mean().item(), exact[T], se)


@pytest.mark.parametrize("grid", ["uniform", "cosine"])
def test_sampler_reproduces_the_distribution(grid):
    process = MaskedDiffusion(Linear(), V)
    denoiser = ExactDenoiser(CONFIGS, PROBS, process.mask_id)
    g = torch.Generator().manual_seed(3)
    samples = process.sample(denoiser, (4000, N), steps=500, grid=grid, generator=g)
    assert (samples < V).all()
    tv = empirical_tv(samples, CONFIGS, PROBS)
    # Independent draws from the per-token marginals (what a sampler that ignored the
    # dependence would give) are far off; the exact sampler is within sampling noise.
    marginals = denoiser(torch.full((1, N), V), torch.ones(1)).exp()[0]
    wrong = torch.stack([torch.multinomial(marginals[n], 4000, replacement=True, generator=g) for n in range(N)], -1)
    assert tv < 0.06 and empirical_tv(wrong, CONFIGS, PROBS) > 0.15, tv


def test_conditioning_keeps_tokens_and_samples_the_conditional():
    process = MaskedDiffusion(Cosine(), V)
    denoiser = ExactDenoiser(CONFIGS, PROBS, process.mask_id)
    x = torch.full((4000, N), process.mask_id)
    x[:, 1] = 2  # infill around a given middle token
    samples = process.sample(denoiser, x.shape, steps=500, x=x, generator=torch.Generator().manual_seed(4))
    assert (samples[:, 1] == 2).all() and (samples < V).all()
    keep = CONFIGS[:, 1] == 2
    cond = torch.where(keep, PROBS, torch.zeros_like(PROBS))
    assert empirical_tv(samples, CONFIGS, cond / cond.sum()) < 0.06


@pytest.mark.slow
def test_output_cache_skips_evaluations_without_changing_the_law():
    process = MaskedDiffusion(Linear(), V)
    denoiser = ExactDenoiser(CONFIGS, PROBS, process.mask_id)
    g = torch.Generator().manual_seed(5)
    samples, nfe = process.sample(denoiser, (1, N), steps=1000, generator=g, return_nfe=True)
    assert nfe <= N + 1 and denoiser.calls == nfe
    _, nfe_plain = process.sample(denoiser, (1, N), steps=1000, generator=g, cache=False, return_nfe=True)
    assert nfe_plain > 10 * nfe
    batch = torch.cat([process.sample(denoiser, (1, N), steps=200, generator=g) for _ in range(2000)])
    assert empirical_tv(batch, CONFIGS, PROBS) < 0.08


def test_final_argmax_fills_what_clipping_leaves_masked():
    process = MaskedDiffusion(Linear(clip_eps=0.2), V)  # alpha(0) = 0.8: many tokens survive to t = 0
    denoiser = ExactDenoiser(CONFIGS, PROBS, process.mask_id)
    samples = process.sample(denoiser, (500, N), steps=4, generator=torch.Generator().manual_seed(6))
    assert (samples < V).all()


class MaskCounter:
    """A denoiser with a flat posterior that records, at each call, the time it receives and the
    fraction of its input still masked: the sampler's state on the grid, before that step."""

    def __init__(self, mask_id: int, vocab_size: int) -> None:
        self.mask_id, self.vocab_size = mask_id, vocab_size
        self.times: list[float] = []
        self.masked: list[float] = []

    def __call__(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.times.append(float(t[0]))
        self.masked.append((xt == self.mask_id).double().mean().item())
        return torch.zeros(*xt.shape, self.vocab_size, dtype=torch.float64)


# 1 - alpha(t) by hand: the probability that a token is masked at time t.
MASK_PROB = {"linear": lambda t: t, "cosine": lambda t: math.sin(0.5 * math.pi * t)}
GRID = {"uniform": lambda u: u, "cosine": lambda u: math.cos(0.5 * math.pi * (1.0 - u))}


@pytest.mark.parametrize("grid", ["uniform", "cosine"])
@pytest.mark.parametrize("name, schedule", [("linear", Linear()), ("cosine", Cosine())])
def test_sampler_reveals_tokens_on_the_schedule(name, schedule, grid):
    """Starting all-masked at t = 1, a token is still masked at grid time t with probability
    1 - alpha(t), independently of the others, so the masked count is Binomial(B N, 1 - alpha(t)).
    The time-independent oracle cannot see this: a sampler revealing a fixed fraction of the
    masked tokens per step reproduces the data law, but leaves t (not 1 - alpha(t)) masked."""
    process = MaskedDiffusion(schedule, V)
    counter = MaskCounter(process.mask_id, V)
    B, L, steps = 400, 500, 10
    samples = process.sample(counter, (B, L), steps=steps, grid=grid, generator=torch.Generator().manual_seed(7))
    assert (samples < V).all()
    times = [GRID[grid](1.0 - k / steps) for k in range(steps)]  # t_steps = 1 > ... > t_1; t_0 = 0 reveals all
    assert counter.times == pytest.approx(times, rel=0, abs=1e-15)
    for t, frac in zip(times, counter.masked):
        p = MASK_PROB[name](t)
        sigma = math.sqrt(p * (1.0 - p) / (B * L))
        assert abs(frac - p) <= 5 * sigma + 1e-12, (t, frac, p, sigma)
