"""AR: the autoregressive baseline on the shared transformer, made causal (same blocks and width).

Its loss, and the number ``md4 validate``/``md4 test`` print as the NELBO, is the exact negative
log-likelihood in nats per token over the same N tokens as the diffusion bounds (BOS = the mask
id; :mod:`lightning_md4.diffusion.autoregressive`), so the two compare directly. The NLL is exact,
so ``--eval_draws`` changes nothing (it is ignored, with one line) and there is no ``--eval_T``.
``sample`` keeps the base signature for ``md4 sample``, ``SampleLogger`` and ``md4 genppl``:
``steps`` and ``grid`` are ignored (one token per network evaluation, NFE = seq_len).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_md4.diffusion.autoregressive import Autoregressive
from lightning_md4.modules.base import DiffusionModule, OptimConfig
from lightning_md4.modules.registry import register_method
from lightning_md4.nets import NetworkConfig, UNetConfig, network_config


# No noise and no time input; its likelihood is exact, so it has no evaluation noise to seed.
@register_method(process="lightning_md4.diffusion.autoregressive", state_spaces=("causal",),
                 samplers=("left-to-right",), eval_options=(), summary="autoregressive baseline, causal transformer")
class AR(DiffusionModule):
    """Next-token prediction. The network config is the shared transformer's with ``causal`` on and
    ``time_conditioning`` off (both set here, whatever the config says). Args: see ``DiffusionModule``."""

    def __init__(self, vocab_size: int, seq_len: int, network: NetworkConfig | None = None,
                 optim: OptimConfig | None = None) -> None:
        net_cfg = network_config(network)
        if isinstance(net_cfg, UNetConfig):
            raise ValueError("AR needs the transformer (network.kind: unet has no causal mask); drop network.kind")
        if net_cfg.time_conditioning:
            rank_zero_info("AR: a next-token model has no time input, so network.time_conditioning is turned off")
        super().__init__(vocab_size, seq_len, replace(net_cfg, causal=True, time_conditioning=False), optim)
        # The base records its noise options, of which AR has none: its hyper-parameters are its own
        # arguments, so that AR(**hparams) rebuilds it (as md4 validate/test do from a checkpoint).
        for key in ("antithetic", "seed", "eval_seed"):
            self.hparams.pop(key, None)
        self._process = Autoregressive(vocab_size)

    @property
    def process(self) -> Autoregressive:
        return self._process

    def schedule_summary(self) -> str:
        return "none (left to right)"

    def configure_evaluation(self, draws: int = 1, T: int | None = None) -> None:
        if T is not None:
            raise ValueError(f"eval_T={T}: AR's NLL is exact and has no T-step bound; drop eval_T")
        if draws < 1:
            raise ValueError(f"eval_draws is {draws}; it must be a positive integer")
        if draws > 1:
            rank_zero_info(f"AR: the NLL is exact, so eval_draws={draws} is ignored (one pass per sequence)")
        self.eval_draws, self.eval_T = 1, None

    def train_objective(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        nll = self.process.nll(self.denoiser(batch), batch["x0"])
        return nll, nll.detach()

    def eval_nelbo(self, batch: dict[str, Tensor]) -> Tensor:
        return self.process.nll(self.denoiser(batch), batch["x0"]).double()

    @torch.no_grad()
    def sample(self, num_samples: int, steps: int = 0, grid: str = "uniform",
               generator: torch.Generator | None = None, x: Tensor | None = None, labels: Tensor | None = None,
               guidance: float = 0.0, cache: bool = True) -> tuple[Tensor, int]:
        """Left-to-right samples ``[num_samples, seq_len]`` and the NFE (``seq_len`` minus the
        shortest given prefix of ``x``); ``steps`` and ``grid`` are ignored. ``x``: given prefixes,
        ``vocab_size`` (the mask id) at the positions to draw. ``cache=False``: the uncached
        reference sampler. Labels and guidance as the base's."""
        if self.num_classes:
            if labels is None:
                labels = torch.arange(num_samples, device=self.device) % self.num_classes
            labels = labels.to(self.device)
        elif labels is not None or guidance:
            raise ValueError("labels and guidance need a class-conditional network (network.num_classes > 0)")
        was_training = self.net.training
        self.net.eval()
        try:
            return self.process.sample(self.net, (num_samples, self.hparams.seq_len), generator, x, labels,
                                       guidance if self.num_classes else 0.0, cache, self.device)
        finally:
            self.net.train(was_training)
