"""Callbacks that make training faster without changing what is computed.

Each one is a measured lever (``benchmarks/speed.py``, tables in ``benchmarks/README.md``):

- :class:`CompileNetwork`: ``torch.compile`` of the denoiser.
- :class:`ForeachEMA`: Lightning's EMA with a fused, sync-free update.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


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


class _ForeachEMAModel(AveragedModel):
    """An EMA of a module updated by one fused ``lerp`` over all floating tensors.

    ``AveragedModel.update_parameters`` with an ``avg_fn`` (what ``EMAWeightAveraging`` passes)
    loops over parameters one kernel at a time and reads its device-side counter twice per step,
    two host syncs. This keeps the same state (``module`` and ``n_averaged``, so checkpoints are
    interchangeable) but counts updates on the host.
    """

    def __init__(self, model: nn.Module, decay: float, device: torch.device | None, use_buffers: bool) -> None:
        super().__init__(model, device=device, use_buffers=use_buffers)
        self.ema_update = get_ema_multi_avg_fn(decay)
        self._host_count: int | None = None  # read once from n_averaged, which a resumed run restores

    def _tensors(self, model: nn.Module) -> list[Tensor]:
        tensors = [*model.parameters(), *model.buffers()] if self.use_buffers else [*model.parameters()]
        return [t.detach() for t in tensors]

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
                self.ema_update([a for a, _ in floats], [m for _, m in floats], None)
            for a, m in zip(mine, theirs):
                if not a.is_floating_point():  # integer buffers (counters) are copied, as AveragedModel does
                    a.copy_(m)
        self.n_averaged += 1
        self._host_count += 1


class ForeachEMA(EMAWeightAveraging):
    """``EMAWeightAveraging`` (same arguments, same checkpoints) with :class:`_ForeachEMAModel`."""

    def __init__(self, decay: float = 0.999, device: torch.device | str | None = None, use_buffers: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(device=device, use_buffers=use_buffers, decay=decay, **kwargs)
        self.decay = decay
        self.ema_device = torch.device(device) if isinstance(device, str) else device
        self.ema_use_buffers = use_buffers

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            # The parent's one hook point for the averaged model is this attribute, which its other
            # hooks (swap for validation, checkpoints) use; only the model class differs.
            self._average_model = _ForeachEMAModel(pl_module, self.decay, self.ema_device or pl_module.device,
                                                   self.ema_use_buffers)
