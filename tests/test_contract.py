"""The contract every registered method meets, checked for each one in each of its state spaces and
samplers (:func:`contract_cases` reads the registry: a method added to it is checked here without
a new line of test).

On an enumerable toy (V = 3 tokens, N = 2 positions: 9 sequences with a strongly correlated law)
and with the exact denoiser, which each process derives from the law (``exact_denoiser``):

* the NELBO: the method's own bound, averaged over the law without Monte Carlo (every reachable
  x_t, a quadrature over t), equals its closed form ``expected_nelbo`` (the entropy when the bound
  is tight, e.g. MD4; plus the endpoint terms, e.g. MDLM's eps; D3PM's T-step sum), which is never
  below the entropy; and the module's evaluation NELBO (keyed noise, the path md4 test takes)
  averages to it within Monte Carlo error;
* the sampler's samples follow the law (total variation within Monte Carlo error);
* given tokens are kept, and a sampler step changes only the positions it was told are active
  (AR, which has no reverse step: every token the network has read stays as read);
* (slow, in subprocesses) a 2-step ``md4 fit`` on the digits through the one switch ``--model
  NAME``, its checkpoint loaded back as the same model, ``md4 test`` and ``md4 sample`` of it.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from conftest import md4
from exact import empirical_tv, mc_tolerance
from lightning_md4.cli import command_parser
from lightning_md4.commands import UsageError
from lightning_md4.preflight import check_command_line
from lightning_md4.diffusion.base import DiffusionProcess
from lightning_md4.diffusion.exact import EnumeratedLaw
from lightning_md4.modules.md4 import MD4
from lightning_md4.modules.registry import Method, method_of, methods, register_method, unregister_method
from lightning_md4.nets import TransformerConfig

V, N = 3, 2
LAW = EnumeratedLaw.random(V, N, seed=0)  # TV 0.42 between it and the product of its marginals
TINY = TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_cond=8)
DRAWS, STEPS = 10000, 128  # samples per sampler check, and the steps of its time grid
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """One registered method with one choice of its options (state space, sampler)."""

    method: Method
    options: tuple[tuple[str, str], ...]

    @property
    def id(self) -> str:
        return "-".join([self.method.name, *(value for _, value in self.options)])

    def build(self) -> Any:
        return self.method.cls(V, N, network=TINY, **dict(self.options))


def contract_cases() -> list[Case]:
    """Every registered method in every combination of its state spaces and samplers."""
    return [Case(method, tuple(options.items())) for method in methods() for options in method.variants()]


CASES = contract_cases()
IDS = [case.id for case in CASES]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every tensor here is tiny: intra-op threads only add synchronisation."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the exact denoiser in place of the network ------------------------------------------------------
class Oracle(nn.Module):
    """The process's exact denoiser as the module's network (``module.net``), so the module's own
    evaluation and sampling paths run on it. Records each reverse-step violation it is told of."""

    time_conditioned = True  # no output cache: every step sees a fresh call
    num_classes = 0

    def __init__(self, exact: Any) -> None:
        super().__init__()
        self.exact = exact
        self.read: list[Tensor] = []  # AR: the prefix each decode call has read

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.exact(x, t)

    def decode(self, tokens: Tensor, cache: Any, y: Tensor | None = None) -> Tensor:
        out = self.exact.decode(tokens, cache, y)
        self.read.append(cache.exact_prefix.clone())
        return out


def with_oracle(case: Case) -> Any:
    model = case.build()
    model.net = Oracle(model.process.exact_denoiser(LAW))
    return model


def exact_expectation(process: Any, law: EnumeratedLaw) -> float:
    """E over x0 ~ ``law`` of the method's own bound with the exact denoiser, without Monte Carlo:
    ``nelbo`` at the process's quadrature times (``time_nodes``) and every reachable x_t, weighted
    by ``p(x0) q(x_t | x0)``; for a process without noise (AR) its exact NLL of every sequence."""
    denoiser = process.exact_denoiser(law)
    if not isinstance(process, DiffusionProcess):
        return float((law.probs * process.nll(denoiser, law.configs).double()).sum())
    parts = []
    for t, weight in zip(*process.time_nodes()):
        p = process.hit_probability(t[None])  # [1, V]
        x0, xt, w = law.reachable(process.kernel(p)[0])
        noise = process.noise_for(x0, xt, p.expand(len(x0), -1).gather(1, x0))
        parts.append((x0, t.expand(len(x0)), noise, weight * w))
    x0, t, noise, weight = (torch.cat(columns) for columns in zip(*parts))
    with torch.no_grad():
        nelbo = process.nelbo(denoiser, x0, t=t, noise=noise)
    return float((weight * nelbo.double()).sum())


# -- the checks, each a function of a case (the throwaway test below runs them too) -----------------
def check_expected_nelbo(case: Case) -> None:
    process = case.build().process
    closed = process.expected_nelbo(LAW)
    assert closed >= LAW.entropy() - 1e-9, (closed, LAW.entropy())  # no model beats the entropy
    assert exact_expectation(process, LAW) == pytest.approx(closed, rel=1e-7, abs=1e-9)


def check_module_nelbo(case: Case, draws: int = 20000) -> None:
    model = with_oracle(case)
    x0 = LAW.sample(draws, torch.Generator().manual_seed(1))
    with torch.no_grad():
        nelbo = model.eval_nelbo({"x0": x0, "index": torch.arange(draws)})
    closed = model.process.expected_nelbo(LAW)
    se = nelbo.std().item() / math.sqrt(draws)
    assert abs(nelbo.mean().item() - closed) < 5 * se + 1e-9, (nelbo.mean().item(), closed, se)


def check_sampler_law(case: Case) -> None:
    model = with_oracle(case)
    samples, nfe = model.sample(DRAWS, STEPS, generator=torch.Generator().manual_seed(2))
    assert samples.shape == (DRAWS, N) and ((samples >= 0) & (samples < V)).all() and 0 < nfe <= STEPS
    tv, tolerance = empirical_tv(samples, LAW.configs, LAW.probs), mc_tolerance(LAW.probs, DRAWS)
    assert tv < tolerance, (tv, tolerance)


def given(batch: int) -> Tensor:
    """Conditioning: the first token given (cycling through the values) in every other row."""
    x = torch.full((batch, N), V)
    x[::2, 0] = torch.arange(0, batch, 2) % V
    return x


def check_given_tokens_kept(case: Case, batch: int = 512) -> None:
    model = with_oracle(case)
    x = given(batch)
    samples, _ = model.sample(batch, STEPS, generator=torch.Generator().manual_seed(3), x=x)
    kept = x != V
    assert torch.equal(samples[kept], x[kept]) and ((samples >= 0) & (samples < V)).all()


def check_only_active_positions_change(case: Case, batch: int = 512) -> None:
    model = with_oracle(case)
    process, x = model.process, given(batch)
    free = x == V
    if not isinstance(process, DiffusionProcess):  # AR: each evaluation reads the tokens drawn so far
        samples, nfe = model.sample(batch, STEPS, generator=torch.Generator().manual_seed(4), x=x)
        bos = torch.full((batch, 1), V)
        assert nfe == N and len(model.net.read) == N
        for prefix in model.net.read:  # every token read is still there
            assert torch.equal(prefix, torch.cat([bos, samples], dim=1)[:, :prefix.shape[1]])
        return
    step, calls = process.step, []

    def watched(output: Tensor, x: Tensor, active: Tensor, t: Tensor, s: Tensor, generator: Any = None) -> Tensor:
        before = x.clone()
        after = step(output, x, active, t, s, generator)
        calls.append((bool((active & ~free).any()), bool(((after != before) & ~active).any())))
        return after

    process.step = watched
    model.sample(batch, STEPS, generator=torch.Generator().manual_seed(4), x=x)
    assert calls and not any(outside for outside, _ in calls), "a given position was active"
    assert not any(changed for _, changed in calls), "a step changed a position it was not given as active"


def check_time_dependence_is_declared(case: Case) -> None:
    """The registration's ``time_dependent`` (which turns the network's t input on) says whether the
    exact denoiser's output changes with t at a fixed x_t: checked on every x_t at two times, with
    the module's own parameters outside the network drawn at random (GenMD4's exponents: a
    schedule that is not the same for every token)."""
    model = case.build()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith("net."):
                parameter.copy_(torch.randn_like(parameter))
    state_space = dict(case.options).get("state_space", case.method.state_spaces[0])
    values = V + 1 if state_space == "absorbing" else V
    xt = torch.tensor(list(itertools.product(range(values), repeat=N)))
    exact, process = model.process.exact_denoiser(LAW), model.process
    outputs = []
    for u in (0.3, 0.7):
        time = torch.tensor(u, dtype=torch.float64)
        if isinstance(process, DiffusionProcess):  # AR has no time: its network is given u, and ignores it
            time = process.network_time(process.time_from_uniform(time))
        outputs.append(torch.log_softmax(exact(xt, time.expand(len(xt))).double(), -1))
    changes = not torch.allclose(*outputs, rtol=1e-9, atol=1e-12)
    assert changes == case.method.posterior_depends_on_time(state_space), (case.id, changes)


CHECKS = [check_expected_nelbo, check_module_nelbo, check_sampler_law, check_given_tokens_kept,
          check_only_active_positions_change, check_time_dependence_is_declared]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_expected_nelbo_with_the_exact_denoiser_is_its_closed_form(case):
    check_expected_nelbo(case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_evaluation_nelbo_with_the_exact_denoiser_averages_to_it(case):
    check_module_nelbo(case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_samples_with_the_exact_denoiser_follow_the_data(case):
    check_sampler_law(case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_given_tokens_are_kept(case):
    check_given_tokens_kept(case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_step_changes_only_active_positions(case):
    check_only_active_positions_change(case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_time_dependence_is_what_the_method_declares(case):
    check_time_dependence_is_declared(case)


def test_every_method_file_is_checked():
    """The parametrisation covers every registered method, each of its state spaces and samplers."""
    names = {case.method.name for case in CASES}
    assert names == {m.name for m in methods()} >= {"AR", "D3PM", "GenMD4", "MD4", "MDLM", "SEDD"}
    for method in methods():
        assert len([c for c in CASES if c.method == method]) == len(method.state_spaces) * len(method.samplers)
        model = method.cls(V, N, network=TINY)
        assert method_of(model) == method
        assert type(model.process).__module__ == method.process  # its math lives where it says


# -- a method added to the registry is checked without a new test -------------------------------------
@pytest.fixture
def throwaway() -> Any:
    """A method registered for one test (MD4's math under another name), unregistered after it."""

    @register_method(process="lightning_md4.diffusion.masked", state_spaces=("absorbing",), samplers=("ancestral",),
                     summary="a test's throwaway method")
    class Throwaway(MD4):
        pass

    yield Throwaway
    unregister_method("Throwaway")


def test_a_registered_method_joins_the_contract_and_the_help(throwaway):
    cases = [case for case in contract_cases() if case.method.name == "Throwaway"]
    assert [case.id for case in cases] == ["Throwaway"] and cases[0].method.cls is throwaway
    for check in CHECKS:
        check(cases[0])
    help_text = command_parser().format_help()
    assert re.search(r"^  Throwaway +a test's throwaway method$", help_text, re.M), help_text
    check_command_line(["fit", "--model", "Throwaway"])  # a known method: no error
    with pytest.raises(UsageError, match="--model Throwawy is not a method"):
        check_command_line(["fit", "--model", "Throwawy"])


def test_an_unregistered_method_is_gone(throwaway):
    unregister_method("Throwaway")
    assert "Throwaway" not in command_parser().format_help()
    assert not [case for case in contract_cases() if case.method.name == "Throwaway"]


def test_registration_refuses_what_the_constructor_contradicts():
    with pytest.raises(ValueError, match="constructor must take sampler="):
        register_method(process="lightning_md4.diffusion.masked", state_spaces=("absorbing",),
                        samplers=("ancestral", "other"))(type("TwoSamplers", (MD4,), {}))
    with pytest.raises(ValueError, match="evaluation options"):
        register_method(process="lightning_md4.diffusion.masked", state_spaces=("absorbing",),
                        samplers=("ancestral",), eval_options=("no_such_option",))(type("BadEval", (MD4,), {}))
    assert {"TwoSamplers", "BadEval"}.isdisjoint(m.name for m in methods())


# -- slow: a fit, its checkpoint, md4 test -------------------------------------------------------------
DIGITS = str(ROOT / "configs" / "digits.yaml")
TINY_NET = ["--model.init_args.network.n_layers=1", "--model.init_args.network.d_model=32",
            "--model.init_args.network.n_heads=2", "--model.init_args.network.d_cond=16"]


@pytest.mark.slow
@pytest.mark.parametrize("method", methods(), ids=[m.name for m in methods()])
def test_a_two_step_fit_round_trips_its_checkpoint_and_md4_test_and_sample_use_it(method, tmp_path):
    from lightning_md4.checkpoints import FitCheckpoint

    run, model_args = tmp_path / method.name, [f"--model={method.name}", *TINY_NET]
    md4("fit", "--config", DIGITS, *model_args, f"--trainer.default_root_dir={run}", "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--data.init_args.batch_size=16", cwd=tmp_path)
    path = run / "checkpoints" / "last.ckpt"
    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] == 2
    loaded = FitCheckpoint.read(path).model("cpu")
    assert type(loaded) is method.cls and method_of(loaded) == method
    for name, value in saved["state_dict"].items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
    rebuilt = method.cls(**{key: value for key, value in loaded.hparams.items() if not key.startswith("_")})
    assert dict(rebuilt.hparams) == {key: value for key, value in loaded.hparams.items() if not key.startswith("_")}
    assert type(rebuilt.process) is type(loaded.process)
    out = md4("test", "--config", DIGITS, *model_args, f"--trainer.default_root_dir={run}",
              "--trainer.enable_progress_bar=false", "--ckpt_path", str(path), cwd=tmp_path)
    nats = float(re.search(rf"{method.name} on DigitsDataModule test: NELBO ([0-9.]+) nats/token", out.stdout).group(1))
    assert 0 < nats < 3 * math.log(17)  # 17 levels: a 2-step model is near uniform, not off the scale
    md4("sample", "--ckpt_path", str(path), "--num_samples", "2", "--steps", "4", "--output", str(run / "s.png"),
        cwd=tmp_path)
    assert (run / "s.png").stat().st_size > 0
