"""The math of each method, pure torch: one file per process, no Lightning."""

from lightning_md4.diffusion.generalized import GenMaskedDiffusion, PerTokenSchedule
from lightning_md4.diffusion.masked import MaskedDiffusion, masked_cross_entropy

__all__ = ["GenMaskedDiffusion", "MaskedDiffusion", "PerTokenSchedule", "masked_cross_entropy"]
