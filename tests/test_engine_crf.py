"""The engine's linear-chain CRF: the text CRF's loss (constraints included), forward-backward gradients against
autograd (float64, ≤ 1e-10) and finite differences, the same Viterbi paths, and bad input naming the layer."""

from __future__ import annotations

import pytest
import torch
from engine_checks import AUTOGRAD_TOL, F64, FD_TOL, PROPERTY, randn
from hypothesis import given
from hypothesis import strategies as st

from bp_apps.engine.crf import CRF as EngineCRF
from bp_apps.engine.gradcheck import finite_difference_grad, relative_error
from bp_apps.text.labeling.crf import CRF, bio_constraints

BIO = ["O", "B-A", "I-A", "B-B", "I-B"]
PARAMS = ("transitions", "start", "end")


def pair(labels: list[str] = BIO, seed: int = 1, dtype: torch.dtype = F64, scale: float = 1.0
         ) -> tuple[EngineCRF, CRF]:
    """The engine CRF and the text CRF with the same random (non-zero) weights."""
    text = CRF(labels).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in text.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=F64) * scale)
    engine = EngineCRF(len(labels), *bio_constraints(labels), dtype=dtype)
    engine.load_state_dict(text.state_dict())
    return engine, text


def batch(lengths: list[int], num_labels: int, seed: int = 0, scale: float = 2.0) -> tuple[torch.Tensor, ...]:
    steps = max(lengths)
    generator = torch.Generator().manual_seed(seed)
    mask = torch.arange(steps)[None] < torch.tensor(lengths)[:, None]
    tags = torch.randint(0, num_labels, (len(lengths), steps), generator=generator).masked_fill(~mask, -100)
    return randn(len(lengths), steps, num_labels, seed=seed, scale=scale), tags, mask


def errors(engine: EngineCRF, text: CRF, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor,
           reduction: str = "mean", grad_output: float = 1.0) -> dict[str, float]:
    """Relative errors of the loss and every gradient, engine vs autograd through the text CRF."""
    reference = emissions.clone().requires_grad_(True)
    text.zero_grad()
    expected = text.nll(reference, tags.clamp(min=0), mask, reduction)
    (expected * grad_output).backward()
    loss = engine.forward(emissions, tags.clamp(min=0), mask, reduction)
    grad = engine.backward(grad_output)
    out = {"loss": relative_error(loss, expected), "emissions": relative_error(grad, reference.grad)}
    for name in PARAMS:
        out[name] = relative_error(getattr(engine, f"{name}_grad"), getattr(text, name).grad)
    return out


def breaking_tags(tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``tags`` with the first sentence starting on I-A: a gold path that breaks the BIO constraints."""
    tags = tags.clone()
    tags[0, 0] = BIO.index("I-A")
    return tags


@pytest.mark.parametrize("reduction", ["mean", "sum", "token_mean"])
@pytest.mark.parametrize("broken", [False, True])
def test_loss_and_gradients_match_the_text_crf(reduction: str, broken: bool) -> None:
    engine, text = pair()
    emissions, tags, mask = batch([6, 3, 1, 6, 5], len(BIO))
    if broken:
        tags = breaking_tags(tags, mask)
    found = errors(engine, text, emissions, tags, mask, reduction, grad_output=0.7)
    assert max(found.values()) <= AUTOGRAD_TOL, found


def test_float32_loss_is_the_text_crfs_to_the_bit() -> None:
    engine, text = pair(dtype=torch.float32, seed=3)
    emissions, tags, mask = batch([9, 4, 7], len(BIO), seed=2)
    emissions = emissions.float()
    with torch.no_grad():
        assert torch.equal(engine.forward(emissions, tags.clamp(min=0), mask, "token_mean"),
                           text.nll(emissions, tags.clamp(min=0), mask, "token_mean"))


def test_floored_mass_routes_its_gradient_as_autograd_does() -> None:
    """A label no path reaches (its mass floored at 1e-30) but with a huge emission: the floor makes its log-mass a
    constant, so its marginal flows to the step's maximum; the engine gives the derivative of the loss computed."""
    engine, text = pair()
    emissions, tags, mask = batch([4, 3], len(BIO), seed=5, scale=1.0)
    tags = torch.zeros_like(tags)  # a path within the constraints: they apply to the partition
    emissions[:, 0, BIO.index("B-A")] = -300.0  # I-A at step 1 is reachable only from B-A or I-A at step 0
    emissions[:, 1, BIO.index("I-A")] = 300.0
    found = errors(engine, text, emissions, tags, mask)
    assert max(found.values()) <= AUTOGRAD_TOL, found
    assert bool((engine.saved[5][1:] < 1e-30).any()), "the example must floor some step's mass"


def test_matches_finite_differences() -> None:
    engine, _ = pair(seed=4)
    emissions, tags, mask = batch([3, 2], len(BIO), seed=6)
    tags = tags.clamp(min=0)
    engine.forward(emissions, tags, mask, "token_mean")
    grad = engine.backward()
    analytic = {name: getattr(engine, f"{name}_grad").clone() for name in PARAMS}
    assert relative_error(grad, finite_difference_grad(
        lambda e: engine.forward(e, tags, mask, "token_mean"), emissions)) <= FD_TOL
    for name in PARAMS:
        param = getattr(engine, name)
        original = param.detach().clone()

        def loss(value: torch.Tensor, param: torch.Tensor = param) -> torch.Tensor:
            param.copy_(value)
            return engine.forward(emissions, tags, mask, "token_mean")

        numeric = finite_difference_grad(loss, original)
        param.copy_(original)
        assert relative_error(analytic[name], numeric) <= FD_TOL, name


@PROPERTY
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=st.integers(0, 1000),
       broken=st.booleans(), labels=st.sampled_from([BIO, ["O", "B-A", "I-A"], ["x", "y", "z", "w"]]),
       reduction=st.sampled_from(["mean", "sum", "token_mean"]))
def test_property_matches_the_text_crf(lengths: list[int], seed: int, broken: bool, labels: list[str],
                                       reduction: str) -> None:
    engine, text = pair(labels, seed=seed)
    emissions, tags, mask = batch(lengths, len(labels), seed=seed)
    if broken:
        tags[0, 0] = len(labels) - 1  # I-* first for the BIO sets: breaks the constraints
    found = errors(engine, text, emissions, tags, mask, reduction)
    assert max(found.values()) <= AUTOGRAD_TOL, found
    assert engine.decode(emissions, mask) == text.decode(emissions, mask)


def test_viterbi_equals_the_text_crfs_and_respects_the_constraints() -> None:
    engine, text = pair(seed=7, scale=3.0)
    emissions, _, mask = batch([8, 1, 5, 8, 3, 7], len(BIO), seed=8, scale=3.0)
    paths = engine.decode(emissions, mask)
    assert paths == text.decode(emissions, mask)
    assert [len(p) for p in paths] == mask.sum(1).tolist()
    for path in paths:
        previous = "O"
        for label in (BIO[i] for i in path):
            assert not label.startswith("I-") or previous[2:] == label[2:]
            previous = label


def test_parameters_are_the_text_crfs_and_start_at_zero() -> None:
    engine, text = EngineCRF(len(BIO), *bio_constraints(BIO)), CRF(BIO)
    assert list(engine.state_dict()) == list(text.state_dict()) == list(PARAMS)
    assert all(torch.equal(a, b) for a, b in zip(engine.state_dict().values(), text.state_dict().values()))
    text.load_state_dict(pair()[0].state_dict())
    assert engine.backend == "engine" and not any(p.requires_grad for p in engine.parameters())


def test_bad_input_names_the_layer() -> None:
    engine = EngineCRF(len(BIO), *bio_constraints(BIO))
    emissions, tags, mask = (t.float() if t.is_floating_point() else t for t in batch([3, 2], len(BIO)))
    tags = tags.clamp(min=0)
    with pytest.raises(ValueError, match=r"CRF: emissions must have shape \[B, T, 5\]"):
        engine.forward(emissions[..., :4], tags, mask)
    with pytest.raises(TypeError, match="CRF: emissions must be a floating-point"):
        engine.forward(tags, tags, mask)
    with pytest.raises(ValueError, match="CRF: mask must be left-aligned"):
        engine.forward(emissions, tags, torch.tensor([[True, False, True], [True, True, False]]))
    with pytest.raises(ValueError, match="CRF: every sentence needs at least one token"):
        engine.forward(emissions, tags, torch.tensor([[True, True, True], [False, False, False]]))
    with pytest.raises(ValueError, match="CRF: mask must be a bool tensor"):
        engine.decode(emissions, mask.long())
    with pytest.raises(ValueError, match=r"CRF: tag 5 is outside \[0, 5\)"):
        engine.forward(emissions, tags.masked_fill(mask, 5), mask)
    with pytest.raises(ValueError, match="CRF: tags must have the mask's shape"):
        engine.forward(emissions, tags[:, :2], mask)
    with pytest.raises(TypeError, match="CRF: tags must be an int64"):
        engine.forward(emissions, tags.float(), mask)
    with pytest.raises(ValueError, match="CRF: reduction must be one of"):
        engine.forward(emissions, tags, mask, "none")
    with pytest.raises(ValueError, match="CRF: allowed must be a bool tensor of shape"):
        EngineCRF(3, allowed=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="CRF: num_labels"):
        EngineCRF(0)
    with pytest.raises(RuntimeError, match="CRF: backward needs a forward"):
        EngineCRF(3).backward()
