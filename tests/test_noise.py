import torch

from lightning_md4.diffusion.noise import _hash32, keyed_times, keyed_uniform, stratified_times


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
