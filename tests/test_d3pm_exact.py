"""D3PM against exact float64 answers on a distribution over V^N = 27 sequences.

References used here are independent of ``lightning_md4/diffusion/d3pm.py``'s formulas: explicit
K x K transition matrices and their products (Bayes rule by brute force), MD4's discrete-time NELBO
(recomputed here in float64) and exact oracles for the x0-posterior.
"""

import itertools
import math

import pytest
import torch

from exact import ExactDenoiser, empirical_tv, mc_tolerance, random_distribution
from lightning_md4.diffusion import MaskedDiffusion
from d3pm_reference import eps_loss
from lightning_md4.diffusion.d3pm import AbsorbingD3PM, D3PMProcess, make_d3pm
from lightning_md4.diffusion.sampling import time_grid
from lightning_md4.diffusion.schedules import Linear

V, N = 3, 3
CONFIGS, PROBS = random_distribution(V, N, seed=0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every tensor here is tiny: intra-op threads only add synchronisation (10x slower on a busy
    2-core machine). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class UniformOracle:
    """The best x0-predictor for the uniform kernel with abar = 1 - t (t = i / T), float64 logs.

    D3PM's parameterisation ``p(x_{t-1} | x_t) propto sum_i q(x_{t-1}, x_t | i) p~(i)`` weighs p~ by
    ``q(x_t | i)``; it reproduces the true per-token reverse marginals
    ``sum_i q(x_{t-1} | x_t, i) q(x0 = i | x_t)`` when ``p~(i) propto q(x0 = i | x_t) / q(x_t | i)``
    (``optimal``). ``optimal=False`` returns the plain posterior q(x0[n] | x_t). For the absorbing
    kernel the two coincide at masked positions (q(x_t = m | i) does not depend on i).
    """

    def __init__(self, configs: torch.Tensor, probs: torch.Tensor, optimal: bool = True) -> None:
        self.configs, self.probs, self.optimal = configs, probs, optimal
        self.V = int(configs.max()) + 1

    def __call__(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = (1.0 - t.double())[:, None, None]
        same = self.configs[None] == xt[:, None]  # [B, S, N]
        lik = torch.where(same, a + (1 - a) / self.V, (1 - a) / self.V).prod(-1)  # [B, S]
        w = self.probs[None] * lik
        onehot = torch.nn.functional.one_hot(self.configs, self.V).double()
        post = (torch.einsum("bs,snv->bnv", w, onehot) / w.sum(-1)[:, None, None]).clamp_min(1e-300).log()
        if not self.optimal:
            return post
        own = torch.nn.functional.one_hot(xt, self.V).bool()  # q(x_t[n] | x0[n] = v) for each v
        return torch.log_softmax(post - torch.where(own, a + (1 - a) / self.V, (1 - a) / self.V).log(), -1)


def with_mask_column(denoiser, fill=-math.inf):
    """The same predictor as V + 1 logits (Austin's full-vocabulary softmax), mask logit ``fill``."""

    def f(xt, t):
        out = denoiser(xt, t)
        return torch.cat([out, torch.full_like(out[..., :1], fill)], dim=-1)

    f.time_conditioned = getattr(denoiser, "time_conditioned", True)
    return f


def brute_matrices(state_space: str, T: int, schedule: str = "linear"):
    """(pi [K], Q [T + 1, K, K] with Q[t] the one-step matrix, Qbar [T + 1, K, K] = Q[1] ... Q[t])."""
    K = V + 1 if state_space == "absorbing" else V
    pi = torch.zeros(K, dtype=torch.float64)
    if state_space == "absorbing":
        pi[V] = 1.0
    else:
        pi[:] = 1.0 / V
    if schedule == "linear":
        betas = [None] + [1.0 / (T - t + 1) for t in range(1, T + 1)]
    else:  # cosine: abar_t = f(t) / f(0), abar_T = 0
        f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) for t in range(T + 1)]
        abar = [f[t] / f[0] for t in range(T)] + [0.0]
        betas = [None] + [1.0 - abar[t] / abar[t - 1] for t in range(1, T + 1)]
    eye, ones = torch.eye(K, dtype=torch.float64), torch.ones(K, 1, dtype=torch.float64)
    Q = torch.zeros(T + 1, K, K, dtype=torch.float64)
    Qbar = torch.zeros(T + 1, K, K, dtype=torch.float64)
    Q[0], Qbar[0] = eye, eye
    for t in range(1, T + 1):
        Q[t] = (1 - betas[t]) * eye + betas[t] * ones @ pi[None]
        Qbar[t] = Qbar[t - 1] @ Q[t]
    return pi, Q, Qbar


def md4_discrete_nelbo(process: MaskedDiffusion, denoiser, x0: torch.Tensor, T: int) -> float:
    """MD4's T-step NELBO summed over all steps and all 2^N masks, every factor in float64.

    (``exact_discrete_nelbo`` in test_masked_exact.py computes the mask-pattern probabilities as
    ``float ** LongTensor``, which is float32: it is only good to ~1e-7 relative.)
    """
    sch = process.schedule
    masks = torch.tensor(list(itertools.product([False, True], repeat=N)))
    k = masks.sum(-1).double()
    xt = torch.where(masks, process.mask_id, x0)
    total = 0.0
    for i in range(1, T + 1):
        t, s = torch.tensor(i / T, dtype=torch.float64), torch.tensor((i - 1) / T, dtype=torch.float64)
        weight = (sch.alpha(s) - sch.alpha(t)) / sch.one_minus_alpha(t)
        p = sch.one_minus_alpha(t)
        logp = denoiser(xt, t.expand(len(masks)))
        ce = -(logp.gather(-1, x0.expand(len(masks), N)[..., None])[..., 0] * masks).sum(-1)
        total += float(weight * (p**k * (1 - p) ** (N - k) * ce).sum())
    return total


def exact_lvb(process: D3PMProcess, denoiser, x0: torch.Tensor) -> float:
    """L_vb summed over all T steps and, at each step, over every reachable x_t (no Monte Carlo).

    q(x_t | x0) comes from the brute-force matrix products; the per-state term from
    ``process.terms`` (its posteriors are checked against brute force separately).
    """
    T, K = process.T, process.num_states
    _, _, Qbar = brute_matrices("absorbing" if isinstance(process, AbsorbingD3PM) else "uniform", T)
    states = torch.tensor(list(itertools.product(range(K), repeat=N)))  # [S, N]
    w = Qbar[1:, x0[None, :], states].prod(-1)  # [T, S]
    t_idx, s_idx = torch.nonzero(w > 0, as_tuple=True)
    t_idx = t_idx + 1
    xt = states[s_idx]
    logits = denoiser(xt, t_idx.double() / T)
    kl, _ = process.terms(logits, x0.expand(len(xt), N), xt, t_idx)
    total = (w[t_idx - 1, s_idx] * kl.double()).sum().item()
    return total + process.prior_kl(x0[None]).item()


# -- 1. the T-step bound with the oracle equals MD4's discrete-time NELBO -----------------------------
@pytest.mark.parametrize("T", [1, 5, 20])
def test_absorbing_bound_equals_md4_discrete_nelbo(T):
    """With p~ giving the mask zero probability (V logits, or V + 1 logits with a -inf mask logit),
    every KL term of absorbing D3PM at linear beta_t = 1/(T - t + 1) is MD4's weighted masked
    cross-entropy: the exact L_vb equals MD4's exact discrete NELBO to rounding, for every x0."""
    process = make_d3pm(V, T=T, state_space="absorbing")
    md4 = MaskedDiffusion(Linear(), V)
    oracle = ExactDenoiser(CONFIGS, PROBS, process.mask_id)
    for which in range(len(CONFIGS)):
        x0 = CONFIGS[which]
        ref = md4_discrete_nelbo(md4, oracle, x0, T)
        assert exact_lvb(process, oracle, x0) == pytest.approx(ref, rel=1e-9, abs=1e-9), which
        assert exact_lvb(process, with_mask_column(oracle), x0) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    # Austin's softmax giving the mask some probability is a worse model: a strictly larger bound.
    leaky = with_mask_column(oracle, fill=math.log(0.1))
    x0 = CONFIGS[13]
    assert exact_lvb(process, leaky, x0) > md4_discrete_nelbo(md4, oracle, x0, T) + 1e-3


def oracle_for(state_space: str):
    return ExactDenoiser(CONFIGS, PROBS, V) if state_space == "absorbing" else UniformOracle(CONFIGS, PROBS)


def average_lvb(process: D3PMProcess, denoiser) -> float:
    """E_{x0 ~ data} of the exact L_vb: >= the data entropy H for any model (Gibbs)."""
    return sum(PROBS[w].item() * exact_lvb(process, denoiser, CONFIGS[w]) for w in range(len(CONFIGS)))


@pytest.mark.parametrize("state_space", ["absorbing", "uniform"])
def test_bound_decreases_to_the_entropy(state_space):
    """With the best x0-predictor the data-averaged bound sits above the entropy H = E[-log p(x0)]
    and decreases towards it as T grows (absorbing: it is MD4's discrete NELBO; uniform: as T -> inf
    one token changes per step, where exact per-token reverse marginals make the bound tight).
    Per sequence the bound need not be above -log p(x0) (the model is not the data law)."""
    H = -(PROBS * PROBS.log()).sum().item()
    values = [average_lvb(make_d3pm(V, T=T, state_space=state_space, dtype=torch.float64), oracle_for(state_space))
              for T in (1, 10, 100)]
    assert all(v > H for v in values), (values, H)
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] - H < 0.05 * (values[0] - H), (values, H)
    # The same for one likely sequence (MD4's test sequence): above -log p(x0) and decreasing.
    target = -math.log(PROBS[13].item())
    single = [exact_lvb(make_d3pm(V, T=T, state_space=state_space, dtype=torch.float64), oracle_for(state_space),
                        CONFIGS[13])
              for T in (1, 10, 100)]
    assert all(v > target for v in single) and all(a > b for a, b in zip(single, single[1:])), (single, target)


def test_uniform_plain_posterior_is_not_the_best_predictor():
    """D3PM's x0-parameterisation: for the uniform kernel the plain posterior q(x0 | x_t) gives a
    strictly worse bound than q(x0 | x_t) / q(x_t | x0). (For the absorbing kernel the two coincide,
    q(x_t = m | x0) being the same for every x0: hence test 1 with the plain posterior.)"""
    uniform = make_d3pm(V, T=10, state_space="uniform", dtype=torch.float64)
    plain = average_lvb(uniform, UniformOracle(CONFIGS, PROBS, optimal=False))
    best = average_lvb(uniform, UniformOracle(CONFIGS, PROBS))
    assert plain > best + 0.1, (plain, best)


# -- 2. the Monte Carlo estimators average to the exact bound -----------------------------------------
@pytest.mark.parametrize("state_space,T", [("absorbing", 20), ("uniform", 10)])
def test_nelbo_and_nelbo_exact_are_unbiased(state_space, T):
    process = make_d3pm(V, T=T, state_space=state_space, dtype=torch.float64)
    oracle = oracle_for(state_space)
    for which in (5, 13):
        x0 = CONFIGS[which]
        exact = exact_lvb(process, oracle, x0)
        g = torch.Generator().manual_seed(which)
        est = process.nelbo(oracle, x0.expand(20000, N), generator=g)
        assert est.dtype == torch.float64 and est.shape == (20000,)
        se = est.std().item() / math.sqrt(len(est))
        assert abs(est.mean().item() - exact) < 4 * se + 1e-9, (est.mean().item(), exact, se)
        full = process.nelbo_exact(oracle, x0.expand(500, N), batch_T=T, generator=g)
        se = full.std().item() / math.sqrt(len(full))
        assert abs(full.mean().item() - exact) < 4 * se + 1e-9, (full.mean().item(), exact, se)
    # Non-antithetic draws and a chunked loop (batch_T not dividing T) give the same expectations.
    x0 = CONFIGS[13].expand(20000, N)
    est = process.nelbo(oracle, x0, antithetic=False, generator=torch.Generator().manual_seed(0))
    exact = exact_lvb(process, oracle, CONFIGS[13])
    assert abs(est.mean().item() - exact) < 4 * est.std().item() / math.sqrt(len(est)) + 1e-9
    full = process.nelbo_exact(oracle, x0[:300], batch_T=3, generator=torch.Generator().manual_seed(1))
    assert abs(full.mean().item() - exact) < 4 * full.std().item() / math.sqrt(len(full)) + 1e-9


def test_loss_is_T_times_the_term_plus_lambda_cross_entropy():
    """``loss`` with lambda = 0 is ``nelbo`` at the same step and noise; the hybrid part is
    ``T lambda`` times the x0 cross-entropy over all positions (Austin's per-step ``kl_t + lambda
    ce_t``, scaled by T)."""
    T, B = 50, 64
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, N, V + 1, dtype=torch.float64, generator=g)
    x0 = CONFIGS[torch.randint(0, len(CONFIGS), (B,), generator=g)]
    t_index = torch.randint(1, T + 1, (B,), generator=g)
    noise = torch.rand(B, N, dtype=torch.float64, generator=g)
    plain = make_d3pm(V, T=T, hybrid_lambda=0.0)
    hybrid = make_d3pm(V, T=T, hybrid_lambda=0.01)
    net = lambda xt, t: logits  # noqa: E731
    t_cont = (t_index.double() - 0.5) / T  # maps back to the same steps
    base, nelbo = plain.loss(net, x0, t=t_cont, noise=noise)
    torch.testing.assert_close(base, nelbo)
    torch.testing.assert_close(base, plain.nelbo(net, x0, t=t_cont, noise=noise))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V + 1), x0.reshape(-1), reduction="none")
    objective, nelbo = hybrid.loss(net, x0, t=t_cont, noise=noise)
    torch.testing.assert_close(objective, base + T * 0.01 * ce.view(B, N).sum(-1))
    torch.testing.assert_close(nelbo, base)
    assert (base >= -1e-9).all()


def brute_terms(state_space: str, T: int, logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor,
                t_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kl_t, ce_t)`` summed over positions, ``[B]``, from explicit matrices in probability space.

    ``p(x_{t-1} = j | x_t = k) propto (p~ Qbar_{t-1})[j] Q_t[j, k]`` and q the same with p~ the
    one-hot of x0; ``ce_t = -log p~(x0 | x_t)``. Differentiable in ``logits [B, N, C]``.
    """
    _, Q, Qbar = brute_matrices(state_space, T)
    K = Q.shape[-1]
    p0 = torch.softmax(logits, -1)
    if p0.shape[-1] < K:  # V logits: the mask has probability 0
        p0 = torch.cat([p0, torch.zeros_like(p0[..., :1])], -1)
    Qbar_s = Qbar[t_index - 1][:, None]  # [B, 1, K, K]
    column = Q[t_index[:, None], :, xt]  # Q_t[j, x_t]: [B, N, K]

    def reverse(p: torch.Tensor) -> torch.Tensor:
        unnorm = (p[..., None, :] @ Qbar_s)[..., 0, :] * column
        return unnorm / unnorm.sum(-1, keepdim=True)

    p = reverse(p0)
    q = reverse(torch.nn.functional.one_hot(x0, K).double())
    live = q > 0  # q > 0 implies p > 0; elsewhere log p may be log 0, kept out of the graph
    log_ratio = q.log().where(live, 0.0) - p.where(live, 1.0).log()
    kl = (q * log_ratio).where(live, 0.0).sum((-1, -2))
    ce = -torch.log_softmax(logits, -1).gather(-1, x0[..., None])[..., 0].sum(-1)
    return kl, ce


@pytest.mark.parametrize("state_space,C", [("absorbing", V), ("absorbing", V + 1), ("uniform", V)])
def test_hybrid_loss_gradient_weighs_cross_entropy_lambda_T(state_space, C):
    """Austin et al.'s training weighting: the gradient of the objective w.r.t. the network logits
    is ``T grad kl_t + T lambda grad ce_t`` (the per-step ``kl_t + lambda ce_t`` times T), with
    both terms written out here from explicit transition matrices in float64."""
    T, B, lam = 20, 64, 0.01
    g = torch.Generator().manual_seed(1)
    x0 = CONFIGS[torch.randint(0, len(CONFIGS), (B,), generator=g)]
    t_index = torch.randint(1, T + 1, (B,), generator=g)
    t_index[:4] = torch.tensor([1, 2, T - 1, T])
    noise = torch.rand(B, N, dtype=torch.float64, generator=g)
    leaf = torch.randn(B, N, C, dtype=torch.float64, generator=g, requires_grad=True)
    seen = []

    def net(xt, t):
        seen.append(xt)
        return leaf

    process = make_d3pm(V, T=T, state_space=state_space, hybrid_lambda=lam, dtype=torch.float64)
    objective, nelbo = process.loss(net, x0, t=(t_index.double() - 0.5) / T, noise=noise)
    (grad,) = torch.autograd.grad(objective.sum(), leaf)
    kl, ce = brute_terms(state_space, T, leaf, x0, seen[0], t_index)
    grad_kl, = torch.autograd.grad(kl.sum(), leaf, retain_graph=True)
    grad_ce, = torch.autograd.grad(ce.sum(), leaf)
    torch.testing.assert_close(objective, T * (kl + lam * ce), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nelbo, T * kl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, T * grad_kl + T * lam * grad_ce, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_exact_test_is_keyed_by_example_index():
    """``md4 test --exact_test``: each sequence's T-step bound is a function of its index in the data
    set, not of its batch: the same numbers at batch sizes 1, 2 and 4 and in another order (the
    old per-batch generator gave other draws to the same sequence)."""
    from lightning_md4.modules import D3PM
    from lightning_md4.nets import TransformerConfig

    Vm, Nm, B = 17, 8, 8
    torch.manual_seed(0)
    m = D3PM(Vm, Nm, T=6, state_space="uniform", exact_test=True, eval_seed=3,
             network=TransformerConfig(n_layers=1, d_model=32, n_heads=2, d_cond=16))
    for p in m.net.parameters():  # away from adaLN-Zero's uniform start, so the draws matter
        torch.nn.init.normal_(p, std=0.3)
    m.eval()
    x0 = torch.randint(0, Vm, (B, Nm), generator=torch.Generator().manual_seed(0))
    index = torch.arange(100, 100 + B)

    def test_nats(order: torch.Tensor, batch_size: int) -> float:
        metric = m.metrics["test"]
        metric.reset()
        for k, rows in enumerate(order.split(batch_size)):
            m.test_step({"x0": x0[rows], "index": index[rows]}, k)
        return metric.compute().item()

    natural, shuffled = torch.arange(B), torch.randperm(B, generator=torch.Generator().manual_seed(1))
    ref = test_nats(natural, 4)
    for order, size in ((natural, 2), (shuffled, 4), (shuffled, 2), (natural, 1)):
        assert test_nats(order, size) == pytest.approx(ref, rel=1e-6), (order, size)
    # Per sequence: the same value in any batch and chunking of the steps.
    alone = torch.cat([m.process.nelbo_exact(m.net, x0[[b]], step_noise=m.exact_test_noise(index[[b]], Nm))
                       for b in range(B)])
    together = m.process.nelbo_exact(m.net, x0, batch_T=4, step_noise=m.exact_test_noise(index, Nm))
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6)
    assert together.std() > 0.1  # the sequences differ, so a mix-up of rows would show


def test_nelbo_exact_with_keyed_noise_is_unbiased():
    """Keyed uniforms (one stream per step) are valid forward draws: the mean over examples of
    ``nelbo_exact`` is the exact L_vb."""
    from lightning_md4.diffusion.streams import keyed_uniform

    process = make_d3pm(V, T=10, state_space="uniform", dtype=torch.float64)
    oracle, x0 = oracle_for("uniform"), CONFIGS[13]
    index = torch.arange(2000)
    full = process.nelbo_exact(oracle, x0.expand(len(index), N), batch_T=10,
                               step_noise=lambda t: keyed_uniform(5, index, N, stream=t))
    exact = exact_lvb(process, oracle, x0)
    assert abs(full.mean().item() - exact) < 4 * full.std().item() / math.sqrt(len(full)) + 1e-9
    with pytest.raises(ValueError, match="not both"):
        process.nelbo_exact(oracle, x0[None], step_noise=lambda t: keyed_uniform(5, index[:1], N, stream=t),
                            generator=torch.Generator())


@pytest.mark.parametrize("state_space", ["absorbing", "uniform"])
def test_time_conditioning_flag_matches_the_posterior(state_space):
    """``D3PM.posterior_depends_on_time`` (the base turns the network's time input on when True) is
    whether q(x0 | x_t), by brute-force Bayes over the 27 sequences, changes with t at a fixed
    x_t: for the absorbing kernel the factor of t is the same for every x0 consistent with x_t."""
    from lightning_md4.modules import D3PM
    from lightning_md4.nets import TransformerConfig

    T = 6
    _, _, Qbar = brute_matrices(state_space, T)
    K = Qbar.shape[-1]
    states = torch.tensor(list(itertools.product(range(K), repeat=N)))

    def posterior(t: int) -> torch.Tensor:  # [S, len(CONFIGS)]: q(x0 | x_t) for every x_t
        joint = PROBS[None] * Qbar[t][CONFIGS[None], states[:, None]].prod(-1)
        return joint / joint.sum(-1, keepdim=True)

    depends = not torch.allclose(posterior(2), posterior(5), rtol=1e-9, atol=1e-12)
    model = D3PM(V, N, T=T, state_space=state_space,
                 network=TransformerConfig(n_layers=1, d_model=32, n_heads=2, d_cond=16))
    assert model.posterior_depends_on_time() == depends


# -- 3. posteriors against brute-force Bayes rule with explicit matrices ------------------------------
@pytest.mark.parametrize("state_space,schedule", [("absorbing", "linear"), ("uniform", "linear"),
                                           ("absorbing", "cosine"), ("uniform", "cosine")])
def test_posteriors_match_brute_force_matrices(state_space, schedule):
    T = 6
    process = make_d3pm(V, T=T, state_space=state_space, schedule=schedule, dtype=torch.float64)
    pi, Q, Qbar = brute_matrices(state_space, T, schedule)
    K = process.num_states
    eye = torch.eye(K, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    assert process.alpha(torch.tensor(T)).item() == 0.0  # x_T ~ pi exactly: the prior term is 0
    assert (process.prior_kl(CONFIGS) == 0).all()
    for t in range(T + 1):  # the schedule is the product of the one-step matrices
        a = process.alpha(torch.tensor(t)).item()
        torch.testing.assert_close(Qbar[t], a * eye + (1 - a) * torch.ones(K, 1, dtype=torch.float64) @ pi[None])
    checked = 0
    for t in range(1, T + 1):
        for s in range(t):
            Qts = torch.linalg.multi_dot([eye] + [Q[r] for r in range(s + 1, t + 1)] + [eye])
            i, k = torch.nonzero(Qbar[t][:V] > 0, as_tuple=True)  # reachable (x0 = i, x_t = k)
            ones = torch.ones_like(i)
            # q(x_s = j | x_t = k, x0 = i) = Qbar_s[i, j] Q_{t|s}[j, k] / Qbar_t[i, k]
            ref_q = Qbar[s][i] * Qts[:, k].T / Qbar[t][i, k][:, None]
            got_q = process.log_q_posterior(i, k, t * ones, s * ones).exp()
            torch.testing.assert_close(got_q, ref_q, rtol=1e-12, atol=1e-14)
            # p(x_s = j | x_t = k) propto sum_i Qbar_s[i, j] Q_{t|s}[j, k] p~(i), any k, V or V + 1 logits
            widths = (V, V + 1) if state_space == "absorbing" else (V,)
            for C in widths:
                kk = torch.arange(K)
                logits = torch.randn(K, C, dtype=torch.float64, generator=g)
                p0 = torch.softmax(logits, -1)
                if C < K:
                    p0 = torch.cat([p0, torch.zeros(K, 1, dtype=torch.float64)], -1)
                unnorm = (p0 @ Qbar[s]) * Qts[:, kk].T
                live = unnorm.sum(-1) > 0  # absorb: a token state at t = T cannot occur
                ref_p = unnorm[live] / unnorm[live].sum(-1, keepdim=True)
                got_p = process.log_posterior(process.x0_log_probs(logits[live]), kk[live], t * ones[:1], s * ones[:1]).exp()
                torch.testing.assert_close(got_p, ref_p, rtol=1e-12, atol=1e-14)
            checked += len(i)
    assert checked > 0


def test_explicit_skip_steps_are_checked():
    """The sampler's explicit s must satisfy 0 <= s < t <= T (the loss's s = t - 1 is valid by construction)."""
    process = make_d3pm(V, T=6, dtype=torch.float64)
    log_x0, xt = process.x0_log_probs(torch.zeros(1, V, dtype=torch.float64)), torch.tensor([V])
    for t, s in ((3, 3), (3, -1), (7, 2)):
        with pytest.raises(ValueError, match="need 0 <= s < t <= T"):
            process.log_posterior(log_x0, xt, torch.tensor([t]), torch.tensor([s]))
    assert torch.isfinite(process.log_posterior(log_x0, xt, torch.tensor([3]), torch.tensor([1]))).any()


# -- 4. ancestral sampling ------------------------------------------------------------------------
def test_sampler_reproduces_the_distribution_absorb():
    process = make_d3pm(V, T=100, state_space="absorbing")
    oracle = ExactDenoiser(CONFIGS, PROBS, process.mask_id)
    g = torch.Generator().manual_seed(3)
    samples = process.sample(oracle, (4000, N), process.T, generator=g)
    assert (samples < V).all()
    tv = empirical_tv(samples, CONFIGS, PROBS)
    # Independent draws from the per-token marginals (a sampler that ignored the dependence) are
    # far off; the exact sampler is within sampling noise (about 0.02 at 4000 draws).
    marginals = oracle(torch.full((1, N), V), torch.ones(1)).exp()[0]
    wrong = torch.stack([torch.multinomial(marginals[n], 4000, replacement=True, generator=g) for n in range(N)], -1)
    assert tv < 0.06 and empirical_tv(wrong, CONFIGS, PROBS) > 0.15, tv
    # Austin's V + 1 logits with a -inf mask logit define the same sampler: identical draws.
    small = make_d3pm(V, T=50, state_space="absorbing")
    a = small.sample(oracle, (500, N), small.T, generator=torch.Generator().manual_seed(4))
    b = small.sample(with_mask_column(oracle), (500, N), small.T, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    # The time-independent oracle's output is reused until a token changes: at most N + 1 calls.
    oracle.calls = 0
    one, nfe = process.sample(oracle, (1, N), process.T, generator=g, return_nfe=True)
    assert (one < V).all() and nfe <= N + 1 and oracle.calls == nfe


def test_sampler_reproduces_the_distribution_uniform():
    process = make_d3pm(V, T=50, state_space="uniform")
    samples = process.sample(UniformOracle(CONFIGS, PROBS), (4000, N), process.T, generator=torch.Generator().manual_seed(5))
    assert (samples < V).all()
    assert empirical_tv(samples, CONFIGS, PROBS) < 0.06


@pytest.mark.parametrize("state_space", ["absorbing", "uniform"])
def test_conditioning_keeps_tokens_and_samples_the_conditional(state_space):
    process = make_d3pm(V, T=50, state_space=state_space)
    oracle = oracle_for(state_space)
    x = torch.full((4000, N), process.mask_id)
    x[:, 1] = 2
    samples = process.sample(oracle, x.shape, process.T, x=x, generator=torch.Generator().manual_seed(6))
    assert (samples[:, 1] == 2).all() and (samples < V).all()
    if state_space == "absorbing":  # exact: the given token is simply an unmasked one
        cond = torch.where(CONFIGS[:, 1] == 2, PROBS, torch.zeros_like(PROBS))
        assert empirical_tv(samples, CONFIGS, cond / cond.sum()) < 0.06
    # Fewer steps than T (jumps with Q_{t|s}) also keep the given tokens.
    few = process.sample(oracle, (500, N), steps=7, x=x[:500], generator=torch.Generator().manual_seed(7))
    assert (few[:, 1] == 2).all() and (few < V).all()


@pytest.mark.parametrize("state_space", ["absorbing", "uniform"])
def test_sampler_honours_the_time_grid(state_space):
    """A cosine grid's times are rounded to D3PM's steps t / T (repeats dropped): the sampler takes
    those steps, one network call each (a time-conditioned network). With the absorbing kernel
    and the exact posterior every jump is exact, so the samples follow the data on any grid (the
    uniform kernel's factorised jumps are not exact across tokens: checked on all T steps above)."""
    T, steps = 50, 20
    process = make_d3pm(V, T=T, state_space=state_space)
    grid = process.sampling_times(time_grid(steps, "cosine"))
    expected = torch.unique_consecutive(torch.round(time_grid(steps, "cosine") * T))
    assert torch.equal(grid, expected / T) and len(grid) < steps + 1  # two cosine times share a step
    calls = []
    oracle = oracle_for(state_space)

    def timed(xt, t):
        calls.append(float(t[0]))
        return oracle(xt, t)

    samples = process.sample(timed, (4000, N), steps, grid="cosine", generator=torch.Generator().manual_seed(8))
    assert calls == (grid[:-1]).tolist()
    if state_space == "absorbing":
        assert empirical_tv(samples, CONFIGS, PROBS) < 0.06


# -- 4b. coarse grids: the sampler's output law, by enumeration ------------------------------------
def states_of(K: int) -> torch.Tensor:
    """Every sequence over K states, ``[K^N, N]``, in the order of ``CONFIGS`` for K = V."""
    return torch.tensor(list(itertools.product(range(K), repeat=N)))


def propagate(law: torch.Tensor, states: torch.Tensor, moves: torch.Tensor) -> torch.Tensor:
    """One sampler step on the law ``[S]`` over ``states [S, N]``: every position moves
    independently given the whole state, ``moves [S, N, K]`` being P(x_s[n] = j | x_t = states)."""
    jump = torch.ones(len(states), len(states), dtype=torch.float64)
    for n in range(N):
        jump = jump * moves[:, n, :][:, states[:, n]]  # [from, to]
    return law @ jump


def d3pm_moves(state_space: str, denoiser, states: torch.Tensor, t: int, s: int, T: int,
               final: str = "draw") -> torch.Tensor:
    """The ancestral step's ``[S, N, K]`` from explicit matrices (brute_matrices, linear schedule):
    P(x_s = j | x_t = k) propto sum_i p~(i) Qbar_s[i, j] Q_{t|s}[j, k]; at s = 0 over the real tokens
    only (here the mask's entry is 0 anyway). ``final="argmax"``: the reference code's last step,
    the argmax of that posterior, as a reference for what the test must tell apart."""
    _, Q, Qbar = brute_matrices(state_space, T)
    K = Q.shape[-1]
    Q_ts = torch.linalg.multi_dot([torch.eye(K, dtype=torch.float64)] * 2 + [Q[r] for r in range(s + 1, t + 1)])
    p0 = denoiser(states, torch.full((len(states),), t / T, dtype=torch.float64)).exp()
    p0 = torch.cat([p0, torch.zeros_like(p0[..., : K - V])], -1)  # the mask's column (absorbing), p~ = 0
    unnorm = (p0 @ Qbar[s]) * Q_ts[:, states].permute(1, 2, 0)  # [S, N, K]
    if s == 0:
        unnorm[..., V:] = 0.0
    if s == 0 and final == "argmax":
        unnorm = torch.nn.functional.one_hot(unnorm.argmax(-1), K).double()
    total = unnorm.sum(-1, keepdim=True)
    return unnorm / torch.where(total > 0, total, 1.0)  # a zero row: a state the sampler never reaches


def md4_moves(denoiser, states: torch.Tensor, t: float, s: float) -> torch.Tensor:
    """MD4's ancestral step (paper Alg. 2) on the linear schedule alpha = 1 - t: a masked token is
    revealed with probability (alpha_s - alpha_t) / (1 - alpha_t), drawn from p(x0 | x_t)."""
    reveal = ((1 - s) - (1 - t)) / t
    p0 = denoiser(states, torch.full((len(states),), t, dtype=torch.float64)).exp()
    masked = (states == V)[..., None]
    move = torch.cat([reveal * p0, torch.full_like(p0[..., :1], 1 - reveal)], -1)
    return torch.where(masked, move, torch.nn.functional.one_hot(states, V + 1).double())


def sampler_law(state_space: str, moves, steps: int) -> torch.Tensor:
    """The exact law over the V^N sequences of a sampler started from the prior (absorbing: all
    masked; uniform: uniform) on the uniform grid of ``steps`` intervals; ``moves(states, i)`` gives
    interval i's ``[S, N, K]``."""
    K = V + 1 if state_space == "absorbing" else V
    states = states_of(K)
    if state_space == "absorbing":
        law = (states == V).all(-1).double()
    else:
        law = torch.full((len(states),), 1.0 / len(states), dtype=torch.float64)
    for i in range(steps):
        law = propagate(law, states, moves(states, i))
    done = (states < V).all(-1)
    assert law[~done].sum() < 1e-12  # every token is real after the last step
    return law[done]


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def empirical_law(samples: torch.Tensor) -> torch.Tensor:
    codes = (samples * V ** torch.arange(N - 1, -1, -1)).sum(-1)
    return torch.bincount(codes, minlength=V**N).double() / len(samples)


DRAWS = 40000


@pytest.mark.parametrize("steps", [2, 4])
def test_coarse_grid_absorbing_sampler_has_md4s_law(steps):
    """With the exact denoiser, the linear schedule and 2 or 4 steps, absorbing D3PM's ancestral
    sampler and MD4's have the same output law: enumerated over all 4^3 states, equal to 1e-12.
    The samplers themselves (D3PM's ``sample``, MD4's ``sample``, 40000 float64 draws each) are
    within Monte Carlo error of it, so their TVs to the data agree. The reference code's argmax at
    the last step gives another law (TV 0.26 from it at 2 steps, 0.11 at 4; the tolerance is
    0.025): D3PM sampled so fails here, although on this toy its TV to the data happens to be
    smaller (0.200 vs 0.210 at 2 steps, 0.086 vs 0.109 at 4)."""
    T = 1000
    process = make_d3pm(V, T=T, state_space="absorbing")
    md4 = MaskedDiffusion(Linear(), V)
    oracle = ExactDenoiser(CONFIGS, PROBS, process.mask_id)
    grid = [round(T * (1 - i / steps)) for i in range(steps + 1)]  # the uniform grid in steps t / T

    def ancestral(states, i, final="draw"):
        return d3pm_moves("absorbing", oracle, states, grid[i], grid[i + 1], T, final)

    law = sampler_law("absorbing", ancestral, steps)
    md4_law = sampler_law("absorbing", lambda states, i: md4_moves(oracle, states, grid[i] / T, grid[i + 1] / T), steps)
    torch.testing.assert_close(law, md4_law, rtol=0, atol=1e-12)
    argmax_law = sampler_law("absorbing", lambda states, i: ancestral(states, i, "argmax"), steps)
    tol = mc_tolerance(law, DRAWS)
    assert tv(argmax_law, law) > 3 * tol, (tv(argmax_law, law), tol)  # the test tells the two rules apart

    d3pm_samples = process.sample(oracle, (DRAWS, N), steps, generator=torch.Generator().manual_seed(10 + steps))
    md4_samples = md4.sample(oracle, (DRAWS, N), steps, generator=torch.Generator().manual_seed(20 + steps))
    d3pm_emp, md4_emp = empirical_law(d3pm_samples), empirical_law(md4_samples)
    assert tv(d3pm_emp, law) < tol and tv(md4_emp, law) < tol, (tv(d3pm_emp, law), tv(md4_emp, law), tol)
    assert abs(tv(d3pm_emp, PROBS) - tv(md4_emp, PROBS)) < 2 * tol


@pytest.mark.parametrize("steps", [2, 4])
def test_coarse_grid_uniform_sampler_follows_its_ancestral_law(steps):
    """The uniform kernel's last step draws too: the sampler's empirical law (40000 draws, the
    best x0-predictor, linear schedule) is within Monte Carlo error of the ancestral law enumerated
    from explicit matrices over the 27 sequences; the argmax rule's law is far from it."""
    T = 1000
    process = make_d3pm(V, T=T, state_space="uniform", schedule="linear")
    oracle = UniformOracle(CONFIGS, PROBS)
    grid = [round(T * (1 - i / steps)) for i in range(steps + 1)]

    def ancestral(states, i, final="draw"):
        return d3pm_moves("uniform", oracle, states, grid[i], grid[i + 1], T, final)

    law = sampler_law("uniform", ancestral, steps)
    argmax_law = sampler_law("uniform", lambda states, i: ancestral(states, i, "argmax"), steps)
    tol = mc_tolerance(law, DRAWS)
    assert tv(argmax_law, law) > 3 * tol, (tv(argmax_law, law), tol)
    samples = process.sample(oracle, (DRAWS, N), steps, generator=torch.Generator().manual_seed(30 + steps))
    assert tv(empirical_law(samples), law) < tol, (tv(empirical_law(samples), law), tol)


# -- 5. numerics: no NaN at any t in low precision; the reference's log(p + eps) does break ----------
CASES = [("absorbing", 50), ("absorbing", 51), ("uniform", 50)]  # (state_space, logit columns) with V = 50


def _losses(state_space, logits, t, log_eps=None, T=1000):
    """``(objective, nelbo)`` at step t for a fixed batch [8, 16] over V = 50 tokens."""
    Vb, Nb, B = 50, 16, 8
    x0 = torch.randint(0, Vb, (B, Nb), generator=torch.Generator().manual_seed(1))
    noise = torch.rand(B, Nb, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
    process = make_d3pm(Vb, T=T, state_space=state_space)
    t_cont = torch.full((B,), (t - 0.5) / T, dtype=torch.float64)
    if log_eps is not None:
        return eps_loss(process, logits, x0, t_cont, noise, log_eps)
    return process.loss(lambda xt, tt: logits, x0, t=t_cont, noise=noise)


def _loss(state_space, logits, t, log_eps=None, T=1000):
    return _losses(state_space, logits, t, log_eps, T)[0]


def _nelbo(state_space, logits, t, log_eps=None, T=1000):
    """The bound's estimate alone: the transition math, without the hybrid cross-entropy (which
    weighs T lambda = 10 and is a plain log-softmax in every formulation)."""
    return _losses(state_space, logits, t, log_eps, T)[1]


@pytest.mark.parametrize("state_space,C", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_are_finite_and_accurate_in_low_precision(state_space, C, dtype):
    T = 1000
    for scale in (1.0, 30.0):  # 30: confident predictions, log p~ of the truth down to about -100
        base = torch.randn(8, 16, C, generator=torch.Generator().manual_seed(C)) * scale
        for t in (1, 2, T - 1, T):
            leaf = base.clone().requires_grad_(True)
            logits = leaf.to(dtype)
            loss = _loss(state_space, logits, t)
            assert loss.dtype == torch.float32 and torch.isfinite(loss).all(), (t, scale)
            loss.sum().backward()
            assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0, (t, scale)
            # The same (rounded) logits in float64: only float32 rounding in the transition math,
            # an absolute error of order 1e-7 per position and step, times T.
            ref = _loss(state_space, logits.detach().double(), t)
            err = (loss.detach().double() - ref).abs()
            assert (err <= 1e-5 * ref.abs() + 1e-6 * T * 16).all(), (t, scale, err.max().item())


def test_minus_inf_mask_logit_has_finite_gradients():
    """A V + 1-column network whose mask logit is -inf (MD4's choice, in Austin's layout): at t = 1
    the mixture log(p~_m + 0) meets log 0 + log 0, whose plain logaddexp gradient is NaN and would
    reach every logit through the softmax. The guarded path gives finite gradients and the same
    loss as the V-column network."""
    T = 1000
    base = torch.randn(8, 16, 50, generator=torch.Generator().manual_seed(0))
    for t in (1, 2, T - 1, T):
        leaf = base.clone().requires_grad_(True)
        full = torch.cat([leaf, torch.full_like(leaf[..., :1], -math.inf)], -1)
        loss = _loss("absorbing", full, t)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(leaf.grad).all(), t
        torch.testing.assert_close(loss, _loss("absorbing", base, t))


@pytest.mark.parametrize("state_space,C", CASES)
def test_reference_log_eps_formulation_breaks(state_space, C):
    """The reference code's ``log(probs + 1e-20)``, computed in the network output's dtype, on the
    bound's estimate (``nelbo``).

    What actually happens (checked, T = 1000, V = 50, N = 16):
    * float16 output: 1e-20 rounds to 0, ``log 0`` meets ``0 *`` and the bound is NaN at t = 1, for
      every state space (the log-space path on the same float16 logits is finite);
    * confident predictions (logits x 30), in float32 and even in float64 (the formulation, not the
      precision): at t = 1 the absorbing bound gains ~9000 nats of spurious KL (eps leaks mass
      into impossible x_{t-1} at unmasked positions, where the true term is 0), and the uniform bound
      loses ~40% (log-probabilities are capped near log eps = -46);
    * bf16 output, uniform kernel: 1 - beta_t and the 1/V mixtures round, errors above 10% at t = 1
      and t = T;
    * moderate logits in float32: the eps path is accurate (so the failure needs low precision or
      confident networks, which is when the MD4 authors saw NaNs late in training).
    """
    T = 1000
    base = torch.randn(8, 16, C, generator=torch.Generator().manual_seed(C))
    assert not torch.isfinite(_nelbo(state_space, base.half(), 1, log_eps=1e-20)).all()
    assert torch.isfinite(_nelbo(state_space, base.half(), 1)).all()
    ref = _nelbo(state_space, 30 * base.double(), 1)
    for dtype in (torch.float32, torch.float64):
        eps = _nelbo(state_space, (30 * base).to(dtype), 1, log_eps=1e-20).double()
        assert torch.isfinite(eps).all() and (eps - ref).abs().max() > 0.3 * ref.abs().max(), (eps, ref)
    for t in (1, 2, T - 1, T):
        ref = _nelbo(state_space, base.double(), t)
        ok = _nelbo(state_space, base, t, log_eps=1e-20).double()
        assert ((ok - ref).abs() <= 1e-4 * ref.abs() + 1e-6 * T * 16).all(), t
    if state_space == "uniform":
        for t in (1, T):
            rounded = base.bfloat16()
            ref = _nelbo(state_space, rounded.double(), t)
            bad = _nelbo(state_space, rounded, t, log_eps=1e-20).double()
            assert ((bad - ref).abs() / ref.abs().clamp_min(1.0)).max() > 0.1, t


# -- 6. the module's per-state-space defaults --------------------------------------------------------
def tiny_d3pm(**kwargs):
    from lightning_md4.modules import D3PM
    from lightning_md4.nets import TransformerConfig

    return D3PM(V, N, T=6, network=TransformerConfig(n_layers=1, d_model=32, n_heads=2, d_cond=16), **kwargs)


@pytest.mark.parametrize("state_space,schedule,expected", [
    ("absorbing", None, "linear"), ("uniform", None, "cosine"),
    ("uniform", "linear", "linear"), ("absorbing", "cosine", "cosine"),
])
def test_module_schedule_defaults_to_austins_per_state_space(state_space, schedule, expected):
    """``schedule=None``: Austin et al.'s schedule for the state space (absorbing: 1/(T - t + 1),
    uniform: cosine); an explicit name overrides it. The process's abar_t is the brute-force
    product of the one-step matrices of that schedule, and the hyper-parameters record the name."""
    model = tiny_d3pm(state_space=state_space, schedule=schedule)
    assert model.hparams.schedule == expected
    process, T = model.process, 6
    _, _, Qbar = brute_matrices(state_space, T, expected)
    stay = Qbar[:, 0, 0]  # q(x_t = x0 | x0) = abar_t + (1 - abar_t) pi_x0, with pi_x0 = 0 (absorbing) or 1 / V
    abar = stay if state_space == "absorbing" else (stay - 1 / V) / (1 - 1 / V)
    torch.testing.assert_close(process.alpha(torch.arange(T + 1)), abar, rtol=0, atol=1e-14)


@pytest.mark.parametrize("state_space,hybrid_lambda,expected", [
    ("absorbing", None, 0.01), ("uniform", None, 0.0), ("uniform", 0.01, 0.01), ("absorbing", 0.001, 0.001),
])
def test_module_hybrid_lambda_defaults_to_austins_text_value(state_space, hybrid_lambda, expected):
    """``hybrid_lambda=None``: Austin et al.'s text setting, L_{lambda=0.01} for absorbing and L_vb
    (lambda 0) for uniform (their section 5.1 and Table 5); the process gets the resolved value and
    the hyper-parameters record it."""
    from lightning_md4.diffusion.d3pm import D3PM_DEFAULTS

    model = tiny_d3pm(state_space=state_space, hybrid_lambda=hybrid_lambda)
    assert model.hparams.hybrid_lambda == expected and model.process.hybrid_lambda == expected
    assert {name: (d.schedule, d.hybrid_lambda) for name, d in D3PM_DEFAULTS.items()} == {
        "absorbing": ("linear", 0.01), "uniform": ("cosine", 0.0)}
    # make_d3pm keeps the process's own defaults (linear, 0.01); None asks for the table's.
    assert make_d3pm(V, state_space="uniform").hybrid_lambda == 0.01
    assert make_d3pm(V, state_space="uniform", hybrid_lambda=None).hybrid_lambda == 0.0
    with pytest.raises(ValueError, match="unknown schedule 'geometric'"):
        tiny_d3pm(state_space=state_space, schedule="geometric")
