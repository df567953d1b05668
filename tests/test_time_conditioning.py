"""A method whose optimal denoiser depends on t gets a network that sees t, whatever the config says."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
import pytest
import torch

from conftest import TINY_NETWORK, digits_fit_args, md4
from lightning_md4.modules import GenMD4, MD4, SEDD
from lightning_md4.nets import TransformerConfig, UNetConfig

BLIND = TransformerConfig(**TINY_NETWORK, time_conditioning=False)


@pytest.mark.parametrize("make, sees_t", [
    (lambda net: GenMD4(5, 8, network=net), True),
    (lambda net: SEDD(5, 8, state_space="uniform", network=net), True),
    (lambda net: SEDD(5, 8, state_space="absorbing", network=net), False),
    (lambda net: MD4(5, 8, network=net), False),
])
def test_time_conditioning_follows_the_posterior(make, sees_t, caplog):
    with caplog.at_level(logging.INFO):
        module = make(BLIND)
    said = "its posterior depends on t, so network.time_conditioning is turned on" in caplog.text
    assert said is sees_t and module.net.time_conditioned is sees_t
    # The checkpoint records the network that was built, so it reloads into the same weights.
    assert module.hparams.network == asdict(module.net.cfg)
    assert module.hparams.network["time_conditioning"] is sees_t
    reloaded = type(module)(**module.hparams)
    reloaded.load_state_dict(module.state_dict())


def test_a_unet_is_turned_on_too():
    blind = UNetConfig(channels=16, res_blocks=1, embed_dim=4, heads=2, dropout=0.0, time_conditioning=False)
    module = GenMD4(5, 48, network=blind)  # a 4x4 colour image
    assert module.net.time_conditioned and module.hparams.network["time_conditioning"]


def test_a_time_conditioned_network_is_left_as_it_is():
    module = GenMD4(5, 8, network=replace(BLIND, time_conditioning=True))
    assert module.net.time_conditioned and module.hparams.network == asdict(replace(BLIND, time_conditioning=True))


@pytest.mark.slow
def test_the_model_switch_on_a_blind_config_trains_a_network_that_sees_t(tmp_path):
    """configs/digits.yaml sets time_conditioning: false for MD4; --model GenMD4 must not inherit it."""
    run = tmp_path / "run"
    proc = md4(*digits_fit_args(run, 1, "--model=GenMD4"), cwd=tmp_path)
    assert "GenMD4: its posterior depends on t, so network.time_conditioning is turned on" in proc.stderr
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["network"]["time_conditioning"] is True
    assert "net.cond.0.weight" in ckpt["state_dict"] and "net.cond_const" not in ckpt["state_dict"]
