"""GenMD4 against exact float64 answers on enumerable problems."""

import itertools
import math

import numpy as np
import pytest
import torch

from exact import empirical_tv, random_distribution
from lightning_md4.diffusion import GenMaskedDiffusion, MaskedDiffusion, PerTokenSchedule
from lightning_md4.nets import Transformer, TransformerConfig
from lightning_md4.diffusion.schedules import Linear

V, N = 3, 3
CONFIGS, PROBS = random_distribution(V, N, seed=1)
MASKS = torch.tensor(list(itertools.product([False, True], repeat=N)))  # [8, N]


def make_process(w, eps=0.0, t_min=0.0) -> GenMaskedDiffusion:
    sch = PerTokenSchedule(V, eps=eps).double()
    with torch.no_grad():
        sch.raw.copy_(torch.log(torch.expm1(torch.as_tensor(w, dtype=torch.float64))))
    return GenMaskedDiffusion(sch, V, t_min=t_min)


class StateDependentOracle:
    """The exact posterior p(x0[n] = v | xt) under per-token schedules: it depends on t, since
    how likely a token is to be masked depends on its value."""

    def __init__(self, process: GenMaskedDiffusion) -> None:
        self.process = process
        self.calls = 0

    def __call__(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        sch = self.process.schedule
        w = sch.w.detach().double()[CONFIGS]  # [K, N]
        t = t.double().clamp_min(1e-300)[:, None, None]
        masked = (xt == self.process.mask_id)[:, None]  # [B, 1, N]
        p_mask = sch.mask_prob(w[None], t)  # [B, K, N]
        like = torch.where(masked, p_mask, (1 - p_mask) * (CONFIGS[None] == xt[:, None]))
        joint = PROBS[None] * like.prod(-1)  # [B, K]
        onehot = torch.nn.functional.one_hot(CONFIGS, V).double()
        post = torch.einsum("bk,knv->bnv", joint, onehot) / joint.sum(-1)[:, None, None]
        return post.clamp_min(1e-300).log()


def test_equal_exponents_reduce_to_md4_linear():
    torch.manual_seed(0)
    net = Transformer(V, TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_cond=8)).double()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x0 = torch.randint(0, V, (64, 7))
    t = torch.rand(64, dtype=torch.float64)
    noise = torch.rand(64, 7, dtype=torch.float64)
    gen = make_process([1.0] * V).nelbo(net, x0, t=t, noise=noise)
    md4 = MaskedDiffusion(Linear(), V).nelbo(net, x0, t=t, noise=noise)
    torch.testing.assert_close(gen, md4, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("w", [[1.0, 1.0, 1.0], [0.3, 1.0, 3.0], [2.0, 0.5, 1.0]])
def test_nelbo_with_oracle_integrates_to_minus_log_likelihood(w):
    process = make_process(w)
    oracle = StateDependentOracle(process)
    nodes, weights = np.polynomial.legendre.leggauss(96)
    u = torch.tensor((nodes + 1) / 2, dtype=torch.float64)
    t, wq = u**2, torch.tensor(weights / 2, dtype=torch.float64) * 2 * u  # t = u^2 resolves t -> 0
    noise = torch.where(MASKS, 0.0, 1.0 - 1e-15).double()
    for which in (0, 5, 13, 26):
        x0 = CONFIGS[which]
        p_mask = process.schedule.mask_prob(process.schedule.w.detach()[x0][None], t[:, None])  # [Q, N]
        p_pattern = torch.where(MASKS[None], p_mask[:, None], 1 - p_mask[:, None]).prod(-1)  # [Q, 8]
        with torch.no_grad():
            est = process.nelbo(oracle, x0.expand(len(t) * len(MASKS), N), t=t.repeat_interleave(len(MASKS)),
                                noise=noise.repeat(len(t), 1))
        value = (wq[:, None] * p_pattern * est.view(len(t), len(MASKS))).sum().item()
        assert value == pytest.approx(-math.log(PROBS[which].item()), rel=1e-5), (which, w)


T_MIN = 1e-3


def bound_with_true_reverse(w, x0, log_decoder) -> float:
    """The GenMD4 bound for ``x0`` [N] (eps = 0) when the reverse process from t = 1 down to t_min is
    the true one, enumerated over the masks at t_min: the diffusion part is then
    ``E_q[log q(x_{t_min} | x0) - log q(x_{t_min})]`` (the reverse chain's terms above t_min cancel)
    and the reconstruction ``E_q[-sum_{masked n} log_decoder[x0[n]]]``."""
    masked_prob = T_MIN ** torch.as_tensor(w, dtype=torch.float64)  # [V]
    def q_given(x0s):  # q(x_{t_min} = x0 masked at MASKS | x0s) [K, 8] for x0s [K, N]
        keep = (1 - masked_prob[x0s][:, None]) * (x0s[:, None] == x0)
        return torch.where(MASKS[None], masked_prob[x0s][:, None], keep).prod(-1)
    q_x0 = q_given(x0[None])[0]  # [8]
    q_marginal = (PROBS[:, None] * q_given(CONFIGS)).sum(0)  # [8]
    recon = -(MASKS * log_decoder[x0]).sum(-1)  # [8]
    return (q_x0 * (q_x0.log() - q_marginal.log() + recon)).sum().item()


def integrated_nelbo(process, x0) -> float:
    """E over t ~ U[t_min, 1] and the masks of ``process.nelbo`` with the exact posterior, float64.
    Gauss-Legendre in log t: the integrand varies like t^w near t_min."""
    oracle = StateDependentOracle(process)
    nodes, weights = np.polynomial.legendre.leggauss(128)
    log_t = torch.tensor((nodes + 1) / 2 * -math.log(T_MIN) + math.log(T_MIN), dtype=torch.float64)
    t = log_t.exp()
    wq = torch.tensor(weights / 2 * -math.log(T_MIN), dtype=torch.float64) * t / (1 - T_MIN)  # sums to 1
    noise = torch.where(MASKS, 0.0, 1.0 - 1e-15).double()
    p_mask = process.schedule.mask_prob(process.schedule.w.detach()[x0][None], t[:, None])  # [Q, N]
    p_pattern = torch.where(MASKS[None], p_mask[:, None], 1 - p_mask[:, None]).prod(-1)  # [Q, 8]
    with torch.no_grad():
        est = process.nelbo(oracle, x0.expand(len(t) * len(MASKS), N), t=t.repeat_interleave(len(MASKS)),
                            noise=noise.repeat(len(t), 1))
    return (wq[:, None] * p_pattern * est.view(len(t), len(MASKS))).sum().item()


def test_reconstruction_decodes_in_proportion_to_the_masking_probability():
    """A token still masked at t_min is v with probability proportional to 1 - alpha_{t_min}(v)
    (uniform prior times masking probability), not 1 / V: with unequal w the exact bound is tighter."""
    w = [0.3, 1.0, 3.0]
    process = make_process(w, t_min=T_MIN)
    masked_prob = T_MIN ** torch.tensor(w, dtype=torch.float64)
    log_decoder = (masked_prob / masked_prob.sum()).log()  # [V]
    uniform = torch.full((V,), -math.log(V), dtype=torch.float64)
    nelbo = torch.tensor([integrated_nelbo(process, x0) for x0 in CONFIGS], dtype=torch.float64)
    for which in (0, 5, 13, 26):
        assert nelbo[which].item() == pytest.approx(bound_with_true_reverse(w, CONFIGS[which], log_decoder), rel=1e-6)
    entropy = -(PROBS * PROBS.log()).sum().item()
    expected = (PROBS * nelbo).sum().item()
    with_uniform_decoder = sum(p.item() * bound_with_true_reverse(w, x0, uniform) for x0, p in zip(CONFIGS, PROBS))
    # Per token: still masked with probability t_min^{w_x0}, then costs -log decoder instead of log V.
    gap = (PROBS[:, None] * masked_prob[CONFIGS] * (math.log(V) + log_decoder[CONFIGS])).sum().item()
    assert entropy < expected < with_uniform_decoder
    assert with_uniform_decoder - expected == pytest.approx(gap, rel=1e-6)
    assert gap > 0.1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reconstruction_gradient_in_w(dtype):
    """The reconstruction term's w-gradient flows through both the masking probability and the
    decoder; finite in float32 even when t_min^w underflows."""
    w = torch.tensor([0.05, 1.0, 40.0], dtype=torch.float64)
    process = make_process(w, t_min=T_MIN)
    process.schedule.to(dtype)
    x0 = torch.tensor([[0, 1, 2], [2, 2, 0]])
    (grad,) = torch.autograd.grad(process.endpoint_terms(x0).sum(), process.schedule.raw)
    raw = torch.log(torch.expm1(w)).requires_grad_()
    masked_prob = T_MIN ** torch.nn.functional.softplus(raw)  # [V]
    recon = -(masked_prob[x0] * (masked_prob / masked_prob.sum()).log()[x0]).sum()
    (grad_ref,) = torch.autograd.grad(recon, raw)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-7)


# The REINFORCE tests use a longer sequence (2^10 masks, still enumerable): with N = 3 the loss
# has a small mean and no baseline can help; at realistic lengths it is mostly its mean.
LONG = 10
_G = torch.Generator().manual_seed(5)
_W, _U = torch.randn(LONG, V, generator=_G, dtype=torch.float64), torch.randn(V + 1, V, generator=_G, dtype=torch.float64)
LONG_MASKS = torch.tensor(list(itertools.product([False, True], repeat=LONG)))


def fixed_denoiser(xt, t):
    """A fixed, imperfect, time-dependent model: logits from the position and the visible token counts."""
    counts = torch.nn.functional.one_hot(xt, V + 1).double().mean(1)  # [B, V + 1]
    return _W[None] + (counts @ _U)[:, None, :] * (1 + t[:, None, None])


def exact_expected_loss(process, x0, t) -> torch.Tensor:
    """E over all 2^N masks of the one-draw loss at fixed (x0, t), float64, differentiable in w."""
    M = len(LONG_MASKS)
    xt = torch.where(LONG_MASKS, process.mask_id, x0)
    batch, tt = x0.expand(M, LONG), t.expand(M)
    loss = (1 - process.t_min) * process.integrand(fixed_denoiser(xt, tt), batch, LONG_MASKS, tt)
    loss = loss + process.endpoint_terms(batch)
    return (process.log_q(batch, tt, LONG_MASKS).exp() * loss).sum()


def surrogate_gradients(process, x0, t, estimator, draws):
    """One gradient in raw w per pair of noised samples (the same compute for every estimator): ``[draws, V]``."""
    grads = []
    g = torch.Generator().manual_seed(7)
    for _ in range(draws):
        process.schedule.raw.grad = None
        if estimator == "none":  # plain REINFORCE over two samples, no baseline
            loss, log_q = process._loss(fixed_denoiser, x0.expand(2, LONG), t.expand(2), None, g)
            surrogate = loss + loss.detach() * log_q
        elif estimator == "rloo":
            surrogate, _ = process.surrogate_loss(fixed_denoiser, x0[None], t=t[None], estimator="rloo", generator=g)
        else:  # a batch of two copies, each the other's baseline
            surrogate, _ = process.surrogate_loss(fixed_denoiser, x0.expand(2, LONG), t=t.expand(2),
                                                  estimator="batch", generator=g)
        surrogate.mean().backward()
        grads.append(process.schedule.raw.grad.clone())
    return torch.stack(grads)


@pytest.mark.slow
def test_reinforce_gradient_is_unbiased_and_leave_one_out_reduces_variance():
    process = make_process([0.5, 1.0, 2.0], eps=1e-3, t_min=1e-3)
    x0 = torch.randint(0, V, (LONG,), generator=torch.Generator().manual_seed(2))
    t = torch.tensor(0.6, dtype=torch.float64)
    (exact,) = torch.autograd.grad(exact_expected_loss(process, x0, t), process.schedule.raw)
    variances = {}
    for estimator in ("rloo", "batch", "none"):
        grads = surrogate_gradients(process, x0, t, estimator, draws=3000)
        mean, se = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
        assert ((mean - exact).abs() < 4 * se).all(), (estimator, mean, exact, se)
        variances[estimator] = grads.var(0).sum().item()
    # Without the score-function term the gradient is biased: the test would catch its absence.
    many = x0.expand(20000, LONG)
    direct = process.nelbo(fixed_denoiser, many, t=t.expand(20000), generator=torch.Generator().manual_seed(3))
    (direct,) = torch.autograd.grad(direct.mean(), process.schedule.raw)
    assert (direct - exact).abs().max() > 10 * se.max()
    assert variances["rloo"] < 0.5 * variances["none"], variances


def test_log_q_is_finite_at_the_time_limits():
    process = make_process([0.2, 1.0, 5.0], eps=1e-4, t_min=1e-3)
    x0 = torch.tensor([[0, 1, 2]])
    for t in (1e-3, 0.5, 1.0 - 1e-12, 1.0):
        for mask in MASKS:
            lq = process.log_q(x0, torch.tensor([t], dtype=torch.float64), mask[None])
            assert torch.isfinite(lq).all(), (t, mask)
            (g,) = torch.autograd.grad(lq.sum(), process.schedule.raw)
            assert torch.isfinite(g).all()


@pytest.mark.slow
@pytest.mark.parametrize("grid", ["uniform", "cosine"])
def test_sampler_reproduces_the_distribution(grid):
    process = make_process([0.3, 1.0, 3.0])
    oracle = StateDependentOracle(process)
    samples = process.sample(oracle, (4000, N), steps=400, grid=grid, generator=torch.Generator().manual_seed(0))
    assert (samples < V).all()
    assert empirical_tv(samples, CONFIGS, PROBS) < 0.06


@pytest.mark.slow
def test_sampler_conditioning_keeps_given_tokens():
    process = make_process([0.3, 1.0, 3.0])
    oracle = StateDependentOracle(process)
    x = torch.full((4000, N), V)
    x[:, 2] = 0
    samples = process.sample(oracle, x.shape, steps=400, x=x, generator=torch.Generator().manual_seed(1))
    assert (samples[:, 2] == 0).all()
    cond = torch.where(CONFIGS[:, 2] == 0, PROBS, torch.zeros_like(PROBS))
    assert empirical_tv(samples, CONFIGS, cond / cond.sum()) < 0.06


@pytest.mark.slow
def test_training_moves_the_exponents_apart_on_skewed_data(tiny_network):
    """Tokens of very different frequencies (60% ... 2%) get different learned schedules.

    (Whether the learned schedule then beats the fixed linear one on held-out data depends on the
    training budget; benchmarks/genmd4_vs_md4.py measures it, this test does not assert it.)
    """
    torch.manual_seed(0)
    vocab, length = 6, 16
    freq = torch.tensor([0.6, 0.2, 0.1, 0.05, 0.03, 0.02])
    g = torch.Generator().manual_seed(1)
    net = Transformer(vocab, tiny_network)
    schedule = PerTokenSchedule(vocab, eps=1e-4)
    process = GenMaskedDiffusion(schedule, vocab, t_min=1e-3)
    opt = torch.optim.AdamW([{"params": net.parameters(), "lr": 3e-3}, {"params": [schedule.raw], "lr": 3e-2}],
                            weight_decay=0.0)
    for _ in range(150):
        x0 = torch.multinomial(freq, 64 * length, replacement=True, generator=g).view(64, length)
        x0[:, length // 2:] = x0[:, : length // 2]  # structure for the denoiser to learn
        opt.zero_grad()
        surrogate, nelbo = process.surrogate_loss(net, x0, estimator="batch", generator=g)
        surrogate.mean().backward()
        opt.step()
    w = schedule.w.detach()
    assert torch.isfinite(w).all() and w.max() - w.min() > 0.15, w


class LogitsTable(torch.nn.Module):
    """A tiny learnable float64 denoiser: logits from the token at each position, per-position
    offsets scaled with t. ``[B, N] -> [B, N, V]``."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.by_token = torch.nn.Parameter(torch.randn(V + 1, V, generator=g, dtype=torch.float64))
        self.by_position = torch.nn.Parameter(torch.randn(LONG, V, generator=g, dtype=torch.float64))

    def forward(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.by_token[xt] + self.by_position[None] * (1 + t[:, None, None])


@pytest.mark.parametrize("estimator", ["rloo", "batch"])
def test_surrogate_gives_the_network_only_the_nelbo_gradient(estimator):
    """The network does not enter log q, so its gradient from the surrogate is exactly that of the
    reported NELBO at the same masks (reference.md section 2): no score-function part for theta."""
    process = make_process([0.5, 1.0, 2.0], eps=1e-3, t_min=T_MIN)
    net = LogitsTable()
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, V, (4, LONG), generator=g)
    t = torch.rand(4, generator=g, dtype=torch.float64)
    noises = [torch.rand(4, LONG, generator=g, dtype=torch.float64) for _ in range(2)]
    surrogate, reported = process.surrogate_loss(net, x0, t=t, estimator=estimator,
                                                 noise=tuple(noises) if estimator == "rloo" else noises[0])
    grads = torch.autograd.grad(surrogate.mean(), list(net.parameters()))
    used = noises if estimator == "rloo" else noises[:1]
    f = torch.stack([process.nelbo(net, x0, t=t, noise=n) for n in used])  # [draws, 4]
    expected = torch.autograd.grad(f.mean(0).mean(), list(net.parameters()))  # (f1 + f2) / 2 or f
    torch.testing.assert_close(reported, f.mean(0).detach(), rtol=1e-14, atol=0)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # The centred losses (f1 - f2, or f minus the others' mean) are far from 0, so a score-function
    # term reaching theta would change its gradient.
    centred = f[0] - f[1] if estimator == "rloo" else f[0] - (f[0].sum() - f[0]) / 3
    assert (centred.abs() > 1e-3).all(), centred
