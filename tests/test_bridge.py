"""The autograd bridge: an autograd extractor + engine head gives autograd's gradients, exactly (float64)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bp_apps.engine import MLP
from bp_apps.engine.bridge import EngineMLPFunction, EngineMLPHead, engine_mlp

RTOL = 1e-10


def assert_close(actual: Tensor, expected: Tensor, rtol: float = RTOL, floor: float = 1e-300) -> None:
    """Relative agreement in max-norm: |a − e|∞ ≤ rtol·max(|e|∞, floor)."""
    assert actual.shape == expected.shape
    scale = max(float(expected.abs().max()), floor)
    err = float((actual - expected).abs().max())
    assert err <= rtol * scale, f"relative error {err / scale:.3e} > {rtol:.0e}"


class Extractor(nn.Module):
    """A small autograd CNN for 8×8 single-channel images, ending in a feature vector."""

    def __init__(self, features: int = 12) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, features)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(torch.tanh(self.conv(x)), 2)
        return torch.tanh(self.fc(h.flatten(1)))


def make_pair(norm: str | None = None, activation: str = "relu", seed: int = 0,
              dropout: float = 0.0) -> tuple[nn.Module, EngineMLPHead, nn.Module, nn.Module]:
    """(extractor, engine head) and an independent copy (extractor, autograd twin), same weights, float64."""
    torch.manual_seed(seed)
    extractor = Extractor().double()
    head = EngineMLPHead(12, [16, 8], 5, activation=activation, norm=norm, dropout=dropout, dtype=torch.float64)
    twin = head.mlp.to_autograd()
    return extractor, head, copy.deepcopy(extractor), twin


def images(n: int = 6, seed: int = 1) -> Tensor:
    return torch.randn(n, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def grads(module: nn.Module) -> list[Tensor]:
    return [p.grad for p in module.parameters()]


def assert_grads_close(actual: list[Tensor], expected: list[Tensor]) -> None:
    """Each gradient relative to itself, floored at 1e-3 of the largest one: a Linear bias before
    BatchNorm has an exactly-zero gradient, so both sides hold only round-off there."""
    assert len(actual) == len(expected) and all(g is not None for g in actual)
    floor = 1e-3 * max(float(g.abs().max()) for g in expected)
    for g, g_ref in zip(actual, expected, strict=True):
        assert_close(g, g_ref, floor=floor)


@pytest.mark.parametrize(("norm", "activation"), [(None, "relu"), ("layer", "gelu"), ("batch", "tanh")])
def test_gradients_match_autograd_twin(norm: str | None, activation: str) -> None:
    ext, head, ext_ref, twin = make_pair(norm, activation)
    x = images()
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    out = head(ext(x))
    out_ref = twin(ext_ref(x_ref))
    assert_close(out.detach(), out_ref.detach())
    F.cross_entropy(out, target).backward()
    F.cross_entropy(out_ref, target).backward()
    assert_close(x.grad, x_ref.grad)
    assert_grads_close(grads(ext), grads(ext_ref))
    assert_grads_close(grads(head), grads(twin))


def test_head_settings() -> None:
    mlp = MLP(4, [3], 2)
    assert not any(p.requires_grad for p in mlp.parameters()) and not mlp.input_grad
    head = EngineMLPHead(mlp=mlp)
    assert head.mlp is mlp and mlp.input_grad and all(p.requires_grad for p in head.parameters())
    assert (head.in_features, head.out_features) == (4, 2)
    head.eval()
    assert not mlp.training and all(not m.training for m in mlp.modules())
    head.train()
    assert all(m.training for m in mlp.modules())
    with pytest.raises(ValueError, match="in_features and out_features"):
        EngineMLPHead()
    with pytest.raises(ValueError, match="not both"):
        EngineMLPHead(4, mlp=mlp)


def test_head_turns_off_reused_buffers() -> None:
    mlp = MLP(4, [3], 2)
    if not hasattr(mlp, "reuse_buffers"):
        pytest.skip("this engine has no reuse_buffers option")
    mlp.reuse_buffers = True
    with pytest.raises(ValueError, match="reuse_buffers"):
        engine_mlp(torch.randn(2, 4), mlp)
    head = EngineMLPHead(mlp=mlp)
    assert not mlp.reuse_buffers
    head(torch.randn(2, 4)).sum().backward()


def test_gradcheck() -> None:
    torch.manual_seed(0)
    mlp = MLP(5, [6, 4], 3, activation="tanh", norm="layer", dtype=torch.float64)
    head = EngineMLPHead(mlp=mlp)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    params = tuple(head.parameters())
    assert torch.autograd.gradcheck(lambda x, *p: EngineMLPFunction.apply(x, mlp, *p), (x, *params))
    x3 = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: EngineMLPFunction.apply(x, mlp, *p), (x3, *params))


def test_sgd_training_matches_autograd() -> None:
    ext, head, ext_ref, twin = make_pair("layer", "relu")
    model, ref = nn.Sequential(ext, head), nn.Sequential(ext_ref, twin)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    x, y = images(16, seed=3), torch.arange(16) % 5
    losses, losses_ref = [], []
    for _ in range(5):
        for m, o, log in ((model, opt, losses), (ref, opt_ref, losses_ref)):
            o.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            o.step()
            log.append(loss.item())
    assert losses[-1] < losses[0]
    for a, b in zip(losses, losses_ref, strict=True):
        assert abs(a - b) <= RTOL * abs(b)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close(p.detach(), q.detach())


def test_two_forwards_then_one_backward() -> None:
    ext, head, ext_ref, twin = make_pair(None, "gelu")
    x1, x2 = images(5, seed=4), images(7, seed=5)
    out = head(ext(x1)).pow(2).sum() + head(ext(x2)).sin().sum()
    ref = twin(ext_ref(x1)).pow(2).sum() + twin(ext_ref(x2)).sin().sum()
    out.backward()
    ref.backward()
    assert_grads_close(grads(ext) + grads(head), grads(ext_ref) + grads(twin))


def test_dropout_mask_is_kept_across_forwards() -> None:
    torch.manual_seed(0)
    head = EngineMLPHead(6, [32], 3, dropout=0.5, dtype=torch.float64)
    twin = head.mlp.to_autograd()
    x1 = torch.randn(4, 6, dtype=torch.float64)
    x2 = torch.randn(4, 6, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        (head(x1).sum() * 2 + head(x2).pow(2).sum()).backward()
    (twin(x1).sum() * 2 + twin(x2).pow(2).sum()).backward()  # same RNG draws, same masks
    assert_grads_close(grads(head), grads(twin))


def test_3d_input_and_noncontiguous_grad() -> None:
    torch.manual_seed(0)
    head = EngineMLPHead(6, [10], 4, activation="leaky_relu", dtype=torch.float64)
    twin = head.mlp.to_autograd()
    base = torch.randn(6, 5, 3, dtype=torch.float64)
    x = base.transpose(0, 2).clone().requires_grad_(True)  # (3, 5, 6)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = head(x), twin(x_ref)
    assert out.shape == (3, 5, 4)
    weight = torch.randn(4, 5, 3, dtype=torch.float64).permute(2, 1, 0)  # non-contiguous upstream gradient
    out.backward(weight)
    out_ref.backward(weight)
    assert_close(x.grad, x_ref.grad)
    assert_grads_close(grads(head), grads(twin))
    head.zero_grad()
    head(x).sum().backward()  # expanded (stride-0) upstream gradient
    twin.zero_grad()
    twin(x_ref).sum().backward()
    assert_grads_close(grads(head), grads(twin))


def test_only_needed_gradients() -> None:
    torch.manual_seed(0)
    head = EngineMLPHead(3, [4], 2, dtype=torch.float64)
    head.mlp.layers[0].weight.requires_grad_(False)
    x = torch.randn(5, 3, dtype=torch.float64)  # no gradient wanted for x
    engine_mlp(x, head.mlp).sum().backward()
    assert head.mlp.layers[0].weight.grad is None and head.mlp.layers[0].bias.grad is not None
    assert head.mlp.input_grad, "the head's input_grad setting survives backward"
    with torch.no_grad():
        y = head(x)
    assert y.grad_fn is None
    for p in head.parameters():
        p.requires_grad_(False)
    assert head(x).grad_fn is None  # nothing to differentiate: the plain engine forward


def test_inplace_change_before_backward_raises() -> None:
    torch.manual_seed(0)
    head = EngineMLPHead(3, [4], 2, dtype=torch.float64)
    out = head(torch.randn(5, 3, dtype=torch.float64)).sum()
    with torch.no_grad():
        head.mlp.layers[0].weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
