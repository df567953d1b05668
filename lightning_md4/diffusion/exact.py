"""Exact answers on a data law small enough to enumerate (V^N sequences), in float64.

Every process answers two questions about such a law (``tests/test_contract.py`` asks them of every
registered method): what its optimal network outputs (``exact_denoiser``) and what its NELBO
averages to with that network (``expected_nelbo``). Both rest on the posterior of the clean tokens
given noisy ones, :meth:`EnumeratedLaw.log_posterior`, and the forward process's one-token kernel.

For a continuous-time process the expected NELBO with the exact denoiser has a closed form: the
bound's integral over [t_min, 1] with the true reverse rates is ``I(X0; X_tmin) - I(X0; X_1)``
(mutual informations of the data and its noised version), to which the endpoint terms add their
expectation. With no endpoint terms (alpha_0 = 1, alpha_1 = 0) that is the data entropy: the
bound is tight. A discrete-time process (D3PM) sums its T terms over every reachable x_t instead.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


class EnumeratedLaw:
    """A law over all ``V^N`` sequences: ``configs [K, N]`` (every sequence, in
    ``itertools.product`` order) and ``probs [K]`` float64, summing to 1."""

    def __init__(self, probs: Tensor, vocab_size: int, seq_len: int) -> None:
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.configs = torch.tensor(list(itertools.product(range(vocab_size), repeat=seq_len)), dtype=torch.long)
        self.probs = probs.double() / probs.double().sum()
        if self.probs.shape != (len(self.configs),):
            raise ValueError(f"probs has shape {tuple(probs.shape)}; a law over {vocab_size}^{seq_len} sequences "
                             f"needs {len(self.configs)} entries")

    @classmethod
    def random(cls, vocab_size: int, seq_len: int, seed: int = 0, concentration: float = 0.3) -> EnumeratedLaw:
        """A strongly correlated law: Dirichlet(concentration) weights over the sequences."""
        g = torch.Generator().manual_seed(seed)
        probs = torch._standard_gamma(torch.full((vocab_size**seq_len,), concentration, dtype=torch.float64),
                                      generator=g)
        return cls(probs, vocab_size, seq_len)

    def entropy(self) -> float:
        """H = E[-log p(x0)] in nats per sequence: what a tight bound averages to."""
        return float(-(self.probs * torch.special.xlogy(1.0, self.probs)).sum())

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` sequences ``[n, N]`` drawn from the law."""
        return self.configs[torch.multinomial(self.probs, n, replacement=True, generator=generator)]

    def log_posterior(self, lik: Tensor) -> Tensor:
        """``log p(x0[n] = v | evidence)`` ``[B, N, V]`` from per-token likelihoods ``lik [B, N, V]``
        (``lik[b, n, v]``: probability of what is seen at position n if its clean token is v).

        A position whose likelihoods are all 0 (a time at which it cannot be seen so, e.g. masked
        at t = 0) counts as unseen. Rows of ``lik`` may be given up to a constant factor.
        """
        lik = lik.double()
        lik = torch.where((lik.sum(-1, keepdim=True) > 0), lik, torch.ones_like(lik))
        lik = lik / lik.amax(-1, keepdim=True)
        positions = torch.arange(self.seq_len, device=lik.device)
        joint = self.probs.to(lik.device)[None] * lik[:, positions, self.configs.to(lik.device)].prod(-1)  # [B, K]
        onehot = torch.nn.functional.one_hot(self.configs, self.vocab_size).double().to(lik.device)  # [K, N, V]
        post = torch.einsum("bk,knv->bnv", joint, onehot) / joint.sum(-1)[:, None, None]
        return post.clamp_min(1e-300).log()

    def information(self, kernel: Tensor) -> float:
        """``I(X0; X_t)`` in nats when each token is noised independently by ``kernel [V, S]``
        (``kernel[v, s] = q(x_t[n] = s | x0[n] = v)``), every ``S^N`` noisy sequence enumerated."""
        kernel = kernel.double()
        states = torch.tensor(list(itertools.product(range(kernel.shape[1]), repeat=self.seq_len)), dtype=torch.long)
        given = kernel[self.configs[:, None, :], states[None, :, :]].prod(-1)  # q(x_t | x0) [K, S^N]
        marginal = self.probs @ given
        ratio = torch.where(given > 0, given / marginal.clamp_min(1e-300), 1.0)
        return float((self.probs[:, None] * given * ratio.log()).sum())

    def reachable(self, kernel: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Every (clean, noisy) pair with its probability: ``(x0 [R, N], xt [R, N], weight [R])``,
        ``weight = p(x0) q(x_t | x0)`` > 0 under the one-token ``kernel [V, S]``."""
        kernel = kernel.double()
        states = torch.tensor(list(itertools.product(range(kernel.shape[1]), repeat=self.seq_len)), dtype=torch.long)
        weight = self.probs[:, None] * kernel[self.configs[:, None, :], states[None, :, :]].prod(-1)  # [K, S^N]
        k, s = torch.nonzero(weight > 0, as_tuple=True)
        return self.configs[k], states[s], weight[k, s]
