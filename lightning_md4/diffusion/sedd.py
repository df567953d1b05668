"""SEDD: score entropy discrete diffusion (Lou, Meng and Ermon, ICML 2024), absorbing and uniform graphs.

The forward process is a continuous-time Markov chain with rate ``sigma(t) Q`` and total noise
``sigma_bar(t) = integral_0^t sigma``. Each token evolves independently:

* absorbing (:class:`AbsorbingSEDD`): states ``0..V`` with the mask ``m = V``; ``Q = 1 e_m^T - I`` on the real
  tokens, so a token is masked by time t with probability ``1 - exp(-sigma_bar)``. This is MD4's
  process with ``alpha_t = exp(-sigma_bar(t))``.
* uniform (:class:`UniformSEDD`): states ``0..V-1``; ``Q = 11^T / V - I``, so by time t a token has been
  resampled uniformly (possibly to itself) with probability ``1 - exp(-sigma_bar)``:
  ``K_t(b | a) = exp(-sigma_bar) [a = b] + (1 - exp(-sigma_bar)) / V``.

The noise schedule is a :class:`~lightning_md4.diffusion.schedules.Schedule` with ``alpha_t = exp(-sigma_bar(t))``:
``loglinear`` ``sigma_bar = -log(1 - (1 - eps) t)`` (MD4's linear schedule ending at alpha_1 = eps)
or ``geometric`` ``sigma_bar = sigma_min^(1 - t) sigma_max^t``.

The network learns the concrete score ``s_y(x) = p_t(x with token n set to y) / p_t(x)``. It is
called like MD4's denoiser, ``denoiser(xt [B, N], time [B]) -> raw [B, N, V]``, but SEDD conditions
it on the total noise: the time argument is ``sigma_bar(t)`` (float64, in ``[0, -log eps]`` for
loglinear, ``[sigma_min, sigma_max]`` for geometric), not t; the transformer's sinusoidal time
embedding takes any float. The raw output becomes log-scores over the V real tokens by
the parameterisation of each state space:

* absorbing ("scale by sigma", as the SEDD code does for its absorbing graph):
  ``log s_y = raw_y - log(exp(sigma_bar) - 1) - log V``. The true score of a masked position is
  ``s_y = r mu_y`` with ``r = 1 / (exp(sigma_bar) - 1)`` and ``mu = p(x0[n] = . | unmasked tokens)``,
  so the optimal raw output is ``log mu + log V``, time-independent: the log V term makes a zero
  output (the network at initialisation) the uniform posterior with normalised scores.
  Unmasked positions have no reverse rate, so their outputs are ignored.
* uniform: ``log s_y = raw_y`` (no scaling, as in the SEDD code); the entry ``y = xt[n]`` is
  ignored (its score is 1 by definition).

Scores and losses are computed in at least float32 (float64 stays float64) whatever the network's
precision; probabilities are drawn in float64.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from torch import Tensor

from lightning_md4.diffusion.base import AbsorbingState, DiffusionProcess, UniformState
from lightning_md4.diffusion.sampling import Denoiser, sample_categorical
from lightning_md4.diffusion.schedules import Geometric, LogLinear, Schedule

METHODS = ("analytic", "euler")


def log_expm1(x: Tensor) -> Tensor:
    """log(exp(x) - 1) for x >= 0, accurate at small x (expm1) and without overflow at large x."""
    big = x > 1.0
    return torch.where(big, x + torch.log1p(-torch.exp(-torch.where(big, x, 1.0))), torch.log(torch.expm1(x)))


class ScoreEntropyDiffusion(DiffusionProcess):
    """The SEDD process: forward noise, the denoising score entropy, its NELBO, two samplers.

    The state space picks the subclass (:class:`AbsorbingSEDD`, :class:`UniformSEDD`; by name:
    :func:`make_sedd`); the denoiser's time argument is ``sigma_bar(t)`` (module docstring).

    Time range: uniforms u in [0, 1) become ``t = t_min + (1 - t_min) u`` and the estimator carries
    the Jacobian ``1 - t_min``, as GenMD4's. ``t_min = 0`` (the default) integrates over all of
    [0, 1]: the loglinear noise starts at sigma_bar(0) = 0 and the integrand stays finite in
    expectation, so nothing is truncated. ``t_min = 1e-3`` reproduces the SEDD code's training draws
    ``t ~ U[1e-3, 1]``; the part below t_min then moves into the reconstruction term.

    Endpoint rule (``endpoint_terms``), chosen so that ``nelbo`` is an unbiased estimate of an
    upper bound on ``-log p_model(x0)`` for the stated model (SEDD Theorem 3.6 plus a decoder):

    * prior at t = 1, ``sum_n KL(q_1(. | x0[n]) || pi)``: absorbing: ``pi`` leaves a token unmasked
      with probability ``alpha_1 = exp(-sigma_bar(1))``, uniformly (MD4's rule), giving
      ``N alpha_1 log V`` (= N eps log V for loglinear); uniform: ``pi`` is uniform, giving
      ``N [q_s log(V q_s) + (V - 1) q_d log(V q_d)]`` with ``q_d = (1 - alpha_1) / V``,
      ``q_s = alpha_1 + q_d``.
    * reconstruction at t_min (non-zero when ``sigma_bar(t_min) > 0``: t_min > 0, or geometric
      noise, which starts at sigma_min): absorbing: a token still masked is predicted uniformly,
      ``N (1 - alpha_{t_min}) log V``; uniform: the decoder ``p(x0[n] = a | xt[n] = b) = K(b | a)``
      (a distribution in a because K is symmetric), giving ``N H(K_{t_min}(. | a))``.

    With ``t_min = 0`` and the loglinear noise only the prior term remains. The sampler's own
    start (all-mask for absorbing, uniform tokens for uniform) differs from ``pi`` by O(alpha_1).
    """

    def __init__(self, vocab_size: int, schedule: Schedule, t_min: float = 0.0, method: str = "analytic") -> None:
        """``method``: the reverse step, ``analytic`` (Tweedie tau-leaping) or ``euler``."""
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if not 0.0 <= t_min < 1.0:
            raise ValueError(f"t_min must be in [0, 1), got {t_min}")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.schedule = schedule
        self.t_min = t_min
        self.method = method

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, schedule={self.schedule}, t_min={self.t_min}, "
                f"method={self.method!r})")

    # -- noise -----------------------------------------------------------------------------
    def sigma_bar(self, t: Tensor) -> Tensor:
        """Total noise sigma_bar(t), float64."""
        return self.schedule.sigma_bar(torch.as_tensor(t, dtype=torch.float64))

    def dsigma(self, t: Tensor) -> Tensor:
        """Noise rate sigma(t) = d sigma_bar / dt, float64."""
        return self.schedule.rate(torch.as_tensor(t, dtype=torch.float64))

    def alpha(self, t: Tensor) -> Tensor:
        """exp(-sigma_bar(t)): the probability that a token has not been hit by the noise yet."""
        return torch.exp(-self.sigma_bar(t))

    def one_minus_alpha(self, t: Tensor) -> Tensor:
        """1 - exp(-sigma_bar(t)) (masking / resampling probability), exact near t = 0."""
        return -torch.expm1(-self.sigma_bar(t))

    def forward_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Noise each token of ``x0`` [B, N] independently to time t [B]; returns ``(xt, hit)``.

        ``hit`` [B, N] bool marks the tokens the noise reached (probability 1 - exp(-sigma_bar)):
        see the state space's ``corrupt``. ``noise``: optional uniforms [B, N] (float64).
        """
        if noise is None:
            noise = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=generator)
        return self.corrupt(x0, noise, self.one_minus_alpha(t.double().to(x0.device))[:, None])

    # -- losses ----------------------------------------------------------------------------
    @abstractmethod
    def score_entropy(self, raw: Tensor, x0: Tensor, xt: Tensor, sigma_bar: Tensor, dsigma: Tensor) -> Tensor:
        """Denoising score entropy times sigma(t), summed over positions, ``[B]`` (at least float32).

        ``raw`` [B, N, V]: the network output (its log-scores: module docstring); ``x0``/``xt``
        [B, N], ``sigma_bar`` and ``dsigma`` [B]. >= 0, and 0 exactly at the conditional ratios
        ``p_t(y | x0) / p_t(xt | x0)``; its integral over t is the NELBO.
        """

    @abstractmethod
    def endpoint_terms(self, seq_len: int) -> float:
        """Reconstruction at t_min plus prior at t = 1, nats per sequence (class docstring)."""

    def nelbo(self, denoiser: Denoiser, x0: Tensor, t: Tensor | None = None, antithetic: bool = True,
              noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Continuous-time negative ELBO, nats per sequence ``[B]``, one t per sequence.

        ``(1 - t_min) * score_entropy at t`` (the dsigma-weighted DSE, unbiased for its integral over
        [t_min, 1] when t ~ U[t_min, 1]) plus ``endpoint_terms``. ``t``: optional times [B] in
        [t_min, 1] (default: ``sample_times``); ``noise``: optional uniforms [B, N] deciding the
        forward noise. The denoiser is called as ``denoiser(xt, sigma_bar(t))``.
        """
        if t is None:
            t = self.sample_times(x0.shape[0], x0.device, antithetic, generator)
        t = t.double()
        xt, _ = self.forward_sample(x0, t, noise, generator)
        sb, ds = self.sigma_bar(t), self.dsigma(t)
        loss = self.score_entropy(denoiser(xt, sb), x0, xt, sb, ds)
        return (1.0 - self.t_min) * loss + self.endpoint_terms(x0.shape[1])

    # -- sampling --------------------------------------------------------------------------
    def network_time(self, t: Tensor) -> Tensor:
        return self.sigma_bar(t)

    # -- exact answers ---------------------------------------------------------------------
    def hit_probability(self, t: Tensor) -> Tensor:
        return self.one_minus_alpha(t)[:, None].expand(-1, self.vocab_size)

    def input_hit_probability(self, time: Tensor) -> Tensor:
        """The network is told sigma_bar: a token has been hit with probability 1 - exp(-sigma_bar)."""
        return (-torch.expm1(-time.double()))[:, None].expand(-1, self.vocab_size)

    @abstractmethod
    def reverse_probs(self, raw: Tensor, x: Tensor, t: Tensor, s: Tensor | None, method: str | None = None) -> Tensor:
        """Transition probabilities of one reverse step t -> s for M positions, float64 ``[M, S]``.

        ``raw`` [M, V]: the network output at those positions (called at sigma_bar(t)); ``x`` [M]:
        their current tokens (all masked for absorbing); ``s = None``: the denoising step, which
        removes all remaining noise (to sigma_bar = 0). Columns: the V real tokens, plus "stay
        masked" last for absorbing (S = V + 1); S = V for uniform.

        absorbing (l = raw - log V, so s_y = r e^{l_y} with r = 1 / (exp(sigma_bar_t) - 1)):

        * ``euler``: to y with probability ``(t - s) sigma(t) s_y``; stays masked otherwise;
        * ``analytic`` (Tweedie tau-leaping, SEDD's staggered score): to y with probability
          ``(exp(Delta) - 1) s_y``, Delta = sigma_bar(t) - sigma_bar(s); with the true scores
          (s = r mu) this is ``(alpha_s - alpha_t) / (1 - alpha_t) mu_y``, MD4's exact step;
        * denoising: to y with probability proportional to s_y (the analytic step to
          sigma_bar = 0 with the mask state dropped); nothing stays masked.

        uniform (s_y = exp(raw_y), s_x = 1): ``euler`` moves to y != x with probability
        ``(t - s) sigma(t) s_y / V``; ``analytic`` with probability ``[exp(-Delta Q) s]_y K_Delta(x | y)``
        (the staggered score times the forward kernel; the row sums to s_x = 1 identically), which
        for a single token with the true scores is the exact reverse kernel p_s(y) K(x | y) / p_t(x);
        denoising is the analytic step with Delta = sigma_bar(t). ``method``: default ``self.method``.

        Negative entries (free scores, large steps) are clipped to 0 and rows renormalised, as the
        SEDD code's categorical draw does.
        """

    def step(self, output: Tensor, x: Tensor, active: Tensor, t: Tensor, s: Tensor,
             generator: torch.Generator | None = None) -> Tensor:
        """``method``'s step t -> s; the last step (s = 0) is the denoising step, which removes all
        remaining noise (see ``reverse_probs``), so the number of steps bounds the NFE. The
        absorbing columns' "stay masked" index V is the mask id."""
        probs = self.reverse_probs(output[active], x[active], t, None if s == 0 else s)
        x[active] = sample_categorical(probs, generator)
        return x

    @staticmethod
    def _clip(probs: Tensor) -> Tensor:
        """Negative entries (free scores, large steps) are clipped to 0 and rows renormalised, as the
        SEDD code's categorical draw does."""
        probs = probs.clamp_min(0.0)
        return probs / probs.sum(-1, keepdim=True)


class AbsorbingSEDD(AbsorbingState, ScoreEntropyDiffusion):
    """SEDD on the absorbing graph: ``log s_y = raw_y - log(exp(sigma_bar) - 1) - log V``."""

    def score_entropy(self, raw: Tensor, x0: Tensor, xt: Tensor, sigma_bar: Tensor, dsigma: Tensor) -> Tensor:
        """Per masked position, with r = 1 / (exp(sigma_bar) - 1) and l = log(s / r) = raw - log V:
        ``sum_y s_y - r log s_{x0} + r (log r - 1) = r [sum_{y != x0} e^{l_y} + (e^{l_{x0}} - l_{x0} - 1)]``;
        the form keeps the r log r cancellation exact and is >= 0 term by term. Weight ``sigma r``,
        which is MD4's ``-alpha' / (1 - alpha)``. Rows with sigma_bar = 0 (nothing is masked) give 0.
        """
        dtype = torch.promote_types(raw.dtype, torch.float32)
        # log(s / r) = raw - log V exactly: no round trip through log r (infinite at sigma_bar = 0).
        log_ratio = raw.to(dtype) - math.log(self.vocab_size)
        sb, ds = sigma_bar.double(), dsigma.double()
        log_r = -log_expm1(sb)
        live = torch.isfinite(log_r)
        weight = torch.where(live, ds * torch.exp(torch.where(live, log_r, 0.0)), 0.0)  # sigma r
        active = (xt == self.mask_id) & live[:, None]
        # Inputs of inactive positions are replaced before use, so that infinite log-scores there
        # (sigma_bar = 0) give neither NaN values nor NaN gradients.
        log_ratio = torch.where(active[..., None], log_ratio, torch.zeros_like(log_ratio))
        l_x0 = log_ratio.gather(-1, x0[..., None])[..., 0]
        per = log_ratio.exp().sum(-1) - l_x0 - 1.0
        per = torch.where(active, per, torch.zeros_like(per))
        return weight.to(dtype) * per.sum(-1)

    def endpoint_terms(self, seq_len: int) -> float:
        sb0 = self.sigma_bar(torch.tensor(self.t_min, dtype=torch.float64))
        sb1 = self.sigma_bar(torch.tensor(1.0, dtype=torch.float64))
        return seq_len * float(-torch.expm1(-sb0) + torch.exp(-sb1)) * math.log(self.vocab_size)

    def exact_output(self, log_posterior: Tensor, xt: Tensor, kernel: Tensor) -> Tensor:
        """The raw output of the true scores: ``log mu + log V`` (module docstring)."""
        return log_posterior + math.log(self.vocab_size)

    def reverse_probs(self, raw: Tensor, x: Tensor, t: Tensor, s: Tensor | None, method: str | None = None) -> Tensor:
        """Columns: the V real tokens, then "stay masked" (see ``ScoreEntropyDiffusion.reverse_probs``)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=raw.device)
        sb_t = self.sigma_bar(t)
        move = (raw.double() - math.log(self.vocab_size)).exp()  # s / r
        if s is None:
            return self._clip(torch.cat([move, torch.zeros_like(move[:, :1])], -1))
        s = torch.as_tensor(s, dtype=torch.float64, device=raw.device)
        if (method or self.method) == "euler":
            coef = (t - s) * self.dsigma(t) * torch.exp(-log_expm1(sb_t))
        else:
            coef = torch.exp(log_expm1(sb_t - self.sigma_bar(s)) - log_expm1(sb_t))
        move = coef * move
        return self._clip(torch.cat([move, 1.0 - move.sum(-1, keepdim=True)], -1))


class UniformSEDD(UniformState, ScoreEntropyDiffusion):
    """SEDD on the uniform graph: ``log s_y = raw_y``; the entry ``y = xt[n]`` is ignored."""

    def score_entropy(self, raw: Tensor, x0: Tensor, xt: Tensor, sigma_bar: Tensor, dsigma: Tensor) -> Tensor:
        """For y != x = xt[n] the target ratio is ``c_y = K(y | x0[n]) / K(x | x0[n])``:
        x = x0[n]: ``c_y = rho = E / (E + V)`` for all y (E = exp(sigma_bar) - 1);
        x != x0[n]: ``c_{x0} = 1 / rho``, ``c_y = 1`` otherwise. Each term
        ``s - c log s + c (log c - 1) = c h(s / c)`` with ``h(u) = u - log u - 1 >= 0`` (0 iff s = c),
        computed as ``c (expm1(z) - z)``, ``z = log s - log c``. Weight ``sigma / V`` (Q's off-diagonal).
        """
        dtype = torch.promote_types(raw.dtype, torch.float32)
        log_scores = raw.to(dtype)
        V = self.vocab_size
        sb, ds = sigma_bar.double(), dsigma.double()
        log_e = log_expm1(sb)  # -inf at sigma_bar = 0
        log_rho = log_e - torch.log(torch.expm1(sb) + V)
        live = torch.isfinite(log_rho)
        log_rho = torch.where(live, log_rho, 0.0)
        ys = torch.arange(V, device=xt.device)
        same = (xt == x0)[..., None]  # [B, N, 1]
        is_x = ys == xt[..., None]  # [B, N, V]
        is_x0 = ys == x0[..., None]
        lr = log_rho.to(dtype)[:, None, None]
        zero = torch.zeros((), dtype=dtype, device=xt.device)
        log_c = torch.where(same, lr, torch.where(is_x0, -lr, zero))
        z = log_scores - log_c
        term = log_c.exp() * (torch.expm1(z) - z)
        # sigma_bar = 0: rho = 0, the limit of c h(s / c) is s when x = x0; x != x0 cannot happen.
        dead = ~live[:, None, None]
        term = torch.where(dead & same, log_scores.exp(), torch.where(dead, zero, term))
        term = torch.where(is_x, zero, term)
        return (ds / V).to(dtype) * term.sum((-1, -2))

    def endpoint_terms(self, seq_len: int) -> float:
        V = self.vocab_size
        sb0 = self.sigma_bar(torch.tensor(self.t_min, dtype=torch.float64))
        sb1 = self.sigma_bar(torch.tensor(1.0, dtype=torch.float64))
        q_d0 = -torch.expm1(-sb0) / V
        q_s0 = torch.exp(-sb0) + q_d0
        recon = -(torch.special.xlogy(q_s0, q_s0) + (V - 1) * torch.special.xlogy(q_d0, q_d0))
        q_d1 = -torch.expm1(-sb1) / V
        q_s1 = torch.exp(-sb1) + q_d1
        prior = q_s1 * torch.log1p((V - 1) * torch.exp(-sb1)) + (V - 1) * torch.special.xlogy(q_d1, V * q_d1)
        return seq_len * float(recon + prior)

    def exact_output(self, log_posterior: Tensor, xt: Tensor, kernel: Tensor) -> Tensor:
        """The true log-scores ``log p_t(x with x_n = y) / p_t(x) = log sum_v mu(v) K(y | v) / K(x_n | v)``
        (mu the posterior of the clean token): the raw output of the uniform graph."""
        log_k = kernel.log()  # [B, V, S]
        log_k_seen = log_k.gather(2, xt[:, None, :].expand(-1, self.vocab_size, -1)).transpose(1, 2)  # [B, N, V]
        # A clean value that cannot give what is seen (K = 0: no noise yet) has posterior 0.
        ratio = torch.where(torch.isfinite(log_k_seen), log_posterior - log_k_seen, -torch.inf)
        return torch.logsumexp(ratio[..., None] + log_k[:, None], dim=2)  # over the clean value: [B, N, V (y)]

    def reverse_probs(self, raw: Tensor, x: Tensor, t: Tensor, s: Tensor | None, method: str | None = None) -> Tensor:
        """Columns: the V real tokens (see ``ScoreEntropyDiffusion.reverse_probs``)."""
        V = self.vocab_size
        t = torch.as_tensor(t, dtype=torch.float64, device=raw.device)
        sb_t = self.sigma_bar(t)
        # s - 1 by expm1: near the prior all scores are ~1 and their differences are what counts.
        score_m1 = torch.expm1(raw.double()).scatter(-1, x[:, None], 0.0)
        onehot = torch.nn.functional.one_hot(x, V).double()
        if s is not None:
            s = torch.as_tensor(s, dtype=torch.float64, device=raw.device)
        if s is not None and (method or self.method) == "euler":
            move = (t - s) * self.dsigma(t) / V * (1.0 + score_m1) * (1.0 - onehot)
            return self._clip(move + (1.0 - move.sum(-1, keepdim=True)) * onehot)
        delta = sb_t if s is None else sb_t - self.sigma_bar(s)
        # [exp(-Delta Q) s]_y = e^Delta s_y + (1 - e^Delta) mean(s) = e^Delta (s_y - mean s) + mean s
        mean_m1 = score_m1.mean(-1, keepdim=True)
        stag = torch.exp(delta) * (score_m1 - mean_m1) + (1.0 + mean_m1)
        kern = torch.exp(-delta) * onehot - torch.expm1(-delta) / V  # K_Delta(x | y)
        return self._clip(stag * kern)


# The state space is chosen once, by name (the module's ``state_space``), here.
SEDD_PROCESSES: dict[str, type[ScoreEntropyDiffusion]] = {"absorbing": AbsorbingSEDD, "uniform": UniformSEDD}
SEDD_SCHEDULES = ("loglinear", "geometric")


def make_sedd(vocab_size: int, schedule: str = "loglinear", state_space: str = "absorbing", eps: float = 1e-3,
              sigma_min: float = 1e-4, sigma_max: float = 20.0, t_min: float = 0.0,
              method: str = "analytic") -> ScoreEntropyDiffusion:
    """The SEDD process by names: ``schedule`` ``loglinear`` (eps) or ``geometric`` (sigma_min,
    sigma_max); ``state_space`` ``absorbing`` or ``uniform``."""
    schedules = {"loglinear": lambda: LogLinear(eps), "geometric": lambda: Geometric(sigma_min, sigma_max)}
    if schedule not in schedules:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SEDD_SCHEDULES}")
    if state_space not in SEDD_PROCESSES:
        raise ValueError(f"unknown state_space {state_space!r}; choose one of {sorted(SEDD_PROCESSES)}")
    return SEDD_PROCESSES[state_space](vocab_size, schedules[schedule](), t_min, method)
