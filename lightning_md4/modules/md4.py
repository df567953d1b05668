"""MD4: masked diffusion with a fixed scalar schedule."""

from __future__ import annotations

import inspect
from typing import Literal

from torch import Tensor

from lightning_md4.diffusion.masked import MaskedDiffusion
from lightning_md4.modules.base import DiffusionModule, OptimConfig
from lightning_md4.modules.registry import register_method
from lightning_md4.nets import NetworkConfig
from lightning_md4.diffusion.schedules import ScheduleName, make_schedule


@register_method(process="lightning_md4.diffusion.masked", state_spaces=("absorbing",), samplers=("ancestral",),
                 summary="masked diffusion with a fixed schedule (Shi et al. 2024)")
class MD4(DiffusionModule):
    """MD4 (Shi et al. 2024): the continuous-time ELBO as a weighted cross-entropy.

    Args:
        schedule: ``linear``, ``cosine``, ``polynomial``, ``geometric`` or ``loglinear``.
        schedule_kwargs: the schedule's parameters, e.g. ``{k: 2.0}`` for polynomial,
            ``{clip_eps: 1e-4}`` for the official code's clipping.
        logits_at: ``masked`` runs the output head on masked positions only (same loss, fewer
            FLOPs, but a host sync; measured in benchmarks/README.md), ``all`` on every position.
        ce_chunk_rows: compute the cross-entropy in float32 chunks of this many rows rather than
            on a float32 copy of all the logits (same loss, less memory); ``null``: one chunk.
        ce_weight: an ablation, off (0) by default: train on ``nelbo + ce_weight * CE``, a flat
            cross-entropy weight beside the bound's 1/t-like one (D3PM's hybrid term: its lambda
            weighs ``lambda T`` = 10 at the text settings). Every reported NELBO stays the bound.
        (the rest: see ``DiffusionModule``)
    """

    def __init__(self, vocab_size: int, seq_len: int, schedule: ScheduleName = "linear",
                 schedule_kwargs: dict[str, float] | None = None, network: NetworkConfig | None = None,
                 optim: OptimConfig | None = None, antithetic: bool = True, seed: int = 0,
                 eval_seed: int = 0, logits_at: Literal["all", "masked"] = "all",
                 ce_chunk_rows: int | None = None, ce_weight: float = 0.0) -> None:
        super().__init__(vocab_size, seq_len, network, optim, antithetic, seed, eval_seed)
        if ce_weight < 0:
            raise ValueError(f"ce_weight is {ce_weight}; it must be >= 0 (0 trains on the bound alone)")
        try:
            sch = make_schedule(schedule, **(schedule_kwargs or {}))
        except TypeError as err:
            raise ValueError(f"bad schedule_kwargs {schedule_kwargs} for schedule {schedule!r}: {err}") from None
        if logits_at == "masked" and "positions" not in inspect.signature(self.net.forward).parameters:
            raise ValueError(f"logits_at: masked needs a network that takes positions= (the transformer); "
                             f"{type(self.net).__name__} does not, so use logits_at: all")
        self._process = MaskedDiffusion(sch, vocab_size, logits_at, ce_chunk_rows)

    @property
    def process(self) -> MaskedDiffusion:
        return self._process

    def train_objective(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        t, noise = self.train_noise(batch)
        objective, nelbo = self.process.loss(self.denoiser(batch), batch["x0"], t=t, noise=noise,
                                             ce_weight=self.hparams.ce_weight)
        return objective, nelbo.detach()
