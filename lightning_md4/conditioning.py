"""Class conditioning as plain denoisers ``(xt [B, N], t [B]) -> [B, N, V]``, so the diffusion
processes never learn about labels: the module binds a batch's labels to the network, and the
sampler gets a classifier-free-guided denoiser.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class LabelledNet(Protocol):
    """A network taking class labels ``y [B]`` (``num_classes`` is the null label); the
    transformer also takes ``positions=`` (see ``ClassConditioned``)."""

    num_classes: int
    time_conditioned: bool

    def __call__(self, xt: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor: ...


def tile_labels(y: Tensor, rows: int) -> Tensor:
    """Labels for ``rows`` rows when a process stacks copies of the batch (``x0.repeat(k, 1)``,
    as D3PM's exact evaluation does): row ``r`` belongs to example ``r % len(y)``."""
    if rows % y.shape[0]:
        raise ValueError(f"{rows} rows are not whole copies of a batch of {y.shape[0]} labels")
    return y.repeat(rows // y.shape[0])


class ClassConditioned:
    """``net`` with the labels ``y [B]`` bound, and classifier-free guidance of scale ``w``:

        denoiser(xt, t) = (1 + w) net(xt, t, y) - w net(xt, t, null)

    For softmax outputs (MD4, GenMD4, D3PM) this is, per position, the distribution
    ``p(x0 | xt, y)^(1+w) p(x0 | xt)^(-w)`` renormalised: the log-softmax constants cancel because
    the weights sum to 1. Only which token a position takes is guided; when it is unmasked stays
    the schedule's, which avoids the too-early unmasking of guiding the unnormalised rates
    (arXiv 2507.08965). For SEDD's log-scores it is the geometric mix of the
    conditional and unconditional rates (Nisonoff et al. 2024). ``w = 0`` (training, evaluation)
    is the conditional model in one network pass; ``w != 0`` runs both passes as one batch of ``2B``.

    ``positions`` (bool ``[B, N]``, given by ``MaskedDiffusion`` with ``logits_at: masked``) is
    passed on to the network, which then returns the rows ``logits[positions]``, ``[M, V]``.
    """

    def __init__(self, net: LabelledNet, y: Tensor, w: float = 0.0) -> None:
        self.net, self.y, self.w = net, y, float(w)
        self.time_conditioned = net.time_conditioned

    def __call__(self, xt: Tensor, t: Tensor, positions: Tensor | None = None) -> Tensor:
        y = tile_labels(self.y, xt.shape[0])
        # Only when given: networks without positions= (the UNet) keep working.
        rows = {} if positions is None else {"positions": positions}
        if self.w == 0.0:
            return self.net(xt, t, y, **rows)
        if positions is not None:
            # The selected rows come example by example, so the first half are the conditional ones.
            rows = {"positions": torch.cat([positions, positions])}
        null = torch.full_like(y, self.net.num_classes)
        cond, uncond = self.net(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([y, null]), **rows).chunk(2)
        return (1.0 + self.w) * cond - self.w * uncond
