"""Random numbers for the Monte Carlo estimators: time draws and keyed (reproducible) noise.

Training uses stratified ("antithetic") times over the *global* batch: every rank draws the same
offset ``u`` from a generator seeded by the step, and takes its own slice of the strata, so no two
devices repeat a stratum.

Evaluation uses noise keyed by the example's index in the data set: the time and the mask of
example ``i`` are a pure function of ``(seed, i)``. A validation NELBO is then the same number on
one device or eight, at any batch size, which is what makes runs comparable in a sweep.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def stratified_times(u: Tensor | float, batch: int, offset: int = 0, total: int | None = None) -> Tensor:
    """Times ``t_i = (u + (offset + i) / total) mod 1`` for i in 0..batch-1, float64 ``[batch]``.

    ``total`` is the global batch size (``world_size * batch`` under DDP) and ``offset`` this rank's
    first position in it (``rank * batch``).
    """
    total = batch if total is None else total
    u = torch.as_tensor(u, dtype=torch.float64)
    i = torch.arange(offset, offset + batch, dtype=torch.float64, device=u.device)
    return torch.remainder(u + i / total, 1.0)


def uniform_times(batch: int, device: torch.device | str | None = None, antithetic: bool = True,
                  generator: torch.Generator | None = None) -> Tensor:
    """One uniform draw in [0, 1) per sequence, float64 ``[batch]``, stratified across the batch if
    ``antithetic``. Processes map it to their time range with ``time_from_uniform``."""
    if antithetic:
        u = torch.rand((), dtype=torch.float64, device=device, generator=generator)
        return stratified_times(u, batch)
    return torch.rand(batch, dtype=torch.float64, device=device, generator=generator)


class TimeRange:
    """Mixin of the processes: one uniform u in [0, 1) per sequence becomes a time
    ``t = t_min + (1 - t_min) u`` (the identity for ``t_min = 0``); an estimator over [t_min, 1]
    carries the Jacobian ``1 - t_min``."""

    t_min: float = 0.0

    def time_from_uniform(self, u: Tensor) -> Tensor:
        return self.t_min + (1.0 - self.t_min) * u

    def sample_times(self, batch: int, device: torch.device | str | None = None, antithetic: bool = True,
                     generator: torch.Generator | None = None) -> Tensor:
        """One time per sequence, float64 ``[batch]``; stratified across the batch if antithetic."""
        return self.time_from_uniform(uniform_times(batch, device, antithetic, generator))


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixing function (Wellons' "lowbias32") on int64 tensors holding uint32 values.

    The products overflow int64 and wrap; only their low 32 bits are kept, which two's complement
    makes exact.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


def keyed_uniform(seed: int, index: Tensor, size: int, stream: int = 0) -> Tensor:
    """Uniforms in [0, 1), float64 ``[batch, size]``, a pure function of (seed, stream, index, position).

    ``index``: LongTensor ``[batch]`` of example indices in the data set.
    """
    pos = torch.arange(size, device=index.device, dtype=torch.int64)
    key = _hash32(torch.full_like(index, seed) * 0x9E3779B1 + stream)
    h = _hash32(_hash32(index[:, None] ^ key[:, None]) + pos[None, :] * 0x85EBCA6B)
    h2 = _hash32(h + 0x68E31DA4)
    # 53 random bits: 32 from h and 21 from h2.
    return (h.double() * 2.0**21 + (h2 >> 11).double()) / 2.0**53


def keyed_times(seed: int, index: Tensor) -> Tensor:
    """Times for evaluation, float64 ``[batch]``: a golden-ratio sequence over the example index.

    ``t_i = (u + i * (sqrt(5) - 1) / 2) mod 1`` is low-discrepancy over the whole data set
    (stratified like the antithetic draw) whatever the batch size or number of devices.
    """
    u = keyed_uniform(seed, torch.zeros(1, dtype=torch.int64, device=index.device), 1, stream=1)[0, 0]
    return torch.remainder(u + index.double() * _GOLDEN, 1.0)
