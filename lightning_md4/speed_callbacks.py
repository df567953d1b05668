"""Callbacks that make training faster without changing what is computed (the EMA's warm-up,
on by default, is the one deliberate change: see :class:`ForeachEMA`).

Each one is a measured lever (``benchmarks/speed.py``, tables in ``benchmarks/README.md``):

- :class:`CompileNetwork`: ``torch.compile`` of the denoiser.
- :class:`ForeachEMA`: Lightning's EMA with a fused, sync-free update and a decay that warms up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


class CompileNetwork(Callback):
    """``torch.compile`` the module's network (``pl_module.net``) in place when fitting starts.

    ``nn.Module.compile`` keeps the parameter names, so checkpoints load with or without it. It
    runs at ``on_fit_start``, after the strategy has moved and wrapped the model and after the EMA
    callback has copied the uncompiled network.

    Args:
        mode: ``torch.compile`` mode (``None``, ``"max-autotune"``, ...).
        dynamic: ``False`` compiles for the training shape only, which fuses the most.
    """

    def __init__(self, mode: str | None = None, dynamic: bool | None = False) -> None:
        self.mode, self.dynamic = mode, dynamic

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.net.compile(mode=self.mode, dynamic=self.dynamic)


def warmup_decay(n: int, decay: float, inv_gamma: float = 1.0, power: float = 0.75) -> float:
    """The decay of the EMA update that follows ``n`` earlier updates (k-diffusion's EMA warm-up):

        decay_n = min(decay, 1 - (1 + n / inv_gamma) ** -power)

    ``decay_0 = 0``: the first update copies the weights. ``1 - decay_n ~ (n / inv_gamma) ** -power``,
    so the average always spans a window that grows like ``n ** power`` updates instead of starting
    with ``1 / (1 - decay)`` updates of the initialisation; ``power = 1`` (``inv_gamma = 1``) is the
    plain mean of all iterates. ``power = 3/4`` reaches 0.999 after 10^4 updates and 0.9999 after
    2.2 * 10^5, i.e. a paper run (10^6 steps, decay 0.9999) spends its last 80% at the constant decay.
    """
    return min(decay, 1.0 - (1.0 + n / inv_gamma) ** -power)


class _ForeachEMAModel(AveragedModel):
    """An EMA of a module updated by one fused ``lerp`` over all floating tensors.

    ``AveragedModel.update_parameters`` with an ``avg_fn`` (what ``EMAWeightAveraging`` passes)
    loops over parameters one kernel at a time and reads its device-side counter twice per step,
    two host syncs. This keeps the same state (``module`` and ``n_averaged``, so checkpoints are
    interchangeable) but counts updates on the host. Update ``n + 1`` (``n = n_averaged`` before it)
    is ``ema <- decay_at(n) * ema + (1 - decay_at(n)) * model``; the first one copies the model.
    """

    def __init__(self, model: nn.Module, decay_at: Callable[[int], float], device: torch.device | None,
                 use_buffers: bool) -> None:
        super().__init__(model, device=device, use_buffers=use_buffers)
        self.decay_at = decay_at
        self._host_count: int | None = None  # read once from n_averaged, which a resumed run restores

    def _tensors(self, model: nn.Module) -> list[Tensor]:
        tensors = [*model.parameters(), *model.buffers()] if self.use_buffers else [*model.parameters()]
        return [t.detach() for t in tensors]

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self._host_count is None:
            self._host_count = int(self.n_averaged)
        mine, theirs = self._tensors(self.module), self._tensors(model)
        if len(mine) != len(theirs):
            raise RuntimeError(f"the EMA copy has {len(mine)} tensors but the model {len(theirs)}")
        if self._host_count == 0:
            torch._foreach_copy_(mine, theirs)
        else:
            floats = [(a, m) for a, m in zip(mine, theirs) if a.is_floating_point()]
            if floats:
                weight = 1.0 - self.decay_at(self._host_count)
                torch._foreach_lerp_([a for a, _ in floats], [m for _, m in floats], weight)
            for a, m in zip(mine, theirs):
                if not a.is_floating_point():  # integer buffers (counters) are copied, as AveragedModel does
                    a.copy_(m)
        self.n_averaged += 1
        self._host_count += 1


class ForeachEMA(EMAWeightAveraging):
    """``EMAWeightAveraging`` (same checkpoints) with :class:`_ForeachEMAModel` and a decay that
    warms up with the number of updates (:func:`warmup_decay`).

    A constant decay of 0.9999 leaves 0.9999^10000 = 37% of the first weights in the average at
    step 10,000, and after a 50-step test run the average is still mostly the initialisation; the
    warm-up forgets them at a rate that follows the run's length.

    Args:
        decay: the decay the warm-up grows to (the paper's EMA rate).
        warmup: ``False`` keeps ``decay`` constant from the second update on (Lightning's EMA).
        inv_gamma, power: the warm-up's shape, see :func:`warmup_decay`; ``n`` counts EMA
            updates (optimiser steps with the default ``update_every_n_steps=1``).
        device, use_buffers, kwargs: as ``EMAWeightAveraging``.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, inv_gamma: float = 1.0, power: float = 0.75,
                 device: torch.device | str | None = None, use_buffers: bool = True, **kwargs: Any) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay is {decay}; it must be in [0, 1]")
        if inv_gamma <= 0.0 or power <= 0.0:
            raise ValueError(f"EMA warm-up needs inv_gamma > 0 and power > 0, got {inv_gamma} and {power}")
        super().__init__(device=device, use_buffers=use_buffers, decay=decay, **kwargs)
        self.decay, self.warmup, self.inv_gamma, self.power = decay, warmup, inv_gamma, power
        self.ema_device = torch.device(device) if isinstance(device, str) else device
        self.ema_use_buffers = use_buffers

    def decay_at(self, n: int) -> float:
        """The decay of the update that follows ``n`` earlier updates."""
        return warmup_decay(n, self.decay, self.inv_gamma, self.power) if self.warmup else self.decay

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            # The parent's one hook point for the averaged model is this attribute, which its other
            # hooks (swap for validation, checkpoints) use; only the model class differs.
            self._average_model = _ForeachEMAModel(pl_module, self.decay_at, self.ema_device or pl_module.device,
                                                   self.ema_use_buffers)
