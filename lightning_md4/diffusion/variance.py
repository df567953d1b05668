"""Variance of the NELBO estimator and of its gradient over repeated noise draws (pure torch).

The continuous-time ELBO is the same number under any schedule (paper, section 4), but its
one-draw Monte Carlo estimate is not equally noisy: the schedule sets how the uniform times are
spread over masking rates (the time weighting), antithetic times stratify the draws over the
batch, and noising each sequence ``m`` times averages ``m`` draws. These functions measure that
noise on a fixed batch, for a fixed network, by redrawing the times and masks ``K`` times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_md4.diffusion.sampling import Denoiser


def nelbo_estimate(process, denoiser: Denoiser, x0: Tensor, samples_per_sequence: int = 1,
                   antithetic: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """One draw of the per-batch NELBO estimate, nats per token (a scalar).

    Every sequence of ``x0`` ``[B, N]`` is noised ``m = samples_per_sequence`` times; the estimate
    is the mean of the ``B * m`` one-draw NELBOs over sequences and tokens. With ``antithetic``
    the ``B * m`` times are stratified together, as training stratifies over the global batch.

    Args:
        process: any of the suite's processes (``nelbo(denoiser, x0, antithetic=, generator=)``).
    """
    if samples_per_sequence < 1:
        raise ValueError(f"samples_per_sequence must be >= 1, got {samples_per_sequence}")
    x = x0.repeat_interleave(samples_per_sequence, dim=0)  # [B * m, N]
    return process.nelbo(denoiser, x, antithetic=antithetic, generator=generator).mean() / x0.shape[1]


@dataclass
class EstimatorStats:
    """Sample statistics over ``K`` draws (variances unbiased, divided by ``K - 1``).

    ``grad_var`` is the total variance of the gradient vector, ``E ||g - E g||^2`` (the trace of its
    covariance), which is what slows SGD; ``grad_norm_var`` is the variance of ``||g||``.
    """

    nelbo_mean: float
    nelbo_var: float
    grad_norm_mean: float
    grad_norm_var: float
    grad_var: float


def estimator_stats(estimate: Callable[[], Tensor], params: list[Tensor], draws: int) -> EstimatorStats:
    """Call ``estimate()`` (a fresh noise draw each time, a scalar differentiable in ``params``)
    ``draws`` times and return the spread of its value and of its gradient.

    Only the running sum of gradients is kept, so memory is one extra copy of ``params``.
    """
    if draws < 2:
        raise ValueError(f"draws must be >= 2 to estimate a variance, got {draws}")
    values, norms_sq = [], []
    grad_sum: Tensor | None = None
    for _ in range(draws):
        value = estimate()
        grads = torch.autograd.grad(value, params, allow_unused=True)
        g = torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1).double()
                       for gr, p in zip(grads, params)])
        values.append(value.detach().double())
        norms_sq.append(g.square().sum())
        grad_sum = g if grad_sum is None else grad_sum + g
    values_t, norms_sq_t = torch.stack(values), torch.stack(norms_sq)
    norms = norms_sq_t.sqrt()
    # sum_k ||g_k - mean||^2 = sum_k ||g_k||^2 - ||sum_k g_k||^2 / K
    grad_var = (norms_sq_t.sum() - grad_sum.square().sum() / draws) / (draws - 1)
    return EstimatorStats(
        nelbo_mean=float(values_t.mean()), nelbo_var=float(values_t.var()),
        grad_norm_mean=float(norms.mean()), grad_norm_var=float(norms.var()),
        grad_var=float(grad_var.clamp(min=0.0)))
