"""LightningModules: a shared base and one thin subclass per method."""

from lightning_md4.modules.ar import AR
from lightning_md4.modules.base import DiffusionModule, OptimConfig
from lightning_md4.modules.d3pm import D3PM
from lightning_md4.modules.genmd4 import GenMD4
from lightning_md4.modules.md4 import MD4
from lightning_md4.modules.mdlm import MDLM
from lightning_md4.modules.sedd import SEDD

__all__ = ["AR", "D3PM", "DiffusionModule", "GenMD4", "MD4", "MDLM", "OptimConfig", "SEDD"]
