"""The math of each method, pure torch: one file per process, no Lightning."""

from lightning_md4.diffusion.d3pm import DiscreteDiffusion
from lightning_md4.diffusion.generalized import GenMaskedDiffusion, PerTokenSchedule
from lightning_md4.diffusion.masked import MaskedDiffusion, masked_cross_entropy
from lightning_md4.diffusion.sedd import ScoreEntropyDiffusion

__all__ = ["DiscreteDiffusion", "GenMaskedDiffusion", "MaskedDiffusion", "PerTokenSchedule", "ScoreEntropyDiffusion",
           "masked_cross_entropy"]
