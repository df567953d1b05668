"""Rendering samples (PNG grids, text) and logging them to TensorBoard during validation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchvision.utils import make_grid, save_image

from lightning_md4.diffusion.variance import estimator_stats, nelbo_estimate


def save_samples(tokens: Tensor, datamodule: Any, output: str | Path, num_classes: int = 0) -> Path:
    """Write ``tokens`` [B, N] as a PNG grid (image data) or one sample per line (text data).

    Samples of a class-conditional model (``num_classes > 0``, labels ``i % num_classes``) are laid
    out one row per class, see :func:`class_rows`.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    images = datamodule.to_images(tokens.cpu())
    if images is not None:
        if output.suffix.lower() != ".png":
            output = output.with_suffix(".png")
        images, nrow = class_rows(images, num_classes)
        save_image(upscale(images), output, nrow=nrow, padding=2, pad_value=1.0)
        return output
    text = datamodule.decode(tokens.cpu())
    if text is None:
        text = [" ".join(map(str, row)) for row in tokens.tolist()]
    output.write_text("\n".join(text) + "\n", encoding="utf-8")
    return output


def class_rows(images: Tensor, num_classes: int) -> tuple[Tensor, int]:
    """``(images, nrow)`` for ``make_grid``: images ``[B, C, H, W]`` drawn with labels
    ``i % num_classes`` (``DiffusionModule.sample``'s default) reordered so that grid row ``c``
    holds class ``c``. A square grid, in drawing order, when ``num_classes`` is 0 or does not
    divide ``B`` (rows of unequal length do not make a grid).
    """
    B = len(images)
    if not num_classes or B % num_classes:
        return images, int(math.ceil(math.sqrt(B)))
    by_class = torch.argsort(torch.arange(B) % num_classes, stable=True)
    return images[by_class], B // num_classes


def upscale(images: Tensor, min_size: int = 64) -> Tensor:
    """Nearest-neighbour upscaling so that tiny images (8x8 digits) are visible in a grid."""
    factor = max(1, min_size // images.shape[-1])
    return images.repeat_interleave(factor, -1).repeat_interleave(factor, -2)


class SampleLogger(pl.Callback):
    """At each validation, draw samples on rank 0 and log them to TensorBoard.

    Sampling happens at the first validation batch, while ``EMAWeightAveraging`` has the averaged
    weights swapped in, so the samples show the model that evaluation scores. A class-conditional
    model draws the classes in turn with classifier-free guidance of scale ``guidance``, and the
    image grid has one row per class when ``num_samples`` is a multiple of the classes.
    """

    def __init__(self, num_samples: int = 16, steps: int = 64, grid: str = "cosine", seed: int = 0,
                 guidance: float = 0.0) -> None:
        self.num_samples, self.steps, self.grid, self.seed = num_samples, steps, grid, seed
        self.guidance = guidance

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero or dataloader_idx != 0:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or trainer.datamodule is None:
            return
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        guidance = {"guidance": self.guidance} if pl_module.num_classes else {}
        tokens, nfe = pl_module.sample(self.num_samples, self.steps, self.grid, generator=generator, **guidance)
        step = trainer.global_step
        images = trainer.datamodule.to_images(tokens.cpu())
        grid = None
        if images is not None:
            images, nrow = class_rows(images, pl_module.num_classes)
            grid = make_grid(upscale(images), nrow=nrow, pad_value=1.0)
        text = trainer.datamodule.decode(tokens.cpu())
        for lg in loggers:
            if grid is not None:
                lg.experiment.add_image("samples", grid, step)
            if text is not None:
                # Markdown code block so TensorBoard keeps spaces and line breaks.
                lg.experiment.add_text("samples", "\n\n".join(f"    {line}" for line in text), step)
            lg.experiment.add_scalar("samples/nfe", nfe, step)


class EstimatorVarianceMonitor(pl.Callback):
    """At each validation, how noisy the training estimator is: its NELBO and gradient over
    ``draws`` noise draws on the first ``num_sequences`` validation sequences.

    Uses the model's own process and ``antithetic`` setting; for each ``m`` in
    ``samples_per_sequence`` it logs ``val/nelbo_estimator_var_m{m}``, ``val/grad_norm_var_m{m}``,
    ``val/grad_var_m{m}`` (total variance of the gradient vector) and ``val/grad_norm_mean_m{m}``
    (see :mod:`lightning_md4.diffusion.variance`). The batch and the noise seed are fixed, so the
    numbers are comparable across runs and identical on every DDP rank (no collectives needed).
    The model is in eval mode during validation, so dropout adds no noise of its own.
    """

    def __init__(self, draws: int = 16, num_sequences: int = 32, samples_per_sequence: list[int] | None = None,
                 seed: int = 0) -> None:
        self.draws, self.num_sequences, self.seed = draws, num_sequences, seed
        self.samples_per_sequence = samples_per_sequence or [1]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.datamodule is None:
            return
        val_set = trainer.datamodule.val_set
        params = [p for p in pl_module.parameters() if p.requires_grad]
        # Validation runs under inference mode; gradients need it switched off.
        with torch.inference_mode(False), torch.enable_grad():
            items = [val_set[i] for i in range(min(self.num_sequences, len(val_set)))]
            x0 = torch.stack([item["x0"] for item in items]).clone().to(pl_module.device)
            y = torch.as_tensor([item["y"] for item in items], device=pl_module.device) if "y" in items[0] else None
            for m in self.samples_per_sequence:
                generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
                # Labels in the row order of nelbo_estimate's repeat_interleave, bound by the module
                # as in training (a class-conditional network needs them).
                batch = {"x0": x0} if y is None else {"x0": x0, "y": y.repeat_interleave(m)}
                denoiser = pl_module.denoiser(batch)
                stats = estimator_stats(
                    lambda: nelbo_estimate(pl_module.process, denoiser, x0, m, pl_module.hparams.antithetic,
                                           generator),
                    params, self.draws)
                pl_module.log_dict({f"val/nelbo_estimator_var_m{m}": stats.nelbo_var,
                                    f"val/grad_norm_var_m{m}": stats.grad_norm_var,
                                    f"val/grad_var_m{m}": stats.grad_var,
                                    f"val/grad_norm_mean_m{m}": stats.grad_norm_mean}, sync_dist=False)
