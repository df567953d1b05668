"""MD4: masked diffusion with a scalar schedule (Shi et al. 2024, sections 2-4).

Tokens are ids ``0..V-1``; the mask id is ``V``. The denoiser maps ``(xt [B, N], t [B])`` to logits
``[B, N, V]`` over the V real tokens: it never predicts the mask.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_md4.diffusion.base import AbsorbingState, DiffusionProcess
from lightning_md4.diffusion.cross_entropy import cross_entropy
from lightning_md4.diffusion.sampling import Denoiser, sample_categorical
from lightning_md4.diffusion.schedules import Schedule


def masked_cross_entropy(logits: Tensor, x0: Tensor, mask: Tensor, chunk_rows: int | None = None) -> Tensor:
    """Sum over masked positions of -log softmax(logits)[x0], ``[B]``.

    Computed in at least float32 (float64 logits stay float64) whatever the network's precision;
    ``chunk_rows``: see :func:`lightning_md4.diffusion.cross_entropy.cross_entropy`.
    """
    B, N, V = logits.shape
    ce = cross_entropy(logits.reshape(B * N, V), x0.reshape(B * N), chunk_rows)
    return (ce.view(B, N) * mask).sum(-1)


class MaskedDiffusion(AbsorbingState, DiffusionProcess):
    """The MD4 process: forward masking, the continuous and discrete NELBOs, the ancestral step.

    Endpoint rule: when the schedule does not reach alpha(0) = 1 and alpha(1) = 0 (clipping, the
    geometric schedule), ``nelbo`` adds both endpoint terms, each exact for the stated choice of
    model: the reconstruction term ``N (1 - alpha_0) log V`` (a token still masked at t = 0 is
    predicted uniformly) and the prior term ``N alpha_1 log V`` (KL to a prior that leaves a token
    unmasked with probability alpha_1, uniformly). For unclipped linear, cosine and polynomial
    schedules both are zero.
    """

    def __init__(self, schedule: Schedule, vocab_size: int, logits_at: Literal["all", "masked"] = "all",
                 ce_chunk_rows: int | None = None) -> None:
        """Two ways to compute the same loss faster: ``logits_at="masked"`` asks the denoiser for
        logits at masked positions only (it must accept ``positions=``), so the output head runs
        on fewer rows; ``ce_chunk_rows`` computes the cross-entropy in float32 chunks of rows
        instead of on a float32 copy of all the logits."""
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if logits_at not in ("all", "masked"):
            raise ValueError(f"logits_at must be 'all' or 'masked', got {logits_at!r}")
        self.schedule = schedule
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.logits_at = logits_at
        self.ce_chunk_rows = ce_chunk_rows

    # -- forward process -------------------------------------------------------------------
    def forward_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Mask each token of ``x0`` [B, N] independently with probability 1 - alpha(t [B]).

        ``noise``: optional uniforms [B, N] (float64) deciding the masks, for reproducible draws.
        Returns ``(xt [B, N], mask [B, N] bool)``.
        """
        if noise is None:
            noise = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=generator)
        return self.corrupt(x0, noise, self.schedule.one_minus_alpha(t.double())[:, None])

    def hit_probability(self, t: Tensor) -> Tensor:
        """1 - alpha(t) for every token value, ``[B, V]`` float64."""
        return self.schedule.one_minus_alpha(t.double())[:, None].expand(-1, self.vocab_size)

    def endpoint_terms(self, seq_len: int) -> float:
        """Reconstruction plus prior terms in nats per sequence (see the class docstring)."""
        zero, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
        leak = float(self.schedule.one_minus_alpha(zero)) + float(self.schedule.alpha(one))
        return seq_len * leak * math.log(self.vocab_size)

    # -- losses ----------------------------------------------------------------------------
    def cross_entropy(self, denoiser: Denoiser, xt: Tensor, t: Tensor, x0: Tensor, mask: Tensor) -> Tensor:
        """Sum over masked positions of -log p(x0 | xt), ``[B]`` (see ``logits_at``)."""
        if self.logits_at == "all":
            return masked_cross_entropy(denoiser(xt, t), x0, mask, self.ce_chunk_rows)
        logits = denoiser(xt, t, positions=mask)  # [M, V], M = number of masked tokens
        ce = cross_entropy(logits, x0[mask], self.ce_chunk_rows)
        per_token = torch.zeros(mask.shape, dtype=ce.dtype, device=ce.device)
        per_token[mask] = ce
        return per_token.sum(-1)

    def nelbo(self, denoiser: Denoiser, x0: Tensor, t: Tensor | None = None, antithetic: bool = True,
              noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Continuous-time negative ELBO (paper eq. 5), nats per sequence ``[B]``, one t per sequence.

        ``x0``: LongTensor [B, N]; ``t``: optional times [B] in [0, 1]; ``noise``: optional mask
        uniforms [B, N]. The estimate is unbiased for any fixed denoiser.
        """
        return self.loss(denoiser, x0, t, antithetic, noise, generator)[1]

    def loss(self, denoiser: Denoiser, x0: Tensor, t: Tensor | None = None, antithetic: bool = True,
             noise: Tensor | None = None, generator: torch.Generator | None = None,
             ce_weight: float = 0.0) -> tuple[Tensor, Tensor]:
        """``(objective, nelbo)``, nats per sequence ``[B]``, from one network pass.

        ``objective = nelbo + ce_weight * CE`` with ``CE`` the cross-entropy summed over the masked
        positions: a flat, t-independent weight beside the bound's ``-alpha'_t / (1 - alpha_t)``
        (``1/t`` for linear). It is D3PM's hybrid term on MD4 (Austin et al.'s ``lambda`` weighs
        ``lambda T`` against the bound, 10 at lambda 0.01 and T 1000), so the effect of the
        hybrid can be measured on MD4 itself. ``nelbo`` is always the unweighted bound.
        """
        if t is None:
            t = self.sample_times(x0.shape[0], x0.device, antithetic, generator)
        xt, mask = self.forward_sample(x0, t, noise, generator)
        ce = self.cross_entropy(denoiser, xt, t, x0, mask)
        # At t = 0 an unclipped schedule masks nothing and the weight is infinite: the term is 0.
        # The weight itself is zeroed (not only the product), or the backward pass gives 0 * inf = NaN.
        weight = torch.where(mask.any(-1), self.schedule.loss_weight(t.double()), 0.0).to(ce.dtype)
        nelbo = weight * ce + self.endpoint_terms(x0.shape[1])
        return (nelbo + ce_weight * ce if ce_weight else nelbo), nelbo

    def nelbo_discrete(self, denoiser: Denoiser, x0: Tensor, T: int, t: Tensor | None = None,
                       antithetic: bool = True, noise: Tensor | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
        """T-step discrete-time negative ELBO, nats per sequence ``[B]``, one step per sequence.

        Step i in 1..T is chosen by ``i = floor(t T) + 1`` from a uniform time (stratified like
        ``nelbo``); the term ``T (alpha_s - alpha_t) / (1 - alpha_t) CE`` with t = i/T, s = (i-1)/T
        is an unbiased estimate of the sum over all T steps.
        """
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        if t is None:
            t = self.sample_times(x0.shape[0], x0.device, antithetic, generator)
        i = torch.clamp(torch.floor(t.double() * T) + 1, 1, T)
        t_i, s_i = i / T, (i - 1) / T
        xt, mask = self.forward_sample(x0, t_i, noise, generator)
        ce = self.cross_entropy(denoiser, xt, t_i, x0, mask)
        sch = self.schedule
        weight = T * (sch.alpha(s_i) - sch.alpha(t_i)) / sch.one_minus_alpha(t_i)
        return weight.to(ce.dtype) * ce + self.endpoint_terms(x0.shape[1])

    # -- sampling --------------------------------------------------------------------------
    def unmask_probability(self, s: Tensor, t: Tensor) -> Tensor:
        """Probability that a token masked at time t is revealed by time s < t (float64)."""
        sch = self.schedule
        return (sch.alpha(s) - sch.alpha(t)) / sch.one_minus_alpha(t)

    def step(self, output: Tensor, x: Tensor, active: Tensor, t: Tensor, s: Tensor,
             generator: torch.Generator | None = None) -> Tensor:
        """Paper Alg. 2: each masked token is revealed with probability ``unmask_probability(s, t)``
        and then drawn from the softmax of the logits ``output`` [B, N, V]; anything still masked
        at t = 0 takes the argmax (the sampler's final pass, needed by clipped schedules)."""
        reveal = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=generator)
        reveal = active & (reveal < self.unmask_probability(s, t))
        if reveal.any():
            probs = torch.softmax(output[reveal].double(), dim=-1)
            x[reveal] = sample_categorical(probs, generator)
        return x
