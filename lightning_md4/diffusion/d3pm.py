"""D3PM: discrete-time diffusion with an absorbing or a uniform kernel (Austin et al. 2021).

The baseline of MD4 (Shi et al. 2024, section 4), written from the math in our own
notation. Real tokens are ``0..V-1``.

Kernels, one step ``t = 1..T`` (``pi`` is the stationary law, ``K`` the number of states)::

    Q_t = (1 - beta_t) I + beta_t 1 pi^T          Qbar_t = Q_1 ... Q_t = abar_t I + (1 - abar_t) 1 pi^T

* absorbing (:class:`AbsorbingD3PM`): ``K = V + 1`` states, ``pi = e_m`` with mask id ``m = V``.
* uniform (:class:`UniformD3PM`): ``K = V`` states, ``pi = 1 / V``.

Schedules (``abar_0 = 1``, ``abar_T = 0`` for both, so the prior KL term is exactly 0):

* ``linear``: ``beta_t = 1 / (T - t + 1)``, hence ``abar_t = 1 - t / T`` (D3PM's absorbing
  schedule, which is also its mutual-information schedule for that kernel, Austin et al. App. A.7;
  with the absorbing kernel it is MD4's linear schedule at T steps).
* ``cosine``: ``abar_t = f(t) / f(0)``, ``f(t) = cos((t/T + 0.008) / 1.008 * pi/2)``, ``abar_T``
  set to 0 (the cosine/Nichol schedule of Austin et al.'s uniform runs, section 3.2; we do not clip beta).

The process's own defaults are ``linear`` and ``hybrid_lambda = 0.01`` for both kernels (the exact
tests' setting). Austin et al.'s settings differ by state space; they live in one table,
:data:`D3PM_DEFAULTS` (absorbing: linear, lambda 0.01; uniform: cosine, lambda 0, i.e. L_vb), which
``make_d3pm(..., schedule=None, hybrid_lambda=None)`` and the D3PM module's defaults read.

Skipping steps uses ``Q_{t|s} = Q_{s+1} ... Q_t = (abar_t / abar_s) I + (1 - abar_t / abar_s) 1 pi^T``.

x0-parameterisation (paper eqs. 4-5), for every t in 1..T including t = 1::

    p(x_{t-1} = j | x_t = k)  propto  sum_i q(x_{t-1} = j, x_t = k | x0 = i) p~(x0 = i | x_t)
                              =  Q_t[j, k] (p~ Qbar_{t-1})[j]

and ``q(x_{t-1} | x_t, x0)`` is the same formula with ``p~`` the one-hot of x0. At t = 1 this
gives the reconstruction term ``-log p(x0 | x1)`` (the reference code instead uses p~ itself at
t = 1; the two agree at masked positions whenever p~ gives the mask zero probability).

The weighting by ``q(x_t | x0~)`` in this sum means the best p~ is not the posterior q(x0 | x_t)
in general but ``q(x0 | x_t) / q(x_t | x0)`` (normalised): then p(x_{t-1} | x_t) is the exact
per-token reverse marginal. For the absorbing kernel at a masked position ``q(x_t = m | x0)`` is
the same for every x0 and the two coincide; for the uniform kernel they differ.

Sampling is ancestral at every step, the last one (to s = 0) included: each still-noisy token is
drawn from the model's ``p(x_0 | x_t)`` above, restricted to the real tokens (``q(x_0 = m) = 0``;
with MD4's V logits the mask already has probability 0 there). Austin et al.'s code takes the argmax
at the last step instead, a decoding rule and not the model's law: on a coarse grid that step
decides most tokens, and with the exact denoiser on a 27-sequence toy the argmax sampler's law is
0.26 (2 steps) and 0.11 (4 steps) in TV from the ancestral one, closer to or farther from the data
depending on the data. Sampled ancestrally, absorbing D3PM on the linear schedule has exactly MD4's
output law on any grid, so a comparison of their samples compares the models
(tests/test_d3pm_exact.py, section 4b).

The network is MD4's: ``denoiser(xt [B, N], t [B]) -> logits [B, N, C]`` with the continuous time
``t / T`` in [0, 1] as input. With ``C = V + 1`` (absorbing only) p~ is Austin's softmax over the
whole vocabulary, mask included. With ``C = V`` (the suite's transformer) the mask logit is taken
as -inf: MD4's choice of never predicting the mask. With that choice and the linear schedule the
T-step bound L_vb of the absorbing kernel equals MD4's discrete-time NELBO term by term.

Numerics: the network output is upcast to at least float32 (``dtype``) and all the transition
math runs in log space (log-sum-exp mixtures, guarded so that ``log 0`` entries neither produce
NaN values nor NaN gradients, e.g. a -inf mask logit at t = 1) at every t in 1..T and for bf16
network outputs. (The reference code's ``log(probs + eps)`` formulation, and what it breaks, is
reproduced next to the tests, in tests/d3pm_reference.py.)
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_md4.diffusion.base import AbsorbingState, DiffusionProcess, UniformState
from lightning_md4.diffusion.exact import EnumeratedLaw
from lightning_md4.diffusion.sampling import Denoiser, sample_categorical
from lightning_md4.diffusion.schedules import Linear, Schedule, ShiftedCosine

StepNoise = Callable[[int], Tensor]  # step t in 1..T -> uniforms [B, N] for the forward draw at t


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """``log(exp(a) + exp(b))`` that returns -inf, with zero gradients, where both are -inf.

    ``torch.logaddexp(-inf, -inf)`` is -inf but its gradient is NaN (``exp(-inf - -inf)``), and a NaN
    multiplied by a zero upstream gradient is still NaN.
    """
    both = torch.isneginf(a) & torch.isneginf(b)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    out = torch.logaddexp(torch.where(both, zero, a), torch.where(both, zero, b))
    return torch.where(both, torch.full_like(out, -math.inf), out)


def _log_normalize(x: Tensor) -> Tensor:
    """``x - logsumexp(x)`` over the last dim; rows that are all -inf stay -inf (no NaN)."""
    dead = torch.isneginf(x).all(-1, keepdim=True)
    safe = torch.where(dead, torch.zeros((), dtype=x.dtype, device=x.device), x)
    out = safe - torch.logsumexp(safe, -1, keepdim=True)
    return torch.where(dead, torch.full_like(out, -math.inf), out)


def categorical_kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """``KL(q || p) = sum_j q_j (log q_j - log p_j)`` over the last dim, with ``0 log 0 = 0``.

    Entries with ``q_j = 0`` are excluded by ``where`` (not by multiplication), so ``log p_j = -inf``
    there gives neither a NaN value nor a NaN gradient.
    """
    keep = ~torch.isneginf(log_q)
    diff = torch.where(keep, log_q - log_p, torch.zeros((), dtype=log_p.dtype, device=log_p.device))
    return (log_q.exp() * diff).sum(-1)


class D3PMProcess(DiffusionProcess):
    """The D3PM process: forward noising, the T-step bound L_vb, the hybrid loss, ancestral sampling.

    ``vocab_size``: V real tokens; ``T``: number of steps; the state space is the subclass
    (:class:`AbsorbingD3PM`, :class:`UniformD3PM`; by name: :func:`make_d3pm`);
    ``hybrid_lambda``: weight of the x0 cross-entropy against ONE term of the bound in ``loss``
    (Austin et al.'s per-step convention; their text values per state space: :data:`D3PM_DEFAULTS`;
    CIFAR-10 absorbing: 0.001);
    ``schedule``: abar_t = ``schedule.alpha(t / T)`` (default ``Linear``, module docstring; it
    must reach alpha = 0 at t = 1 or ``prior_kl`` counts the rest); ``dtype``: the least precision of the posterior math
    (the network output is upcast to it; float64 outputs stay float64).
    float32 is enough for training; each KL term carries an absolute rounding error of order
    1e-7 per position, which ``T`` multiplies, so for exact evaluation at large T (the uniform
    kernel especially, whose late terms are tiny differences) pass ``torch.float64``.

    Units: every loss is in nats per sequence (summed over positions), like ``MaskedDiffusion``.
    Times: integer steps ``t_index`` in 1..T inside; continuous times are ``t_index / T``, and
    that is what the network sees and the sampler's grid is rounded to.
    """

    num_states: int
    pi: Tensor  # the stationary law [K], float64

    def __init__(self, vocab_size: int, T: int = 1000, hybrid_lambda: float = 0.01, schedule: Schedule | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        if hybrid_lambda < 0:
            raise ValueError(f"hybrid_lambda must be >= 0, got {hybrid_lambda}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.vocab_size, self.T, self.hybrid_lambda, self.dtype = vocab_size, T, hybrid_lambda, dtype
        self.schedule = Linear() if schedule is None else schedule
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        self.alphas, self.one_minus_alphas = self.schedule.alpha(steps), self.schedule.one_minus_alpha(steps)
        # Marks the positions to generate in ``sample(x=...)``; the mask state for the absorbing kernel.
        self.mask_id = vocab_size
        self.log_pi = self.pi.log()
        self._device_tables: dict[tuple[str, torch.device], Tensor] = {}

    def _on(self, name: str, device: torch.device) -> Tensor:
        """The table ``name`` on ``device``, copied once: a host-to-device copy at every step
        would stall the GPU stream."""
        key = (name, torch.device(device))
        if key not in self._device_tables:
            self._device_tables[key] = getattr(self, name).to(device)
        return self._device_tables[key]

    # -- schedule --------------------------------------------------------------------------
    def alpha(self, t_index: Tensor) -> Tensor:
        """``abar_t``: probability that a token is untouched after t steps, float64, t in 0..T."""
        return self._on("alphas", t_index.device)[t_index.long()]

    def one_minus_alpha(self, t_index: Tensor) -> Tensor:
        return self._on("one_minus_alphas", t_index.device)[t_index.long()]

    # -- forward process -------------------------------------------------------------------
    def step_of(self, t: Tensor) -> Tensor:
        """The integer step ``round(t T)`` of continuous times t = t_index / T, LongTensor."""
        return torch.round(t.double() * self.T).long()

    def forward_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``x0`` [B, N] noised to the steps ``step_of(t)`` of the times ``t`` [B]: see ``noise_to``."""
        return self.noise_to(x0, self.step_of(t), noise, generator)

    def noise_to(self, x0: Tensor, t_index: Tensor, noise: Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``xt ~ q(x_t | x0) = abar_t delta_x0 + (1 - abar_t) pi`` per token.

        ``x0``: LongTensor [B, N]; ``t_index``: LongTensor [B] in 0..T; ``noise``: optional uniforms
        [B, N] (float64). A token is noised where ``noise < 1 - abar_t`` (MD4's convention; the
        state space's ``corrupt``). Returns ``(xt, noised [B, N] bool)``.
        """
        if noise is None:
            noise = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=generator)
        return self.corrupt(x0, noise, self.one_minus_alpha(t_index)[:, None])

    def prior_kl(self, x0: Tensor) -> Tensor:
        """``sum_n KL(q(x_T | x0[n]) || pi)`` in nats, float64 ``[B]``; 0 when abar_T = 0."""
        a = float(self.alphas[-1])
        kl = 0.0 if a == 0.0 else self._prior_kl_per_token(a)
        return torch.full((x0.shape[0],), x0.shape[1] * kl, dtype=torch.float64, device=x0.device)

    @abstractmethod
    def _prior_kl_per_token(self, a: float) -> float:
        """KL(abar_T delta_x0 + (1 - abar_T) pi || pi) for abar_T = a > 0."""

    # -- posteriors ------------------------------------------------------------------------
    def x0_log_probs(self, logits: Tensor) -> Tensor:
        """log p~(x0 | x_t) over the K states, in at least ``self.dtype``, ``[..., K]``.

        ``logits [..., V]``: for ``absorbing`` the mask gets log-probability -inf (MD4: never predict the
        mask). ``logits [..., V + 1]`` (``absorbing`` only): Austin's softmax over the full vocabulary.
        """
        dtype = torch.promote_types(logits.dtype, self.dtype)
        logp = torch.log_softmax(logits.to(dtype), dim=-1)
        if self._check_width(logits.shape[-1]):
            return logp
        never = torch.full((*logp.shape[:-1], 1), -math.inf, dtype=dtype, device=logp.device)
        return torch.cat([logp, never], dim=-1)

    def _check_width(self, C: int) -> bool:
        """True if the network gives all K states, False if V real tokens only (absorbing); else raise."""
        if C == self.num_states:
            return True
        raise ValueError(f"denoiser returned {C} logits per position; expected {self.num_states}")

    def _time_factor(self, t: Tensor, s: Tensor | None, ndim: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(abar_t / abar_s, abar_s, 1 - abar_s)`` in float64, with trailing dims up to ``ndim``.

        An explicit ``s`` (the sampler's skips) is checked; ``s = t - 1`` is not, because the check
        reads the device (a host sync) and the loss's steps come from ``step_index``, in 1..T."""
        if s is None:
            s = t - 1
        elif bool(((s < 0) | (s >= t) | (t > self.T)).any()):
            raise ValueError("need 0 <= s < t <= T")
        a_t, a_s, abar_s = self.alpha(t), self.alpha(s), self.one_minus_alpha(s)
        keep = a_t / a_s  # 1 - beta_{t|s}; a_s > 0 for s < T
        while keep.ndim < ndim:
            keep, a_s, abar_s = keep[..., None], a_s[..., None], abar_s[..., None]
        return keep, a_s, abar_s

    def log_posterior(self, log_x0: Tensor, xt: Tensor, t: Tensor, s: Tensor | None = None) -> Tensor:
        """``log sum_i q(x_s = j, x_t | x0 = i) p0(i)``, normalised over j: ``[..., K]``.

        ``log_x0 [..., K]``: log p0 over the states (a one-hot gives q(x_s | x_t, x0), the network's
        p~ gives the model p(x_s | x_t)); ``xt`` LongTensor ``[...]``; ``t``, ``s``: LongTensors
        broadcastable from the left to ``xt`` (e.g. ``[B]`` for ``xt [B, N]``), ``0 <= s < t <= T``,
        default ``s = t - 1``. Computed in ``log_x0``'s dtype, in log space.
        """
        dtype, device = log_x0.dtype, log_x0.device
        keep, a_s, abar_s = self._time_factor(t, s, xt.ndim)
        # log (p0 Qbar_s)[j] = log(abar_s p0_j + (1 - abar_s) pi_j)
        log_pi = self._on("log_pi", device).to(dtype)
        mix = _logaddexp(a_s.log()[..., None].to(dtype) + log_x0,
                         abar_s.log()[..., None].to(dtype) + log_pi)
        # log Q_{t|s}[j, x_t] = log(keep delta_{j, x_t} + (1 - keep) pi_{x_t}), computed in float64
        pi_xt = self._on("pi", device)[xt]
        diag = torch.log(keep + (1.0 - keep) * pi_xt)
        off = torch.log((1.0 - keep) * pi_xt)
        onehot = torch.arange(self.num_states, device=device) == xt[..., None]
        log_q_step = torch.where(onehot, diag[..., None].to(dtype), off[..., None].to(dtype))
        return _log_normalize(log_q_step + mix)

    def log_q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor, s: Tensor | None = None,
                        dtype: torch.dtype = torch.float64) -> Tensor:
        """``log q(x_s | x_t, x0)`` in closed form, ``[..., K]`` (see ``log_posterior``)."""
        onehot = F.one_hot(x0, self.num_states).bool()
        log_x0 = torch.where(onehot, 0.0, -math.inf).to(dtype)
        return self.log_posterior(log_x0, xt, t, s)

    # -- losses ----------------------------------------------------------------------------
    def terms(self, logits: Tensor, x0: Tensor, xt: Tensor, t_index: Tensor) -> tuple[Tensor, Tensor]:
        """The bound's term at step t and the x0 cross-entropy, both summed over positions, ``[B]``.

        ``kl = sum_n KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))`` (at t = 1 this is the
        reconstruction ``-log p(x0 | x1)``, q being a point mass); ``ce = sum_n -log p~(x0 | x_t)``
        over all positions (the D3PM hybrid term).
        """
        log_x0 = self.x0_log_probs(logits)
        log_p = self.log_posterior(log_x0, xt, t_index)
        log_q = self.log_q_posterior(x0, xt, t_index, dtype=log_p.dtype)
        kl = categorical_kl(log_q, log_p).sum(-1)
        ce = -log_x0.gather(-1, x0[..., None])[..., 0].sum(-1)
        return kl, ce

    def _t_input(self, t_index: Tensor) -> Tensor:
        return t_index.double() / self.T

    def step_index(self, t: Tensor) -> Tensor:
        """Step ``i = floor(t T) + 1`` in 1..T of continuous times t in [0, 1] (MD4's ``nelbo_discrete``)."""
        return torch.clamp(torch.floor(t.double() * self.T) + 1, 1, self.T).long()

    def loss(self, denoiser: Denoiser, x0: Tensor, t: Tensor | None = None, antithetic: bool = True,
             noise: Tensor | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(objective, nelbo)``, nats per sequence ``[B]``, from one network pass.

        One step ``i = floor(t T) + 1`` per example (``t`` given, or drawn, stratified across the
        batch when ``antithetic``); ``nelbo = T kl_i + prior`` is an unbiased estimate of L_vb.

        The objective is ``T (kl_i + hybrid_lambda ce_i) + prior`` with ``ce_i = sum_n -log p~(x0 | x_i)``:
        Austin et al.'s per-step hybrid loss ``kl_i + lambda ce_i`` (kl_i being ONE term of L_vb), so
        relative to the bound the cross-entropy weighs ``lambda T``; their published numbers (text8
        1.45 BPC, CIFAR-10 4.40 BPD) were trained so, and ``T kl_i + lambda ce_i`` would be a hybrid
        T times weaker. The overall factor T (which Adam ignores) keeps the bound's part of the
        objective equal to ``nelbo``, on the scale of the other methods' objectives.
        ``noise``: optional uniforms [B, N] for the forward draw.
        """
        if t is None:
            t = self.sample_times(x0.shape[0], x0.device, antithetic, generator)
        i = self.step_index(t)
        xt, _ = self.noise_to(x0, i, noise, generator)
        kl, ce = self.terms(denoiser(xt, self._t_input(i)), x0, xt, i)
        nelbo = self.T * kl + self.prior_kl(x0).to(kl.dtype)
        return nelbo + self.T * self.hybrid_lambda * ce, nelbo

    def nelbo(self, denoiser: Denoiser, x0: Tensor, t: Tensor | None = None, antithetic: bool = True,
              noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """One-draw unbiased estimate of L_vb, nats per sequence ``[B]`` (same conventions as
        ``MaskedDiffusion.nelbo``; see ``loss``)."""
        return self.loss(denoiser, x0, t, antithetic, noise, generator)[1]

    @torch.no_grad()
    def nelbo_exact(self, denoiser: Denoiser, x0: Tensor, batch_T: int = 1, generator: torch.Generator | None = None,
                    step_noise: StepNoise | None = None) -> Tensor:
        """L_vb summed over all T steps (D3PM's evaluation), float64 nats per sequence ``[B]``.

        Every step is evaluated (one forward draw of x_t per step and sequence), ``batch_T`` steps per
        network call (``batch_T * B`` rows). No gradients.
        The forward draws are the only randomness: ``step_noise(t)`` gives the uniforms ``[B, N]`` of
        step t (e.g. keyed by each example's index, so that a sequence's value does not depend on
        its batch), otherwise they come from ``generator``.
        """
        if batch_T < 1:
            raise ValueError(f"batch_T must be >= 1, got {batch_T}")
        if step_noise is not None and generator is not None:
            raise ValueError("pass step_noise or generator, not both")
        B = x0.shape[0]
        total = self.prior_kl(x0)
        for start in range(1, self.T + 1, batch_T):
            steps = range(start, min(start + batch_T, self.T + 1))
            t = torch.arange(steps.start, steps.stop, device=x0.device).repeat_interleave(B)
            xb = x0.repeat(len(steps), 1)
            noise = None if step_noise is None else torch.cat([step_noise(i) for i in steps])
            xt, _ = self.noise_to(xb, t, noise, generator)
            kl, _ = self.terms(denoiser(xt, self._t_input(t)), xb, xt, t)
            total = total + kl.double().view(len(steps), B).sum(0)
        return total

    # -- exact answers ---------------------------------------------------------------------
    def hit_probability(self, t: Tensor) -> Tensor:
        """1 - abar at the steps ``step_index(t)`` that the loss draws x_t at for the times t."""
        return self.one_minus_alpha(self.step_index(t))[:, None].expand(-1, self.vocab_size)

    def input_hit_probability(self, time: Tensor) -> Tensor:
        """1 - abar at the step the network is told, ``time = t_index / T``."""
        return self.one_minus_alpha(self.step_of(time))[:, None].expand(-1, self.vocab_size)

    def time_nodes(self, n: int = 0) -> tuple[Tensor, Tensor]:
        """The loss is constant on each step's interval of t: its midpoints, weight 1 / T each."""
        return (torch.arange(1, self.T + 1, dtype=torch.float64) - 0.5) / self.T, torch.full((self.T,), 1.0 / self.T,
                                                                                             dtype=torch.float64)

    @torch.no_grad()
    def expected_nelbo(self, law: EnumeratedLaw, steps_per_call: int = 100) -> float:
        """E over x0 ~ ``law`` of L_vb with the exact denoiser: every term ``KL_t`` summed over all
        T steps and every reachable x_t (a discrete-time bound: no closed form over t)."""
        denoiser = self.exact_denoiser(law)
        total = float((law.probs * self.prior_kl(law.configs)).sum())
        for start in range(1, self.T + 1, steps_per_call):
            rows = []
            for t in range(start, min(start + steps_per_call, self.T + 1)):
                x0, xt, weight = law.reachable(self.kernel(self.one_minus_alphas[t].expand(1, self.vocab_size))[0])
                rows.append((x0, xt, weight, torch.full((len(x0),), t, dtype=torch.long)))
            x0, xt, weight, t_index = (torch.cat(parts) for parts in zip(*rows))
            kl, _ = self.terms(denoiser(xt, self._t_input(t_index)), x0, xt, t_index)
            total += float((weight * kl.double()).sum())
        return total

    def exact_output(self, log_posterior: Tensor, xt: Tensor, kernel: Tensor) -> Tensor:
        """The best x0-predictor is ``q(x0 | x_t) / q(x_t | x0)``, normalised (module docstring: the
        weighting by q(x_t | x0) in the reverse step); for the absorbing kernel at a masked position
        the divisor is the same for every x0, so it is the posterior itself there."""
        log_k_seen = kernel.log().gather(2, xt[:, None, :].expand(-1, self.vocab_size, -1)).transpose(1, 2)
        # A clean value that cannot give what is seen (K = 0, e.g. another token at an unmasked
        # position) has posterior 0.
        ratio = torch.where(torch.isfinite(log_k_seen), log_posterior - log_k_seen, -torch.inf)
        return torch.log_softmax(ratio, dim=-1)

    # -- sampling --------------------------------------------------------------------------
    def sampling_times(self, times: Tensor) -> Tensor:
        """The grid rounded to the steps ``t_index / T``, repeats dropped: any grid (uniform,
        cosine) works, fewer intervals than asked where two times share a step."""
        return torch.unique_consecutive(self.step_of(times)).double() / self.T

    def step(self, output: Tensor, x: Tensor, active: Tensor, t: Tensor, s: Tensor,
             generator: torch.Generator | None = None) -> Tensor:
        """Ancestral step: each active token drawn from p(x_s | x_t) (``Q_{t|s}`` when the grid skips steps).

        ``output`` [B, N, C]: the denoiser's logits at ``(x, t)``; ``x`` [B, N] is updated in place
        at the ``active`` [B, N] positions; ``t > s`` are 0-d float64 times on the grid ``i / T``.

        The last step (to s = 0) draws too, from the model's p(x_0 | x_t) over the real tokens:
        ``log_posterior`` at s = 0 has ``abar_0 = 1``, so it is ``Q_t[j, x_t] p~(j | x_t)`` normalised
        (at an absorbing masked position ``Q_t[j, m]`` is the same for every real j, so it is p~ itself;
        the mask's entry is 0 when p~ gives it 0 and is dropped otherwise, x_0 never being the mask).
        Austin et al.'s code takes the argmax there instead. We do not: on a coarse grid the last
        step decides most tokens, and the argmax of each token's p(x_0 | x_t) is not a draw from
        it, so the output law would be a decoding rule's, not the model's (module docstring).
        Draws are float64.
        """
        log_x0 = self.x0_log_probs(output[active])
        t_, s_ = (torch.full((log_x0.shape[0],), int(v), dtype=torch.long, device=x.device)
                  for v in (self.step_of(t), self.step_of(s)))
        log_p = self.log_posterior(log_x0, x[active], t_, s_)
        if s == 0:
            log_p = log_p[:, :self.vocab_size]
        x[active] = sample_categorical(log_p.double().exp(), generator)
        return x


class AbsorbingD3PM(AbsorbingState, D3PMProcess):
    """``K = V + 1`` states, ``pi = e_m``. The network may give the mask a logit too (Austin's
    softmax over the full vocabulary) or not (MD4's: the mask gets probability 0)."""

    def __init__(self, vocab_size: int, T: int = 1000, hybrid_lambda: float = 0.01, schedule: Schedule | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.num_states = vocab_size + 1
        self.pi = F.one_hot(torch.tensor(vocab_size), vocab_size + 1).double()
        super().__init__(vocab_size, T, hybrid_lambda, schedule, dtype)

    def _prior_kl_per_token(self, a: float) -> float:
        return math.inf  # pi never leaves the mask, q does with probability a

    def _check_width(self, C: int) -> bool:
        if C == self.vocab_size:
            return False
        if C == self.num_states:
            return True
        raise ValueError(f"denoiser returned {C} logits per position; expected one of "
                         f"{(self.vocab_size, self.vocab_size + 1)}")


class UniformD3PM(UniformState, D3PMProcess):
    """``K = V`` states, ``pi = 1 / V``."""

    def __init__(self, vocab_size: int, T: int = 1000, hybrid_lambda: float = 0.01, schedule: Schedule | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.num_states = vocab_size
        self.pi = torch.full((vocab_size,), 1.0 / vocab_size, dtype=torch.float64)
        super().__init__(vocab_size, T, hybrid_lambda, schedule, dtype)

    def _prior_kl_per_token(self, a: float) -> float:
        V = self.vocab_size
        q_own = a + (1.0 - a) / V
        return q_own * math.log(q_own * V) + (V - 1) * (1.0 - a) / V * math.log1p(-a)


# The state space is chosen once, by name (the module's ``state_space``), here.
D3PM_PROCESSES: dict[str, type[D3PMProcess]] = {"absorbing": AbsorbingD3PM, "uniform": UniformD3PM}
D3PM_SCHEDULES: dict[str, type[Schedule]] = {"linear": Linear, "cosine": ShiftedCosine}


@dataclass(frozen=True)
class D3PMDefaults:
    """Austin et al.'s setting for one state space (configs/README.md cites each value)."""

    schedule: str  # a key of D3PM_SCHEDULES
    hybrid_lambda: float  # their text runs' lambda (0: trained on L_vb alone)


# The one place the per-state-space defaults live. Austin et al. 2021: the absorbing runs use
# beta_t = 1/(T - t + 1) (sections 3.2, 6, App. A.7) and L_{lambda=0.01} at text (Table 1; App. B.2
# Table 5: 1.44 vs 1.47 bits/char with L_vb); the uniform runs use the cosine schedule (section 3.2,
# App. B.2 Table 6) and L_vb, "L_vb was better for D3PM uniform" (section 5.1; Table 5: 1.61 vs 1.91
# with L_{lambda=0.01}; LM1B, section 5.2: lambda 0.01 "reduced performance for the other models").
D3PM_DEFAULTS: dict[str, D3PMDefaults] = {
    "absorbing": D3PMDefaults(schedule="linear", hybrid_lambda=0.01),
    "uniform": D3PMDefaults(schedule="cosine", hybrid_lambda=0.0),
}


def d3pm_options(state_space: str, schedule: str | None = None,
                 hybrid_lambda: float | None = None) -> tuple[str, float]:
    """``(schedule, hybrid_lambda)`` with each ``None`` replaced by ``D3PM_DEFAULTS[state_space]``'s
    value; names are checked here, values by the process."""
    if state_space not in D3PM_PROCESSES:
        raise ValueError(f"unknown state_space {state_space!r}; choose one of {sorted(D3PM_PROCESSES)}")
    if schedule is not None and schedule not in D3PM_SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(D3PM_SCHEDULES)}")
    default = D3PM_DEFAULTS[state_space]
    return (default.schedule if schedule is None else schedule,
            default.hybrid_lambda if hybrid_lambda is None else hybrid_lambda)


def make_d3pm(vocab_size: int, T: int = 1000, state_space: str = "absorbing", hybrid_lambda: float | None = 0.01,
              schedule: str | None = "linear", dtype: torch.dtype = torch.float32) -> D3PMProcess:
    """The D3PM process by names: ``state_space`` ``absorbing`` or ``uniform``; ``schedule`` ``linear`` or
    ``cosine``. ``None`` for ``schedule`` or ``hybrid_lambda``: Austin et al.'s value for the state
    space (:data:`D3PM_DEFAULTS`); the defaults here are the process's own (linear, 0.01)."""
    schedule, hybrid_lambda = d3pm_options(state_space, schedule, hybrid_lambda)
    return D3PM_PROCESSES[state_space](vocab_size, T, hybrid_lambda, D3PM_SCHEDULES[schedule](), dtype)
