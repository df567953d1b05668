"""GenMD4: masked diffusion with a learned per-token schedule (Shi et al. 2024, section 5, eq. 12).

A token whose clean value is v is still clean at time t with probability
``alpha_t(v) = 1 - (1 - eps) t^{w_v}``, with one exponent ``w_v = softplus(raw_v)`` per vocabulary
entry, learned jointly with the denoiser. The masks depend on w, so w's gradient has a
score-function (REINFORCE) part; ``surrogate_loss`` gives an objective whose gradient is unbiased
for the NELBO's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_md4.diffusion.base import AbsorbingState, DiffusionProcess
from lightning_md4.diffusion.sampling import Denoiser, sample_categorical


class PerTokenSchedule(nn.Module):
    """alpha_t(v) = 1 - (1 - eps) t^{w_v}; ``w = softplus(raw)`` ``[V]``, initialised to ``w_init``."""

    def __init__(self, vocab_size: int, w_init: float = 1.0, eps: float = 1e-4) -> None:
        super().__init__()
        if w_init <= 0:
            raise ValueError(f"w_init must be > 0, got {w_init}")
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        self.eps = eps
        raw = math.log(math.expm1(w_init))  # inverse softplus
        self.raw = nn.Parameter(torch.full((vocab_size,), raw))

    @property
    def w(self) -> Tensor:
        return F.softplus(self.raw)

    def log_mask_prob(self, w: Tensor, t: Tensor) -> Tensor:
        """log(1 - alpha_t) = log(1 - eps) + w log t, elementwise (w and t broadcast)."""
        return math.log1p(-self.eps) + w * torch.log(t)

    def mask_prob(self, w: Tensor, t: Tensor) -> Tensor:
        return torch.exp(self.log_mask_prob(w, t))

    def log_keep_prob(self, w: Tensor, t: Tensor) -> Tensor:
        """log alpha_t = log(1 - (1 - eps) t^w), never log(0) for eps > 0 (expm1 keeps precision near t = 0)."""
        return torch.log(-torch.expm1(self.log_mask_prob(w, t)))


class GenMaskedDiffusion(AbsorbingState, DiffusionProcess):
    """The GenMD4 process with the same public API as ``MaskedDiffusion``.

    Times live in ``[t_min, 1]``: a uniform draw u becomes ``t = t_min + (1 - t_min) u`` and the
    estimator carries the Jacobian ``1 - t_min``. Endpoint terms: the reconstruction term at
    t_min (``reconstruction``; it depends on w and is differentiated directly) plus MD4's prior
    term ``N eps log V`` at t = 1.
    """

    def __init__(self, schedule: PerTokenSchedule, vocab_size: int, t_min: float = 1e-3) -> None:
        if not 0.0 <= t_min < 1.0:
            raise ValueError(f"t_min must be in [0, 1), got {t_min}")
        self.schedule = schedule
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.t_min = t_min

    # -- forward process -------------------------------------------------------------------
    def forward_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Mask token n of ``x0`` [B, N] with probability 1 - alpha_t(x0[n]); ``(xt, mask)``."""
        if noise is None:
            noise = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=generator)
        w = self.schedule.w.detach().double()[x0]
        return self.corrupt(x0, noise, self.schedule.mask_prob(w, t.double()[:, None]))

    def hit_probability(self, t: Tensor) -> Tensor:
        """1 - alpha_t(v) ``[B, V]`` float64: each value masks at its own rate."""
        w = self.schedule.w.detach().double().to(t.device)
        return self.schedule.mask_prob(w[None], t.double()[:, None])

    def expected_endpoint_terms(self, law) -> float:
        """E over x0 ~ ``law`` of the reconstruction (which depends on x0 through w) and the prior."""
        with torch.no_grad():
            terms = self.endpoint_terms(law.configs.to(self.schedule.raw.device)).double().cpu()
        return float((law.probs * terms).sum())

    def log_q(self, x0: Tensor, t: Tensor, mask: Tensor) -> Tensor:
        """log q(xt | x0) ``[B]`` in closed form, differentiable in w."""
        w = self.schedule.w[x0]  # [B, N]
        t = t.to(w.dtype)[:, None]
        logp = torch.where(mask, self.schedule.log_mask_prob(w, t), self.schedule.log_keep_prob(w, t))
        return logp.sum(-1)

    def log_decoder(self) -> Tensor:
        """log p(x0 = v | masked at t_min) ``[V]``: the paper's decoder for a token still masked at t_min.

        A uniform prior over v times the probability that v is masked at t_min, normalised:
        ``(1 - alpha_{t_min}(v)) / sum_u (1 - alpha_{t_min}(u)) = softmax_v(w_v log t_min)``
        ((1 - eps) cancels). Equal w give the uniform decoder; otherwise values with small
        exponents, the ones likely to be still masked, get the mass. Needs t_min > 0.
        """
        log_t_min = math.log(self.t_min)
        return torch.log_softmax(self.schedule.w * log_t_min, dim=-1)

    def reconstruction(self, x0: Tensor) -> Tensor:
        """E_q[-log p(x0 | x_{t_min})] for ``x0`` [B, N], nats ``[B]``, differentiable in w.

        Visible tokens are copied (no cost); token n is still masked with probability
        ``1 - alpha_{t_min}(x0[n])`` and then costs ``-log_decoder()[x0[n]]``.
        """
        if self.t_min == 0.0:  # nothing is masked at t = 0; the decoder's log t_min would be -inf
            return torch.zeros(x0.shape[0], dtype=self.schedule.raw.dtype, device=x0.device)
        t_min = torch.full((), self.t_min, dtype=self.schedule.raw.dtype, device=x0.device)  # no host copy
        still_masked = self.schedule.mask_prob(self.schedule.w[x0], t_min)  # [B, N]
        return -(still_masked * self.log_decoder()[x0]).sum(-1)

    def endpoint_terms(self, x0: Tensor) -> Tensor:
        """Reconstruction at t_min plus the prior at t = 1, nats ``[B]``, differentiable in w."""
        return self.reconstruction(x0) + x0.shape[1] * self.schedule.eps * math.log(self.vocab_size)

    # -- losses ----------------------------------------------------------------------------
    def integrand(self, logits: Tensor, x0: Tensor, mask: Tensor, t: Tensor) -> Tensor:
        """Paper eq. 12 at one t, summed over masked positions, ``[B]``.

        Per masked n: ``sum_v (w_v / t) [mu_v - (log mu_{x0} + 1) onehot(x0)_v]``, which is
        ``-(w/t) log mu_{x0}`` (MD4's) when all w are equal. Computed in at least float32.
        """
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logp = torch.log_softmax(logits.to(dtype), dim=-1)  # [B, N, V]
        w = self.schedule.w.to(dtype)
        log_mu_x0 = logp.gather(-1, x0[..., None])[..., 0]
        expected_w = (logp.exp() * w).sum(-1)  # sum_v w_v mu_v
        per_token = expected_w - w[x0] * (log_mu_x0 + 1.0)
        return (per_token * mask).sum(-1) / t.to(dtype)

    def _loss(self, denoiser: Denoiser, x0: Tensor, t: Tensor, noise: Tensor | None,
              generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """One draw: ``(loss [B], log q(xt | x0) [B])``."""
        xt, mask = self.forward_sample(x0, t, noise, generator)
        loss = (1.0 - self.t_min) * self.integrand(denoiser(xt, t), x0, mask, t)
        loss = loss + self.endpoint_terms(x0).to(loss.dtype)
        return loss, self.log_q(x0, t, mask)

    def nelbo(self, denoiser: Denoiser, x0: Tensor, t: Tensor | None = None, antithetic: bool = True,
              noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """The GenMD4 negative ELBO, nats per sequence ``[B]``, one t in [t_min, 1] per sequence.

        Its gradient in w misses the score-function term: train with ``surrogate_loss``.
        """
        if t is None:
            t = self.sample_times(x0.shape[0], x0.device, antithetic, generator)
        return self._loss(denoiser, x0, t, noise, generator)[0]

    def surrogate_loss(self, denoiser: Denoiser, x0: Tensor, t: Tensor | None = None, antithetic: bool = True,
                       noise: tuple[Tensor, Tensor] | Tensor | None = None, estimator: str = "rloo",
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The training objective and the NELBO to report, both ``[B]``.

        ``estimator="rloo"`` (the paper's): two masks of the same (x0, t), losses f1, f2:
        ``(f1 + f2) / 2 + 0.5 * stopgrad(f1 - f2) * (log q1 - log q2)``, reported NELBO (f1 + f2)/2.
        ``estimator="batch"``: one mask per sequence (MD4's compute) and a leave-one-out baseline
        from the other sequences of the batch: ``f + stopgrad(f - mean_{j != i} f_j) log q``.
        Both are unbiased for the NELBO's gradient in w and the denoiser.
        ``noise``: the mask uniforms, a pair for ``rloo``.
        """
        if t is None:
            t = self.sample_times(x0.shape[0], x0.device, antithetic, generator)
        if estimator == "rloo":
            n1, n2 = noise if noise is not None else (None, None)
            f1, log_q1 = self._loss(denoiser, x0, t, n1, generator)
            f2, log_q2 = self._loss(denoiser, x0, t, n2, generator)
            nelbo = 0.5 * (f1 + f2)
            return nelbo + 0.5 * (f1 - f2).detach() * (log_q1 - log_q2), nelbo.detach()
        if estimator == "batch":
            if x0.shape[0] < 2:
                raise ValueError("the batch leave-one-out estimator needs at least 2 sequences per batch")
            f, log_q = self._loss(denoiser, x0, t, noise, generator)
            baseline = (f.sum() - f) / (f.shape[0] - 1)
            return f + (f - baseline).detach() * log_q, f.detach()
        raise ValueError(f"unknown estimator {estimator!r}; choose 'rloo' or 'batch'")

    # -- sampling --------------------------------------------------------------------------
    def step(self, output: Tensor, x: Tensor, active: Tensor, t: Tensor, s: Tensor,
             generator: torch.Generator | None = None) -> Tensor:
        """One ancestral step t -> s with per-token schedules, from the logits ``output`` [B, N, V].

        For a masked position the exact reverse step given the clean token v reveals it with
        probability ``r_v = (alpha_s(v) - alpha_t(v)) / (1 - alpha_t(v))``. v is unknown, so each
        step draws v from the model's posterior mu (float64) and then reveals the position with
        probability r_v, else leaves it masked: the transition ``P(x_s = v) = mu_v r_v``,
        ``P(stay masked) = 1 - sum_v mu_v r_v``, which is the exact reverse step when mu is the
        true posterior p(x0[n] | xt) (the optimum of eq. 12).
        """
        w = self.schedule.w.detach().double().to(x.device)
        probs = torch.softmax(output[active].double(), dim=-1)  # [M, V]
        v = sample_categorical(probs, generator)
        # (alpha_s - alpha_t) / (1 - alpha_t) = 1 - (1 - alpha_s) / (1 - alpha_t) = 1 - (s / t)^w
        reveal_prob = -torch.expm1(w[v] * torch.log(s / t))
        u = torch.rand(v.shape, dtype=torch.float64, device=x.device, generator=generator)
        x[active] = torch.where(u < reveal_prob, v, self.mask_id)
        return x
