"""D3PM baseline: discrete-time diffusion on the same backbone, data and optimiser as MD4."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lightning_md4.diffusion.base import UniformState
from lightning_md4.diffusion.d3pm import D3PM_PROCESSES, D3PMProcess, StepNoise, make_d3pm
from lightning_md4.diffusion.streams import Stream, keyed_uniform, stream_id
from lightning_md4.modules.base import DiffusionModule, OptimConfig
from lightning_md4.nets import NetworkConfig


class D3PM(DiffusionModule):
    """D3PM (Austin et al. 2021) with the x0-parameterisation and the hybrid loss.

    The network outputs logits over the V real tokens, so p~ gives the mask zero probability
    (MD4's choice); training uses one step t per example and the hybrid loss
    ``T (kl_t + hybrid_lambda * CE_t)``: Austin et al.'s per-step loss ``kl_t + lambda CE_t`` (kl_t
    is one of the T terms of L_vb), under which their published numbers were trained, scaled by T
    so that its bound part is the L_vb estimate (``D3PMProcess.loss``). Training and
    validation report that L_vb estimate, without the CE term.

    Args:
        T: number of diffusion steps (paper: 1000 for text8).
        state_space: ``absorbing`` or ``uniform``.
        hybrid_lambda: weight of the x0 cross-entropy (0.01 text, 0.001 images).
        exact_test: ``md4 test`` sums all T terms of the bound (D3PM's evaluation; T network passes
            per batch) instead of the one-draw estimate that validation uses. Its forward draws
            are keyed by ``(eval_seed, example index, step)``: a sequence's number does not depend
            on the batch size, the batch order or the number of devices.
        (the rest: see ``DiffusionModule``)
    """

    def __init__(self, vocab_size: int, seq_len: int, T: int = 1000,
                 state_space: Literal["absorbing", "uniform"] = "absorbing",
                 hybrid_lambda: float = 0.01, exact_test: bool = False,
                 network: NetworkConfig | None = None, optim: OptimConfig | None = None,
                 antithetic: bool = True, seed: int = 0, eval_seed: int = 0) -> None:
        super().__init__(vocab_size, seq_len, network, optim, antithetic, seed, eval_seed)
        self._process = make_d3pm(vocab_size, T=T, state_space=state_space, hybrid_lambda=hybrid_lambda)

    @property
    def process(self) -> D3PMProcess:
        return self._process

    def train_objective(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        t, noise = self.train_noise(batch)
        objective, nelbo = self.process.loss(self.denoiser(batch), batch["x0"], t=t, noise=noise)
        return objective, nelbo.detach()

    def posterior_depends_on_time(self) -> bool:
        """Uniform kernel: q(x0 | x_t) depends on t (no token is known clean); absorbing: it does not."""
        return issubclass(D3PM_PROCESSES[self.hparams.state_space], UniformState)

    def exact_test_noise(self, index: Tensor, seq_len: int) -> StepNoise:
        """The forward-draw uniforms ``[B, N]`` of each step t, keyed by ``(eval_seed, index, t)``.

        ``index``: LongTensor ``[B]`` of the examples' indices in the data set.
        """
        seed = self.hparams.eval_seed
        return lambda t: keyed_uniform(seed, index, seq_len, stream=stream_id(Stream.EXACT_TEST, step=t))

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if not self.hparams.exact_test:
            return super().test_step(batch, batch_idx)
        x0 = batch["x0"]
        noise = self.exact_test_noise(batch["index"], x0.shape[1])
        nelbo = self.process.nelbo_exact(self.denoiser(batch), x0, batch_T=8, step_noise=noise)
        self.log_eval("test", nelbo / x0.shape[1])
