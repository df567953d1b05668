"""The math of each method, pure torch: one file per process, no Lightning; ``base.py`` holds the
contract they meet and the one sampling loop."""

from lightning_md4.diffusion.base import AbsorbingState, DiffusionProcess, UniformState, sample
from lightning_md4.diffusion.d3pm import AbsorbingD3PM, D3PMProcess, UniformD3PM, make_d3pm
from lightning_md4.diffusion.exact import EnumeratedLaw
from lightning_md4.diffusion.generalized import GenMaskedDiffusion, PerTokenSchedule
from lightning_md4.diffusion.masked import MaskedDiffusion, masked_cross_entropy
from lightning_md4.diffusion.sedd import AbsorbingSEDD, ScoreEntropyDiffusion, UniformSEDD, make_sedd
from lightning_md4.diffusion.subs import SubsMaskedDiffusion

__all__ = ["AbsorbingD3PM", "AbsorbingSEDD", "AbsorbingState", "D3PMProcess", "DiffusionProcess", "EnumeratedLaw",
           "GenMaskedDiffusion", "MaskedDiffusion", "PerTokenSchedule", "ScoreEntropyDiffusion", "SubsMaskedDiffusion",
           "UniformD3PM", "UniformSEDD", "UniformState", "make_d3pm", "make_sedd", "masked_cross_entropy", "sample"]
