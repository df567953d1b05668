"""Checkpoints saved under the old hyper-parameter names (D3PM ``kind``, SEDD ``graph`` and ``noise``,
the value ``absorb``) load as the model they were, never as the defaults."""

import lightning
import pytest
import torch

from conftest import TINY_NETWORK
from lightning_md4.checkpoints import FitCheckpoint
from lightning_md4.diffusion.d3pm import AbsorbingD3PM, UniformD3PM
from lightning_md4.diffusion.sedd import AbsorbingSEDD, UniformSEDD
from lightning_md4.modules import D3PM, MD4, MDLM, SEDD, GenMD4
from lightning_md4.modules.base import CheckpointError
from lightning_md4.modules.legacy import upgrade_hparams
from lightning_md4.nets import TransformerConfig

TINY = TransformerConfig(**TINY_NETWORK)
SEDD_OLD = {"state_space": "graph", "schedule": "noise"}
D3PM_OLD = {"state_space": "kind"}


def old_checkpoint(model, old_names: dict[str, str]) -> dict:
    """``model``'s checkpoint as the code before the rename wrote it: old keys, ``absorb`` for absorbing."""
    hparams = {old_names.get(key, key): "absorb" if value == "absorbing" else value
               for key, value in model.hparams.items()}
    hparams["_class_path"] = f"lightning_md4.modules.{type(model).__name__}"
    return {"state_dict": model.state_dict(), "hyper_parameters": hparams,
            "pytorch-lightning_version": lightning.__version__}


@pytest.mark.parametrize("make,old_names,process_type,kept", [
    (lambda: SEDD(11, 8, state_space="uniform", schedule="geometric", network=TINY), SEDD_OLD, UniformSEDD,
     {"state_space": "uniform", "schedule": "geometric"}),
    (lambda: SEDD(11, 8, state_space="absorbing", schedule="geometric", network=TINY), SEDD_OLD, AbsorbingSEDD,
     {"state_space": "absorbing", "schedule": "geometric"}),
    (lambda: D3PM(11, 8, T=7, state_space="uniform", network=TINY), D3PM_OLD, UniformD3PM,
     {"state_space": "uniform", "T": 7}),
], ids=["sedd-uniform", "sedd-absorbing-geometric", "d3pm-uniform"])
def test_an_old_checkpoint_loads_for_evaluation_as_what_it_was(tmp_path, make, old_names, process_type, kept):
    """Lightning drops init keys a class does not take: without the upgrade an old uniform checkpoint
    would be built absorbing (and SEDD's geometric noise log-linear)."""
    torch.manual_seed(0)
    model = make()
    path = tmp_path / "old.ckpt"
    torch.save(old_checkpoint(model, old_names), path)
    loaded = FitCheckpoint.read(path).model("cpu")
    assert type(loaded.process) is process_type
    assert {key: loaded.hparams[key] for key in kept} == kept
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)


def test_resuming_an_old_checkpoint_checks_its_state_space():
    """Resuming (``md4 fit --ckpt_path``) builds the model from the config, then Lightning calls
    ``on_load_checkpoint``: an old uniform checkpoint must not continue as an absorbing run."""
    uniform = SEDD(11, 8, state_space="uniform", network=TINY)
    checkpoint = old_checkpoint(uniform, SEDD_OLD)
    uniform.on_load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="state_space is 'uniform'"):
        SEDD(11, 8, state_space="absorbing", network=TINY).on_load_checkpoint(checkpoint)
    absorbing = D3PM(11, 8, T=7, network=TINY)
    absorbing.on_load_checkpoint(old_checkpoint(absorbing, D3PM_OLD))
    assert type(absorbing.process) is AbsorbingD3PM


@pytest.mark.parametrize("make", [
    lambda: MD4(11, 8, schedule="cosine", network=TINY), lambda: MDLM(11, 8, network=TINY),
    lambda: GenMD4(11, 8, network=TINY), lambda: SEDD(11, 8, state_space="uniform", network=TINY),
    lambda: D3PM(11, 8, T=7, state_space="uniform", network=TINY),
], ids=["md4", "mdlm", "genmd4", "sedd", "d3pm"])
def test_new_hyper_parameters_pass_unchanged(make):
    hparams = dict(make().hparams)
    assert upgrade_hparams(hparams) == hparams


def test_a_d3pm_checkpoint_from_before_the_schedule_option_keeps_its_linear_schedule(tmp_path):
    """D3PM had no ``schedule`` before: every run, uniform too, trained on the linear schedule (and
    saved ``hybrid_lambda``, 0.01 by the old default). Today a uniform D3PM defaults to cosine and
    lambda 0, so such a checkpoint must load as linear with its lambda: for evaluation (the upgrade
    fills the key), and into a model built from a config that left both to the default (``md4 test
    --config``, or resuming); a config that asks for another schedule is refused."""
    torch.manual_seed(0)
    model = D3PM(11, 8, T=7, state_space="uniform", schedule="linear", hybrid_lambda=0.01, network=TINY)
    checkpoint = old_checkpoint(model, D3PM_OLD)
    del checkpoint["hyper_parameters"]["schedule"]
    path = tmp_path / "old.ckpt"
    torch.save(checkpoint, path)
    loaded = FitCheckpoint.read(path).model("cpu")
    assert (loaded.hparams.schedule, loaded.hparams.hybrid_lambda) == ("linear", 0.01)
    assert type(loaded.process.schedule).__name__ == "Linear" and loaded.process.hybrid_lambda == 0.01

    from_config = D3PM(11, 8, T=7, state_space="uniform", network=TINY)
    assert (from_config.hparams.schedule, from_config.hparams.hybrid_lambda) == ("cosine", 0.0)
    from_config.on_load_checkpoint(checkpoint)
    assert (from_config.hparams.schedule, from_config.hparams.hybrid_lambda) == ("linear", 0.01)
    assert type(from_config.process.schedule).__name__ == "Linear" and from_config.process.hybrid_lambda == 0.01
    with pytest.raises(CheckpointError, match="its schedule is 'linear', this run's is 'cosine'"):
        D3PM(11, 8, T=7, state_space="uniform", schedule="cosine", network=TINY).on_load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="its hybrid_lambda is 0.01, this run's is 0.0"):
        D3PM(11, 8, T=7, state_space="uniform", hybrid_lambda=0.0, network=TINY).on_load_checkpoint(checkpoint)
    # Today's checkpoints carry the resolved values, which the upgrade leaves alone.
    assert upgrade_hparams(dict(from_config.hparams))["schedule"] == "linear"
    assert upgrade_hparams(dict(D3PM(11, 8, T=7, state_space="uniform", network=TINY).hparams))["schedule"] == "cosine"
