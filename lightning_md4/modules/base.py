"""The LightningModule glue every method shares: network, optimiser, noise, metrics, sampling.

A method subclass registers itself (``@register_method``, :mod:`lightning_md4.modules.registry`),
provides ``process`` (its math object) and, if its training objective differs from
``process.nelbo``, overrides ``train_objective``; ``schedule_summary`` and ``upgrade_hparams`` if its
schedule or its checkpoints' history need them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric
from tqdm.auto import tqdm

from lightning_md4.diffusion.streams import EVAL_DRAW_STREAM  # noqa: F401  (where tests rebuild the evaluation noise)
from lightning_md4.diffusion.streams import Stream, keyed_times, keyed_uniform, stratified_times, stream_id
from lightning_md4.conditioning import ClassConditioned
from lightning_md4.nets import NetworkConfig, build_network, network_config
from lightning_md4.diffusion.base import DiffusionProcess, sample
from lightning_md4.diffusion.sampling import Denoiser, time_grid
from lightning_md4.modules.registry import method_of


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that belongs to another model."""


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr`` over the run's steps."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.03
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        # Checked where declared, so a bad value stops the command before any run folder is touched.
        checks = {"lr": self.lr > 0, "betas": len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                  "weight_decay": self.weight_decay >= 0, "warmup_steps": self.warmup_steps >= 0,
                  "min_lr_ratio": 0 <= self.min_lr_ratio <= 1}
        rules = {"lr": "> 0", "betas": "two values in [0, 1)", "weight_decay": ">= 0", "warmup_steps": ">= 0",
                 "min_lr_ratio": "in [0, 1]"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"optim.{name} is {getattr(self, name)!r}; it must be {rules[name]}")


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier at optimiser step ``step``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DiffusionModule(pl.LightningModule):
    """Shared base of all methods.

    Args:
        vocab_size: number of real tokens V (linked from the DataModule); the mask id is V.
        seq_len: tokens per example (linked from the DataModule).
        network: the denoiser: a ``TransformerConfig`` (default) or a ``UNetConfig`` (``kind: unet``).
        optim: optimiser and learning-rate schedule.
        antithetic: stratify training times over the global batch.
        seed: key of the training noise (times and masks are a function of seed, step, example).
        eval_seed: key of the evaluation noise, so validation numbers are comparable across runs.
    """

    def __init__(self, vocab_size: int, seq_len: int, network: NetworkConfig | None = None,
                 optim: OptimConfig | None = None, antithetic: bool = True, seed: int = 0,
                 eval_seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Plain dicts in the checkpoint (checkpoints load with weights_only=True); dicts accepted back.
        net_cfg = network_config(network)
        if self.posterior_depends_on_time() and not net_cfg.time_conditioning:
            net_cfg = replace(net_cfg, time_conditioning=True)
            rank_zero_info(f"{type(self).__name__}: its posterior depends on t, so network.time_conditioning "
                           "is turned on")
        self.optim_cfg = OptimConfig(**optim) if isinstance(optim, dict) else optim or OptimConfig()
        self.hparams.network, self.hparams.optim = asdict(net_cfg), asdict(self.optim_cfg)
        self.net = build_network(net_cfg, vocab_size, seq_len)
        # NELBO per token in nats, averaged over the epoch's sequences; Lightning computes (reducing
        # over ranks), logs and resets the metric objects logged in ``log_eval``.
        self.metrics = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})
        # Bits per token: the same mean divided by ln 2 after the reduction (exactly nats / ln 2).
        self.bits_metrics = torch.nn.ModuleDict({stage: metric / math.log(2) for stage, metric in self.metrics.items()})

    @property
    def process(self) -> DiffusionProcess:
        raise NotImplementedError

    def posterior_depends_on_time(self) -> bool:
        """Whether the optimal denoiser E[x0 | x_t] changes with t at a fixed x_t; then a network
        that does not see t cannot reach it. Declared by the method's registration (``time_dependent``),
        for the ``state_space`` option if it has one (``save_hyperparameters`` has filled
        ``self.hparams`` before the network is built)."""
        method = method_of(type(self))
        return method is not None and method.posterior_depends_on_time(self.hparams.get("state_space"))

    def schedule_summary(self) -> str:
        """How TensorBoard's HPARAMS tab names the noise schedule of this run (``run_hparams``)."""
        return str(self.hparams.get("schedule", "none"))

    @classmethod
    def upgrade_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint upgrade hook: a checkpoint's hyper-parameters, saved under older names,
        under today's (see :mod:`lightning_md4.modules.legacy`). None by default."""
        return dict(hparams)

    @property
    def num_classes(self) -> int:
        """Class labels the network is conditioned on; 0 for an unconditional network."""
        return getattr(self.net, "num_classes", 0)

    def denoiser(self, batch: dict[str, Tensor]) -> Denoiser:
        """What the process calls: the network, with the batch's labels ``y [B]`` bound when it is
        class-conditional (the processes never see labels)."""
        if not self.num_classes:
            return self.net
        if "y" not in batch:
            raise ValueError(f"network.num_classes is {self.num_classes} but the data has no class labels; "
                             "use an image data module or set network.num_classes: 0")
        return ClassConditioned(self.net, batch["y"])

    # -- noise -----------------------------------------------------------------------------
    # Position of the current micro-batch within its optimiser step, set by ``training_step``.
    micro_index: int = 0

    def train_noise(self, batch: dict[str, Tensor], draw: int = 0) -> tuple[Tensor, Tensor]:
        """Times ``[B]`` stratified over the global batch and mask uniforms ``[B, N]`` for one step.

        The global batch of an optimiser step is accumulate x world x B sequences; this micro-batch
        takes strata ``(micro_index * world + rank) * B`` onwards. ``draw`` picks independent
        masks for methods that noise each sequence more than once; the times are the same for
        every draw.
        """
        x0, index = batch["x0"], batch["index"]
        B, N = x0.shape
        seed, step = self.hparams.seed, self.global_step
        if self.hparams.antithetic:  # one offset per optimiser step, each micro-batch its own strata
            # torch.zeros fills on the device; torch.tensor would copy from the host and sync the stream.
            zero = torch.zeros(1, dtype=torch.int64, device=x0.device)
            u = keyed_uniform(seed, zero, 1, stream=stream_id(Stream.TRAIN_TIME_OFFSET, step))[0, 0]
            world, accumulate = self.trainer.world_size, self.trainer.accumulate_grad_batches
            offset = (self.micro_index * world + self.trainer.global_rank) * B
            u = stratified_times(u, B, offset=offset, total=accumulate * world * B)
        else:
            u = keyed_uniform(seed, index, 1, stream=stream_id(Stream.TRAIN_TIME, step))[:, 0]
        noise = keyed_uniform(seed, index, N, stream=stream_id(Stream.TRAIN_MASK, step, draw))
        return self.process.time_from_uniform(u), noise

    def eval_noise(self, batch: dict[str, Tensor], draw: int = 0) -> tuple[Tensor, Tensor]:
        """Times and masks keyed by the example index: the same on any number of devices.

        Draw ``k`` of ``eval_draws`` shifts each example's time by ``k / eval_draws`` (so the draws
        of one example are stratified over [0, 1)) and takes its own mask stream.
        """
        index = batch["index"]
        seed = self.hparams.eval_seed
        u = torch.remainder(keyed_times(seed, index) + draw / self.eval_draws, 1.0)
        stream = stream_id(Stream.EVAL_MASK, draw=draw)
        return self.process.time_from_uniform(u), keyed_uniform(seed, index, batch["x0"].shape[1], stream=stream)

    # Evaluation protocol: a property of a test run, not of the model, so it is set by
    # ``configure_evaluation`` (``md4 test --eval_draws K --eval_T T``) and not saved in checkpoints.
    eval_draws: int = 1
    eval_T: int | None = None

    def configure_evaluation(self, draws: int = 1, T: int | None = None) -> None:
        """Average the evaluation NELBO over ``draws`` keyed time/mask draws per sequence (SEDD's
        protocol used 1000); ``T`` reports the ``T``-step discrete-time bound instead of the
        continuous one (MD4 paper Table 7: T = 100, 1000, 10000)."""
        if draws < 1:
            raise ValueError(f"eval_draws is {draws}; it must be a positive integer")
        if T is not None and T < 1:
            raise ValueError(f"eval_T is {T}; it must be a positive integer")
        if T is not None and not hasattr(self.process, "nelbo_discrete"):
            raise ValueError(f"eval_T={T}: {type(self).__name__} has no T-step discrete-time bound (MD4 has one); "
                             "drop eval_T to report the continuous-time bound")
        self.eval_draws, self.eval_T = draws, T

    # -- losses ----------------------------------------------------------------------------
    def train_objective(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(objective, nelbo)`` per sequence ``[B]``: what to differentiate, and what to report
        (they differ for methods with a surrogate loss)."""
        t, noise = self.train_noise(batch)
        nelbo = self.process.nelbo(self.denoiser(batch), batch["x0"], t=t, noise=noise)
        return nelbo, nelbo.detach()

    def eval_nelbo(self, batch: dict[str, Tensor]) -> Tensor:
        """The reported NELBO per sequence ``[B]`` in nats, averaged over ``eval_draws`` draws."""
        total = torch.zeros(batch["x0"].shape[0], dtype=torch.float64, device=batch["x0"].device)
        # With many draws a batch takes long, so the draws get a bar of their own under Lightning's.
        trainer = self._trainer  # None when called outside a Trainer
        show = self.eval_draws > 1 and trainer is not None and trainer.progress_bar_callback is not None \
            and trainer.is_global_zero
        for draw in tqdm(range(self.eval_draws), desc="time draws", leave=False, disable=not show):
            t, noise = self.eval_noise(batch, draw)
            if self.eval_T is None:
                nelbo = self.process.nelbo(self.denoiser(batch), batch["x0"], t=t, noise=noise)
            else:
                nelbo = self.process.nelbo_discrete(self.denoiser(batch), batch["x0"], self.eval_T, t=t, noise=noise)
            total += nelbo.double()
        return total / self.eval_draws

    # First step whose training loss was NaN or inf (-1: none), a 0-d tensor on the device: kept every
    # step without a host sync, read at logging steps below and before every checkpoint save
    # (checkpointing.FiniteCheckpoints), so a NaN between logging steps never reaches a checkpoint.
    nonfinite_step: Tensor | None = None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # Lightning steps the optimiser after every accumulate-th batch of an epoch (and after the
        # epoch's last), counting from the epoch's first batch as batch_idx does.
        self.micro_index = batch_idx % self.trainer.accumulate_grad_batches
        objective, nelbo = self.train_objective(batch)
        first = self.nonfinite_step
        if first is None or first.device != objective.device:
            first = torch.full((), -1, dtype=torch.int64, device=objective.device)
        bad = ~torch.isfinite(objective.detach()).all()
        self.nonfinite_step = torch.where(bad & (first < 0), self.global_step, first)
        # A host sync, so only at logging steps.
        if self.global_step % self.trainer.log_every_n_steps == 0 and int(self.nonfinite_step) >= 0:
            raise FloatingPointError(
                f"training loss is not finite (NaN or inf), first at step {int(self.nonfinite_step)}; md4 fit saves no "
                "checkpoint after it, so --ckpt_path last resumes from the last good one: lower optim.lr or set (or lower) "
                "trainer.gradient_clip_val first")
        seq_len = batch["x0"].shape[1]
        nats_per_token = nelbo.mean() / seq_len
        self.log("train/nelbo", nats_per_token, prog_bar=True)
        self.log("train/bpt", nats_per_token / math.log(2))
        return objective.mean() / seq_len

    def _eval_step(self, stage: str, batch: dict[str, Tensor]) -> None:
        nelbo = self.eval_nelbo(batch)
        if not torch.isfinite(nelbo).all():
            raise FloatingPointError(f"{stage} NELBO is not finite (NaN or inf) at step {self.global_step}; "
                                     "lower the learning rate or check the data for out-of-range tokens")
        self.log_eval(stage, nelbo / batch["x0"].shape[1])

    def log_eval(self, stage: str, nats_per_token: Tensor) -> None:
        """Add the batch's NELBO per token ``[B]`` to the epoch's ``{stage}/nelbo`` and ``{stage}/bpt``."""
        self.metrics[stage].update(nats_per_token)
        self.log(f"{stage}/nelbo", self.metrics[stage], on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/bpt", self.bits_metrics[stage], on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    # -- sampling --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, num_samples: int, steps: int, grid: str = "uniform",
               generator: torch.Generator | None = None, x: Tensor | None = None, labels: Tensor | None = None,
               guidance: float = 0.0) -> tuple[Tensor, int]:
        """Draw ``num_samples`` sequences; returns tokens ``[num_samples, seq_len]`` and the NFE.

        A class-conditional network draws class ``labels`` ``[num_samples]`` (default: 0, 1, 2, ...
        cycling through the classes; the null label ``num_classes`` for unconditional samples)
        with classifier-free guidance of scale ``guidance`` (see ``ClassConditioned``).
        """
        denoiser: Denoiser = self.net
        if self.num_classes:
            if labels is None:
                labels = torch.arange(num_samples, device=self.device) % self.num_classes
            denoiser = ClassConditioned(self.net, labels.to(self.device), guidance)
        elif labels is not None or guidance:
            raise ValueError("labels and guidance need a class-conditional network (network.num_classes > 0)")
        was_training = self.net.training
        self.net.eval()
        try:
            return sample(self.process, denoiser, (num_samples, self.hparams.seq_len), time_grid(steps, grid),
                          generator=generator, x=x, device=self.device)
        finally:
            self.net.train(was_training)

    # -- optimisation ----------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices only; norms, biases, embeddings and constants are not decayed."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
        return [{"params": decay, "weight_decay": self.optim_cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        opt = torch.optim.AdamW(self.param_groups(), lr=cfg.lr, betas=tuple(cfg.betas),
                                fused=self.device.type == "cuda")
        total = int(self.trainer.estimated_stepping_batches)
        # Not LinearLR + CosineAnnealingLR: the latter's eta_min is one number for all groups, and each group
        # (GenMD4's w_lr one too) decays to min_lr_ratio times its own lr.
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, cfg.warmup_steps, total, cfg.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoints -----------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model with an error that names the difference."""
        theirs = self.upgrade_hparams(checkpoint.get("hyper_parameters", {}))
        # Through the config class, so a checkpoint saved before a field was added compares with its default.
        their_net = asdict(network_config(theirs.get("network")))
        state_space = self.hparams.get("state_space")
        differences = {
            "model class": (theirs.get("_class_path", type(self).__name__).rsplit(".", 1)[-1], type(self).__name__),
            "vocab_size": (theirs.get("vocab_size", self.hparams.vocab_size), self.hparams.vocab_size),
            "seq_len": (theirs.get("seq_len", self.hparams.seq_len), self.hparams.seq_len),
            "network": (their_net, asdict(self.net.cfg)),
            # absorbing or uniform (D3PM, SEDD); resuming a run must not switch it
            "state_space": (theirs.get("state_space", state_space), state_space),
        }
        for key, (other, mine) in differences.items():
            if other != mine:
                raise CheckpointError(f"checkpoint was made by another model: its {key} is {other!r}, this run's is "
                                 f"{mine!r}. Pass a checkpoint of this model, or drop ckpt_path to start fresh.")
