"""The contract every process meets, the two state spaces, and the one sampling loop.

A process is the math of one method: its forward noise, its negative ELBO and one reverse step.
The sampler (:func:`sample`) drives any process over a decreasing time grid; the output cache, the
conditioning, the final argmax and the NFE count live there and nowhere else.

State spaces. Tokens are ids ``0..V-1``; ``mask_id = V``.

* :class:`AbsorbingState`: a hit token becomes the mask; the reverse process unmasks. The
  positions a step may change are the masked ones; a sampler that leaves some masked at t = 0
  fills them with the denoiser's argmax.
* :class:`UniformState`: a hit token is redrawn uniformly (possibly to itself); there is no mask
  state, so ``mask_id`` only marks the positions to generate in a conditioning ``x``, and every
  such position may change at every step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from lightning_md4.diffusion.exact import EnumeratedLaw
from lightning_md4.diffusion.streams import uniform_times
from lightning_md4.diffusion.sampling import CachedDenoiser, Denoiser, is_time_conditioned, time_grid

Generator = torch.Generator | None


class DiffusionProcess(ABC):
    """What every method has. Subclasses set ``vocab_size`` and ``mask_id`` and pick a state space.

    Times are float64 in ``[t_min, 1]``; ``x0``/``xt`` are LongTensors ``[B, N]``; every loss is in
    nats per sequence ``[B]``.
    """

    vocab_size: int
    mask_id: int
    t_min: float = 0.0

    # -- times -------------------------------------------------------------------------------
    def time_from_uniform(self, u: Tensor) -> Tensor:
        """``t = t_min + (1 - t_min) u`` for uniforms u in [0, 1); an estimator over [t_min, 1]
        carries the Jacobian ``1 - t_min``."""
        return self.t_min + (1.0 - self.t_min) * u

    def sample_times(self, batch: int, device: torch.device | str | None = None, antithetic: bool = True,
                     generator: Generator = None) -> Tensor:
        """One time per sequence, float64 ``[batch]``; stratified across the batch if antithetic."""
        return self.time_from_uniform(uniform_times(batch, device, antithetic, generator))

    # -- training ----------------------------------------------------------------------------
    @abstractmethod
    def forward_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None,
                       generator: Generator = None) -> tuple[Tensor, Tensor]:
        """``(xt [B, N], hit [B, N] bool)``: ``x0`` noised to times ``t`` [B]; ``noise``: optional
        uniforms [B, N] (float64) that decide the draw, for reproducible noise."""

    @abstractmethod
    def nelbo(self, denoiser: Denoiser, x0: Tensor, t: Tensor | None = None, antithetic: bool = True,
              noise: Tensor | None = None, generator: Generator = None) -> Tensor:
        """One-draw unbiased estimate of the negative ELBO, nats per sequence ``[B]``."""

    # -- sampling ----------------------------------------------------------------------------
    @abstractmethod
    def initial_tokens(self, shape: tuple[int, int], x: Tensor | None = None, generator: Generator = None,
                       device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """``(x [B, N], free [B, N] bool)``: the sampler's start, and the positions to generate
        (those ``x`` marks with ``mask_id``; all of them when ``x`` is None)."""

    @abstractmethod
    def active(self, x: Tensor, free: Tensor) -> Tensor:
        """The positions ``[B, N]`` bool that the next step may change."""

    def unfinished(self, x: Tensor) -> Tensor:
        """Positions ``[B, N]`` bool still noisy after the last step: the sampler gives them the
        denoiser's argmax at t = 0. None by default."""
        return torch.zeros_like(x, dtype=torch.bool)

    def network_time(self, t: Tensor) -> Tensor:
        """What the denoiser is told about the time t (0-d float64): t itself by default."""
        return t

    def sampling_times(self, times: Tensor) -> Tensor:
        """The grid the sampler steps through, from a decreasing grid ``1 = t_0 > ... > 0``;
        a discrete-time process rounds it to its own steps."""
        return times

    @abstractmethod
    def step(self, output: Tensor, x: Tensor, active: Tensor, t: Tensor, s: Tensor,
             generator: Generator = None) -> Tensor:
        """One reverse step from time t to s < t (0-d float64; s = 0 is the last step).

        ``output``: the denoiser's output ``[B, N, C]`` at ``(x, network_time(t))``; ``x`` [B, N]
        the current tokens (may be updated in place); ``active`` [B, N] bool: the positions to
        update (``active(x, free)``, never empty). Draws in float64. Returns the new tokens.
        """

    # -- exact answers on an enumerable law (lightning_md4.diffusion.exact) ----------------------
    def hit_probability(self, t: Tensor) -> Tensor:
        """``[B, V]`` float64: the probability that a token whose clean value is v has been hit by
        the noise (masked, or redrawn) by the times ``t [B]``."""
        raise NotImplementedError(f"{type(self).__name__} has no hit_probability")

    def input_hit_probability(self, time: Tensor) -> Tensor:
        """``hit_probability`` from what the denoiser is told, ``network_time(t)`` (t by default)."""
        return self.hit_probability(time)

    def kernel(self, p: Tensor) -> Tensor:
        """``q(x_t[n] = s | x0[n] = v)`` ``[B, V, S]`` from hit probabilities ``p [B, V]`` (the state space's)."""
        raise NotImplementedError

    def noise_for(self, x0: Tensor, xt: Tensor, p: Tensor) -> Tensor:
        """Uniforms ``[B, N]`` with which ``corrupt(x0, noise, p)`` gives ``xt`` (a reachable x_t; ``p``
        the hit probabilities ``[B, N]`` of the tokens): the state space's inverse of ``corrupt``,
        so that ``nelbo`` can be evaluated at every x_t of an enumerable law."""
        raise NotImplementedError

    def time_nodes(self, n: int = 64) -> tuple[Tensor, Tensor]:
        """Times ``t [Q]`` and weights ``[Q]`` (summing to 1) with ``sum_q w_q f(t_q) = E_u f(t(u))``
        (``t(u) = time_from_uniform(u)``, u ~ U[0, 1)) for the way ``nelbo`` depends on t:
        Gauss-Legendre in ``u = v^3``, whose nodes gather near t_min, where the integrands of
        continuous-time bounds vary fastest. A discrete-time process overrides it."""
        v, w = np.polynomial.legendre.leggauss(n)
        v, w = torch.tensor((v + 1) / 2, dtype=torch.float64), torch.tensor(w / 2, dtype=torch.float64)
        return self.time_from_uniform(v**3), w * 3 * v**2

    def exact_output(self, log_posterior: Tensor, xt: Tensor, kernel: Tensor) -> Tensor:
        """What the optimal network outputs at ``xt [B, N]``, given the exact ``log p(x0[n] = v | xt)``
        ``[B, N, V]`` and the kernel ``[B, V, S]`` at its time: the log-posterior itself for an
        x0-predicting process; a process that parameterises its output otherwise overrides this."""
        return log_posterior

    def exact_denoiser(self, law: EnumeratedLaw) -> Denoiser:
        """The optimal denoiser for the data law ``law``: ``denoiser(xt [B, N], time [B])`` with the
        time this process feeds its network, float64 outputs."""

        def exact(xt: Tensor, time: Tensor) -> Tensor:
            kernel = self.kernel(self.input_hit_probability(time))  # [B, V, S]
            seen = kernel.gather(2, xt[:, None, :].expand(-1, kernel.shape[1], -1)).transpose(1, 2)  # [B, N, V]
            return self.exact_output(law.log_posterior(seen), xt, kernel)

        def denoiser(xt: Tensor, time: Tensor) -> Tensor:
            # Once per distinct (x_t, time): a sampler's batch holds few distinct rows.
            time = time.double().to(xt.device)
            times, when = torch.unique(time, return_inverse=True)
            code = (xt * (self.vocab_size + 1) ** torch.arange(xt.shape[1], device=xt.device)).sum(-1)
            _, inverse = torch.unique(code * len(times) + when, return_inverse=True)
            first = torch.zeros(int(inverse.max()) + 1, dtype=torch.long, device=xt.device)
            first.scatter_(0, inverse, torch.arange(len(xt), device=xt.device))  # a row of each kind
            return exact(xt[first], time[first])[inverse]

        return denoiser

    def expected_nelbo(self, law: EnumeratedLaw) -> float:
        """E over x0 ~ ``law`` of ``nelbo`` with the exact denoiser, in closed form (nats per
        sequence): ``I(X0; X_tmin) - I(X0; X_1)`` plus the endpoint terms' expectation (module
        docstring of :mod:`lightning_md4.diffusion.exact`)."""
        def at(t: float) -> Tensor:
            return self.kernel(self.hit_probability(torch.tensor([t], dtype=torch.float64)))[0]

        return law.information(at(self.t_min)) - law.information(at(1.0)) + self.expected_endpoint_terms(law)

    def expected_endpoint_terms(self, law: EnumeratedLaw) -> float:
        """E over x0 ~ ``law`` of the endpoint terms ``nelbo`` adds (a constant ``endpoint_terms(N)``
        by default)."""
        return float(self.endpoint_terms(law.seq_len))  # type: ignore[attr-defined]

    def sample(self, denoiser: Denoiser, shape: tuple[int, int], steps: int, grid: str = "uniform",
               generator: Generator = None, x: Tensor | None = None, device: torch.device | str | None = None,
               cache: bool | None = None, return_nfe: bool = False) -> Tensor | tuple[Tensor, int]:
        """:func:`sample` on the ``grid`` of ``steps`` intervals (see :func:`time_grid`)."""
        tokens, nfe = sample(self, denoiser, shape, time_grid(steps, grid), generator, x, device, cache)
        return (tokens, nfe) if return_nfe else tokens


class AbsorbingState:
    """Tokens ``0..V-1`` plus the mask ``mask_id = V``; noise masks a token."""

    mask_id: int

    def corrupt(self, x0: Tensor, noise: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        """Mask where ``noise < p`` (``p`` broadcasts to ``x0`` [B, N]); ``(xt, hit)``."""
        hit = noise < p
        return torch.where(hit, self.mask_id, x0), hit

    def initial_tokens(self, shape: tuple[int, int], x: Tensor | None = None, generator: Generator = None,
                       device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        x = _start(shape, self.mask_id, x, device)
        return x, x == self.mask_id

    def active(self, x: Tensor, free: Tensor) -> Tensor:
        # Given tokens are never the mask, so the masked positions are the free ones not yet revealed.
        return x == self.mask_id

    def unfinished(self, x: Tensor) -> Tensor:
        return x == self.mask_id

    def noise_for(self, x0: Tensor, xt: Tensor, p: Tensor) -> Tensor:
        """0 where ``xt`` is masked, just below 1 where it kept ``x0``."""
        return torch.where(xt == self.mask_id, 0.0, 1.0 - 1e-15).double()

    def kernel(self, p: Tensor) -> Tensor:
        """``[B, V, V + 1]``: a token stays with probability 1 - p, else it is the mask (column V)."""
        p = p.double()
        stay = torch.diag_embed(1.0 - p)  # [B, V, V]
        return torch.cat([stay, p[..., None]], dim=-1)


class UniformState:
    """Tokens ``0..V-1`` only; noise redraws a token uniformly (possibly to itself)."""

    vocab_size: int
    mask_id: int

    def corrupt(self, x0: Tensor, noise: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        """Redraw where ``noise < p``: the same uniform, rescaled by ``1 / p``, is uniform on
        [0, 1) and picks the new token ``floor(V noise / p)``; ``(xt, hit)``."""
        hit = noise < p
        token = torch.floor(noise / torch.where(p > 0, p, 1.0) * self.vocab_size).long()
        return torch.where(hit, token.clamp_(0, self.vocab_size - 1), x0), hit

    def initial_tokens(self, shape: tuple[int, int], x: Tensor | None = None, generator: Generator = None,
                       device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Free positions start uniform (the prior); given tokens are clamped, which is a heuristic
        here: the true process would noise them too."""
        x = _start(shape, self.mask_id, x, device)
        free = x == self.mask_id
        start = torch.randint(self.vocab_size, x.shape, device=x.device, generator=generator)
        return torch.where(free, start, x), free

    def active(self, x: Tensor, free: Tensor) -> Tensor:
        return free

    def noise_for(self, x0: Tensor, xt: Tensor, p: Tensor) -> Tensor:
        """The uniform that ``corrupt`` redraws to ``xt`` (to itself where it equals ``x0``), or just
        below 1 (not hit) where the hit probability is 0."""
        p = p.double()
        return torch.where(p > 0, p * (xt.double() + 0.5) / self.vocab_size, 1.0 - 1e-15)

    def kernel(self, p: Tensor) -> Tensor:
        """``[B, V, V]``: a token stays with probability 1 - p, else it is redrawn uniformly."""
        p = p.double()
        eye = torch.eye(p.shape[-1], dtype=torch.float64, device=p.device)
        return (1.0 - p)[..., None] * eye + (p / p.shape[-1])[..., None]


def _start(shape: tuple[int, int], fill: int, x: Tensor | None, device: torch.device | str | None) -> Tensor:
    """All ``fill``, or a copy of the conditioning ``x`` [B, N] (``fill`` marks the free positions)."""
    if x is None:
        return torch.full(shape, fill, dtype=torch.long, device=device)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"conditioning x has shape {tuple(x.shape)}, expected {tuple(shape)}")
    return x.clone()


@torch.no_grad()
def sample(process: DiffusionProcess, denoiser: Denoiser, shape: tuple[int, int], times: Tensor,
           generator: Generator = None, x: Tensor | None = None, device: torch.device | str | None = None,
           cache: bool | None = None) -> tuple[Tensor, int]:
    """Run ``process`` backwards over the decreasing float64 grid ``times`` ``[steps + 1]`` (1 to 0).

    ``x``: optional LongTensor ``shape`` holding given tokens and ``mask_id`` at the positions to
    generate; given tokens never change. Stops early once no position can change. ``cache``
    (default: when the denoiser declares ``time_conditioned = False``) reuses the denoiser output
    while the tokens are unchanged. Returns the tokens ``[B, N]`` and the number of network
    evaluations.
    """
    x, free = process.initial_tokens(shape, x, generator, device)
    reuse = (not is_time_conditioned(denoiser)) if cache is None else cache
    net = CachedDenoiser(denoiser, reuse)
    times = process.sampling_times(times.to(x.device))
    batch = x.shape[0]
    for t, s in zip(times[:-1], times[1:]):
        active = process.active(x, free)
        if not active.any():
            break
        output = net(x, process.network_time(t).expand(batch))
        x = process.step(output, x, active, t, s, generator)
    left = process.unfinished(x)
    if left.any():
        output = net(x, process.network_time(times[-1]).expand(batch))
        x[left] = output[left].argmax(-1)
    return x, net.nfe
