"""Bidirectional transformer denoiser: rotary positions, adaLN-Zero time conditioning, GLU MLP, SDPA.

Input tokens ``[B, N]`` with ids ``0..V`` (``V`` is the mask), times ``[B]``, optionally class
labels ``[B]``; output logits ``[B, N, V]`` over the real tokens only.

With ``causal: true`` every position attends only to itself and the positions before it (the
autoregressive baseline, :mod:`lightning_md4.modules.ar`), and :meth:`Transformer.decode` runs it
incrementally with a key/value cache (:class:`KVCache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class TransformerConfig:
    """Network size. The paper's text8/OWT model is 12 layers, d_model 768, 12 heads.

    ``num_classes`` > 0 makes the network class-conditional (label ``num_classes`` is the null
    label of classifier-free guidance); in training each label becomes the null label with
    probability ``label_dropout``, so the same network also learns the unconditional model.

    ``causal`` masks attention so that position i sees positions 0..i only (an autoregressive
    model; the AR method sets it); the default, bidirectional attention, is the denoisers'.
    """

    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    time_conditioning: bool = True
    d_cond: int = 128
    rope_base: float = 10000.0
    num_classes: int = 0
    label_dropout: float = 0.1
    causal: bool = False

    def __post_init__(self) -> None:
        # Checked where declared, so a bad size stops the command before any run folder is touched.
        if min(self.n_layers, self.d_model, self.n_heads, self.d_cond) < 1:
            raise ValueError(f"network sizes must be >= 1: n_layers {self.n_layers}, d_model {self.d_model}, "
                             f"n_heads {self.n_heads}, d_cond {self.d_cond}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"network.d_model {self.d_model} must split into n_heads {self.n_heads} heads of an "
                             "even size (rotary positions rotate pairs)")
        if not (self.mlp_ratio > 0 and self.rope_base > 0):
            raise ValueError(f"network.mlp_ratio {self.mlp_ratio} and rope_base {self.rope_base} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"network.dropout is {self.dropout}; it is a probability in [0, 1)")
        if self.num_classes < 0:
            raise ValueError(f"network.num_classes is {self.num_classes}; it must be >= 0 (0: unconditional)")
        if not 0 <= self.label_dropout <= 1:
            raise ValueError(f"network.label_dropout is {self.label_dropout}; it is a probability in [0, 1]")


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of times ``t`` in [0, 1] (scaled by 1000 so the
    frequencies resolve small differences in t)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding tables, cached per sequence length."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        pos = torch.arange(seq_len, device=device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq.to(device))  # [N, head_dim / 2]
        return angles.cos()[None, None], angles.sin()[None, None]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x1, x2) of the last dim of ``x`` [B, H, N, D] by the position angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class KVCache:
    """Keys and values of the positions a causal transformer has read, per block, for
    :meth:`Transformer.decode`: preallocated for ``max_len`` positions on the first call, so that
    a step writes one slot instead of copying the whole cache."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0  # positions stored
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k``, ``v`` ``[B, H, n, D]`` after the stored positions; all keys and values so far."""
        start, n = self.length, k.shape[2]
        if start + n > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} positions; {start} stored, {n} more given")
        if layer == len(self.keys):  # first call: allocate this block's buffers
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys.append(k.new_empty(shape))
            self.values.append(v.new_empty(shape))
        self.keys[layer][:, :, start : start + n] = k
        self.values[layer][:, :, start : start + n] = v
        return self.keys[layer][:, :, : start + n], self.values[layer][:, :, : start + n]


class Block(nn.Module):
    """Pre-norm attention + GLU MLP, each modulated (shift, scale, gate) by the conditioning vector."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.causal = cfg.causal
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        hidden = int(cfg.mlp_ratio * d * 2 / 3)  # GLU: two input projections, same parameter count
        self.mlp_in = nn.Linear(d, 2 * hidden, bias=False)
        self.mlp_out = nn.Linear(hidden, d, bias=False)
        self.dropout = cfg.dropout
        self.ada = nn.Linear(cfg.d_cond, 6 * d)
        nn.init.zeros_(self.ada.weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        """``x`` ``[B, N, d]``; with ``cache`` (causal blocks), ``x`` holds the ``N`` positions after
        the ``cache.length`` already read, ``cos``/``sin`` their angles, and block ``layer`` stores
        its keys and values there."""
        B, N, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).view(B, N, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        p = self.dropout if self.training else 0.0
        if cache is None:
            h = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        else:
            past = cache.length
            k, v = cache.extend(layer, k, v)
            # New position i (absolute past + i) sees keys 0..past + i; one new position sees them all.
            mask = None if N == 1 else torch.ones(N, past + N, dtype=torch.bool, device=x.device).tril(past)
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        h = h.transpose(1, 2).reshape(B, N, d)
        x = x + gate1[:, None] * F.dropout(self.attn_out(h), p, self.training)
        h = modulate(self.norm2(x), shift2, scale2)
        a, b = self.mlp_in(h).chunk(2, dim=-1)
        x = x + gate2[:, None] * F.dropout(self.mlp_out(F.silu(a) * b), p, self.training)
        return x


class Transformer(nn.Module):
    """The denoiser: ``forward(xt [B, N], t [B], y [B] | None) -> logits [B, N, V]``.

    With ``time_conditioning=False`` the time part of the conditioning vector is a learned
    constant, the network ignores t, and ``time_conditioned`` tells samplers they may cache its
    output. With ``num_classes`` > 0 a label embedding is added to the conditioning vector, as in
    the UNet, so ``ClassConditioned`` binds labels and guides either network.
    """

    def __init__(self, vocab_size: int, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 2:
            raise ValueError(f"d_model {cfg.d_model} must split into {cfg.n_heads} heads of even size")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.time_conditioned = cfg.time_conditioning
        self.num_classes = cfg.num_classes
        self.embed = nn.Embedding(vocab_size + 1, cfg.d_model)  # + the mask token
        if cfg.time_conditioning:
            self.cond = nn.Sequential(nn.Linear(cfg.d_cond, cfg.d_cond), nn.SiLU(), nn.Linear(cfg.d_cond, cfg.d_cond))
        else:
            self.cond_const = nn.Parameter(torch.zeros(cfg.d_cond))
        if cfg.num_classes:
            self.label_embed = nn.Embedding(cfg.num_classes + 1, cfg.d_cond)  # + the null label
        self.rotary = Rotary(cfg.d_model // cfg.n_heads, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_out = nn.LayerNorm(cfg.d_model, elementwise_affine=False)
        self.ada_out = nn.Linear(cfg.d_cond, 2 * cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size)
        self.drop = nn.Dropout(cfg.dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.requires_grad:
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.embed.weight, std=0.02)
        if self.num_classes:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada.weight)
            nn.init.zeros_(block.ada.bias)
        nn.init.zeros_(self.ada_out.weight)
        nn.init.zeros_(self.ada_out.bias)

    def conditioning(self, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The vector ``[B, d_cond]`` every block is modulated by: the time embedding (a learned
        constant without time conditioning, so t never enters) plus the label embedding."""
        if self.time_conditioned:
            c = self.cond(timestep_embedding(t, self.cfg.d_cond).to(self.embed.weight.dtype))
        else:
            c = self.cond_const.expand(t.shape[0], -1)
        if self.num_classes:
            c = c + self.label_embed(self.labels(y, t.shape[0], t.device))
        elif y is not None:
            raise ValueError("class labels were given to an unconditional transformer; set network.num_classes")
        return F.silu(c)

    def labels(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """Labels ``[B]`` to embed: ``None`` is the null label ``num_classes`` for every example;
        in training mode each label is replaced by the null label with probability ``label_dropout``."""
        if y is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if self.training and self.cfg.label_dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.cfg.label_dropout
            y = torch.where(drop, self.num_classes, y)
        return y

    def forward(self, xt: Tensor, t: Tensor, y: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Logits ``[B, N, V]``; ``y`` ``[B]`` class labels (``None``: the null label). With
        ``positions`` (bool ``[B, N]``) only those rows, ``[M, V]`` in the order of
        ``logits[positions]``: the head is a quarter of the FLOPs at a GPT-2 vocabulary and a
        loss over masked tokens needs no other rows."""
        B, N = xt.shape
        c = self.conditioning(t, y).to(self.embed.weight.dtype)
        cos, sin = self.rotary(N, xt.device)
        x = self.drop(self.embed(xt))
        for block in self.blocks:
            x = block(x, c, cos, sin)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        h = modulate(self.norm_out(x), shift, scale)
        return self.head(h if positions is None else h[positions])

    def decode(self, tokens: Tensor, cache: KVCache, y: Tensor | None = None) -> Tensor:
        """Logits ``[B, n, V]`` of the ``n`` positions ``tokens`` ``[B, n]`` that follow the
        ``cache.length`` positions already read, reading only these (a causal network's
        incremental forward): equal to ``forward``'s rows ``cache.length:cache.length + n`` on
        the whole sequence. Adds their keys and values to ``cache``."""
        if not self.cfg.causal:
            raise ValueError("decode with a KV cache needs a causal transformer (network.causal: true)")
        B, n = tokens.shape
        start = cache.length
        t = torch.zeros(B, device=tokens.device)  # a causal model here has no time input
        c = self.conditioning(t, y).to(self.embed.weight.dtype)
        cos, sin = self.rotary(start + n, tokens.device)
        cos, sin = cos[:, :, start:], sin[:, :, start:]
        x = self.drop(self.embed(tokens))
        for layer, block in enumerate(self.blocks):
            x = block(x, c, cos, sin, cache, layer)
        cache.length = start + n
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        return self.head(modulate(self.norm_out(x), shift, scale))

    def num_params(self, exclude_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n
