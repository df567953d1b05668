"""The time each process feeds its network, in the losses and in the samplers.

Each process documents the network's time input: MD4 and GenMD4 the time t in [0, 1], SEDD the
total noise sigma_bar(t), D3PM the step over the number of steps, i / T. A wrong input (alpha(t),
1 - t) leaves every distributional test with a time-independent oracle passing, so a recording
network checks the values themselves against references computed here by hand in float64.
"""

from __future__ import annotations

import math
import typing

import pytest
import torch
from torch import Tensor, nn

from conftest import TINY_NETWORK
from lightning_md4.diffusion import GenMaskedDiffusion, MaskedDiffusion, PerTokenSchedule, make_d3pm, make_sedd
from lightning_md4.modules import AR, D3PM, SEDD
from lightning_md4.modules.registry import methods
from lightning_md4.nets.transformer import TransformerConfig
from lightning_md4.diffusion.schedules import Cosine

V, N, B = 5, 8, 3
# Times off the symmetric point 1/2 and off the D3PM step boundaries (T = 10), so that t, 1 - t,
# alpha(t) and the neighbouring steps all differ.
TIMES = [0.05, 0.37, 0.81]
STEP_TIMES = [0.1, 0.4, 0.9]  # i / T with i = floor(t T) + 1, T = 10
TINY = TransformerConfig(**TINY_NETWORK)


class TimeRecorder(nn.Module):
    """A network with a flat output that records the time argument of every call (float64)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.calls: list[Tensor] = []

    def forward(self, xt: Tensor, t: Tensor, positions: Tensor | None = None) -> Tensor:
        self.calls.append(t.detach().double().clone())
        return torch.zeros(*xt.shape, self.vocab_size, dtype=torch.float64)

    def first_of_each_call(self) -> list[float]:
        """One time per call: every row of a sampler call gets the same time."""
        for t in self.calls:
            assert torch.equal(t, t[0].expand_as(t)), t
        return [float(t[0]) for t in self.calls]


def x0_batch(batch: int = B) -> Tensor:
    return torch.randint(0, V, (batch, N), generator=torch.Generator().manual_seed(0))


def times() -> Tensor:
    return torch.tensor(TIMES, dtype=torch.float64)


def assert_calls(recorder: TimeRecorder, expected: list[list[float]]) -> None:
    assert len(recorder.calls) == len(expected)
    for got, want in zip(recorder.calls, expected):
        assert got.tolist() == pytest.approx(want, rel=1e-13, abs=1e-15)


def sigma_bar_loglinear(t: float, eps: float = 1e-3) -> float:
    return -math.log1p(-(1.0 - eps) * t)


def sigma_bar_geometric(t: float, sigma_min: float = 1e-4, sigma_max: float = 20.0) -> float:
    return sigma_min ** (1.0 - t) * sigma_max**t


UNIFORM_GRID_4 = [1.0, 0.75, 0.5, 0.25]  # the network calls of a 4-step uniform grid; t = 0 is not one


# -- MD4 ---------------------------------------------------------------------------------------
def test_md4_network_gets_t():
    process = MaskedDiffusion(Cosine(), V)
    net = TimeRecorder(V)
    process.nelbo(net, x0_batch(), t=times())
    process.nelbo_discrete(net, x0_batch(), 10, t=times())
    assert_calls(net, [TIMES, STEP_TIMES])
    net = TimeRecorder(V)
    process.sample(net, (64, 16), steps=4, generator=torch.Generator().manual_seed(1))
    assert net.first_of_each_call() == pytest.approx(UNIFORM_GRID_4, abs=1e-15)


def test_genmd4_network_gets_t():
    process = GenMaskedDiffusion(PerTokenSchedule(V, w_init=2.0), V, t_min=1e-3)
    net = TimeRecorder(V)
    process.nelbo(net, x0_batch(), t=times())
    process.surrogate_loss(net, x0_batch(), t=times(), estimator="rloo")  # two noised copies
    process.surrogate_loss(net, x0_batch(), t=times(), estimator="batch")
    assert_calls(net, [TIMES] * 4)
    net = TimeRecorder(V)
    process.sample(net, (64, 16), steps=4, generator=torch.Generator().manual_seed(2))
    assert net.first_of_each_call() == pytest.approx(UNIFORM_GRID_4, abs=1e-15)


# -- SEDD --------------------------------------------------------------------------------------
@pytest.mark.parametrize("state_space", ["absorbing", "uniform"])
@pytest.mark.parametrize("schedule, sigma_bar", [("loglinear", sigma_bar_loglinear),
                                                 ("geometric", sigma_bar_geometric)])
def test_sedd_network_gets_sigma_bar(schedule, sigma_bar, state_space):
    process = make_sedd(V, schedule=schedule, state_space=state_space)
    net = TimeRecorder(V)
    process.nelbo(net, x0_batch(), t=times())
    assert_calls(net, [[sigma_bar(t) for t in TIMES]])
    assert net.calls[0].dtype == torch.float64
    net = TimeRecorder(V)
    process.sample(net, (64, 16), steps=4, generator=torch.Generator().manual_seed(3))
    # the last call is the denoising step from t = 0.25 (to sigma_bar = 0), at sigma_bar(0.25)
    assert net.first_of_each_call() == pytest.approx([sigma_bar(t) for t in UNIFORM_GRID_4], rel=1e-13)


# -- D3PM --------------------------------------------------------------------------------------
@pytest.mark.parametrize("state_space", ["absorbing", "uniform"])
def test_d3pm_network_gets_step_over_T(state_space):
    T = 10
    process = make_d3pm(V, T=T, state_space=state_space)
    net = TimeRecorder(V)
    process.loss(net, x0_batch(), t=times())
    process.nelbo(net, x0_batch(), t=times())
    assert_calls(net, [STEP_TIMES] * 2)
    net = TimeRecorder(V)
    process.nelbo_exact(net, x0_batch(), batch_T=4)  # steps 1..T, four per call
    expected = torch.tensor([[i / T] * B for i in range(1, T + 1)], dtype=torch.float64)
    torch.testing.assert_close(torch.cat(net.calls).view(T, B), expected, rtol=0, atol=1e-15)
    net = TimeRecorder(V)
    process.sample(net, (64, 16), steps=5, generator=torch.Generator().manual_seed(4))
    # steps 10, 8, 6, 4, 2; the last jumps to 0 (the argmax step)
    assert net.first_of_each_call() == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2], abs=1e-15)


# -- through the Lightning modules -----------------------------------------------------------
def documented_input(model, t: Tensor) -> Tensor:
    """The network input each method documents, by hand from the evaluation times t."""
    if isinstance(model, SEDD):
        return torch.tensor([sigma_bar_loglinear(float(u)) for u in t], dtype=torch.float64)
    if isinstance(model, D3PM):
        T = model.process.T
        return torch.tensor([(math.floor(float(u) * T) + 1) / T for u in t], dtype=torch.float64)
    if isinstance(model, AR):  # no time: zeros, which its network (without time input) ignores
        return torch.zeros_like(t)
    return t


def non_linear_schedule(cls: type) -> dict[str, str]:
    """``schedule="cosine"`` where the class offers it: under the linear schedule 1 - alpha(t) = t,
    so a module feeding the masking probability instead of t would pass unseen."""
    hint = typing.get_type_hints(cls.__init__).get("schedule")
    parts = [hint] if typing.get_origin(hint) is typing.Literal else typing.get_args(hint)  # Literal or Optional
    choices = {arg for part in parts if typing.get_origin(part) is typing.Literal for arg in typing.get_args(part)}
    return {"schedule": "cosine"} if "cosine" in choices else {}


# Every registered method, in each of its state spaces (a new method is checked without a new line
# here; one whose network sees something else than t fails until documented_input knows it).
VARIANTS = [(m, options) for m in methods() for options in m.variants() if "sampler" not in options or
            options["sampler"] == m.samplers[0]]


@pytest.mark.parametrize("method, options", VARIANTS,
                         ids=["-".join([m.name, *options.values()]) for m, options in VARIANTS])
@torch.no_grad()
def test_modules_feed_the_documented_time(method, options):
    """The modules pass their evaluation times to the process untouched: the network sees the
    documented function of the keyed times."""
    model = method.cls(V, N, network=TINY, **options, **non_linear_schedule(method.cls))
    model.net = TimeRecorder(V)
    batch = {"x0": x0_batch(), "index": torch.tensor([3, 11, 40])}
    # A method without evaluation noise (AR: its likelihood is exact) draws no time.
    t = model.eval_noise(batch)[0] if "eval_seed" in model.hparams else torch.zeros(B, dtype=torch.float64)
    model.eval_nelbo(batch)
    assert_calls(model.net, [documented_input(model, t).tolist()])
