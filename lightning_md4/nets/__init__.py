"""Denoising networks; they never know which method trains them."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_md4.nets.transformer import Transformer, TransformerConfig
from lightning_md4.nets.unet import UNet, UNetConfig

# A config picks its network by type: a UNetConfig (``kind: unet``) builds the pixel UNet,
# a TransformerConfig the transformer.
NetworkConfig = TransformerConfig | UNetConfig


def network_config(network: NetworkConfig | dict[str, Any] | None) -> NetworkConfig:
    """The config object for ``network``: checkpoints store it as a plain dict (``asdict``)."""
    if isinstance(network, dict):
        return UNetConfig(**network) if network.get("kind") == "unet" else TransformerConfig(**network)
    return network or TransformerConfig()


def build_network(cfg: NetworkConfig, vocab_size: int, seq_len: int) -> nn.Module:
    """The denoiser ``net(xt [B, N], t [B]) -> logits [B, N, V]`` that ``cfg`` describes."""
    if isinstance(cfg, UNetConfig):
        return UNet(vocab_size, seq_len, cfg)
    return Transformer(vocab_size, cfg)


__all__ = ["NetworkConfig", "Transformer", "TransformerConfig", "UNet", "UNetConfig", "build_network",
           "network_config"]
