"""D3PM baseline: discrete-time diffusion on the same backbone, data and optimiser as MD4."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from lightning_md4.diffusion.d3pm import D3PMProcess, StepNoise, d3pm_options, make_d3pm
from lightning_md4.diffusion.streams import Stream, keyed_uniform, stream_id
from lightning_md4.modules.base import CheckpointError, DiffusionModule, OptimConfig
from lightning_md4.modules.legacy import rename_options
from lightning_md4.modules.registry import register_method
from lightning_md4.nets import NetworkConfig


# Uniform kernel: q(x0 | x_t) depends on t (no token is known clean), so the network always sees t;
# absorbing: it does not. ``exact_test`` changes how md4 test scores a checkpoint, not the model.
@register_method(process="lightning_md4.diffusion.d3pm", state_spaces=("absorbing", "uniform"),
                 samplers=("ancestral",), time_dependent=("uniform",), eval_options=("eval_seed", "exact_test"),
                 summary="discrete-time diffusion, T steps (Austin et al. 2021)")
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
        schedule: ``linear`` (abar_t = 1 - t/T, beta_t = 1/(T - t + 1)) or ``cosine`` (Nichol's).
            None: Austin et al.'s schedule for the state space (``D3PM_DEFAULTS``): linear for
            absorbing, cosine for uniform.
        hybrid_lambda: weight of the x0 cross-entropy. None: Austin et al.'s text value for the
            state space (``D3PM_DEFAULTS``): 0.01 absorbing, 0 uniform (their uniform runs used
            L_vb); their CIFAR-10 absorbing runs used 0.001.
        exact_test: ``md4 test`` sums all T terms of the bound (D3PM's evaluation; T network passes
            per batch) instead of the one-draw estimate that validation uses. Its forward draws
            are keyed by ``(eval_seed, example index, step)``: a sequence's number does not depend
            on the batch size, the batch order or the number of devices.
        (the rest: see ``DiffusionModule``)

    The hyper-parameters hold the resolved ``schedule`` and ``hybrid_lambda``, so a checkpoint says
    what its run trained with. A checkpoint whose values differ loads only where this model left
    them to the default (None): it then takes the checkpoint's (e.g. an old uniform run, trained
    linear, evaluated or resumed from a config written before the option); an explicit value that
    differs is refused (``on_load_checkpoint``).
    """

    def __init__(self, vocab_size: int, seq_len: int, T: int = 1000,
                 state_space: Literal["absorbing", "uniform"] = "absorbing",
                 schedule: Literal["linear", "cosine"] | None = None,
                 hybrid_lambda: float | None = None, exact_test: bool = False,
                 network: NetworkConfig | None = None, optim: OptimConfig | None = None,
                 antithetic: bool = True, seed: int = 0, eval_seed: int = 0) -> None:
        # Resolved first: a bad name fails before the network is built.
        resolved_schedule, resolved_lambda = d3pm_options(state_space, schedule, hybrid_lambda)
        super().__init__(vocab_size, seq_len, network, optim, antithetic, seed, eval_seed)
        # Which options a loaded checkpoint may set (those this model left to the default).
        self._defaulted = {key for key, value in (("schedule", schedule), ("hybrid_lambda", hybrid_lambda))
                           if value is None}
        self._build_process(resolved_schedule, resolved_lambda)

    def _build_process(self, schedule: str, hybrid_lambda: float) -> None:
        hp = self.hparams
        self.hparams.schedule, self.hparams.hybrid_lambda = schedule, hybrid_lambda
        self._process = make_d3pm(hp.vocab_size, T=hp.T, state_space=hp.state_space, hybrid_lambda=hybrid_lambda,
                                  schedule=schedule)

    @property
    def process(self) -> D3PMProcess:
        return self._process

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The base's checks, then the schedule and hybrid_lambda: a defaulted one takes the
        checkpoint's value (the process is rebuilt), an explicit one that differs is refused."""
        super().on_load_checkpoint(checkpoint)
        theirs = self.upgrade_hparams(checkpoint.get("hyper_parameters", {}))
        wanted = {key: theirs.get(key, self.hparams[key]) for key in ("schedule", "hybrid_lambda")}
        for key, other in wanted.items():
            if other != self.hparams[key] and key not in self._defaulted:
                raise CheckpointError(f"checkpoint was made by another model: its {key} is {other!r}, this run's is "
                                      f"{self.hparams[key]!r}. Pass --model.init_args.{key}={other} (or leave it "
                                      "unset) to load it, or drop ckpt_path to start fresh.")
        if wanted != {key: self.hparams[key] for key in wanted}:
            self._build_process(wanted["schedule"], wanted["hybrid_lambda"])

    def train_objective(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        t, noise = self.train_noise(batch)
        objective, nelbo = self.process.loss(self.denoiser(batch), batch["x0"], t=t, noise=noise)
        return objective, nelbo.detach()

    def schedule_summary(self) -> str:
        """The resolved schedule (its default depends on the state space) and the number of steps."""
        return f"{self.hparams.schedule}, {self.hparams.state_space}, T={self.hparams.T}"

    @classmethod
    def upgrade_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """D3PM's ``kind`` became ``state_space`` (its value ``absorb``, ``absorbing``); a checkpoint
        saved before the ``schedule`` option ran the linear schedule whatever its state space (today
        a uniform D3PM defaults to cosine)."""
        upgraded = rename_options(hparams, {"kind": "state_space"}, {"state_space": {"absorb": "absorbing"}})
        if "T" in upgraded and "schedule" not in upgraded:
            upgraded["schedule"] = "linear"
        return upgraded

    def exact_test_noise(self, index: Tensor, seq_len: int) -> StepNoise:
        """The forward-draw uniforms ``[B, N]`` of each step t, keyed by ``(eval_seed, index, t)``.

        ``index``: LongTensor ``[B]`` of the examples' indices in the data set.
        """
        seed = self.hparams.eval_seed
        return lambda t: keyed_uniform(seed, index, seq_len, stream=stream_id(Stream.EXACT_TEST, step=t))

    def exact_nelbo(self, batch: dict[str, Tensor], batch_T: int = 8) -> Tensor:
        """L_vb summed over all T steps, nats per sequence ``[B]`` float64, with the keyed forward
        draws of ``exact_test_noise`` (what ``md4 test`` reports with ``exact_test``)."""
        x0 = batch["x0"]
        noise = self.exact_test_noise(batch["index"], x0.shape[1])
        return self.process.nelbo_exact(self.denoiser(batch), x0, batch_T=batch_T, step_noise=noise)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if not self.hparams.exact_test:
            return super().test_step(batch, batch_idx)
        self.log_eval("test", self.exact_nelbo(batch) / batch["x0"].shape[1])
