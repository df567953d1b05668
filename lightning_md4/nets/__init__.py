"""Denoising networks; they never know which method trains them."""

from lightning_md4.nets.transformer import Transformer, TransformerConfig

__all__ = ["Transformer", "TransformerConfig"]
