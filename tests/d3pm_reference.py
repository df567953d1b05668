"""The D3PM reference code's ``log(probs + eps)`` formulation, reproduced to show what it breaks
(tests/test_d3pm_exact.py); not for training: ``D3PMProcess.terms`` is the log-space one.

What it does, with ``eps = 1e-20``, T = 1000: a float16 output gives NaN (1e-20 rounds to 0 and
``0 * log 0`` appears); a bf16 output with the uniform kernel is off by 10% to 20x (``1 - beta_t``
and the 1/V mixtures round); confident predictions are wrong in any dtype (eps leaks mass into
impossible states: thousands of nats of spurious KL at unmasked absorbing positions;
log-probabilities capped near log eps = -46 for the uniform kernel); moderate float32 logits are
fine. That is the instability the MD4 paper reports.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_md4.diffusion.d3pm import D3PMProcess


def eps_terms(process: D3PMProcess, logits: Tensor, x0: Tensor, xt: Tensor, t_index: Tensor,
              eps: float) -> tuple[Tensor, Tensor]:
    """``(kl, ce)`` like ``process.terms``, from ``log(fact1 + eps) + log(fact2 + eps)`` logits of
    both posteriors, in the network output's dtype (no upcast), KL between their softmaxes."""
    dtype = logits.dtype
    probs = torch.softmax(logits, dim=-1)
    logp0 = torch.log_softmax(logits, dim=-1)
    if not process._check_width(logits.shape[-1]):
        probs = torch.cat([probs, torch.zeros_like(probs[..., :1])], dim=-1)
    keep, a_s, abar_s = process._time_factor(t_index, None, xt.ndim)
    pi = process.pi.to(logits.device)
    fact1 = torch.where(torch.arange(process.num_states, device=xt.device) == xt[..., None],
                        (keep + (1.0 - keep) * pi[xt])[..., None], ((1.0 - keep) * pi[xt])[..., None])
    fact1 = fact1.to(dtype)
    a_s, abar_s, pi = a_s[..., None].to(dtype), abar_s[..., None].to(dtype), pi.to(dtype)
    onehot = F.one_hot(x0, process.num_states).to(dtype)
    logit_p = torch.log(fact1 + eps) + torch.log(a_s * probs + abar_s * pi + eps)
    logit_q = torch.log(fact1 + eps) + torch.log(a_s * onehot + abar_s * pi + eps)
    kl = (torch.softmax(logit_q, -1) * (torch.log_softmax(logit_q, -1) - torch.log_softmax(logit_p, -1))).sum(-1)
    ce = -logp0.gather(-1, x0[..., None])[..., 0]
    acc = torch.promote_types(dtype, torch.float32)
    return kl.to(acc).sum(-1), ce.to(acc).sum(-1)


def eps_loss(process: D3PMProcess, logits: Tensor, x0: Tensor, t: Tensor, noise: Tensor,
             eps: float) -> tuple[Tensor, Tensor]:
    """``process.loss`` with ``eps_terms`` in place of ``terms``: ``(objective, nelbo)`` ``[B]``."""
    i = process.step_index(t)
    xt, _ = process.noise_to(x0, i, noise)
    kl, ce = eps_terms(process, logits, x0, xt, i, eps)
    nelbo = process.T * kl + process.prior_kl(x0).to(kl.dtype)
    return nelbo + process.T * process.hybrid_lambda * ce, nelbo
