"""Pieces of the sampling loop (``diffusion/base.py``): time grids, float64 draws, the output cache."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoiser(xt: LongTensor[B, N], t: Tensor[B]) -> logits Tensor[B, N, V]`` over the V real tokens."""

GRIDS = ("uniform", "cosine")


def time_grid(steps: int, grid: str = "uniform", device: torch.device | str | None = None) -> Tensor:
    """Decreasing times ``1 = t_steps > ... > t_0 = 0``, float64 ``[steps + 1]``.

    ``cosine`` maps a uniform grid through t -> cos(pi/2 (1 - t)); with the linear schedule this
    takes the same steps in alpha as the cosine schedule on a uniform grid (paper section 6).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    if grid == "uniform":
        return u
    if grid == "cosine":
        t = torch.cos(0.5 * math.pi * (1.0 - u))
        t[0], t[-1] = 1.0, 0.0  # exact endpoints despite rounding
        return t
    raise ValueError(f"unknown time grid {grid!r}; choose one of {GRIDS}")


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row of ``probs`` ``[M, V]`` (need not be normalised), by inverse CDF in float64.

    float32 draws (Gumbel-max in particular) under-sample the tail of a large vocabulary, which
    lowers sample diversity and flatters generative perplexity.
    """
    cdf = probs.double().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device, generator=generator)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


class CachedDenoiser:
    """Calls ``denoiser`` and counts evaluations; when ``reuse`` is set (the network ignores t), it
    returns the previous output again as long as the input tokens have not changed.

    ``nfe`` is the number of real network evaluations.
    """

    def __init__(self, denoiser: Denoiser, reuse: bool) -> None:
        self.denoiser = denoiser
        self.reuse = reuse
        self.nfe = 0
        self._last_x: Tensor | None = None
        self._last_out: Tensor | None = None

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self.reuse and self._last_x is not None and torch.equal(x, self._last_x):
            return self._last_out
        out = self.denoiser(x, t)
        self.nfe += 1
        if self.reuse:
            self._last_x, self._last_out = x.clone(), out
        return out


def is_time_conditioned(denoiser: Denoiser) -> bool:
    """Denoisers declare ``time_conditioned = False`` to enable the output cache; default True."""
    return bool(getattr(denoiser, "time_conditioned", True))
