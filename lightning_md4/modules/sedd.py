"""SEDD baseline: score entropy on the same backbone, data and optimiser as MD4."""

from __future__ import annotations

from typing import Literal

from lightning_md4.diffusion.base import UniformState
from lightning_md4.diffusion.sedd import SEDD_PROCESSES, ScoreEntropyDiffusion, make_sedd
from lightning_md4.modules.base import DiffusionModule, OptimConfig
from lightning_md4.nets import NetworkConfig


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

    def posterior_depends_on_time(self) -> bool:
        """Uniform state space: any token may be noise, and how likely it is to be clean falls with t.
        Absorbing: the optimal raw output ``log mu + log V`` does not depend on t (the score's
        sigma_bar(t) factor is applied outside the network)."""
        return issubclass(SEDD_PROCESSES[self.hparams.state_space], UniformState)
