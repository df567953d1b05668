"""MDLM (Sahoo et al. 2024): masked diffusion through the SUBS parameterisation
(:mod:`lightning_md4.diffusion.subs`); added as this one file and ``configs/mdlm_tiny_text.yaml``."""

from __future__ import annotations

from lightning_md4.diffusion.schedules import ScheduleName, make_schedule
from lightning_md4.diffusion.subs import SubsMaskedDiffusion
from lightning_md4.modules.base import DiffusionModule, OptimConfig
from lightning_md4.modules.registry import register_method
from lightning_md4.nets import NetworkConfig


@register_method(process="lightning_md4.diffusion.subs", state_spaces=("absorbing",), samplers=("ancestral",),
                 summary="masked diffusion, SUBS parameterisation (Sahoo et al. 2024)")
class MDLM(DiffusionModule):
    """MDLM. Args: ``schedule`` and ``schedule_kwargs`` as MD4's (MDLM: ``loglinear``, eps 1e-3);
    the rest: see ``DiffusionModule``."""

    def __init__(self, vocab_size: int, seq_len: int, schedule: ScheduleName = "loglinear",
                 schedule_kwargs: dict[str, float] | None = None, network: NetworkConfig | None = None,
                 optim: OptimConfig | None = None, antithetic: bool = True, seed: int = 0,
                 eval_seed: int = 0) -> None:
        super().__init__(vocab_size, seq_len, network, optim, antithetic, seed, eval_seed)
        self._process = SubsMaskedDiffusion(make_schedule(schedule, **(schedule_kwargs or {})), vocab_size)

    @property
    def process(self) -> SubsMaskedDiffusion:
        return self._process
