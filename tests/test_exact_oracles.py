"""The library's exact denoisers (``lightning_md4/diffusion/exact.py`` and each process's
``exact_output``), which the contract test relies on, against the independent oracles of the
older exact tests, written from the posterior formulas directly, on every x_t."""

import itertools

import torch

from exact import ExactDenoiser, random_distribution
from lightning_md4.diffusion.d3pm import UniformD3PM
from lightning_md4.diffusion.exact import EnumeratedLaw
from lightning_md4.diffusion.masked import MaskedDiffusion
from lightning_md4.diffusion.schedules import Linear
from test_d3pm_exact import UniformOracle

V, N = 3, 3


def test_the_random_laws_are_the_same_law():
    configs, probs = random_distribution(V, N, seed=4)
    law = EnumeratedLaw.random(V, N, seed=4)
    assert torch.equal(law.configs, configs) and torch.allclose(law.probs, probs, rtol=0, atol=1e-15)


def test_md4s_exact_denoiser_is_the_enumerated_posterior_at_masked_positions():
    law = EnumeratedLaw.random(V, N, seed=4)
    process = MaskedDiffusion(Linear(), V)
    xt = torch.tensor(list(itertools.product(range(V + 1), repeat=N)))  # every x_t, mask included
    xt = xt[(xt == process.mask_id).any(-1)]
    oracle = ExactDenoiser(law.configs, law.probs, process.mask_id)
    for t in (0.3, 0.8):
        time = torch.full((len(xt),), t, dtype=torch.float64)
        got = torch.log_softmax(process.exact_denoiser(law)(xt, time).double(), -1)
        want = oracle(xt, time)
        masked = xt == process.mask_id
        torch.testing.assert_close(got[masked], want[masked], rtol=0, atol=1e-10)


def test_uniform_d3pms_exact_output_is_the_weighted_posterior_of_the_oracle():
    law = EnumeratedLaw.random(V, N, seed=4)
    T = 10
    process = UniformD3PM(V, T=T, schedule=Linear(), dtype=torch.float64)
    xt = torch.tensor(list(itertools.product(range(V), repeat=N)))
    oracle = UniformOracle(law.configs, law.probs, optimal=True)
    for i in (1, 4, 9):
        time = torch.full((len(xt),), i / T, dtype=torch.float64)
        got = torch.log_softmax(process.exact_denoiser(law)(xt, time).double(), -1)
        torch.testing.assert_close(got, oracle(xt, time), rtol=0, atol=1e-10)
