"""Autoregressive (next-token) modelling: the exact negative log-likelihood and left-to-right sampling.

The baseline every masked-diffusion paper compares with, on the same network made causal
(``network.causal``) and the same data. Tokens are ids ``0..V-1``; the id ``V`` (the diffusion
models' mask, whose embedding every network already has) is the beginning-of-sequence token BOS.
The network reads ``[BOS, x_0, ..., x_{N-2}]`` and its output at position ``i`` is the
distribution of ``x_i`` given ``x_<i``, so

    -log p(x) = -sum_{i=0}^{N-1} log p(x_i | BOS, x_<i)

covers every one of the N tokens, the first one too, and divided by N it compares directly with the
diffusion bounds in nats per token over the same N tokens. It is exact: no time or mask is drawn.

Sampling draws ``x_0, x_1, ...`` in turn (float64 inverse-CDF draws,
:func:`~lightning_md4.diffusion.sampling.sample_categorical`), reading each new token once through
a key/value cache (:class:`~lightning_md4.nets.transformer.KVCache`); ``cache=False`` reruns the
network on the whole prefix at each position instead (the reference the cached sampler must equal).
Given tokens at the start of a sequence (a prefix) are kept and conditioned on.

Pure torch: the LightningModule is :class:`lightning_md4.modules.ar.AR`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_md4.diffusion.exact import EnumeratedLaw
from lightning_md4.diffusion.sampling import Denoiser, sample_categorical
from lightning_md4.nets.transformer import KVCache


class CausalNet(Protocol):
    """A causal network: ``net(x [B, n], t [B], y) -> logits [B, n, V]`` (the output at position i
    depends on ``x[:, :i + 1]`` only) and ``net.decode(x [B, n], cache, y)``, its incremental form."""

    vocab_size: int
    num_classes: int

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor: ...

    def decode(self, tokens: Tensor, cache: KVCache, y: Tensor | None = None) -> Tensor: ...


class Autoregressive:
    """Next-token prediction over ``vocab_size`` tokens with BOS ``= vocab_size``.

    ``mask_id`` (the same id) marks the positions to generate in a conditioning ``x``, as for the
    diffusion processes.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.bos_id = self.mask_id = vocab_size

    def inputs(self, x0: Tensor) -> Tensor:
        """What the network reads for targets ``x0`` ``[B, N]``: ``[BOS, x_0, ..., x_{N-2}]``."""
        bos = torch.full_like(x0[:, :1], self.bos_id)
        return torch.cat([bos, x0[:, :-1]], dim=1)

    def token_log_probs(self, denoiser: Denoiser, x0: Tensor) -> Tensor:
        """``log p(x_i | x_<i)`` ``[B, N]``, in at least float32 (float64 for a float64 network).

        ``denoiser(x, t)``: the causal network (labels bound, see ``ClassConditioned``); ``t`` is
        zeros, which a network without time conditioning ignores.
        """
        inp = self.inputs(x0)
        logits = denoiser(inp, torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device))
        dtype = torch.promote_types(logits.dtype, torch.float32)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(dtype), x0.reshape(-1), reduction="none")
        return -nll.view(x0.shape)

    def nll(self, denoiser: Denoiser, x0: Tensor) -> Tensor:
        """The exact negative log-likelihood ``-log p(x0)`` in nats per sequence ``[B]``."""
        return -self.token_log_probs(denoiser, x0).sum(-1)

    # -- exact answers on an enumerable law ---------------------------------------------------------
    def exact_denoiser(self, law: EnumeratedLaw) -> ExactCausalNet:
        """The exact conditionals of ``law`` as a causal network (with ``decode``, for the sampler)."""
        return ExactCausalNet(law, self.bos_id)

    def expected_nelbo(self, law: EnumeratedLaw) -> float:
        """E over x0 ~ ``law`` of the NLL with the exact conditionals: the entropy (the NLL is exact)."""
        return law.entropy()

    # -- sampling ----------------------------------------------------------------------------
    def initial_tokens(self, shape: tuple[int, int], x: Tensor | None, device: torch.device | str | None
                       ) -> tuple[Tensor, Tensor, int]:
        """``(x [B, N], free [B, N] bool, P)``: the start (``mask_id`` at the positions to
        generate), those positions, and the length of the shortest given prefix.

        Raises:
            ValueError: ``x`` has the wrong shape, or a given token after a position to generate
                (left-to-right sampling conditions on a prefix only).
        """
        if x is None:
            x = torch.full(shape, self.mask_id, dtype=torch.long, device=device)
        elif tuple(x.shape) != tuple(shape):
            raise ValueError(f"conditioning x has shape {tuple(x.shape)}, expected {tuple(shape)}")
        else:
            x = x.to(device).clone()
        free = x == self.mask_id
        if (free[:, :-1] & ~free[:, 1:]).any():
            raise ValueError("AR conditions on a prefix only: in x, every given token must come before the first "
                             f"position to generate (mask id {self.mask_id})")
        prefix = int((~free).sum(1).min()) if x.shape[0] else shape[1]
        return x, free, prefix

    @torch.no_grad()
    def sample(self, net: CausalNet, shape: tuple[int, int], generator: torch.Generator | None = None,
               x: Tensor | None = None, labels: Tensor | None = None, guidance: float = 0.0, cache: bool = True,
               device: torch.device | str | None = None) -> tuple[Tensor, int]:
        """Draw sequences left to right; returns tokens ``[B, N]`` and the network evaluations.

        ``x``: optional LongTensor ``shape``, a prefix of given tokens per row then ``mask_id``;
        given tokens are kept (rows may have prefixes of different lengths). ``labels`` ``[B]``:
        class labels of a class-conditional network, with classifier-free guidance of scale
        ``guidance`` on each next-token distribution, ``(1 + w) cond - w uncond`` in logits.
        Each position's draw takes ``B`` uniforms from ``generator`` whether or not its rows are
        given, so the cached and uncached samplers consume the same stream. The network is called
        ``N - P`` times (``P`` the shortest prefix): ``seq_len`` for unconditional samples.
        """
        x, free, prefix = self.initial_tokens(shape, x, device)
        B, N = x.shape
        if prefix == N:
            return x, 0
        y = labels
        if guidance:
            if labels is None:
                raise ValueError("guidance needs class labels")
            y = torch.cat([labels, torch.full_like(labels, net.num_classes)])

        def next_logits(out: Tensor) -> Tensor:  # the last position's logits [B, V], guided
            out = out[:, -1]
            if not guidance:
                return out
            cond, uncond = out.chunk(2)
            return (1.0 + guidance) * cond - guidance * uncond

        def rows(tokens: Tensor) -> Tensor:  # each row twice (conditional, null label) when guided
            return torch.cat([tokens, tokens]) if guidance else tokens

        bos = torch.full((B, 1), self.bos_id, dtype=torch.long, device=x.device)
        kv = KVCache(N) if cache else None
        nfe = 0
        for i in range(prefix, N):
            if kv is None:  # the whole prefix again
                inp = rows(torch.cat([bos, x[:, :i]], dim=1))
                out = net(inp, torch.zeros(inp.shape[0], dtype=torch.float64, device=x.device), y)
            elif i == prefix:  # BOS and the common prefix in one pass
                out = net.decode(rows(torch.cat([bos, x[:, :i]], dim=1)), kv, y)
            else:  # only the token drawn last
                out = net.decode(rows(x[:, i - 1 : i]), kv, y)
            nfe += 1
            probs = torch.softmax(next_logits(out).double(), dim=-1)
            draw = sample_categorical(probs, generator)
            x[:, i] = torch.where(free[:, i], draw, x[:, i])
        return x, nfe


class ExactCausalNet:
    """``log p(x_i | x_<i)`` of an enumerated law, called like the causal network: ``net(x [B, n], t)``
    reads ``[BOS, x_0, ..., x_{n-2}]`` and gives the log-probabilities ``[B, n, V]`` of ``x_0 ... x_{n-1}``;
    ``decode`` reads the positions one call at a time (the prefix is kept on the cache object)."""

    vocab_size: int
    num_classes = 0

    def __init__(self, law: EnumeratedLaw, bos_id: int) -> None:
        self.law, self.bos_id, self.vocab_size = law, bos_id, law.vocab_size

    def __call__(self, x: Tensor, t: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        B, n = x.shape
        seen = x[:, 1:]  # x_0 .. x_{n-2}
        out = []
        for i in range(n):  # position i knows x_<i
            known = torch.arange(self.law.seq_len, device=x.device) < i  # [N]
            token = torch.zeros(B, self.law.seq_len, dtype=torch.long, device=x.device)
            token[:, :i] = seen[:, :i]
            lik = torch.where(known[None, :, None],
                              F.one_hot(token, self.vocab_size).double(), torch.ones(1, dtype=torch.float64))
            out.append(self.law.log_posterior(lik)[:, i])
        return torch.stack(out, dim=1)

    def decode(self, tokens: Tensor, cache: KVCache, y: Tensor | None = None) -> Tensor:
        prefix = getattr(cache, "exact_prefix", tokens[:, :0])
        cache.exact_prefix = prefix = torch.cat([prefix, tokens], dim=1)  # type: ignore[attr-defined]
        return self(prefix)[:, -tokens.shape[1]:]
