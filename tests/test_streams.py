import itertools

import pytest
import torch

from lightning_md4.diffusion.streams import (Stream, _hash32, keyed_times, keyed_uniform, stratified_times, stream_id,
                                           stream_key)

TRAINING = (Stream.TRAIN_TIME_OFFSET, Stream.TRAIN_TIME, Stream.TRAIN_MASK)


def _hash32_py(x: int) -> int:
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    x ^= x >> 16
    return x


def test_hash_matches_python_reference():
    xs = [0, 1, 2, 12345, 0xFFFFFFFF, 0x80000000, 987654321]
    got = _hash32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [_hash32_py(x) for x in xs]


def test_keyed_uniform_is_keyed_and_uniform():
    idx = torch.arange(4000)
    u = keyed_uniform(7, idx, 16)
    assert u.dtype == torch.float64 and u.shape == (4000, 16)
    assert 0 <= u.min() and u.max() < 1
    # The same example gives the same noise in any batch, in any order.
    torch.testing.assert_close(keyed_uniform(7, idx[[10, 3]], 16), u[[10, 3]], rtol=0, atol=0)
    assert not torch.equal(keyed_uniform(8, idx, 16), u)
    # Uniform: every decile holds about a tenth; neighbouring positions are uncorrelated.
    counts = torch.histc(u.flatten().float(), bins=10, min=0, max=1) / u.numel()
    assert (counts - 0.1).abs().max() < 0.01
    assert abs(torch.corrcoef(torch.stack([u[:, 0], u[:, 1]]))[0, 1]) < 0.05


def test_stratified_times_cover_each_stratum_once():
    t = stratified_times(torch.tensor(0.37, dtype=torch.float64), 8)
    assert sorted((t * 8).floor().long().tolist()) == list(range(8))
    # Two ranks taking slices of one global batch give the same set as one process.
    both = torch.cat([stratified_times(0.37, 4, offset=0, total=8), stratified_times(0.37, 4, offset=4, total=8)])
    torch.testing.assert_close(both, t)


def test_keyed_times_low_discrepancy():
    t = keyed_times(3, torch.arange(1000))
    counts = torch.histc(t.float(), bins=10, min=0, max=1)
    assert (counts - 100).abs().max() <= 2


def test_stream_ids_never_meet():
    """Every (purpose, step, draw) a run can reach has its own stream, and so its own key."""
    steps = [*range(70_000), *range((1 << 24) - 1000, 1 << 24)]  # past the old meeting point 65533, to the last step
    ids = [stream_id(p, step, draw) for p, step, draw in itertools.product(TRAINING, steps, range(8))]
    ids += [stream_id(Stream.EVAL_MASK, draw=k) for k in [*range(5000), (1 << 31) - 1]]
    ids += [stream_id(Stream.EXACT_TEST, step=t) for t in [*range(1, 5000), (1 << 30) - 1]]
    ids.append(stream_id(Stream.EVAL_TIME))
    streams = torch.tensor(ids)
    assert streams.unique().numel() == len(ids)
    assert 0 <= streams.min() and streams.max() < 1 << 32  # keyed_uniform keys streams mod 2**32
    for seed in (0, 1, 12345):
        assert stream_key(seed, streams).unique().numel() == len(ids)


def test_evaluation_streams_keep_their_numbers():
    """Validation NELBOs stay comparable with runs made before the streams were named."""
    assert [stream_id(Stream.EVAL_MASK, draw=k) for k in (0, 1, 7)] == [0, (1 << 31) + 1, (1 << 31) + 7]
    assert stream_id(Stream.EVAL_TIME) == 1 and stream_id(Stream.EXACT_TEST, step=3) == (1 << 30) + 3


@pytest.mark.parametrize("purpose, step, draw", [
    (Stream.TRAIN_MASK, 1 << 24, 0), (Stream.TRAIN_TIME, -1, 0), (Stream.TRAIN_MASK, 0, 8),
    (Stream.EVAL_MASK, 1, 0), (Stream.EVAL_MASK, 0, 1 << 31), (Stream.EVAL_TIME, 0, 1),
    (Stream.EXACT_TEST, 0, 0), (Stream.EXACT_TEST, 1 << 30, 0)])
def test_stream_id_refuses_what_its_fields_cannot_hold(purpose, step, draw):
    with pytest.raises(ValueError, match=purpose.name):
        stream_id(purpose, step, draw)

