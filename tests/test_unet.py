"""Pixel UNet: token order, time and label conditioning, guidance, and its use as an MD4 backbone."""

from dataclasses import asdict

import pytest
import torch

from lightning_md4.conditioning import ClassConditioned, tile_labels
from lightning_md4.modules import MD4
from lightning_md4.nets import UNet, UNetConfig, network_config

V, SIDE = 7, 8
N = 3 * SIDE * SIDE
TINY = UNetConfig(channels=16, res_blocks=1, embed_dim=4, heads=2, dropout=0.0)


def randomised(net: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Leave the zero-initialised start (blocks as identities, a constant head) so every path is live."""
    torch.manual_seed(0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=std)
    return net


def test_tokens_are_read_and_written_channel_by_channel():
    net = UNet(V, N, TINY)
    with torch.no_grad():
        # Row r of the embedding is the constant r, so conv_in sees the table row of each token.
        net.embed.weight.copy_(torch.arange(net.embed.num_embeddings, dtype=torch.float32)[:, None])
        net.head.bias.copy_(torch.tensor([1000.0 * c + v for c in range(3) for v in range(V)]))
    seen = {}
    net.conv_in.register_forward_pre_hook(lambda module, args: seen.setdefault("h", args[0]))
    xt = torch.randint(0, V + 1, (2, N))
    out = net(xt, torch.rand(2))
    h = seen["h"]  # [B, 3 * embed_dim, SIDE, SIDE]
    for c in range(3):
        expected = (xt[:, c * SIDE * SIDE : (c + 1) * SIDE * SIDE] + c * (V + 1)).view(2, SIDE, SIDE).float()
        for j in range(TINY.embed_dim):
            torch.testing.assert_close(h[:, c * TINY.embed_dim + j], expected, rtol=0, atol=0)
    # Output token n is channel n // (SIDE * SIDE): its logits are the head bias of that channel.
    channel = torch.arange(N) // (SIDE * SIDE)
    torch.testing.assert_close(out, (1000.0 * channel[None, :, None] + torch.arange(V)).expand(2, N, V))


def test_shapes_time_conditioning_and_global_receptive_field():
    net = randomised(UNet(V, N, TINY))
    x, t = torch.randint(0, V + 1, (2, N)), torch.rand(2)
    out = net(x, t)
    assert out.shape == (2, N, V)
    assert not torch.allclose(net(x, t + 0.3), out)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % (V + 1)  # last blue value changes the first red logits (attention middle)
    assert not torch.allclose(net(y, t)[:, 0], out[:, 0])
    frozen = randomised(UNet(V, N, UNetConfig(**{**asdict(TINY), "time_conditioning": False})))
    assert frozen.time_conditioned is False
    torch.testing.assert_close(frozen(x, torch.zeros(2)), frozen(x, torch.ones(2)))


def test_labels_null_label_and_label_dropout():
    cfg = UNetConfig(**{**asdict(TINY), "num_classes": 3, "label_dropout": 1.0})
    net = randomised(UNet(V, N, cfg)).eval()
    x, t = torch.randint(0, V + 1, (2, N)), torch.rand(2)
    labels, null = torch.tensor([0, 2]), torch.tensor([3, 3])
    cond = net(x, t, labels)
    assert not torch.allclose(cond, net(x, t, torch.tensor([1, 1])))
    torch.testing.assert_close(net(x, t), net(x, t, null))  # no labels = the null label
    net.train()  # label_dropout 1.0: every training label becomes the null label
    torch.testing.assert_close(net(x, t, labels), net.eval()(x, t, null))
    with pytest.raises(ValueError, match="num_classes"):
        randomised(UNet(V, N, TINY))(x, t, labels)


def test_downsampled_levels_with_transformer_middle_train_every_parameter():
    cfg = UNetConfig(channels=16, channel_mults=(1, 2), res_blocks=1, transformer_layers=2, heads=2, embed_dim=4,
                     dropout=0.0, num_classes=3)
    torch.manual_seed(0)
    net = UNet(V, N, cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x, t, y = torch.randint(0, V + 1, (4, N)), torch.rand(4), torch.tensor([0, 1, 2, 3])
    for _ in range(3):  # zero-initialised head, then zero last convs: every gradient flows by the third step
        opt.zero_grad()
        net(x, t, y).logsumexp(-1).mean().backward()
        opt.step()
    dead = [name for name, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead


def test_image_shape_errors_are_clear():
    with pytest.raises(ValueError, match="square image"):
        UNet(V, 3 * 8 * 9, TINY)
    with pytest.raises(ValueError, match="halved"):
        UNet(V, 3 * 6 * 6, UNetConfig(channels=16, channel_mults=(1, 2, 2), res_blocks=1, embed_dim=4))


class TableNet:
    """A stand-in network whose logits are a fixed table row per label: ``out[b, n] = table[y[b]]``."""

    time_conditioned, num_classes = True, 2

    def __init__(self) -> None:
        self.table = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])  # labels 0, 1, null
        self.calls = 0

    def __call__(self, xt, t, y=None):
        self.calls += 1
        return self.table[y][:, None, :].expand(xt.shape[0], xt.shape[1], 3)


def test_guidance_is_the_renormalised_power_of_conditional_over_unconditional():
    net, w = TableNet(), 1.5
    x, t, y = torch.zeros(2, 4, dtype=torch.long), torch.rand(2), torch.tensor([0, 1])
    out = ClassConditioned(net, y, w)(x, t)
    assert net.calls == 1  # conditional and unconditional in one batch
    p_c, p_u = net.table[y].log_softmax(-1), net.table[[2, 2]].log_softmax(-1)
    expected = torch.softmax((1 + w) * p_c - w * p_u, -1)  # p_c^(1+w) p_u^(-w), renormalised
    torch.testing.assert_close(out.softmax(-1), expected[:, None].expand(2, 4, 3))
    plain = ClassConditioned(net, y)(x, t)
    torch.testing.assert_close(plain, net.table[y][:, None].expand(2, 4, 3))


def test_bound_labels_follow_stacked_copies_of_the_batch():
    torch.testing.assert_close(tile_labels(torch.tensor([4, 5]), 6), torch.tensor([4, 5, 4, 5, 4, 5]))
    with pytest.raises(ValueError, match="copies"):
        tile_labels(torch.tensor([4, 5]), 3)


def test_md4_with_a_class_conditional_unet():
    cfg = UNetConfig(**{**asdict(TINY), "num_classes": 3})
    model = MD4(V, N, network=cfg)
    assert network_config(model.hparams.network) == cfg  # the checkpoint's plain dict rebuilds it
    assert isinstance(MD4(V, N, network=model.hparams.network).net, UNet)
    batch = {"x0": torch.randint(0, V, (4, N)), "index": torch.arange(4), "y": torch.tensor([0, 1, 2, 0])}
    model.eval()
    nelbo = model.eval_nelbo(batch)
    other = model.eval_nelbo({**batch, "y": torch.tensor([1, 2, 0, 1])})
    randomised(model.net)
    assert torch.isfinite(nelbo).all() and not torch.allclose(model.eval_nelbo(batch), model.eval_nelbo(
        {**batch, "y": torch.tensor([1, 2, 0, 1])}))
    assert torch.allclose(nelbo, other)  # the zero-initialised head ignores everything at the start
    with pytest.raises(ValueError, match="no class labels"):
        model.eval_nelbo({"x0": batch["x0"], "index": batch["index"]})
    tokens, nfe = model.sample(3, 4, "cosine", generator=torch.Generator().manual_seed(0), guidance=2.0)
    assert tokens.shape == (3, N) and tokens.max() < V and nfe <= 5
    unconditional = MD4(V, N, network=TINY)
    with pytest.raises(ValueError, match="class-conditional"):
        unconditional.sample(2, 4, guidance=1.0)
