"""Masking schedules alpha(t): the probability that a token is still clean at time t.

Each schedule gives ``alpha(t)``, ``one_minus_alpha(t)`` (the masking probability, computed
directly rather than as ``1 - alpha`` so it keeps its relative precision near t = 0) and
``dalpha(t)``. ``loss_weight(t) = -alpha'(t) / (1 - alpha(t))`` is the positive weight of the
continuous-time NELBO (paper eq. 5): 1/t for the linear schedule.

``clip_eps > 0`` applies the official code's clipping ``alpha = (1 - 2 eps) alpha_base + eps`` so
that alpha(0) = 1 - eps and alpha(1) = eps. All inputs are tensors of times in [0, 1], any shape.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor


class Schedule:
    """Base class: subclasses define the unclipped ``_alpha``, ``_one_minus_alpha``, ``_dalpha``."""

    def __init__(self, clip_eps: float = 0.0) -> None:
        if not 0.0 <= clip_eps < 0.5:
            raise ValueError(f"clip_eps must be in [0, 0.5), got {clip_eps}")
        self.clip_eps = clip_eps

    def _alpha(self, t: Tensor) -> Tensor:
        return 1.0 - self._one_minus_alpha(t)

    def _one_minus_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _dalpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha(self, t: Tensor) -> Tensor:
        eps = self.clip_eps
        return (1.0 - 2.0 * eps) * self._alpha(t) + eps

    def one_minus_alpha(self, t: Tensor) -> Tensor:
        eps = self.clip_eps
        return (1.0 - 2.0 * eps) * self._one_minus_alpha(t) + eps

    def dalpha(self, t: Tensor) -> Tensor:
        return (1.0 - 2.0 * self.clip_eps) * self._dalpha(t)

    def loss_weight(self, t: Tensor) -> Tensor:
        """-alpha'(t) / (1 - alpha(t)) >= 0; infinite only at t = 0 for unclipped schedules."""
        return -self.dalpha(t) / self.one_minus_alpha(t)

    def sigma_bar(self, t: Tensor) -> Tensor:
        """Total noise -log alpha(t) (SEDD's sigma_bar), by log1p so it keeps precision near t = 0."""
        return -torch.log1p(-self.one_minus_alpha(t))

    def rate(self, t: Tensor) -> Tensor:
        """Noise rate sigma(t) = d sigma_bar / dt = -alpha'(t) / alpha(t)."""
        return -self.dalpha(t) / self.alpha(t)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Linear(Schedule):
    """alpha_t = 1 - t."""

    def _one_minus_alpha(self, t: Tensor) -> Tensor:
        return t

    def _dalpha(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -1.0)


class LogLinear(Schedule):
    """alpha_t = 1 - (1 - eps) t: SEDD's log-linear noise, sigma_bar = -log(1 - (1 - eps) t),
    linear from alpha_0 = 1 to alpha_1 = eps."""

    def __init__(self, eps: float = 1e-3, clip_eps: float = 0.0) -> None:
        super().__init__(clip_eps)
        if not 0.0 < eps < 1.0:
            raise ValueError(f"LogLinear schedule needs eps in (0, 1), got {eps}")
        self.eps = eps

    def _one_minus_alpha(self, t: Tensor) -> Tensor:
        return (1.0 - self.eps) * t

    def _dalpha(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -(1.0 - self.eps))


class Polynomial(Schedule):
    """alpha_t = 1 - t^k."""

    def __init__(self, k: float = 2.0, clip_eps: float = 0.0) -> None:
        super().__init__(clip_eps)
        if k <= 0:
            raise ValueError(f"Polynomial schedule needs k > 0, got {k}")
        self.k = k

    def _one_minus_alpha(self, t: Tensor) -> Tensor:
        return t**self.k

    def _dalpha(self, t: Tensor) -> Tensor:
        return -self.k * t ** (self.k - 1.0)


class Cosine(Schedule):
    """alpha_t = 1 - cos(pi/2 (1 - t)); 1 - alpha_t = sin(pi/2 t) keeps precision near t = 0."""

    def _one_minus_alpha(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def _alpha(self, t: Tensor) -> Tensor:
        return 1.0 - torch.sin(0.5 * math.pi * t)

    def _dalpha(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.cos(0.5 * math.pi * t)


class ShiftedCosine(Schedule):
    """alpha_t = f(t) / f(0), f(t) = cos((t + s) / (1 + s) pi/2) (Nichol and Dhariwal's cosine, the
    D3PM uniform runs' schedule); alpha_1 = 0 exactly (the formula's cos(pi/2) rounds to 6e-17)."""

    def __init__(self, s: float = 0.008, clip_eps: float = 0.0) -> None:
        super().__init__(clip_eps)
        if s <= 0:
            raise ValueError(f"ShiftedCosine schedule needs s > 0, got {s}")
        self.s = s

    def _f(self, t: Tensor) -> Tensor:
        return torch.cos((t + self.s) / (1.0 + self.s) * (math.pi / 2))

    def _alpha(self, t: Tensor) -> Tensor:
        # f(0) by the same op as f(t), so that alpha_0 = 1 exactly.
        return torch.where(t >= 1.0, 0.0, self._f(t) / self._f(torch.zeros_like(t)))

    def _one_minus_alpha(self, t: Tensor) -> Tensor:
        return 1.0 - self._alpha(t)

    def _dalpha(self, t: Tensor) -> Tensor:
        scale = math.pi / (2.0 * (1.0 + self.s))
        return -scale * torch.sin((t + self.s) / (1.0 + self.s) * (math.pi / 2)) / self._f(torch.zeros_like(t))


class Geometric(Schedule):
    """alpha_t = exp(-beta_min^(1-t) beta_max^t) (paper Table 4).

    alpha(0) = exp(-beta_min) and alpha(1) = exp(-beta_max), so the endpoints are not exactly 1
    and 0; the NELBO's endpoint terms account for that.
    """

    def __init__(self, beta_min: float = 1e-5, beta_max: float = 20.0, clip_eps: float = 0.0) -> None:
        super().__init__(clip_eps)
        if not 0 < beta_min < beta_max:
            raise ValueError(f"Geometric schedule needs 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min = beta_min
        self.beta_max = beta_max

    def _sigma(self, t: Tensor) -> Tensor:
        return self.beta_min ** (1.0 - t) * self.beta_max**t

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-self._sigma(t))

    def _one_minus_alpha(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self._sigma(t))

    def _dalpha(self, t: Tensor) -> Tensor:
        sigma = self._sigma(t)
        return -torch.exp(-sigma) * sigma * math.log(self.beta_max / self.beta_min)

    def sigma_bar(self, t: Tensor) -> Tensor:
        if self.clip_eps:
            return super().sigma_bar(t)
        return self._sigma(t)

    def rate(self, t: Tensor) -> Tensor:
        if self.clip_eps:
            return super().rate(t)
        return self._sigma(t) * math.log(self.beta_max / self.beta_min)


SCHEDULES: dict[str, type[Schedule]] = {
    "linear": Linear,
    "loglinear": LogLinear,
    "polynomial": Polynomial,
    "cosine": Cosine,
    "geometric": Geometric,
}
# The names of SCHEDULES as a type, so that a method's ``schedule`` option lists its choices in
# ``md4 fit --model.help MD4`` and refuses any other name as it parses (tests/test_preflight.py
# checks that the two agree).
ScheduleName = Literal["linear", "loglinear", "polynomial", "cosine", "geometric"]


def make_schedule(name: str, **kwargs: float) -> Schedule:
    """Build a schedule by name; ``kwargs`` are its parameters (k, beta_min, beta_max, clip_eps)."""
    try:
        cls = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}") from None
    return cls(**kwargs)
