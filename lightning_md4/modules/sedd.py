"""SEDD baseline: score entropy on the same backbone, data and optimiser as MD4."""

from __future__ import annotations

from typing import Any, Literal

from lightning_md4.diffusion.sedd import ScoreEntropyDiffusion, make_sedd
from lightning_md4.modules.base import DiffusionModule, OptimConfig
from lightning_md4.modules.legacy import rename_options
from lightning_md4.modules.registry import register_method
from lightning_md4.nets import NetworkConfig


# Uniform state space: any token may be noise, and how likely it is to be clean falls with t, so
# the network always sees t. Absorbing: the optimal raw output ``log mu + log V`` does not depend on
# t (the score's sigma_bar(t) factor is applied outside the network).
@register_method(process="lightning_md4.diffusion.sedd", state_spaces=("absorbing", "uniform"),
                 samplers=("analytic", "euler"), time_dependent=("uniform",),
                 summary="score entropy (Lou et al. 2024)")
class SEDD(DiffusionModule):
    """SEDD (Lou et al. 2024). The network is conditioned on the total noise sigma_bar(t).

    Args:
        schedule: the noise schedule, ``loglinear`` (eps) or ``geometric`` (sigma_min, sigma_max).
        state_space: ``absorbing`` (the paper's best) or ``uniform``.
        t_min: lower time limit of training and evaluation draws (SEDD's code: 1e-3).
        sampler: ``analytic`` (Tweedie tau-leaping) or ``euler``, for samples at validation.
        (the rest: see ``DiffusionModule``)
    """

    def __init__(self, vocab_size: int, seq_len: int, schedule: Literal["loglinear", "geometric"] = "loglinear",
                 state_space: Literal["absorbing", "uniform"] = "absorbing", eps: float = 1e-3, sigma_min: float = 1e-4,
                 sigma_max: float = 20.0, t_min: float = 0.0, sampler: Literal["analytic", "euler"] = "analytic",
                 network: NetworkConfig | None = None, optim: OptimConfig | None = None,
                 antithetic: bool = True, seed: int = 0, eval_seed: int = 0) -> None:
        super().__init__(vocab_size, seq_len, network, optim, antithetic, seed, eval_seed)
        self._process = make_sedd(vocab_size, schedule, state_space, eps, sigma_min, sigma_max, t_min, sampler)

    @property
    def process(self) -> ScoreEntropyDiffusion:
        return self._process

    def schedule_summary(self) -> str:
        return f"{self.hparams.schedule} noise, {self.hparams.state_space}"

    @classmethod
    def upgrade_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """SEDD's ``graph`` became ``state_space`` (its value ``absorb``, ``absorbing``) and ``noise``
        (a schedule name) ``schedule``."""
        return rename_options(hparams, {"graph": "state_space", "noise": "schedule"},
                              {"state_space": {"absorb": "absorbing"}})
