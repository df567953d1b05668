import math
from dataclasses import asdict, replace

import pytest
import torch

from lightning_md4.conditioning import ClassConditioned
from lightning_md4.diffusion import MaskedDiffusion
from lightning_md4.modules import MD4
from lightning_md4.nets import Transformer, TransformerConfig, network_config
from lightning_md4.diffusion.schedules import Linear

TINY = TransformerConfig(n_layers=2, d_model=32, n_heads=4, d_cond=16, dropout=0.0)
LABELLED = replace(TINY, num_classes=3)


def randomised(net: torch.nn.Module) -> torch.nn.Module:
    """Leave adaLN-Zero's identity start (zero gates ignore the conditioning) so every path is live."""
    torch.manual_seed(0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return net


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


@pytest.mark.parametrize("cfg", [TINY, LABELLED], ids=["unconditional", "labelled"])
def test_gradients_reach_every_parameter(cfg: TransformerConfig):
    torch.manual_seed(0)
    net = Transformer(7, cfg)
    process = MaskedDiffusion(Linear(), 7)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x0 = torch.randint(0, 7, (8, 12))
    denoiser = ClassConditioned(net, torch.arange(8) % 4) if cfg.num_classes else net  # 3 is the null label
    # adaLN-Zero starts with zero gates, so the blocks' weights get gradients from the second step.
    for _ in range(3):
        opt.zero_grad()
        process.nelbo(denoiser, x0).mean().backward()
        opt.step()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead


@pytest.mark.slow
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


def test_labels_change_the_output_and_no_labels_is_the_null_label():
    net = randomised(Transformer(5, LABELLED)).eval()
    x, t = torch.randint(0, 6, (2, 7)), torch.rand(2)
    out = net(x, t, torch.tensor([0, 2]))
    other = net(x, t, torch.tensor([1, 1]))
    for b in range(2):  # each example reads its own label
        assert not torch.allclose(out[b], other[b])
    torch.testing.assert_close(out[0], net(x, t, torch.tensor([0, 1]))[0])
    torch.testing.assert_close(net(x, t), net(x, t, torch.tensor([3, 3])))
    with pytest.raises(ValueError, match="num_classes"):
        randomised(Transformer(5, TINY))(x, t, torch.tensor([0, 2]))


def test_label_dropout_only_in_training_mode_at_its_rate():
    p, B = 0.25, 400
    net = randomised(Transformer(5, replace(LABELLED, label_dropout=p)))
    x, t = torch.randint(0, 6, (1, 7)).expand(B, 7), torch.full((B,), 0.5)
    labels, null = torch.arange(B) % 3, torch.full((B,), 3)
    net.eval()
    conditional, unconditional = net(x, t, labels), net(x, t, null)
    torch.testing.assert_close(net(x, t, labels), conditional)  # evaluation never drops a label
    net.train()
    trained = net(x, t, labels)
    # Every training row is the conditional or the unconditional output; count the dropped ones.
    dropped = (trained - unconditional).abs().amax((1, 2)) < 1e-5
    kept = (trained - conditional).abs().amax((1, 2)) < 1e-5
    assert bool((dropped ^ kept).all())
    # Binomial(400, 0.25): 100 +- 8.7; the bound is 4.6 standard deviations.
    assert abs(int(dropped.sum()) - p * B) < 40, int(dropped.sum())
    assert not torch.allclose(conditional, unconditional)


def test_time_independent_labelled_network_ignores_t_but_not_the_label():
    net = randomised(Transformer(5, replace(LABELLED, time_conditioning=False))).eval()
    assert net.time_conditioned is False and ClassConditioned(net, torch.tensor([0])).time_conditioned is False
    x = torch.randint(0, 6, (2, 7))
    for y in (torch.tensor([0, 2]), None):
        torch.testing.assert_close(net(x, torch.zeros(2), y), net(x, torch.ones(2), y))
    assert not torch.allclose(net(x, torch.zeros(2), torch.tensor([0, 2])), net(x, torch.zeros(2)))


@pytest.mark.parametrize("w", [0.0, 2.0])
def test_class_conditioned_passes_positions_to_the_network(w: float):
    net = randomised(Transformer(5, LABELLED)).eval()
    x, t = torch.randint(0, 6, (3, 7)), torch.rand(3)
    positions = torch.rand(3, 7) < 0.5
    guided = ClassConditioned(net, torch.tensor([0, 1, 2]), w)
    torch.testing.assert_close(guided(x, t, positions=positions), guided(x, t)[positions])


def test_md4_with_a_labelled_transformer_logits_at_masked_is_the_same_bound():
    model = MD4(5, 7, network=LABELLED)
    assert network_config(model.hparams.network) == LABELLED  # the checkpoint's plain dict rebuilds it
    masked = MD4(5, 7, network=asdict(LABELLED), logits_at="masked")
    randomised(model.net)
    masked.net.load_state_dict(model.net.state_dict())
    model.eval(), masked.eval()
    batch = {"x0": torch.randint(0, 5, (4, 7)), "index": torch.arange(4), "y": torch.tensor([0, 1, 2, 3])}
    torch.testing.assert_close(masked.eval_nelbo(batch), model.eval_nelbo(batch))
    assert not torch.allclose(model.eval_nelbo(batch), model.eval_nelbo({**batch, "y": torch.tensor([1, 2, 0, 0])}))


@pytest.mark.slow
def test_conditional_model_learns_each_class_and_the_mixture():
    """Two classes, one sequence each. At the optimum the masked-diffusion bound is tight: the
    conditional NELBO is -log p(x | y) = 0 and the unconditional -log p(x) = log 2 nats. The
    sequences are constant because with rotary positions only, a fully masked input looks the
    same at every position."""
    torch.manual_seed(0)
    net = Transformer(4, replace(LABELLED, num_classes=2, label_dropout=0.5))
    process = MaskedDiffusion(Linear(), 4)
    x0 = torch.tensor([[0] * 6, [3] * 6]).repeat(16, 1)
    y = torch.tensor([0, 1]).repeat(16)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        process.nelbo(ClassConditioned(net, y), x0).mean().backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        draws = torch.Generator().manual_seed(0)
        conditional = process.nelbo(ClassConditioned(net, y.repeat(8)), x0.repeat(8, 1), generator=draws).mean()
        unconditional = process.nelbo(net, x0.repeat(8, 1), generator=draws).mean()
    assert conditional < 0.1 * math.log(2), float(conditional)
    assert abs(unconditional - math.log(2)) < 0.25 * math.log(2), float(unconditional)


@pytest.mark.parametrize("bad", [{"num_classes": -1}, {"label_dropout": 1.5}, {"label_dropout": -0.1}])
def test_bad_label_options_fail_where_declared(bad: dict):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TransformerConfig(**bad)
