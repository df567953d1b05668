"""Pixel UNet denoiser for images, optionally class-conditional.

Token order (the data modules' and this network's): an image ``[C, H, W]`` of 8-bit values is
flattened channel by channel, all of R in row-major order, then all of G, then all of B, so token
``c * H * W + h * W + w`` is channel ``c`` of pixel ``(h, w)``. ``forward(xt [B, C*H*W], t [B])``
returns logits ``[B, C*H*W, V]`` in the same order.

The layout follows the CIFAR-10 network of the MD4 paper (a VDM-style UNet): each pixel's channel
values are embedded separately and concatenated, residual blocks run at full resolution (one
level, no downsampling) with skip connections from the first half to the second, and the middle
is residual block, self-attention, residual block. For 64x64 images, ``channel_mults`` adds
downsampled levels and ``transformer_layers`` replaces the middle with transformer blocks at the
lowest resolution. Class labels are embedded and added to the time embedding; label
``num_classes`` is the null label of classifier-free guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_md4.nets.transformer import Block, Rotary, TransformerConfig, timestep_embedding


@dataclass
class UNetConfig:
    """UNet size. ``kind`` tells a stored config from a ``TransformerConfig``.

    The paper's CIFAR-10 model (28M parameters; 29.1M here) is the default: 128 channels, 32 residual
    blocks down and 33 up at 32x32, attention middle, dropout 0.1.

    Args:
        channels: width of the first level; level ``i`` has ``channels * channel_mults[i]``.
        channel_mults: one entry per resolution; each level after the first halves the resolution.
        res_blocks: residual blocks per level on the way down (one more on the way up).
        transformer_layers: 0 for the residual/attention/residual middle; otherwise that many
            transformer blocks at the lowest resolution.
        heads: attention heads in the middle.
        embed_dim: embedding size of one channel value; a pixel gets ``image_channels * embed_dim``.
        image_channels: colour channels ``C`` (the image side is ``sqrt(seq_len / C)``).
        num_classes: number of class labels; 0 for an unconditional network.
        label_dropout: probability that a training label is replaced by the null label, so the
            same network also learns the unconditional model that guidance needs.
        time_conditioning: condition on t; ``False`` lets samplers cache the output.
    """

    kind: Literal["unet"] = "unet"
    channels: int = 128
    channel_mults: tuple[int, ...] = (1,)
    res_blocks: int = 32
    transformer_layers: int = 0
    heads: int = 1
    embed_dim: int = 32
    image_channels: int = 3
    dropout: float = 0.1
    num_classes: int = 0
    label_dropout: float = 0.1
    time_conditioning: bool = True

    def __post_init__(self) -> None:
        # Checked where declared, so a bad size stops the command before any run folder is touched.
        if min(self.channels, self.heads, self.embed_dim, self.image_channels, *self.channel_mults, 1) < 1 \
                or not self.channel_mults:
            raise ValueError(f"network sizes must be >= 1: channels {self.channels}, channel_mults "
                             f"{self.channel_mults}, heads {self.heads}, embed_dim {self.embed_dim}, "
                             f"image_channels {self.image_channels}")
        if min(self.res_blocks, self.transformer_layers, self.num_classes) < 0:
            raise ValueError(f"network.res_blocks {self.res_blocks}, transformer_layers {self.transformer_layers} "
                             f"and num_classes {self.num_classes} must be >= 0")
        if not (0 <= self.dropout < 1 and 0 <= self.label_dropout <= 1):
            raise ValueError(f"network.dropout {self.dropout} must be in [0, 1) and label_dropout "
                             f"{self.label_dropout} in [0, 1]")


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (fewer for narrow test networks)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; GroupNorm scaled and shifted by the conditioning vector, SiLU,
    dropout, 3x3 conv. The last conv starts at zero, so every block starts as its skip path.

    The conditioning scales and shifts after the norm: a per-channel bias added before a GroupNorm
    would be partly (for one channel per group, wholly) normalised away.
    """

    def __init__(self, c_in: int, c_out: int, d_cond: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.cond = nn.Linear(d_cond, 2 * c_out)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x [B, c_in, H, W]``, conditioning ``c [B, d_cond]`` -> ``[B, c_out, H, W]``."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.cond(c)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(self.drop(F.silu(self.norm2(h) * (1 + scale) + shift)))
        return self.skip(x) + h


class SpatialAttention(nn.Module):
    """Multi-head self-attention over all ``H * W`` positions, with a zero-initialised output."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # [B, heads, H*W, C/heads]
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


class TransformerMiddle(nn.Module):
    """The transformer's adaLN-Zero blocks applied to the ``H * W`` positions of a feature map."""

    def __init__(self, channels: int, layers: int, heads: int, d_cond: int, dropout: float) -> None:
        super().__init__()
        cfg = TransformerConfig(n_layers=layers, d_model=channels, n_heads=heads, d_cond=d_cond, dropout=dropout)
        if channels % heads or (channels // heads) % 2:
            raise ValueError(f"{channels} channels must split into {heads} heads of even size")
        self.rotary = Rotary(channels // heads, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(layers))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = x.flatten(2).transpose(1, 2)  # [B, H*W, C], row-major positions
        cos, sin = self.rotary(H * W, x.device)
        for block in self.blocks:
            h = block(h, c, cos, sin)
        return h.transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    """The denoiser: ``forward(xt [B, C*H*W], t [B], y [B] | None) -> logits [B, C*H*W, V]``.

    ``y`` holds class labels ``0..num_classes-1``, or ``num_classes`` (the null label) for the
    unconditional model; ``None`` means all null. In training mode each label becomes the null
    label with probability ``label_dropout``.
    """

    def __init__(self, vocab_size: int, seq_len: int, cfg: UNetConfig) -> None:
        super().__init__()
        C = cfg.image_channels
        side = math.isqrt(seq_len // C)
        if C * side * side != seq_len:
            raise ValueError(f"seq_len {seq_len} is not {C} channels of a square image; set network.image_channels")
        if side % 2 ** (len(cfg.channel_mults) - 1):
            raise ValueError(f"a {side}x{side} image cannot be halved {len(cfg.channel_mults) - 1} times")
        self.cfg, self.vocab_size, self.side = cfg, vocab_size, side
        self.time_conditioned = cfg.time_conditioning
        self.num_classes = cfg.num_classes
        d_cond = cfg.channels
        # One table per channel: value v of channel c is row c * (V + 1) + v (V is the mask).
        self.embed = nn.Embedding(C * (vocab_size + 1), cfg.embed_dim)
        self.register_buffer("channel_offset", torch.arange(C) * (vocab_size + 1), persistent=False)
        if cfg.time_conditioning:
            self.time_mlp = nn.Sequential(nn.Linear(cfg.channels, d_cond), nn.SiLU(), nn.Linear(d_cond, d_cond))
        else:
            self.cond_const = nn.Parameter(torch.zeros(d_cond))
        if cfg.num_classes:
            self.label_embed = nn.Embedding(cfg.num_classes + 1, d_cond)  # + the null label

        widths = [cfg.channels * m for m in cfg.channel_mults]
        self.conv_in = nn.Conv2d(C * cfg.embed_dim, widths[0], 3, padding=1)
        self.down, skip_widths, width = nn.ModuleList(), [widths[0]], widths[0]
        for level, w in enumerate(widths):
            for _ in range(cfg.res_blocks):
                self.down.append(ResBlock(width, w, d_cond, cfg.dropout))
                width = w
                skip_widths.append(width)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skip_widths.append(width)
        if cfg.transformer_layers:
            self.middle = nn.ModuleList([TransformerMiddle(width, cfg.transformer_layers, cfg.heads, d_cond, cfg.dropout)])
        else:
            self.middle = nn.ModuleList([ResBlock(width, width, d_cond, cfg.dropout), SpatialAttention(width, cfg.heads),
                                         ResBlock(width, width, d_cond, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, w in reversed(list(enumerate(widths))):
            for _ in range(cfg.res_blocks + 1):
                self.up.append(ResBlock(width + skip_widths.pop(), w, d_cond, cfg.dropout))
                width = w
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(width, width, 3, padding=1)))
        self.norm_out = group_norm(width)
        self.head = nn.Conv2d(width, C * vocab_size, 3, padding=1)
        nn.init.zeros_(self.head.weight)  # uniform predictions at the start
        nn.init.zeros_(self.head.bias)

    def conditioning(self, t: Tensor, y: Tensor | None) -> Tensor:
        """The vector ``[B, channels]`` every block is conditioned on: time plus label embedding."""
        if self.time_conditioned:
            c = self.time_mlp(timestep_embedding(t, self.cfg.channels).to(self.embed.weight.dtype))
        else:
            c = self.cond_const.expand(t.shape[0], -1)
        if self.num_classes:
            if y is None:
                y = torch.full_like(t, self.num_classes, dtype=torch.long)
            elif self.training and self.cfg.label_dropout > 0:
                drop = torch.rand(y.shape, device=y.device) < self.cfg.label_dropout
                y = torch.where(drop, self.num_classes, y)
            c = c + self.label_embed(y)
        elif y is not None:
            raise ValueError("class labels were given to an unconditional UNet; set network.num_classes")
        return F.silu(c)

    def forward(self, xt: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        B, N = xt.shape
        C, S, V = self.cfg.image_channels, self.side, self.vocab_size
        tokens = xt.view(B, C, S * S) + self.channel_offset[:, None]
        h = self.embed(tokens).permute(0, 1, 3, 2).reshape(B, C * self.cfg.embed_dim, S, S)
        c = self.conditioning(t, y)
        h = self.conv_in(h)
        skips = [h]
        for layer in self.down:
            h = layer(h, c) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.middle:
            h = layer(h) if isinstance(layer, SpatialAttention) else layer(h, c)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), c) if isinstance(layer, ResBlock) else layer(h)
        logits = self.head(F.silu(self.norm_out(h)))  # [B, C * V, S, S]
        return logits.view(B, C, V, S * S).transpose(2, 3).reshape(B, N, V)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
