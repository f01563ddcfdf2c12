"""BART (and the project's pointer-generator BART) built of engine layers, forward and backward by hand.

The module tree mirrors Hugging Face's ``BartForConditionalGeneration`` (``model.shared``, ``model.encoder.layers.0.
self_attn.q_proj`` ..., ``lm_head``, the ``final_logits_bias`` buffer, and for the copy variant ``copy_query``,
``copy_key``, ``copy_gate``), so one ``state_dict`` loads into either. Each block is post-LayerNorm as in BART::

    x = LN(x + dropout(attention(x)))            (decoder: then x = LN(x + dropout(cross_attention(x, memory))))
    x = LN(x + dropout(fc2(act_dropout(act(fc1(x))))))

and the embeddings are ``dropout(LN(scale·E[ids] + P[positions + 2]))``. Dropout masks are drawn in the order and
shapes of Hugging Face's forward, so one RNG state drops the same units in both. The token embedding is shared by
the encoder, the decoder and the output projection: its gradient is the sum of both lookups' gradients (one
``index_add``, the padding row zero) and the output projection's dW. This module imports torch only: the
configuration is any object with ``BartConfig``'s attribute names.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from bp_apps.engine.attention import MultiHeadAttention
from bp_apps.engine.embedding import Embedding
from bp_apps.engine.layers import GELU, Dropout, Layer, LayerNorm, Linear, ReLU

__all__ = ["BART_ACTIVATIONS", "COPY_FLOOR", "BartDecoder", "BartDecoderLayer", "BartEncoder", "BartEncoderLayer",
           "BartModel", "EngineBart", "LearnedPositionalEmbedding", "TiedOutputProjection"]

BART_ACTIVATIONS = {"gelu": lambda: GELU(), "gelu_pytorch_tanh": lambda: GELU("tanh"), "gelu_new": lambda: GELU("tanh"),
               "relu": lambda: ReLU()}
"""Hugging Face ``activation_function`` names the engine layers compute (``gelu`` is the exact, erf form)."""
COPY_FLOOR = 1e-10
"""The copy BART's floor on probabilities before the log (``copy.TINY``); below it the gradient is zero."""


class LearnedPositionalEmbedding(Embedding):
    """``BartLearnedPositionalEmbedding``: ``num_positions + 2`` rows, position ``t`` reads row ``t + 2`` (BART's
    offset). Forward gives the (T, D) rows for a length T (the same for every sequence of a batch); backward takes
    (B, T, D) or (T, D) and sums over the batch before the lookup's ``index_add``."""

    offset = 2

    def __init__(self, num_positions: int, embedding_dim: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(num_positions + self.offset, embedding_dim, device=device, dtype=dtype)

    def forward(self, length: int) -> Tensor:  # type: ignore[override]
        if length > self.num_embeddings - self.offset:
            raise ValueError(f"LearnedPositionalEmbedding: {length} positions, the table has "
                             f"{self.num_embeddings - self.offset} (max_position_embeddings)")
        return super().forward(torch.arange(self.offset, length + self.offset, device=self.weight.device))

    def backward(self, grad_output: Tensor) -> None:
        super().backward(grad_output.sum(0) if grad_output.dim() == 3 else grad_output)


class TiedOutputProjection(Layer):
    """The language-model head ``logits = h Eᵀ`` whose weight *is* the token embedding E (``lm_head.weight`` in the
    state dict, not a parameter of its own): backward returns dh = g E and keeps dE = gᵀh for the owner of E to add
    to its own gradient (:meth:`add_weight_grad`)."""

    def __init__(self, embedding: Embedding) -> None:
        super().__init__()
        nn.Module.register_parameter(self, "weight", embedding.weight)
        self._mirror_tensors()
        self.__dict__["tied"] = embedding  # a reference, not a submodule: the state dict keeps one layout

    def forward(self, x: Tensor) -> Tensor:
        self.saved = (x,)
        return torch.mm(x, self.weight.t())

    def backward(self, grad_output: Tensor) -> Tensor:
        (x,) = self.saved
        self.saved = (torch.mm(grad_output.t(), x, out=self.workspace("weight_grad", self.weight.shape, x)),)
        return torch.mm(grad_output, self.weight)

    def add_weight_grad(self) -> None:
        """Add the dE of the last backward to the embedding's gradient buffer (after the embedding's own backward,
        which overwrites it)."""
        (grad_weight,) = self.saved
        self.tied.weight_grad.add_(grad_weight)


def _activation(name: str) -> Layer:
    if name not in BART_ACTIVATIONS:
        raise ValueError(f"BART activation_function {name!r} has no engine layer; choose one of "
                         f"{', '.join(BART_ACTIVATIONS)}")
    return BART_ACTIVATIONS[name]()


class _PostNormLayer(Layer):
    """What BART's encoder and decoder layers share: the feed-forward block fc2(act_dropout(act(fc1(x)))), dropped
    out, added back and layer-normalised (``final_layer_norm``). Subclasses register ``fc1``, ``fc2`` and
    ``final_layer_norm`` after their attention blocks, in BART's order, then call :meth:`_add_feed_forward`."""

    def _add_feed_forward(self, d_model: int, ffn_dim: int, dropout: float, activation: str,
                          activation_dropout: float) -> None:
        self.fc1 = Linear(d_model, ffn_dim)
        self.fc2 = Linear(ffn_dim, d_model)
        self.final_layer_norm = LayerNorm(d_model)
        self.act = _activation(activation)
        self.act_dropout, self.ffn_out_dropout = Dropout(activation_dropout), Dropout(dropout)

    def _feed_forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        f = self.fc2.forward(self.act_dropout.forward(self.act.forward(self.fc1.forward(x.reshape(-1, width)))))
        return self.final_layer_norm.forward(x + self.ffn_out_dropout.forward(f.view(batch, length, width)))

    def _feed_forward_backward(self, grad_output: Tensor) -> Tensor:
        g = self.final_layer_norm.backward(grad_output)
        rows = self.ffn_out_dropout.backward(g).reshape(-1, g.shape[-1])
        rows = self.fc1.backward(self.act.backward(self.act_dropout.backward(self.fc2.backward(rows))))
        return g + rows.view_as(g)


class BartEncoderLayer(_PostNormLayer):
    """``BartEncoderLayer``: self-attention, then the feed-forward block, each added back and layer-normalised."""

    def __init__(self, d_model: int, heads: int, ffn_dim: int, dropout: float = 0.1, attention_dropout: float = 0.0,
                 activation: str = "gelu", activation_dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, heads, dropout=attention_dropout)
        self.self_attn_layer_norm = LayerNorm(d_model)
        self.attn_out_dropout = Dropout(dropout)
        self._add_feed_forward(d_model, ffn_dim, dropout, activation, activation_dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        a = self.self_attn.forward(x, key_padding_mask=key_padding_mask)
        return self._feed_forward(self.self_attn_layer_norm.forward(x + self.attn_out_dropout.forward(a)))

    def backward(self, grad_output: Tensor) -> Tensor:
        g = self.self_attn_layer_norm.backward(self._feed_forward_backward(grad_output))
        return g + self.self_attn.backward(self.attn_out_dropout.backward(g))


class BartDecoderLayer(_PostNormLayer):
    """``BartDecoderLayer``: causal self-attention, cross-attention to the encoder's states (``memory``), then the
    feed-forward block, each added back and layer-normalised."""

    def __init__(self, d_model: int, heads: int, ffn_dim: int, dropout: float = 0.1, attention_dropout: float = 0.0,
                 activation: str = "gelu", activation_dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, heads, dropout=attention_dropout)
        self.self_attn_layer_norm = LayerNorm(d_model)
        self.encoder_attn = MultiHeadAttention(d_model, heads, dropout=attention_dropout)
        self.encoder_attn_layer_norm = LayerNorm(d_model)
        self.self_out_dropout, self.cross_out_dropout = Dropout(dropout), Dropout(dropout)
        self._add_feed_forward(d_model, ffn_dim, dropout, activation, activation_dropout)

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Tensor | None,
                key_padding_mask: Tensor | None = None) -> Tensor:
        a = self.self_attn.forward(x, key_padding_mask=key_padding_mask, causal=True)
        x = self.self_attn_layer_norm.forward(x + self.self_out_dropout.forward(a))
        c = self.encoder_attn.forward(x, memory, key_padding_mask=memory_mask)
        return self._feed_forward(self.encoder_attn_layer_norm.forward(x + self.cross_out_dropout.forward(c)))

    def backward(self, grad_output: Tensor) -> tuple[Tensor, Tensor]:
        """(dL/dx, dL/dmemory)."""
        g = self.encoder_attn_layer_norm.backward(self._feed_forward_backward(grad_output))
        grad_x, grad_memory = self.encoder_attn.backward(self.cross_out_dropout.backward(g))
        g = self.self_attn_layer_norm.backward(g + grad_x)
        return g + self.self_attn.backward(self.self_out_dropout.backward(g)), grad_memory


def _layer_settings(config: Any, side: str) -> dict[str, Any]:
    return {"d_model": config.d_model, "heads": getattr(config, f"{side}_attention_heads"),
            "ffn_dim": getattr(config, f"{side}_ffn_dim"), "dropout": config.dropout,
            "attention_dropout": config.attention_dropout, "activation": config.activation_function,
            "activation_dropout": config.activation_dropout}


class _Stack(Layer):
    """What BART's encoder and decoder share: token embeddings in (looked up by the owner of the shared table),
    scaled, plus learned positions, layer-normalised, dropped out, then the layers."""

    def __init__(self, config: Any, embed_tokens: Embedding, side: str, layer_class: type[Layer]) -> None:
        super().__init__()
        if getattr(config, f"{side}_layerdrop", 0.0):
            raise ValueError(f"EngineBart: {side}_layerdrop > 0 is not supported (layers are never skipped)")
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_tokens = embed_tokens  # the shared table, registered here for the layout
        self.embed_positions = LearnedPositionalEmbedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList(layer_class(**_layer_settings(config, side))
                                    for _ in range(getattr(config, f"{side}_layers")))
        self.layernorm_embedding = LayerNorm(config.d_model)
        self.embed_dropout = Dropout(config.dropout)

    def _embed(self, token_embeddings: Tensor) -> Tensor:
        x = token_embeddings * self.embed_scale if self.embed_scale != 1.0 else token_embeddings
        x = x + self.embed_positions.forward(x.shape[1])
        return self.embed_dropout.forward(self.layernorm_embedding.forward(x))

    def _embed_backward(self, grad_output: Tensor) -> Tensor:
        g = self.layernorm_embedding.backward(self.embed_dropout.backward(grad_output))
        self.embed_positions.backward(g)
        return g * self.embed_scale if self.embed_scale != 1.0 else g


class BartEncoder(_Stack):
    """``BartEncoder`` on token embeddings (B, S, D) (``inputs_embeds``) and the source's padding mask (B, S)."""

    def __init__(self, config: Any, embed_tokens: Embedding) -> None:
        super().__init__(config, embed_tokens, "encoder", BartEncoderLayer)

    def forward(self, token_embeddings: Tensor, attention_mask: Tensor | None) -> Tensor:
        x = self._embed(token_embeddings)
        for layer in self.layers:
            x = layer.forward(x, attention_mask)
        return x

    def backward(self, grad_output: Tensor) -> Tensor:
        """dL/d(token embeddings), with the position table's gradient written."""
        g = grad_output
        for layer in reversed(self.layers):
            g = layer.backward(g)
        return self._embed_backward(g)


class BartDecoder(_Stack):
    """``BartDecoder`` on token embeddings (B, T, D), attending causally to itself (and to real tokens only with a
    ``decoder_attention_mask``) and to the encoder's states (``memory``) through their padding mask."""

    def __init__(self, config: Any, embed_tokens: Embedding) -> None:
        super().__init__(config, embed_tokens, "decoder", BartDecoderLayer)

    def forward(self, token_embeddings: Tensor, memory: Tensor, memory_mask: Tensor | None,
                attention_mask: Tensor | None = None) -> Tensor:
        x = self._embed(token_embeddings)
        for layer in self.layers:
            x = layer.forward(x, memory, memory_mask, attention_mask)
        return x

    def backward(self, grad_output: Tensor) -> tuple[Tensor, Tensor]:
        """(dL/d(token embeddings), dL/dmemory summed over the layers' cross-attentions)."""
        g, grad_memory = grad_output, None
        for layer in reversed(self.layers):
            g, grad = layer.backward(g)
            grad_memory = grad if grad_memory is None else grad_memory.add_(grad)
        return self._embed_backward(g), grad_memory


class BartModel(Layer):
    """``BartModel``: the shared token table, the encoder and the decoder. Both sides' tokens are looked up at
    once, so the table's gradient is one ``index_add`` over source and target ids."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.shared = Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.encoder = BartEncoder(config, self.shared)
        self.decoder = BartDecoder(config, self.shared)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, decoder_input_ids: Tensor,
                decoder_attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(decoder states (B, T, D), encoder states (B, S, D))."""
        for label, ids in (("input_ids", input_ids), ("decoder_input_ids", decoder_input_ids)):
            if ids.dim() != 2:
                raise ValueError(f"BartModel: {label} must be (batch, length), got {tuple(ids.shape)}")
        if decoder_input_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"BartModel: input_ids and decoder_input_ids batches differ ({input_ids.shape[0]} and "
                             f"{decoder_input_ids.shape[0]})")
        rows = self.shared.forward(torch.cat([input_ids.reshape(-1), decoder_input_ids.reshape(-1)]))
        source, target = rows.split([input_ids.numel(), decoder_input_ids.numel()])
        memory = self.encoder.forward(source.view(*input_ids.shape, -1), attention_mask)
        hidden = self.decoder.forward(target.view(*decoder_input_ids.shape, -1), memory, attention_mask,
                                      decoder_attention_mask)
        return hidden, memory

    def backward(self, grad_hidden: Tensor, grad_memory: Tensor | None = None) -> None:
        """Backward from dL/d(decoder states) and any other dL/d(encoder states) (the copy head's); the table's
        gradient holds both lookups' (an owner tying it to an output layer adds that layer's dW afterwards)."""
        grad_target, grad_from_decoder = self.decoder.backward(grad_hidden)
        grad_memory = grad_from_decoder if grad_memory is None else grad_memory.add_(grad_from_decoder)
        grad_source = self.encoder.backward(grad_memory)
        width = grad_source.shape[-1]
        self.shared.backward(torch.cat([grad_source.reshape(-1, width), grad_target.reshape(-1, width)]))


class EngineBart(Layer):
    """``BartForConditionalGeneration`` (``copy=False``) or the pointer-generator
    ``BartCopyForConditionalGeneration`` (``copy=True``) of engine layers, built from a ``BartConfig``-like
    ``config`` (``tie_word_embeddings`` must hold: the output layer is the token table). Initial weights are the
    engine layers' own: load a Hugging Face model's ``state_dict`` for its weights.

    ``forward`` returns the logits (B, T, V) — log-probabilities of the mixed distribution with the copy head — and
    ``backward(dL/dlogits)`` writes every parameter's gradient."""

    def __init__(self, config: Any, copy: bool = False) -> None:
        super().__init__()
        if not getattr(config, "tie_word_embeddings", True):
            raise ValueError("EngineBart: the output layer is the token table; tie_word_embeddings=False is not "
                             "supported")
        self.config, self.copy = config, copy
        self.model = BartModel(config)
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))
        self.lm_head = TiedOutputProjection(self.model.shared)
        if copy:
            d = config.d_model
            self.copy_query = Linear(d, d, bias=False)
            self.copy_key = Linear(d, d, bias=False)
            self.copy_gate = Linear(2 * d, 1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, decoder_input_ids: Tensor,
                decoder_attention_mask: Tensor | None = None, source_ids: Tensor | None = None) -> Tensor:
        """Teacher-forced logits for ``decoder_input_ids``; the copy head copies from ``source_ids`` (default:
        ``input_ids``)."""
        hidden, memory = self.model.forward(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
        batch, length, width = hidden.shape
        rows = hidden.reshape(batch * length, width)
        logits = self.lm_head.forward(rows).add_(self.final_logits_bias).view(batch, length, -1)
        copy_state = None
        if self.copy:
            logits, copy_state = self._copy_forward(hidden, memory, attention_mask,
                                                    input_ids if source_ids is None else source_ids, logits)
        self.saved = (batch, length, width, copy_state)
        return logits

    def backward(self, grad_output: Tensor) -> None:
        batch, length, width, copy_state = self.saved
        if grad_output.shape[:2] != (batch, length):
            raise ValueError(f"EngineBart: grad_output must be (batch, target length, vocab) = "
                             f"{(batch, length, self.config.vocab_size)}, got {tuple(grad_output.shape)}")
        grad_memory = None
        if self.copy:
            grad_logits, grad_hidden, grad_memory = self._copy_backward(grad_output, copy_state)
        else:
            grad_logits, grad_hidden = grad_output, None
        vocab = grad_logits.shape[-1]
        grad_rows = self.lm_head.backward(grad_logits.reshape(batch * length, vocab))
        grad_rows = grad_rows if grad_hidden is None else grad_rows.add_(grad_hidden.reshape(batch * length, width))
        self.model.backward(grad_rows.view(batch, length, width), grad_memory)
        self.lm_head.add_weight_grad()

    # -- the pointer-generator mixture (copy.py's copy_mix), forward and backward -----------------------------

    def _copy_forward(self, hidden: Tensor, memory: Tensor, memory_mask: Tensor | None, source_ids: Tensor,
                      vocab_logits: Tensor) -> tuple[Tensor, tuple]:
        """log P (and what its backward needs), P = g·softmax(vocab_logits) + (1 − g)·Σ_{i: source_i = token} A_i,
        with A = softmax over source positions of (h Wq)(m Wk)ᵀ/√d, the context c = A m and the gate
        g = σ(w·[h; c] + b)."""
        batch, length, width = hidden.shape
        sources = memory.shape[1]
        if source_ids.shape != memory.shape[:2]:
            raise ValueError(f"EngineBart: source_ids must be (batch, source length) = {tuple(memory.shape[:2])}, "
                             f"got {tuple(source_ids.shape)}")
        query = self.copy_query.forward(hidden.reshape(-1, width)).view(batch, length, width)
        key = self.copy_key.forward(memory.reshape(-1, width)).view(batch, sources, width)
        scores = torch.bmm(query, key.transpose(1, 2)).div_(math.sqrt(width))
        if memory_mask is not None:
            scores.masked_fill_((memory_mask == 0).unsqueeze(1), float("-inf"))
        attention = torch.softmax(scores, dim=-1)  # (B, T, S)
        context = torch.bmm(attention, memory)
        gate = torch.sigmoid(self.copy_gate.forward(torch.cat([hidden, context], dim=-1).view(-1, 2 * width)))
        gate = gate.view(batch, length, 1)
        vocab_probs = torch.softmax(vocab_logits, dim=-1)
        index = source_ids.unsqueeze(1).expand(-1, length, -1)
        probs = (gate * vocab_probs).scatter_add_(-1, index, (1.0 - gate) * attention)
        return probs.clamp_min(COPY_FLOOR).log_(), (memory, query, key, attention, gate, vocab_probs, index, probs)

    def _copy_backward(self, grad_output: Tensor, state: tuple) -> tuple[Tensor, Tensor, Tensor]:
        """(dL/d vocab logits, dL/dh from the copy head, dL/dmemory from the copy head) from dL/dlog P."""
        memory, query, key, attention, gate, vocab_probs, index, probs = state
        batch, length, width = query.shape
        # log of the clamp: dP = dlogP / P where P ≥ floor (the clamp passes it), 0 below
        grad_probs = (grad_output / probs).masked_fill_(probs < COPY_FLOOR, 0.0)
        # P = g·q + scatter((1 − g)·A): dq = g·dP, dA = (1 − g)·gather(dP), dg = Σ dP·q − Σ gather(dP)·A
        gathered = grad_probs.gather(-1, index)  # (B, T, S)
        vocab = vocab_probs.shape[-1]  # Σ_v dP·q as a batched dot product: no (B, T, V) temporary
        vocab_dot = torch.bmm(grad_probs.view(-1, 1, vocab), vocab_probs.view(-1, vocab, 1)).view(batch, length, 1)
        grad_gate = vocab_dot - (gathered * attention).sum(-1, keepdim=True)
        # softmax over the vocabulary: d logits = q ⊙ (dq − Σ dq·q) = g·q ⊙ (dP − Σ dP·q)
        grad_logits = grad_probs.sub_(vocab_dot).mul_(vocab_probs).mul_(gate)
        grad_attention = gathered.mul_(1.0 - gate)
        grad_z = grad_gate.mul_(gate * (1.0 - gate)).view(-1, 1)
        grad_cat = self.copy_gate.backward(grad_z).view(batch, length, 2 * width)
        grad_hidden, grad_context = grad_cat[..., :width], grad_cat[..., width:]
        # context = A m
        grad_attention.add_(torch.bmm(grad_context, memory.transpose(1, 2)))
        grad_memory = torch.bmm(attention.transpose(1, 2), grad_context)
        # softmax over source positions (masked ones have A = 0: no gradient), then the scaled scores
        row = (grad_attention * attention).sum(-1, keepdim=True)
        grad_scores = grad_attention.sub_(row).mul_(attention).div_(math.sqrt(width))
        grad_query = torch.bmm(grad_scores, key)
        grad_key = torch.bmm(grad_scores.transpose(1, 2), query)
        grad_hidden = grad_hidden + self.copy_query.backward(grad_query.reshape(-1, width)).view(batch, length, width)
        grad_memory.add_(self.copy_key.backward(grad_key.reshape(-1, width)).view_as(grad_memory))
        return grad_logits, grad_hidden, grad_memory
