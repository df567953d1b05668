"""GenMD4: MD4 with a learned per-token schedule, trained with a leave-one-out REINFORCE surrogate."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_md4.diffusion.generalized import GenMaskedDiffusion, PerTokenSchedule
from lightning_md4.modules.base import DiffusionModule, OptimConfig
from lightning_md4.modules.registry import register_method
from lightning_md4.nets import NetworkConfig


# A token is masked at a rate that depends on its value, so how likely each value is under a mask,
# q(x0 | x_t), changes with t: the network always sees t.
@register_method(process="lightning_md4.diffusion.generalized", state_spaces=("absorbing",), samplers=("ancestral",),
                 time_dependent=True, summary="MD4 with learned per-token schedules (Shi et al. 2024, sec. 5)")
class GenMD4(DiffusionModule):
    """GenMD4 (Shi et al. 2024, section 5).

    Args:
        w_init: initial exponent of every token's schedule ``alpha_t(v) = 1 - (1 - eps) t^{w_v}``.
        eps: schedule floor: alpha_1 = eps.
        t_min: lower time limit; a reconstruction term covers [0, t_min].
        estimator: ``rloo`` (the paper's: two noised samples per sequence, each the other's
            baseline) or ``batch`` (MD4's compute: one sample, baseline from the rest of the batch).
        decay_w: apply weight decay to the exponents' raw parameters, as the official code does
            (it pulls w towards softplus(0) = 0.69); off by default.
        w_lr: learning rate of the exponents; ``None`` uses the network's.
        (the rest: see ``DiffusionModule``; the network always sees t: its registration)
    """

    def __init__(self, vocab_size: int, seq_len: int, w_init: float = 1.0, eps: float = 1e-4, t_min: float = 1e-3,
                 estimator: Literal["rloo", "batch"] = "rloo", decay_w: bool = False, w_lr: float | None = None,
                 network: NetworkConfig | None = None, optim: OptimConfig | None = None,
                 antithetic: bool = True, seed: int = 0, eval_seed: int = 0) -> None:
        super().__init__(vocab_size, seq_len, network, optim, antithetic, seed, eval_seed)
        self.schedule = PerTokenSchedule(vocab_size, w_init, eps)
        self._process = GenMaskedDiffusion(self.schedule, vocab_size, t_min)

    @property
    def process(self) -> GenMaskedDiffusion:
        return self._process

    def schedule_summary(self) -> str:
        return "learned per token"

    def train_objective(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        t, noise = self.train_noise(batch, draw=0)
        if self.hparams.estimator == "rloo":
            noise = (noise, self.train_noise(batch, draw=1)[1])
        return self.process.surrogate_loss(self.denoiser(batch), batch["x0"], t=t, noise=noise, estimator=self.hparams.estimator)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        w = self.schedule.w.detach()
        self.log_dict({"w/min": w.min(), "w/mean": w.mean(), "w/max": w.max()})
        return super().training_step(batch, batch_idx)

    def param_groups(self) -> list[dict[str, Any]]:
        raw = self.schedule.raw
        groups = [{**g, "params": [p for p in g["params"] if p is not raw]} for g in super().param_groups()]
        w_group: dict[str, Any] = {"params": [raw], "weight_decay": self.optim_cfg.weight_decay if self.hparams.decay_w else 0.0}
        if self.hparams.w_lr is not None:
            w_group["lr"] = self.hparams.w_lr
        return groups + [w_group]

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        w = self.schedule.w.detach().float().cpu()
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram("w", w, self.global_step)
                table = self.exponent_table(w)
                if table:
                    logger.experiment.add_text("w/extremes", table, self.global_step)

    def exponent_table(self, w: Tensor, k: int = 5) -> str | None:
        """Markdown table of the tokens with the largest and smallest w (text data only)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        names = datamodule.decode(torch.arange(len(w))[None]) if datamodule is not None else None
        if not names:
            return None
        order = torch.argsort(w, descending=True).tolist()
        rows = [f"| {repr(names[0][i])} | {w[i]:.4f} |" for i in order[:k] + order[-k:]]
        return "\n".join(["| token | w |", "|---|---|", *rows])
