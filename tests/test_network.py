import torch

from lightning_md4.diffusion import MaskedDiffusion
from lightning_md4.nets import Transformer, TransformerConfig
from lightning_md4.schedules import Linear

TINY = TransformerConfig(n_layers=2, d_model=32, n_heads=4, d_cond=16, dropout=0.0)


def test_shapes_and_bidirectional_attention():
    torch.manual_seed(0)
    net = Transformer(5, TINY)
    for p in net.parameters():  # leave adaLN-Zero's identity start so every path is live
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randint(0, 6, (2, 10))
    t = torch.rand(2)
    out = net(x, t)
    assert out.shape == (2, 10, 5)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 6
    # A change at the last position reaches the first: no causal mask.
    assert not torch.allclose(net(y, t)[:, 0], out[:, 0])
    # And the time conditioning is used.
    assert not torch.allclose(net(x, t + 0.3), out)


def test_time_independent_network_ignores_t_and_allows_caching():
    net = Transformer(5, TransformerConfig(n_layers=1, d_model=32, n_heads=4, d_cond=16, time_conditioning=False))
    x = torch.randint(0, 6, (2, 7))
    assert net.time_conditioned is False
    torch.testing.assert_close(net(x, torch.zeros(2)), net(x, torch.ones(2)))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = Transformer(7, TINY)
    process = MaskedDiffusion(Linear(), 7)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x0 = torch.randint(0, 7, (8, 12))
    # adaLN-Zero starts with zero gates, so the blocks' weights get gradients from the second step.
    for _ in range(3):
        opt.zero_grad()
        process.nelbo(net, x0).mean().backward()
        opt.step()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead


def test_tiny_model_overfits_tiny_data():
    torch.manual_seed(0)
    net = Transformer(4, TINY)
    process = MaskedDiffusion(Linear(), 4)
    x0 = torch.randint(0, 4, (4, 16)).repeat(8, 1)
    eval_x0 = x0.repeat(16, 1)

    def evaluate() -> float:  # the same time and mask draws before and after training
        with torch.no_grad():
            return process.nelbo(net, eval_x0, generator=torch.Generator().manual_seed(0)).mean().item() / 16

    start = evaluate()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(800):
        opt.zero_grad()
        (process.nelbo(net, x0).mean() / 16).backward()
        opt.step()
    end = evaluate()
    # Start: about log(4) = 1.39 nats per token; four memorised sequences need log(4)/16 = 0.09.
    assert start > 1.2 and end < 0.4 * start, (start, end)
