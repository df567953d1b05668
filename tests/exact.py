"""Exact float64 references on distributions small enough to enumerate."""

from __future__ import annotations

import itertools

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


def empirical_tv(samples: Tensor, configs: Tensor, probs: Tensor) -> float:
    """Total-variation distance between the empirical law of ``samples`` [S, N] and ``probs``."""
    V = int(configs.max()) + 1
    base = V ** torch.arange(configs.shape[1] - 1, -1, -1)
    codes = (samples * base).sum(-1)
    counts = torch.bincount(codes, minlength=len(probs)).double()
    return 0.5 * (counts / counts.sum() - probs).abs().sum().item()
