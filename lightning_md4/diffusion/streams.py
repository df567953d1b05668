"""Random numbers for the Monte Carlo estimators: time draws and keyed (reproducible) noise.

Training uses stratified ("antithetic") times over the *global* batch of an optimiser step
(accumulated micro-batches x ranks x batch): every micro-batch on every rank draws the same offset
``u``, keyed by the step, and takes its own slice of the strata, so no two devices or micro-batches
repeat a stratum.

Evaluation uses noise keyed by the example's index in the data set: the time and the mask of
example ``i`` are a pure function of ``(seed, i)``. A validation NELBO is then the same number on
one device or eight, at any batch size, which is what makes runs comparable in a sweep.

Each use of the keyed noise draws from its own stream, ``stream_id(purpose, step, draw)``: no two
uses share a stream, so no example ever gets the same uniforms for two purposes (a time and a mask,
two steps, two draws).
"""

from __future__ import annotations

import math
from enum import IntEnum

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


class Stream(IntEnum):
    """What a keyed draw is for."""

    EVAL_MASK = 0  # the masks of evaluation draw k
    EVAL_TIME = 1  # the offset of the evaluation times (``keyed_times``)
    EXACT_TEST = 2  # D3PM's exact test, forward draw of step t (passed as ``step``)
    TRAIN_TIME_OFFSET = 3  # the offset u shared by one optimiser step's antithetic times
    TRAIN_TIME = 4  # one time per example, without antithetic sampling
    TRAIN_MASK = 5  # the masks of training draw k


# Training stream: 2 + (step << 5 | draw << 2 | purpose - TRAIN_TIME_OFFSET), in [2, 2 + 2**29):
# clear of the evaluation streams 0 and 1 and below the exact test's.
_TRAIN_PURPOSE_BITS, _TRAIN_DRAW_BITS, _TRAIN_STEP_BITS = 2, 3, 24
_TRAIN_FIRST = 2
EXACT_TEST_STREAM = 1 << 30  # + step t >= 1: (2**30, 2**31)
EVAL_DRAW_STREAM = 1 << 31  # + draw k >= 1: (2**31, 2**32); draw 0 is stream 0


def _check_range(name: str, value: int, low: int, high: int, purpose: Stream) -> None:
    if not low <= value < high:
        raise ValueError(f"{purpose.name} noise: {name} {value} is outside [{low}, {high}), the range its "
                         "stream ids hold without meeting another stream")


def stream_id(purpose: Stream, step: int = 0, draw: int = 0) -> int:
    """The ``stream`` of ``keyed_uniform`` for draw ``draw`` of ``purpose`` at optimiser step ``step``.

    Injective on every (purpose, step, draw) it accepts and in [0, 2**32), where ``keyed_uniform``
    keys streams one to one; arguments outside a purpose's field raise. The evaluation streams keep
    the numbers they always had (masks: 0, then 2**31 + k; times: 1; D3PM's exact test: 2**30 + t),
    so validation numbers stay comparable; training packs (step < 2**24, draw < 8, purpose) into
    disjoint bit fields from 2 up.
    """
    purpose = Stream(purpose)
    if purpose >= Stream.TRAIN_TIME_OFFSET:
        _check_range("step", step, 0, 1 << _TRAIN_STEP_BITS, purpose)
        _check_range("draw", draw, 0, 1 << _TRAIN_DRAW_BITS, purpose)
        code = purpose - Stream.TRAIN_TIME_OFFSET
        return _TRAIN_FIRST + ((step << _TRAIN_DRAW_BITS | draw) << _TRAIN_PURPOSE_BITS | code)
    if purpose == Stream.EXACT_TEST:
        _check_range("step", step, 1, EVAL_DRAW_STREAM - EXACT_TEST_STREAM, purpose)
        _check_range("draw", draw, 0, 1, purpose)
        return EXACT_TEST_STREAM + step
    _check_range("step", step, 0, 1, purpose)  # evaluation noise does not change with training
    if purpose == Stream.EVAL_TIME:
        _check_range("draw", draw, 0, 1, purpose)
        return 1
    _check_range("draw", draw, 0, EVAL_DRAW_STREAM, purpose)
    return 0 if draw == 0 else EVAL_DRAW_STREAM + draw


def stream_key(seed: int, stream: Tensor) -> Tensor:
    """The 32-bit keys of ``(seed, stream)``, int64 like ``stream``: one to one in ``stream`` mod
    2**32 for a fixed seed, since ``_hash32`` is a bijection of the 32-bit integers."""
    return _hash32(torch.full_like(stream, seed) * 0x9E3779B1 + stream)


def keyed_uniform(seed: int, index: Tensor, size: int, stream: int = 0) -> Tensor:
    """Uniforms in [0, 1), float64 ``[batch, size]``, a pure function of (seed, stream, index, position).

    ``index``: LongTensor ``[batch]`` of example indices in the data set; ``stream``: see ``stream_id``.
    """
    pos = torch.arange(size, device=index.device, dtype=torch.int64)
    key = stream_key(seed, torch.full_like(index, stream))
    h = _hash32(_hash32(index[:, None] ^ key[:, None]) + pos[None, :] * 0x85EBCA6B)
    h2 = _hash32(h + 0x68E31DA4)
    # 53 random bits: 32 from h and 21 from h2.
    return (h.double() * 2.0**21 + (h2 >> 11).double()) / 2.0**53


def keyed_times(seed: int, index: Tensor) -> Tensor:
    """Times for evaluation, float64 ``[batch]``: a golden-ratio sequence over the example index.

    ``t_i = (u + i * (sqrt(5) - 1) / 2) mod 1`` is low-discrepancy over the whole data set
    (stratified like the antithetic draw) whatever the batch size or number of devices.
    """
    zero = torch.zeros(1, dtype=torch.int64, device=index.device)
    u = keyed_uniform(seed, zero, 1, stream=stream_id(Stream.EVAL_TIME))[0, 0]
    return torch.remainder(u + index.double() * _GOLDEN, 1.0)
