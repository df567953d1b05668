"""MDLM's SUBS parameterisation (Sahoo et al. 2024) of MD4's masked process.

The denoiser may give logits over the V real tokens or over V + 1 (the mask too, MDLM's layout).
SUBS turns them into ``log p(x0 | xt)`` ``[B, N, V]``: zero masking probability (the mask logit
is dropped) and carry-over unmasking (an unmasked token is its own prediction, log-probability 0).
With both, the continuous-time NELBO is MD4's eq. 5 (unmasked positions cost log 1 = 0) and the
ancestral step is MD4's, so the process only changes what the network output means.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_md4.diffusion.masked import MaskedDiffusion
from lightning_md4.diffusion.sampling import Denoiser


class SubsMaskedDiffusion(MaskedDiffusion):
    """MD4's process with the SUBS parameterisation of the denoiser output."""

    def subs(self, logits: Tensor, xt: Tensor) -> Tensor:
        """``log p(x0 | xt)`` ``[B, N, V]`` from logits ``[B, N, V or V + 1]``, at least float32."""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logp = torch.log_softmax(logits[..., :self.vocab_size].to(dtype), dim=-1)  # mask logit dropped
        carry = torch.nn.functional.one_hot(torch.where(xt == self.mask_id, 0, xt), self.vocab_size).bool()
        carried = torch.where(carry, 0.0, -torch.inf).to(dtype)
        return torch.where((xt == self.mask_id)[..., None], logp, carried)

    def cross_entropy(self, denoiser: Denoiser, xt: Tensor, t: Tensor, x0: Tensor, mask: Tensor) -> Tensor:
        """Sum over masked positions of -log p(x0 | xt), ``[B]``; unmasked ones carry over at no cost."""
        logp = self.subs(denoiser(xt, t), xt)
        return -(logp.gather(-1, x0[..., None])[..., 0] * mask).sum(-1)

    def step(self, output: Tensor, x: Tensor, active: Tensor, t: Tensor, s: Tensor,
             generator: torch.Generator | None = None) -> Tensor:
        return super().step(self.subs(output, x), x, active, t, s, generator)
