"""Engine attention and BART blocks against Hugging Face's (eager attention, autograd): float64 outputs and gradients
within 1e-10, with the same dropout masks; central finite differences; property tests over shapes, masks and
lengths; exact zero gradients at blocked positions; bad input named."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from engine_checks import AUTOGRAD_TOL, F64, FD_TOL, PROPERTY, assert_all_below, randn
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from transformers import BartConfig
from transformers.models.bart import modeling_bart as hf

from bp_apps.engine.attention import MultiHeadAttention
from bp_apps.engine.gradcheck import finite_difference_grad, relative_error
from bp_apps.engine.transformer import BartDecoderLayer, BartEncoderLayer, LearnedPositionalEmbedding

FLOOR = 1e-3  # a gradient zero up to rounding (the key bias: softmax ignores a shift) is measured against this floor


def config(d_model: int = 8, heads: int = 2, dropout: float = 0.0, attention_dropout: float = 0.0,
           activation_dropout: float = 0.0, activation: str = "gelu") -> BartConfig:
    """A tiny BART config with eager attention (whose dropout draws the (B, H, T, S) mask the engine draws)."""
    cfg = BartConfig(d_model=d_model, encoder_attention_heads=heads, decoder_attention_heads=heads,
                     encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model, dropout=dropout,
                     attention_dropout=attention_dropout, activation_dropout=activation_dropout,
                     activation_function=activation)
    cfg._attn_implementation = "eager"
    return cfg


def additive(blocked: Tensor | None, dtype: torch.dtype = F64) -> Tensor | None:
    """Hugging Face's eager mask: the dtype's minimum where blocked, 0 elsewhere, as (B, 1, T, S)."""
    if blocked is None:
        return None
    return torch.zeros(blocked.shape, dtype=dtype).masked_fill(blocked, torch.finfo(dtype).min)


def blocked_pairs(batch: int, queries: int, keys: int, padding: Tensor | None, causal: bool) -> Tensor | None:
    blocked = torch.zeros(batch, 1, queries, keys, dtype=torch.bool)
    if padding is not None:
        blocked |= (padding == 0)[:, None, None, :]
    if causal:
        blocked |= torch.ones(queries, keys, dtype=torch.bool).triu(1)
    return blocked if bool(blocked.any()) else None


def errors(engine: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, float]:
    """Relative errors; each reference's scale is at least FLOOR times the largest reference entry."""
    top = max(float(t.abs().max()) for t in reference.values())
    return {k: float((engine[k] - v).abs().max()) / max(float(v.abs().max()), FLOOR * top)
            for k, v in reference.items()}


def engine_attention(d_model: int, heads: int, dropout: float = 0.0, seed: int = 0) -> MultiHeadAttention:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MultiHeadAttention(d_model, heads, dropout=dropout).double()


def hf_attention(layer: MultiHeadAttention, dropout: float = 0.0) -> hf.BartAttention:
    twin = hf.BartAttention(layer.embed_dim, layer.num_heads, dropout=dropout, config=config(layer.embed_dim,
                                                                                            layer.num_heads))
    twin = twin.double()
    twin.load_state_dict(layer.state_dict())
    return twin


def attention_errors(layer: MultiHeadAttention, hidden: Tensor, memory: Tensor | None, padding: Tensor | None,
                     causal: bool, seed: int = 5) -> dict[str, float]:
    """Output, input and parameter gradient errors of the engine vs BartAttention (both from one RNG state)."""
    twin = hf_attention(layer, layer.attn_dropout.p).train(layer.training)
    keys = hidden.shape[1] if memory is None else memory.shape[1]
    blocked = blocked_pairs(hidden.shape[0], hidden.shape[1], keys, padding, causal)
    grad = randn(*hidden.shape, seed=seed)
    with torch.random.fork_rng(devices=[]):
        out = layer.forward(hidden, memory, key_padding_mask=padding, causal=causal)
    grads = layer.backward(grad)
    grad_x, grad_m = grads if memory is not None else (grads, None)
    x = hidden.clone().requires_grad_(True)
    m = None if memory is None else memory.clone().requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        expected, _ = twin(x, key_value_states=m, attention_mask=additive(blocked))
    expected.backward(grad)
    reference = {"output": expected.detach(), "grad_hidden": x.grad,
                 **{name: p.grad for name, p in twin.named_parameters()}}
    engine = {"output": out, "grad_hidden": grad_x, **{name: g for name, _, g in layer.param_grads()}}
    if m is not None:
        reference["grad_memory"], engine["grad_memory"] = m.grad, grad_m
    return errors(engine, reference)


def test_attention_has_bart_attention_names_and_initial_weights() -> None:
    torch.manual_seed(2)
    layer = MultiHeadAttention(8, 2)
    torch.manual_seed(2)
    twin = hf.BartAttention(8, 2, config=config())
    assert list(layer.state_dict()) == list(twin.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), twin.state_dict().values()))
    layer.load_state_dict(twin.state_dict(), strict=True)
    twin.load_state_dict(layer.state_dict(), strict=True)


@pytest.mark.parametrize("kind", ["self", "self_padded", "causal", "causal_padded", "cross", "cross_padded"])
def test_attention_matches_bart_attention(kind: str) -> None:
    layer = engine_attention(8, 2)
    hidden = randn(3, 5, 8, seed=1)
    memory = randn(3, 7, 8, seed=2) if kind.startswith("cross") else None
    keys = 5 if memory is None else 7
    padding = None
    if kind.endswith("padded"):
        padding = torch.ones(3, keys, dtype=torch.long)
        padding[1, 3:] = 0
        padding[2, 1:] = 0
    assert_all_below(attention_errors(layer, hidden, memory, padding, causal=kind.startswith("causal")), AUTOGRAD_TOL)


def test_attention_dropout_draws_eager_attentions_mask() -> None:
    layer = engine_attention(8, 2, dropout=0.3).train()
    padding = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert_all_below(attention_errors(layer, randn(2, 4, 8, seed=3), randn(2, 5, 8, seed=4), padding, False),
                     AUTOGRAD_TOL)
    assert (layer.attn_dropout.saved[0] == 0).any(), "some probabilities were dropped"


def test_blocked_keys_get_exactly_zero_gradient() -> None:
    layer = engine_attention(4, 2)
    padding = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]])
    layer.forward(randn(2, 3, 4, seed=1), randn(2, 4, 4, seed=2), key_padding_mask=padding)
    _, grad_memory = layer.backward(randn(2, 3, 4, seed=3))
    assert torch.count_nonzero(grad_memory[padding == 0]) == 0
    assert torch.count_nonzero(grad_memory[padding == 1]) > 0
    layer.forward(randn(1, 4, 4, seed=4), causal=True)
    probs = layer.saved[3]
    assert torch.count_nonzero(probs.view(2, 4, 4).triu(1)) == 0


def test_attention_finite_differences() -> None:
    layer = engine_attention(4, 2)
    hidden, memory = randn(2, 3, 4, seed=1), randn(2, 4, 4, seed=2)
    padding = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    grad = randn(2, 3, 4, seed=3)
    layer.forward(hidden, memory, key_padding_mask=padding)
    grad_x, grad_m = layer.backward(grad)
    analytic = {"hidden": grad_x, "memory": grad_m, "q_proj.weight": layer.q_proj.weight_grad.clone(),
                "k_proj.weight": layer.k_proj.weight_grad.clone()}

    def loss(h: Tensor, m: Tensor) -> float:
        return float((layer.forward(h, m, key_padding_mask=padding) * grad).sum())

    def weight_loss(name: str) -> Callable[[Tensor], float]:
        weight = layer.get_parameter(name)

        def fn(value: Tensor) -> float:
            original = weight.clone()
            weight.copy_(value)
            try:
                return loss(hidden, memory)
            finally:
                weight.copy_(original)
        return fn

    numeric = {"hidden": finite_difference_grad(lambda h: loss(h, memory), hidden),
               "memory": finite_difference_grad(lambda m: loss(hidden, m), memory),
               **{name: finite_difference_grad(weight_loss(name), layer.get_parameter(name))
                  for name in ("q_proj.weight", "k_proj.weight")}}
    assert_all_below({k: relative_error(analytic[k], numeric[k]) for k in analytic}, FD_TOL)


@PROPERTY
@given(batch=st.integers(1, 3), queries=st.integers(1, 5), keys=st.integers(1, 5), heads=st.sampled_from([1, 2]),
       head_dim=st.integers(1, 3), cross=st.booleans(), causal=st.booleans(), data=st.data())
def test_attention_property(batch: int, queries: int, keys: int, heads: int, head_dim: int, cross: bool,
                            causal: bool, data: st.DataObject) -> None:
    """Any shapes, any padding with a real key per sequence (the first, so causal rows keep one), self or cross."""
    if not cross:
        keys = queries
    causal = causal and not cross
    lengths = data.draw(st.lists(st.integers(1, keys), min_size=batch, max_size=batch))
    padding = (torch.arange(keys)[None] < torch.tensor(lengths)[:, None]).long()
    d = heads * head_dim
    layer = engine_attention(d, heads, seed=data.draw(st.integers(0, 100)))
    memory = randn(batch, keys, d, seed=2) if cross else None
    assert_all_below(attention_errors(layer, randn(batch, queries, d, seed=1), memory, padding, causal),
                     AUTOGRAD_TOL)


def test_attention_refuses_bad_input() -> None:
    layer = MultiHeadAttention(4, 2)
    with pytest.raises(ValueError, match="MultiHeadAttention: hidden must be"):
        layer.forward(torch.zeros(2, 4))
    with pytest.raises(TypeError, match=r"MultiHeadAttention: hidden is torch\.float64"):
        layer.forward(torch.zeros(1, 2, 4, dtype=F64))
    with pytest.raises(ValueError, match="batches differ"):
        layer.forward(torch.zeros(1, 2, 4), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        layer.forward(torch.zeros(1, 2, 4), key_padding_mask=torch.ones(1, 3))
    with pytest.raises(TypeError, match="bool or integer"):
        layer.forward(torch.zeros(1, 2, 4), key_padding_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="has no key to attend to"):
        layer.forward(torch.zeros(2, 2, 4), torch.zeros(2, 3, 4), key_padding_mask=torch.tensor([[1, 0, 0], [0] * 3]))
    with pytest.raises(ValueError, match="causal mask needs as many queries as keys"):
        layer.forward(torch.zeros(1, 2, 4), torch.zeros(1, 3, 4), causal=True)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MultiHeadAttention(5, 2)
    layer.forward(torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="grad_output must be"):
        layer.backward(torch.zeros(1, 3, 4))


# ------------------------------------------------------------------ BART's blocks


def layer_pair(kind: str, cfg: BartConfig, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The engine layer with the Hugging Face layer's weights (float64), both in training mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        twin = (hf.BartEncoderLayer if kind == "encoder" else hf.BartDecoderLayer)(cfg, layer_idx=0).double()
    settings = {"d_model": cfg.d_model, "heads": cfg.encoder_attention_heads, "ffn_dim": cfg.encoder_ffn_dim,
                "dropout": cfg.dropout, "attention_dropout": cfg.attention_dropout,
                "activation": cfg.activation_function, "activation_dropout": cfg.activation_dropout}
    engine = (BartEncoderLayer if kind == "encoder" else BartDecoderLayer)(**settings).double()
    engine.load_state_dict(twin.state_dict(), strict=True)
    twin.load_state_dict(engine.state_dict(), strict=True)
    return engine.train(), twin.train()


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("activation", ["gelu", "relu", "gelu_new"])
def test_bart_layers_match_with_dropout_on(kind: str, activation: str) -> None:
    """Dropout after attention, after fc2, after the activation and on the attention probabilities: the same masks
    from one RNG state, so float64 outputs and gradients agree."""
    cfg = config(d_model=8, heads=2, dropout=0.2, attention_dropout=0.1, activation_dropout=0.15,
                 activation=activation)
    engine, twin = layer_pair(kind, cfg)
    x, memory = randn(2, 4, 8, seed=1), randn(2, 5, 8, seed=2)
    padding = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    grad = randn(2, 4, 8, seed=3)
    with torch.random.fork_rng(devices=[]):
        if kind == "encoder":
            out = engine.forward(memory[:, :4], padding[:, :4])
        else:
            out = engine.forward(x, memory, padding)
    grads = engine.backward(grad)
    ref_x = (memory[:, :4] if kind == "encoder" else x).clone().requires_grad_(True)
    ref_m = memory.clone().requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        if kind == "encoder":
            expected = twin(ref_x, additive(blocked_pairs(2, 4, 4, padding[:, :4], False)))
        else:
            expected = twin(ref_x, additive(blocked_pairs(2, 4, 4, None, True)), ref_m,
                            encoder_attention_mask=additive(blocked_pairs(2, 4, 5, padding, False)), use_cache=False)
    expected.backward(grad)
    reference = {"output": expected.detach(), "grad_x": ref_x.grad, **{n: p.grad for n, p in twin.named_parameters()}}
    grad_x = grads if kind == "encoder" else grads[0]
    result = {"output": out, "grad_x": grad_x, **{n: g for n, _, g in engine.param_grads()}}
    if kind == "decoder":
        reference["grad_memory"], result["grad_memory"] = ref_m.grad, grads[1]
    assert_all_below(errors(result, reference), AUTOGRAD_TOL, set(reference))


def test_learned_positions_read_bart_offset_rows() -> None:
    torch.manual_seed(0)
    table = LearnedPositionalEmbedding(6, 3)
    twin = hf.BartLearnedPositionalEmbedding(6, 3)
    twin.load_state_dict(table.state_dict())
    rows = table.forward(4)
    assert torch.equal(rows, twin(torch.zeros(2, 4, dtype=torch.long))[0])
    assert torch.equal(rows, table.weight[2:6])
    table.backward(torch.ones(2, 4, 3))
    assert torch.equal(table.weight_grad[2:6], torch.full((4, 3), 2.0))
    assert torch.count_nonzero(table.weight_grad[:2]) == 0 and torch.count_nonzero(table.weight_grad[6:]) == 0
    with pytest.raises(ValueError, match="7 positions, the table has 6"):
        table.forward(7)


def test_unknown_activation_is_named() -> None:
    with pytest.raises(ValueError, match="activation_function 'swish' has no engine layer"):
        BartEncoderLayer(4, 2, 8, activation="swish")
