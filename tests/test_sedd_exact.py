"""SEDD (score entropy) against exact float64 answers on a distribution over V^N = 27 sequences.

Oracles: for the absorbing graph the true score of a masked position is ``s_y = r mu_y`` with
``r = 1 / (exp(sigma_bar) - 1)`` and mu the exact posterior, which under the scale-by-sigma
parameterisation is the raw output ``log mu + log V`` (``AbsorbOracle``). For the uniform graph
the true score ``p_t(x with x_n = y) / p_t(x)`` is computed by enumerating p_t (``UniformOracle``).
"""

import itertools
import math

import numpy as np
import pytest
import torch

from exact import ExactDenoiser, empirical_tv, random_distribution
from lightning_md4.diffusion.masked import MaskedDiffusion, masked_cross_entropy
from lightning_md4.diffusion.sedd import AbsorbingSEDD, ScoreEntropyDiffusion, log_expm1, make_sedd
from lightning_md4.diffusion.schedules import Schedule

V, N = 3, 3
CONFIGS, PROBS = random_distribution(V, N, seed=0)
K = len(CONFIGS)
BASE = V ** torch.arange(N - 1, -1, -1)
MASKS = torch.tensor(list(itertools.product([False, True], repeat=N)))  # [8, N]
SCHEDULES = ["loglinear", "geometric"]


def f64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


class SEDDSchedule(Schedule):
    """MD4 schedule alpha_t = exp(-sigma_bar(t)) of a SEDD process."""

    def __init__(self, process: ScoreEntropyDiffusion) -> None:
        super().__init__()
        self.p = process

    def alpha(self, t):
        return self.p.alpha(t)

    def one_minus_alpha(self, t):
        return self.p.one_minus_alpha(t)

    def dalpha(self, t):
        return -self.p.dsigma(t) * self.p.alpha(t)


class AbsorbOracle:
    """Raw output ``log mu + log V``: normalised scores ``s = r mu`` after scaling by sigma."""

    time_conditioned = False

    def __init__(self) -> None:
        self.exact = ExactDenoiser(CONFIGS, PROBS, V)
        self.calls = 0

    def __call__(self, xt, sigma_bar):
        self.calls += 1
        return self.exact(xt, sigma_bar) + math.log(V)


def uniform_marginals(sigma_bar: torch.Tensor, probs: torch.Tensor = PROBS) -> torch.Tensor:
    """p_t over all K configurations for each total noise, ``[S, K]``, uniform graph."""
    a = torch.exp(-sigma_bar)[:, None, None]
    kern = a * torch.eye(V, dtype=torch.float64) + (-torch.expm1(-sigma_bar))[:, None, None] / V  # [S, b, a]
    pt = torch.einsum("sia,sjb,skc,abc->sijk", kern, kern, kern, probs.view(V, V, V))
    return pt.reshape(len(sigma_bar), K)


class UniformOracle:
    """Exact log-scores ``log p_t(x with x_n = y) - log p_t(x)`` of the uniform graph, ``[B, N, V]``."""

    time_conditioned = True

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, xt, sigma_bar):
        self.calls += 1
        uniq, inv = torch.unique(sigma_bar.double(), return_inverse=True)
        logp = uniform_marginals(uniq).log()[inv]  # [B, K]
        code = (xt * BASE).sum(-1)
        ys = torch.arange(V)
        codes = code[:, None, None] + (ys - xt[..., None]) * BASE[None, :, None]  # [B, N, V]
        return logp.gather(1, codes.reshape(len(xt), -1)).view(codes.shape) - logp.gather(1, code[:, None])[..., None]


def entropy(p: torch.Tensor) -> float:
    return -(p * p.log()).sum().item()


def legendre(q: int, power: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes u^power in [0, 1] and weights (Jacobian included) of q-point Gauss-Legendre."""
    nodes, weights = np.polynomial.legendre.leggauss(q)
    u = f64((nodes + 1) / 2)
    return u**power, f64(weights / 2) * power * u ** (power - 1)


def raw_output(process: ScoreEntropyDiffusion, log_scores, sigma_bar):
    """The network output with these log-scores: absorbing ``log s + log(exp(sigma_bar) - 1) + log V``
    (module docstring of sedd.py), uniform ``log s``."""
    if isinstance(process, AbsorbingSEDD):
        return log_scores + (log_expm1(sigma_bar) + math.log(V))[:, None, None]
    return log_scores


def md4_integrand(process: ScoreEntropyDiffusion, logits, x0, mask, t):
    """MD4's ``loss_weight(t) * masked CE`` for alpha = exp(-sigma_bar)."""
    return SEDDSchedule(process).loss_weight(t) * masked_cross_entropy(logits, x0, mask)


# --- 1. normalised scores: the SEDD loss is the MD4 integrand -------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_normalised_scores_give_the_md4_integrand_sample_by_sample(schedule):
    """With s = r mu (raw = log mu + log V), per masked position
    ``sum_y s_y - r log s_{x0} + r (log r - 1) = r - r log r - r log mu_{x0} + r log r - r
    = -r log mu_{x0}`` because sum_y mu_y = 1 holds for every context; and sigma r =
    -alpha'/(1 - alpha) for alpha = exp(-sigma_bar). So the identity is exact for every (x0, t,
    mask), not only in expectation, and the endpoint terms coincide as well (same alpha_0, alpha_1).
    Without the log V term (raw = log mu) the identity fails: the test sees the convention."""
    process = make_sedd(V, schedule=schedule)
    md4 = MaskedDiffusion(SEDDSchedule(process), V)
    oracle = AbsorbOracle()
    g = torch.Generator().manual_seed(0)
    B = 2000
    x0 = CONFIGS[torch.randint(K, (B,), generator=g)]
    t = torch.rand(B, dtype=torch.float64, generator=g)
    t[:5] = f64([1e-6, 1e-3, 0.5, 1 - 1e-6, 1.0])
    noise_u = torch.rand(B, N, dtype=torch.float64, generator=g)
    noise_u[:5] = 0.0  # everything masked at the special times
    sedd = process.nelbo(oracle, x0, t=t, noise=noise_u)
    ref = md4.nelbo(oracle.exact, x0, t=t, noise=noise_u)
    assert sedd.dtype == torch.float64
    torch.testing.assert_close(sedd, ref, rtol=1e-11, atol=1e-12)
    assert process.endpoint_terms(N) == pytest.approx(md4.endpoint_terms(N), rel=1e-14)

    # score_entropy of the raw output, what nelbo uses, is the same integrand.
    xt, mask = process.forward_sample(x0, t, noise_u)
    sb, ds = process.sigma_bar(t), process.dsigma(t)
    log_mu = oracle.exact(xt, sb)
    dse = process.score_entropy(log_mu + math.log(V), x0, xt, sb, ds)
    torch.testing.assert_close(dse, md4_integrand(process, log_mu, x0, mask, t), rtol=1e-9, atol=1e-12)
    wrong = process.score_entropy(log_mu, x0, xt, sb, ds)
    assert not torch.allclose(wrong, dse, rtol=1e-3)


# --- 2. free scores -----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_free_scores_pay_a_nonnegative_normalisation_penalty(schedule):
    """Per sample, free scores are never below their own normalisation: with l = raw - log V,
    Z = sum_y e^{l_y} and the normalised scores s' = r softmax(raw),
    ``DSE(s) = DSE(s') + sigma r sum_masked (Z - log Z - 1)`` and ``DSE(s') = MD4 weight x CE(raw)``.
    (Per sample, free scores *can* fall below the oracle's value when they put extra mass on the
    true x0; the oracle is the minimiser only in expectation over x0 given xt: next test.)"""
    process = make_sedd(V, schedule=schedule)
    g = torch.Generator().manual_seed(1)
    B = 2000
    x0 = CONFIGS[torch.randint(K, (B,), generator=g)]
    t = torch.rand(B, dtype=torch.float64, generator=g)
    xt, mask = process.forward_sample(x0, t, generator=g)
    raw = 2.0 * torch.randn(B, N, V, dtype=torch.float64, generator=g)
    sb, ds = process.sigma_bar(t), process.dsigma(t)
    free = process.score_entropy(raw, x0, xt, sb, ds)
    normalised = md4_integrand(process, raw, x0, mask, t)
    z = (raw - math.log(V)).exp().sum(-1)
    penalty = SEDDSchedule(process).loss_weight(t) * ((z - z.log() - 1.0) * mask).sum(-1)
    torch.testing.assert_close(free, normalised + penalty, rtol=1e-9, atol=1e-10)
    assert (penalty >= 0).all() and (free >= normalised - 1e-12).all()
    assert (penalty[mask.any(-1)] > 1e-3).double().mean() > 0.9  # free scores really are unnormalised
    norm_raw = torch.log_softmax(raw, -1) + math.log(V)
    torch.testing.assert_close(process.score_entropy(norm_raw, x0, xt, sb, ds), normalised,
                               rtol=1e-9, atol=1e-10)


def _absorb_joint(process, t):
    """All (x0, mask) pairs at time t: ``x0 [R, N], xt [R, N], weight [R], xt code [R]``."""
    x0 = CONFIGS.repeat_interleave(len(MASKS), 0)
    masks = MASKS.repeat(K, 1)
    xt = torch.where(masks, V, x0)
    p = float(process.one_minus_alpha(f64(t)))
    w = PROBS.repeat_interleave(len(MASKS)) * torch.where(masks, p, 1 - p).prod(-1)
    return x0, xt, w, (xt * (V + 1) ** torch.arange(N - 1, -1, -1)).sum(-1)


def _uniform_joint(process, t):
    """All (x0, xt) pairs at time t with weight p(x0) K_t(xt | x0)."""
    x0 = CONFIGS.repeat_interleave(K, 0)
    xt = CONFIGS.repeat(K, 1)
    a, b = float(process.alpha(f64(t))), float(process.one_minus_alpha(f64(t)))
    w = PROBS.repeat_interleave(K) * (torch.where(xt == x0, a, 0.0) + b / V).prod(-1)
    return x0, xt, w, (xt * BASE).sum(-1)


@pytest.mark.parametrize("state_space", ["absorbing", "uniform"])
@pytest.mark.parametrize("t", [0.05, 0.4, 0.9])
def test_oracle_minimises_the_expected_entropy(state_space, t):
    """Enumerate every (x0, xt) with its probability and let the scores be a free table over xt.
    The expected DSE is stationary at the oracle (gradient 0: the targets c_y of the DSE average
    to the true score given xt) and every perturbation of the oracle scores raises it."""
    process = make_sedd(V, schedule="geometric", state_space=state_space)
    x0, xt, w, code = (_absorb_joint if state_space == "absorbing" else _uniform_joint)(process, t)
    tt = f64(t).expand(len(x0))
    sb, ds = process.sigma_bar(tt), process.dsigma(tt)
    oracle = AbsorbOracle() if state_space == "absorbing" else UniformOracle()
    n_codes = (V + 1) ** N if state_space == "absorbing" else K
    table = torch.zeros(n_codes, N, V, dtype=torch.float64)
    table[code] = oracle(xt, sb)
    table.requires_grad_(True)

    def expected(tab):
        return (w * process.score_entropy(tab[code], x0, xt, sb, ds)).sum()

    best = expected(table)
    (grad,) = torch.autograd.grad(best, table)
    assert grad.abs().max().item() < 1e-8  # round-off; a wrong target gives O(0.01)
    g = torch.Generator().manual_seed(2)
    for scale in (1e-3, 0.1, 1.0):
        delta = scale * torch.randn(table.shape, dtype=torch.float64, generator=g)
        assert expected(table.detach() + delta).item() > best.item()


@pytest.mark.parametrize("state_space", ["absorbing", "uniform"])
def test_entropy_is_nonnegative_and_zero_at_the_conditional_ratios(state_space):
    """DSE >= 0 for any scores, and = 0 exactly when s_y = p_t(y | x0) / p_t(xt | x0) for every
    y != xt[n]: this pins the constant terms (r (log r - 1) for absorb; the uniform constants)."""
    process = make_sedd(V, schedule="loglinear", state_space=state_space)
    g = torch.Generator().manual_seed(3)
    B = 3000
    x0 = CONFIGS[torch.randint(K, (B,), generator=g)]
    t = torch.rand(B, dtype=torch.float64, generator=g)
    xt, _ = process.forward_sample(x0, t, generator=g)
    sb, ds = process.sigma_bar(t), process.dsigma(t)
    raw = 3.0 * torch.randn(B, N, V, dtype=torch.float64, generator=g)
    assert (process.score_entropy(raw, x0, xt, sb, ds) >= 0).all()
    # conditional ratios: K(y | x0) / K(xt | x0), per position
    a, b = process.alpha(t)[:, None, None], process.one_minus_alpha(t)[:, None, None]
    ys = torch.arange(V)
    if state_space == "absorbing":
        # masked position: ratio of real token y to the mask is [y = x0] a / b
        log_target = torch.where(ys == x0[..., None], torch.log(a / b), f64(-1e4))
    else:
        k_y = torch.where(ys == x0[..., None], a, 0.0) + b / V
        k_x = torch.where(xt == x0, a[..., 0], 0.0) + b[..., 0] / V
        log_target = (k_y / k_x[..., None]).log()
    raw_target = raw_output(process, log_target, sb)
    dse = process.score_entropy(raw_target, x0, xt, sb, ds)
    assert dse.abs().max().item() < 1e-9
    assert (process.score_entropy(raw_target + 0.01, x0, xt, sb, ds) > 0).any()


# --- 3. the continuous NELBO ------------------------------------------------------------------


def absorb_reference(x0: torch.Tensor, p_lo: float, p_hi: float) -> float:
    """integral_{p_lo}^{p_hi} f(p) / p dp, f(p) = E_{mask ~ Bernoulli(p)^N}[masked CE of the exact
    posterior]: MD4's NELBO in the masking-probability variable; f(p) / p is a polynomial of
    degree N - 1 in p, so a few Gauss-Legendre nodes are exact. Independent of any SEDD code."""
    exact = ExactDenoiser(CONFIGS, PROBS, V)
    xt = torch.where(MASKS, V, x0)
    ce = -(exact(xt, torch.zeros(len(MASKS))).gather(-1, x0.expand(len(MASKS), N)[..., None])[..., 0] * MASKS).sum(-1)
    k = MASKS.sum(-1)
    nodes, weights = np.polynomial.legendre.leggauss(8)
    p = p_lo + (p_hi - p_lo) * f64((nodes + 1) / 2)
    f_over_p = (p[:, None] ** (k - 1) * (1 - p[:, None]) ** (N - k) * ce).sum(-1)  # k = 0 has ce = 0
    return float((f64(weights / 2) * (p_hi - p_lo) * f_over_p).sum())


@pytest.mark.parametrize("schedule,t_min,q", [("loglinear", 0.0, 16), ("loglinear", 1e-3, 16), ("geometric", 0.0, 96)])
def test_absorb_nelbo_integrates_to_the_exact_bound(schedule, t_min, q):
    """Gauss-Legendre over u (t = t_min + (1 - t_min) u) of `.nelbo` with the oracle, averaged
    over all 2^N masks given as noise, equals ``integral_{p(t_min)}^{p(1)} f(p)/p dp + endpoint
    terms`` for every x0 to quadrature precision, with p(t) = 1 - exp(-sigma_bar(t)). Over all
    of p in [0, 1] that integral is -log p(x0) (MD4 section 5), so the NELBO is -log p(x0) minus the
    missing ends plus the endpoint terms (< 0.01 nats here): at most -log p(x0) + endpoint terms,
    at least 99.7% of -log p(x0), and above the entropy on average over x0."""
    process = make_sedd(V, schedule=schedule, t_min=t_min)
    oracle = AbsorbOracle()
    u, wq = legendre(q)
    t = process.time_from_uniform(u)
    noise_u = torch.where(MASKS, 0.0, 1.0 - 1e-15).double()
    p = process.one_minus_alpha(t)[:, None, None]
    p_pattern = torch.where(MASKS[None], p, 1 - p).prod(-1)  # [Q, M]
    p_lo, p_hi = float(process.one_minus_alpha(f64(t_min))), float(process.one_minus_alpha(f64(1.0)))
    end = process.endpoint_terms(N)
    assert 0 < end < 0.01
    values = []
    for which in range(K):
        x0 = CONFIGS[which]
        est = process.nelbo(oracle, x0.expand(len(t) * len(MASKS), N), t=t.repeat_interleave(len(MASKS)),
                            noise=noise_u.repeat(len(t), 1))
        value = (wq[:, None] * p_pattern * est.view(len(t), len(MASKS))).sum().item()
        target = -math.log(PROBS[which].item())
        assert absorb_reference(x0, 0.0, 1.0) == pytest.approx(target, rel=1e-12)
        assert value == pytest.approx(absorb_reference(x0, p_lo, p_hi) + end, rel=1e-9, abs=1e-10), which
        assert target - 0.003 * max(1.0, target) < value <= target + end + 1e-12
        values.append(value)
    assert (f64(values) * PROBS).sum().item() > entropy(PROBS)


@pytest.mark.parametrize("schedule,t_min,q,power", [("loglinear", 0.0, 64, 3), ("loglinear", 1e-3, 64, 3),
                                                  ("geometric", 0.0, 64, 1)])
def test_uniform_nelbo_integrates_to_the_exact_expected_bound(schedule, t_min, q, power):
    """Uniform graph: Gauss-Legendre over t of `.nelbo` with the exact scores, averaged over every
    (x0, xt) (xt given as noise), equals ``H(p_{t_min}) + KL(p_1 || uniform)`` in expectation
    over x0 ~ p: with exact reverse rates the path KL is I(X0; X_{t_min}) + KL(p_1 || pi), and the
    reconstruction term adds N H(K_{t_min}) - (the rest of) I. That checks the DSE constants and
    the endpoint terms. The substitution t = t_min + (1 - t_min) u^3 smooths the t log t behaviour
    near t = 0."""
    process = make_sedd(V, schedule=schedule, state_space="uniform", t_min=t_min)
    oracle = UniformOracle()
    u, wq = legendre(q, power)
    t = process.time_from_uniform(u)
    x0 = CONFIGS.repeat_interleave(K, 0)
    xt = CONFIGS.repeat(K, 1)
    beta = process.one_minus_alpha(t)[:, None, None]
    noise_u = beta * (xt[None].double() + 0.5) / V  # resampled, to xt exactly
    est = process.nelbo(oracle, x0.repeat(len(t), 1), t=t.repeat_interleave(K * K), noise=noise_u.reshape(-1, N))
    kern = torch.where(xt[None] == x0[None], process.alpha(t)[:, None, None], 0.0) + beta / V
    weight = kern.prod(-1) * PROBS.repeat_interleave(K)[None]
    value = (wq[:, None] * weight * est.view(len(t), -1)).sum().item()
    p0 = uniform_marginals(process.sigma_bar(f64([t_min])))[0]
    p1 = uniform_marginals(process.sigma_bar(f64([1.0])))[0]
    target = entropy(p0) + (p1 * (K * p1).log()).sum().item()
    assert value == pytest.approx(target, rel=1e-9)


@pytest.mark.parametrize("state_space", ["absorbing", "uniform"])
def test_nelbo_monte_carlo_is_unbiased(state_space):
    """Random stratified times and random noise (the training path) average to the exact value."""
    process = make_sedd(V, schedule="geometric", state_space=state_space)
    g = torch.Generator().manual_seed(4)
    x0 = CONFIGS[torch.multinomial(PROBS, 20000, replacement=True, generator=g)]
    if state_space == "absorbing":
        est = process.nelbo(AbsorbOracle(), x0, generator=g)
        p_lo, p_hi = float(process.one_minus_alpha(f64(0.0))), float(process.one_minus_alpha(f64(1.0)))
        exact = sum(PROBS[i].item() * absorb_reference(CONFIGS[i], p_lo, p_hi) for i in range(K))
        exact += process.endpoint_terms(N)
    else:
        est = process.nelbo(UniformOracle(), x0, generator=g)
        p0 = uniform_marginals(process.sigma_bar(f64([0.0])))[0]
        p1 = uniform_marginals(process.sigma_bar(f64([1.0])))[0]
        exact = entropy(p0) + (p1 * (K * p1).log()).sum().item()
    se = est.std().item() / math.sqrt(len(est))
    assert abs(est.mean().item() - exact) < 4 * se, (est.mean().item(), exact, se)


# --- 4. samplers -------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_absorb_reverse_step_is_md4s_exact_step(schedule):
    """One reverse step of a masked position with the true scores: ``analytic`` moves to y with
    probability ``(alpha_s - alpha_t) / (1 - alpha_t) mu_y`` for any step size (MD4's ancestral
    step, computed here by MaskedDiffusion); ``euler`` with ``(t - s) w(t) mu_y`` (w = MD4's loss
    weight), which agrees to O((t - s)^2), exactly for loglinear noise (alpha linear in t); the
    denoising step draws from mu."""
    process = make_sedd(V, schedule=schedule)
    md4 = MaskedDiffusion(SEDDSchedule(process), V)
    oracle = AbsorbOracle()
    xt = torch.where(MASKS, V, CONFIGS[7])[1:]  # every pattern with a masked position
    raw = oracle(xt, torch.zeros(len(xt)))
    masked = xt == V
    raw_m, x_m = raw[masked], xt[masked]
    mu = (raw_m - math.log(V)).exp()
    for t, s in [(1.0, 0.5), (0.7, 0.2), (0.3, 0.299), (0.05, 0.0)]:
        t, s = f64(t), f64(s)
        reveal = md4.unmask_probability(s, t)
        expected = torch.cat([reveal * mu, (1 - reveal).expand(len(mu), 1)], -1)
        analytic = process.reverse_probs(raw_m, x_m, t, s, "analytic")
        torch.testing.assert_close(analytic, expected, rtol=1e-12, atol=1e-14)
        reveal = (t - s) * SEDDSchedule(process).loss_weight(t)
        euler = process.reverse_probs(raw_m, x_m, t, s, "euler")
        if reveal <= 1:
            torch.testing.assert_close(euler, torch.cat([reveal * mu, (1 - reveal).expand(len(mu), 1)], -1),
                                       rtol=1e-12, atol=1e-14)
        else:  # clipped: "stay" would be negative
            torch.testing.assert_close(euler, torch.cat([mu, torch.zeros(len(mu), 1, dtype=torch.float64)], -1))
    err = [(process.reverse_probs(raw_m, x_m, f64(0.5), f64(0.5 - h), "euler")
            - process.reverse_probs(raw_m, x_m, f64(0.5), f64(0.5 - h), "analytic")).abs().max().item()
           for h in (1e-2, 1e-3)]
    assert err[1] <= 0.02 * err[0] + 1e-14 and err[0] < 1e-2  # equal for loglinear: (t - s) w(t) = (t - s) / t
    denoise = process.reverse_probs(raw_m, x_m, f64(0.3), None, "euler")
    torch.testing.assert_close(denoise, torch.cat([mu, torch.zeros(len(mu), 1, dtype=torch.float64)], -1))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_uniform_reverse_step_is_exact_for_one_token(schedule):
    """For a single token (N = 1) the staggered score with the true scores is exactly
    p_s(y) / p_t(x), so the ``analytic`` step is the exact reverse kernel
    ``p_s(y) K_Delta(x | y) / p_t(x)`` for any step, and the denoising step the exact posterior
    ``p_0(y) K_{sigma_bar_t}(x | y) / p_t(x)``; ``euler`` agrees to O((t - s)^2)."""
    process = make_sedd(V, schedule=schedule, state_space="uniform")
    _, p0 = random_distribution(V, 1, seed=1)

    def law(sb):  # p at total noise sb, [V]
        return torch.exp(-sb) * p0 + (-torch.expm1(-sb)) / V

    def kernel(sb):  # K(x | y) as [x, y]
        return torch.exp(-sb) * torch.eye(V, dtype=torch.float64) + (-torch.expm1(-sb)) / V

    x = torch.arange(V)

    def exact_step(t, s):
        sb_t = process.sigma_bar(t)
        sb_s = f64(0.0) if s is None else process.sigma_bar(s)
        pt, ps = law(sb_t), law(sb_s)
        # [x, y]: log p_t(y) / p_t(x), from the exact difference p_t(y) - p_t(x) = e^{-sb} (p_y - p_x):
        # near the prior the scores are 1 + O(e^{-sb}) and the analytic step amplifies their spread.
        raw = torch.log1p(torch.exp(-sb_t) * (p0[None, :] - p0[x][:, None]) / pt[x][:, None])
        return raw, ps[None, :] * kernel(sb_t - sb_s) / pt[x][:, None]

    for t, s in [(1.0, 0.6), (0.5, 0.1), (0.2, 0.19), (0.3, None)]:
        t, s = f64(t), None if s is None else f64(s)
        raw, exact = exact_step(t, s)
        torch.testing.assert_close(exact.sum(-1), torch.ones(V, dtype=torch.float64))
        torch.testing.assert_close(process.reverse_probs(raw, x, t, s, "analytic"), exact, rtol=1e-10, atol=1e-13)
    err = []
    for h in (1e-2, 1e-3):
        raw, exact = exact_step(f64(0.5), f64(0.5 - h))
        err.append((process.reverse_probs(raw, x, f64(0.5), f64(0.5 - h), "euler") - exact).abs().max().item())
    assert err[1] < 0.02 * err[0] and err[0] < 1e-2
    # free scores: clipped and renormalised, a probability vector whatever the step
    g = torch.Generator().manual_seed(12)
    raw = 5.0 * torch.randn(200, V, dtype=torch.float64, generator=g)
    xs = torch.randint(V, (200,), generator=g)
    for method in ("analytic", "euler"):
        probs = process.reverse_probs(raw, xs, f64(0.9), f64(0.1), method)
        assert (probs >= 0).all() and torch.allclose(probs.sum(-1), torch.ones(200, dtype=torch.float64))


def independent_marginals(g) -> torch.Tensor:
    marg = ExactDenoiser(CONFIGS, PROBS, V)(torch.full((1, N), V), torch.ones(1)).exp()[0]
    return torch.stack([torch.multinomial(marg[n], 4000, replacement=True, generator=g) for n in range(N)], -1)


@pytest.mark.parametrize("state_space,schedule,method", [
    ("absorbing", "loglinear", "analytic"), ("absorbing", "geometric", "analytic"), ("absorbing", "geometric", "euler"),
    ("uniform", "geometric", "analytic"), ("uniform", "geometric", "euler"),
])
def test_sampler_reproduces_the_distribution(state_space, schedule, method):
    """(For absorbing with loglinear noise Euler's (t - s) sigma r = (t - s)/t equals the analytic
    step's probability, so the two coincide; the geometric noise tells them apart.)"""
    process = make_sedd(V, schedule=schedule, state_space=state_space, method=method)
    oracle = AbsorbOracle() if state_space == "absorbing" else UniformOracle()
    g = torch.Generator().manual_seed(5)
    samples, nfe = process.sample(oracle, (4000, N), steps=100, generator=g, return_nfe=True)
    assert samples.dtype == torch.long and (samples >= 0).all() and (samples < V).all()
    assert nfe == oracle.calls and nfe <= 100
    tv = empirical_tv(samples, CONFIGS, PROBS)
    assert tv < 0.06 and empirical_tv(independent_marginals(g), CONFIGS, PROBS) > 0.15, tv


@pytest.mark.parametrize("method", ["analytic", "euler"])
def test_conditioning_keeps_tokens_and_samples_the_conditional(method):
    process = make_sedd(V, schedule="geometric", method=method)
    x = torch.full((4000, N), process.mask_id)
    x[:, 1] = 2
    samples = process.sample(AbsorbOracle(), x.shape, steps=100, x=x,
                             generator=torch.Generator().manual_seed(6))
    assert (samples[:, 1] == 2).all() and (samples < V).all()
    cond = torch.where(CONFIGS[:, 1] == 2, PROBS, torch.zeros_like(PROBS))
    assert empirical_tv(samples, CONFIGS, cond / cond.sum()) < 0.06
    # uniform graph: given tokens stay (the clamped sampler is not exact for the conditional law)
    uni = make_sedd(V, schedule="geometric", state_space="uniform", method=method)
    out = uni.sample(UniformOracle(), (200, N), steps=20, x=x[:200],
                     generator=torch.Generator().manual_seed(7))
    assert (out[:, 1] == 2).all() and (out < V).all() and (out[:, 0] != out[0, 0]).any()


def test_output_cache_and_network_evaluation_count():
    process = make_sedd(V, schedule="loglinear")
    oracle = AbsorbOracle()
    g = torch.Generator().manual_seed(8)
    _, nfe = process.sample(oracle, (1, N), steps=1000, generator=g, return_nfe=True)
    assert nfe <= N + 1 and oracle.calls == nfe
    _, nfe_plain = process.sample(oracle, (1, N), steps=1000, generator=g, cache=False, return_nfe=True)
    assert nfe_plain > 10 * nfe
    uni = UniformOracle()
    _, nfe_uni = make_sedd(V, state_space="uniform", schedule="geometric").sample(
        uni, (2, N), steps=37, generator=g, return_nfe=True)
    assert nfe_uni == 37 == uni.calls
    # one step is the denoising step alone: nothing is left masked
    assert (process.sample(oracle, (100, N), steps=1, generator=g) < V).all()



def sigma_bar_by_hand(schedule: str, t: float) -> float:
    """SEDD's total noise at the process defaults (eps = 1e-3; sigma_min = 1e-4, sigma_max = 20)."""
    if schedule == "loglinear":
        return -math.log1p(-(1.0 - 1e-3) * t)
    return 1e-4 ** (1.0 - t) * 20.0**t


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_absorb_sampler_reveals_tokens_on_the_schedule(schedule):
    """With normalised scores (raw = 0: s = r / V for every y) the analytic step reveals a masked
    token with probability (alpha_s - alpha_t) / (1 - alpha_t); started all-masked at t = 1, a
    token is still masked at grid time t with probability (1 - alpha_t) / (1 - alpha_1),
    alpha = exp(-sigma_bar), independently of the others. The sampler's state before each network
    call must sit within 5 binomial sigmas of it, and the call must receive sigma_bar(t)."""
    process = make_sedd(V, schedule=schedule)
    seen: list[tuple[float, float]] = []

    def flat(xt, sigma_bar):
        seen.append((float(sigma_bar[0]), (xt == V).double().mean().item()))
        return torch.zeros(*xt.shape, V, dtype=torch.float64)

    B, L, steps = 400, 500, 10
    out = process.sample(flat, (B, L), steps=steps, generator=torch.Generator().manual_seed(13))
    assert (out < V).all() and len(seen) == steps  # the last call is the denoising step
    one_minus_alpha_1 = -math.expm1(-sigma_bar_by_hand(schedule, 1.0))
    for k, (sigma_bar, frac) in enumerate(seen):
        t = 1.0 - k / steps
        assert sigma_bar == pytest.approx(sigma_bar_by_hand(schedule, t), rel=1e-12)
        p = -math.expm1(-sigma_bar_by_hand(schedule, t)) / one_minus_alpha_1
        sigma = math.sqrt(p * (1.0 - p) / (B * L))
        assert abs(frac - p) <= 5 * sigma + 1e-12, (t, frac, p, sigma)


# --- 5. numerics -------------------------------------------------------------------------------


@pytest.mark.parametrize("state_space", ["absorbing", "uniform"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_are_finite_at_the_ends(state_space, schedule, dtype):
    process = make_sedd(V, schedule=schedule, state_space=state_space)
    g = torch.Generator().manual_seed(9)
    times = f64([0.0, 1e-3, 0.5, 1 - 1e-6, 1.0]).repeat_interleave(4)
    B = len(times)
    x0 = CONFIGS[torch.randint(K, (B,), generator=g)]
    noise_u = torch.rand(B, N, dtype=torch.float64, generator=g)
    noise_u[::2] = 0.0  # every token hit wherever the noise is non-zero
    raw = (4.0 * torch.randn(B, N, V, generator=g)).to(dtype).requires_grad_(True)
    loss = process.nelbo(lambda xt, sb: raw, x0, t=times, noise=noise_u)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(raw.grad.float()).all()
    # the public path, with every position masked / changed even where that has probability 0
    sb, ds = process.sigma_bar(times), process.dsigma(times)
    xt = torch.full_like(x0, V) if state_space == "absorbing" else (x0 + 1) % V
    raw.grad = None
    dse = process.score_entropy(raw, x0, xt, sb, ds)
    assert dse.dtype == torch.float32 and torch.isfinite(dse).all() and (dse >= 0).all()
    dse.sum().backward()
    assert torch.isfinite(raw.grad.float()).all()


def test_float32_loss_matches_float64():
    process = make_sedd(V, schedule="loglinear")
    g = torch.Generator().manual_seed(10)
    x0 = CONFIGS[torch.randint(K, (500,), generator=g)]
    t = torch.rand(500, dtype=torch.float64, generator=g) ** 4  # many small t, large r
    raw = 2.0 * torch.randn(500, N, V, dtype=torch.float64, generator=g)
    noise_u = torch.rand(500, N, dtype=torch.float64, generator=g)
    l64 = process.nelbo(lambda xt, sb: raw, x0, t=t, noise=noise_u)
    l32 = process.nelbo(lambda xt, sb: raw.float(), x0, t=t, noise=noise_u)
    torch.testing.assert_close(l32.double(), l64, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused():
    for kwargs in ({"schedule": "cosine"}, {"state_space": "absorb"}, {"eps": 0.0},
                   {"schedule": "geometric", "sigma_min": 30.0}, {"t_min": 1.0}, {"method": "tweedie"}):
        with pytest.raises(ValueError):
            make_sedd(V, **kwargs)
