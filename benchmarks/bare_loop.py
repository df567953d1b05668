"""The bare-loop anchor of ``benchmarks/speed.py``: MD4's training step as a plain PyTorch loop.

The same work as an ``md4 fit`` step, without what the framework adds around it: no Trainer,
callbacks, EMA, logger, progress bar, NaN check or data loader. It takes the library's pieces,
not a rewrite of them:

- the network and loss: the ``MD4`` module ``speed.build_module`` builds at the config's shape,
  with the baseline's loss settings (head on every position, one cross-entropy call); the loss is
  ``train_objective`` (the module's ``train_noise``, keyed by step and example as in a fit, then
  ``process.nelbo``) divided by the sequence length, as ``training_step`` returns it;
- the optimiser: AdamW on the module's ``param_groups`` with the config's lr, betas and weight
  decay (fused on a GPU), the warm-up + cosine ``LambdaLR`` over the run's ``max_steps``, stepped
  every step, gradient clipping by norm at the config's ``gradient_clip_val``, ``zero_grad`` to
  ``None``: what ``configure_optimizers`` and Lightning's automatic optimisation do;
- the precision: ``precision: null`` is ``md4 fit``'s default (float32 on the CPU, bf16 autocast
  on a GPU);
- the data: the same random-token file the fit rows read, loaded into memory once, batches as
  views of it (with the example indices the noise is keyed on).

The module is not attached to a Trainer; ``train_noise`` reads the step, world size and
accumulation from a stand-in (:class:`LoopState`). ``speed.py`` runs this in its own fresh process
(``python -m benchmarks.bare_loop SPEC.json``) before each chain of fit rows, timed like them:
``warmup`` untimed steps, then ``steps`` timed ones with a device sync only at the two ends.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks import speed
from lightning_md4.checkpoints import default_device, default_precision
from lightning_md4.modules.base import DiffusionModule


@dataclass
class LoopState:
    """What the module reads from its trainer (``train_noise``: step, world and accumulation;
    ``configure_optimizers``: the run's length), for one device without accumulation."""

    estimated_stepping_batches: int
    global_step: int = 0
    world_size: int = 1
    global_rank: int = 0
    accumulate_grad_batches: int = 1


def autocast_dtype(precision: str | None) -> torch.dtype | None:
    """The autocast dtype of a Trainer ``precision`` (``None``: none), for the ones the anchor replicates."""
    precision = str(precision or default_precision())
    if precision in ("32-true", "32"):
        return None
    if precision == "bf16-mixed":
        return torch.bfloat16
    raise ValueError(f"the bare loop does not replicate precision {precision!r} (only 32-true and bf16-mixed)")


class BareLoop:
    """The network, loss, AdamW and learning-rate schedule of an ``md4 fit`` run at ``shape``.

    ``total_steps`` is the fit's ``max_steps`` (the cosine decay's length). The module is built
    with the current RNG state, so after ``torch.manual_seed(s)`` its weights are those of a fit
    with ``seed_everything: s``.
    """

    def __init__(self, shape: speed.Shape, total_steps: int, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.module: DiffusionModule = speed.build_module(shape, "MD4").to(self.device)
        self.module.train()
        self.state = LoopState(estimated_stepping_batches=total_steps)
        self.module._trainer = self.state
        # The module's own AdamW and schedule, so the anchor follows any change to them.
        optim = self.module.configure_optimizers()
        self.optimizer, self.scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
        self.clip = shape.gradient_clip_val
        self.dtype = autocast_dtype(shape.precision)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The training loss of ``batch`` at the current step: what ``training_step`` returns."""
        autocast = contextlib.nullcontext() if self.dtype is None else torch.autocast(self.device.type, self.dtype)
        with autocast:
            objective, _ = self.module.train_objective(batch)
        return objective.mean() / batch["x0"].shape[1]

    def step(self, batch: dict[str, Tensor]) -> Tensor:
        """One optimiser step on ``batch``; its loss (before the update), not synced to the host."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.state.global_step += 1
        return loss.detach()


def memory_batches(tokens: Path, batch: int, seq_len: int, count: int, device: str) -> list[dict[str, Tensor]]:
    """``count`` batches of consecutive ``seq_len`` chunks of the token file, held in memory on ``device``."""
    rows = torch.from_numpy(np.asarray(np.load(tokens, mmap_mode="r")[: count * batch * seq_len]).astype(np.int64))
    rows = rows.view(count * batch, seq_len).to(device)
    index = torch.arange(count * batch, device=device)
    return [{"x0": rows[i * batch:(i + 1) * batch], "index": index[i * batch:(i + 1) * batch]} for i in range(count)]


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Time the bare loop as :class:`speed.StepTimer` times a fit row; the same result fields."""
    shape, timing = speed.Shape(**spec["shape"]), speed.Timing(**spec["timing"])
    device = default_device()
    torch.manual_seed(0)  # the fit rows' seed_everything: 0
    loop = BareLoop(shape, total_steps=timing.warmup + timing.steps + 1, device=device)
    batches = memory_batches(Path(spec["tokens"]), shape.batch, shape.seq_len, timing.warmup + timing.steps, device)
    for batch in batches[: timing.warmup]:
        loop.step(batch)
    speed.sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), speed.process_cpu_seconds()
    for batch in batches[timing.warmup:]:
        loss = loop.step(batch)
    speed.sync(device)
    seconds = time.perf_counter() - start
    return speed.timed_result(seconds, timing.steps, batches[-1]["x0"], float(loss), loop.module, cpu_start,
                              spec["flops_per_batch"], timing.available_flops)


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.bare_loop SPEC.json``: run the spec's loop, write its result JSON."""
    spec_path = Path((argv if argv is not None else sys.argv[1:])[0])
    spec = json.loads(spec_path.read_text())
    Path(spec["output"]).write_text(json.dumps(run(spec)))


if __name__ == "__main__":
    main()
