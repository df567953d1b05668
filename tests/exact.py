"""Exact float64 references on distributions small enough to enumerate."""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor


def random_distribution(V: int, N: int, seed: int = 0, concentration: float = 0.3) -> tuple[Tensor, Tensor]:
    """A strongly correlated distribution over all V^N sequences: ``(configs [V^N, N], probs [V^N])``."""
    g = torch.Generator().manual_seed(seed)
    configs = torch.tensor(list(itertools.product(range(V), repeat=N)), dtype=torch.long)
    probs = torch._standard_gamma(torch.full((V**N,), concentration, dtype=torch.float64), generator=g)
    return configs, probs / probs.sum()


class ExactDenoiser:
    """The exact posterior p(x0[n] = v | unmasked tokens of xt), as float64 log-probabilities.

    Time-independent, as the true posterior of masked diffusion is (MD4 section 5).
    """

    time_conditioned = False

    def __init__(self, configs: Tensor, probs: Tensor, mask_id: int) -> None:
        self.configs, self.probs, self.mask_id = configs, probs, mask_id
        self.V = int(configs.max()) + 1
        self.calls = 0

    def __call__(self, xt: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        known = xt != self.mask_id  # [B, N]
        agree = (self.configs[None] == xt[:, None]) | ~known[:, None]  # [B, K, N]
        w = self.probs[None] * agree.all(-1)  # [B, K]
        onehot = torch.nn.functional.one_hot(self.configs, self.V).double()  # [K, N, V]
        post = torch.einsum("bk,knv->bnv", w, onehot) / w.sum(-1)[:, None, None]
        return post.clamp_min(1e-300).log()


def mc_tolerance(law: Tensor, draws: int) -> float:
    """A bound on TV(empirical law of ``draws`` i.i.d. draws, ``law``) that fails with probability
    < 1e-7: E[TV] <= 1/2 sum_k sqrt(p_k (1 - p_k) / draws) (Jensen), and TV moves by at most
    1/draws per draw, so P(TV > E[TV] + eps) <= exp(-2 eps^2 draws) (McDiarmid); eps = 0.015 at
    40000 draws gives exp(-18)."""
    return 0.5 * (law * (1 - law) / draws).sqrt().sum().item() + math.sqrt(18 / (2 * draws))


def empirical_tv(samples: Tensor, configs: Tensor, probs: Tensor) -> float:
    """Total-variation distance between the empirical law of ``samples`` [S, N] and ``probs``."""
    V = int(configs.max()) + 1
    base = V ** torch.arange(configs.shape[1] - 1, -1, -1)
    codes = (samples * base).sum(-1)
    counts = torch.bincount(codes, minlength=len(probs)).double()
    return 0.5 * (counts / counts.sum() - probs).abs().sum().item()
