"""Multi-head attention with a hand-written backward, laid out as BART's ``BartAttention``.

Forward, with heads kept as a batch dimension (``B·H`` matrices multiplied at once)::

    Q = x Wqᵀ + bq,  K = m Wkᵀ + bk,  V = m Wvᵀ + bv          (m = x for self-attention)
    S = s·Q Kᵀ (s = head_dim^-½),  S[blocked] = −∞,  P = softmax(S),  C = dropout(P) V,  y = C Woᵀ + bo

Backward: dC = dy Wo (the out projection), dP' = dC Vᵀ and dV = P'ᵀ dC (P' the dropped-out P), dP = dropout's
backward of dP', then the softmax Jacobian written out, dS = P ⊙ (dP − rowsum(dP ⊙ P)), and dQ = s·dS K,
dK = s·dSᵀ Q. A blocked position has P = 0 exactly, so its score gets exactly zero gradient and its key and value
receive nothing from that query.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bp_apps.engine.layers import Dropout, Layer, Linear

__all__ = ["MultiHeadAttention", "attention_mask"]


def attention_mask(batch: int, queries: int, keys: int, key_padding_mask: Tensor | None = None, causal: bool = False,
                   device: torch.device | None = None, name: str = "MultiHeadAttention") -> Tensor | None:
    """The blocked (query, key) pairs as a bool tensor broadcastable to ``(batch, 1, queries, keys)`` (True: blocked),
    or None when nothing is blocked. ``key_padding_mask`` is ``(batch, keys)``, 1/True for a real key, as Hugging
    Face's ``attention_mask``; ``causal`` blocks keys after the query. A query left with no key is refused."""
    blocked = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, keys):
            raise ValueError(f"{name}: key_padding_mask must be (batch, keys) = {(batch, keys)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.is_floating_point() or key_padding_mask.is_complex():
            raise TypeError(f"{name}: key_padding_mask must be bool or integer (1: attend), got "
                            f"{key_padding_mask.dtype}")
        blocked = (key_padding_mask == 0).reshape(batch, 1, 1, keys)
    if causal:
        if queries != keys:
            raise ValueError(f"{name}: a causal mask needs as many queries as keys, got {queries} and {keys}")
        future = torch.ones(queries, keys, dtype=torch.bool, device=device).triu_(1)
        blocked = future if blocked is None else blocked | future
    if blocked is not None and bool(blocked.all(-1).any()):
        raise ValueError(f"{name}: a query has no key to attend to (a row of key_padding_mask with no real key, or "
                         "causal attention whose first key is padding)")
    return blocked


class MultiHeadAttention(Layer):
    """BART's multi-head attention (self or cross, optional causal and key-padding masks, dropout on the attention
    probabilities) with the parameter names and initialisation of ``BartAttention``: ``k_proj``, ``v_proj``,
    ``q_proj``, ``out_proj``, each ``nn.Linear(embed_dim, embed_dim, bias)``, created in that order."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"MultiHeadAttention: embed_dim={embed_dim} must be a positive multiple of "
                             f"num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.scaling = self.head_dim ** -0.5
        factory = {"device": device, "dtype": dtype}
        self.k_proj = Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.q_proj = Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.attn_dropout = Dropout(dropout)

    def _check(self, hidden: Tensor, memory: Tensor | None) -> None:
        for label, x in (("hidden", hidden), ("memory", memory)):
            if x is None:
                continue
            if x.dim() != 3 or x.shape[-1] != self.embed_dim:
                raise ValueError(f"MultiHeadAttention: {label} must be (batch, length, {self.embed_dim}), "
                                 f"got {tuple(x.shape)}")
            if x.dtype != self.q_proj.weight.dtype:
                raise TypeError(f"MultiHeadAttention: {label} is {x.dtype}, the weights are "
                                f"{self.q_proj.weight.dtype}")
        if memory is not None and memory.shape[0] != hidden.shape[0]:
            raise ValueError(f"MultiHeadAttention: hidden and memory batches differ ({hidden.shape[0]} and "
                             f"{memory.shape[0]})")

    def _split_heads(self, x: Tensor, batch: int, length: int) -> Tensor:
        """(batch·length, D) → (batch·heads, length, head_dim)."""
        return (x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
                .reshape(batch * self.num_heads, length, self.head_dim))

    def _merge_heads(self, x: Tensor, batch: int, length: int) -> Tensor:
        """(batch·heads, length, head_dim) → (batch·length, D)."""
        return (x.view(batch, self.num_heads, length, self.head_dim).transpose(1, 2)
                .reshape(batch * length, self.embed_dim))

    def forward(self, hidden: Tensor, memory: Tensor | None = None, key_padding_mask: Tensor | None = None,
                causal: bool = False) -> Tensor:
        """Attend from ``hidden`` (B, T, D) to itself, or to ``memory`` (B, S, D) (cross-attention);
        ``key_padding_mask`` (B, keys) marks real keys with 1; ``causal`` blocks later keys. Returns (B, T, D)."""
        self._check(hidden, memory)
        batch, queries, _ = hidden.shape
        source = hidden if memory is None else memory
        keys = source.shape[1]
        blocked = attention_mask(batch, queries, keys, key_padding_mask, causal, hidden.device)
        x = hidden.reshape(batch * queries, self.embed_dim)
        m = x if memory is None else memory.reshape(batch * keys, self.embed_dim)
        k = self._split_heads(self.k_proj.forward(m), batch, keys)
        v = self._split_heads(self.v_proj.forward(m), batch, keys)
        q = self._split_heads(self.q_proj.forward(x), batch, queries)
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(self.scaling)  # (B·H, T, S)
        if blocked is not None:
            scores.view(batch, self.num_heads, queries, keys).masked_fill_(blocked, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # Dropped as the (B, H, T, S) tensor Hugging Face's eager attention drops, so one RNG state gives one mask.
        dropped = self.attn_dropout.forward(probs.view(batch, self.num_heads, queries, keys))
        context = torch.bmm(dropped.view(batch * self.num_heads, queries, keys), v)
        out = self.out_proj.forward(self._merge_heads(context, batch, queries))
        self.saved = (q, k, v, probs, dropped, batch, queries, keys, memory is None)
        return out.view(batch, queries, self.embed_dim)

    def backward(self, grad_output: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """dL/dhidden for self-attention; (dL/dhidden, dL/dmemory) for cross-attention."""
        q, k, v, probs, dropped, batch, queries, keys, self_attention = self.saved
        if grad_output.shape != (batch, queries, self.embed_dim):
            raise ValueError(f"MultiHeadAttention: grad_output must be {(batch, queries, self.embed_dim)}, "
                             f"got {tuple(grad_output.shape)}")
        grad_context = self.out_proj.backward(grad_output.reshape(batch * queries, self.embed_dim))
        grad_context = self._split_heads(grad_context, batch, queries)  # (B·H, T, hd)
        grad_v = torch.bmm(dropped.view(batch * self.num_heads, queries, keys).transpose(1, 2), grad_context)
        grad_dropped = torch.bmm(grad_context, v.transpose(1, 2))  # (B·H, T, S)
        grad_probs = self.attn_dropout.backward(grad_dropped.view(batch, self.num_heads, queries, keys))
        grad_probs = grad_probs.view(batch * self.num_heads, queries, keys)
        # softmax Jacobian: dS = P ⊙ (dP − rowsum(dP ⊙ P)), with the score scaling folded in
        row = (grad_probs * probs).sum(-1, keepdim=True)
        grad_scores = (grad_probs - row).mul_(probs).mul_(self.scaling)
        grad_q = torch.bmm(grad_scores, k)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q)
        grad_x = self.q_proj.backward(self._merge_heads(grad_q, batch, queries))
        grad_m = self.k_proj.backward(self._merge_heads(grad_k, batch, keys))
        grad_m = grad_m + self.v_proj.backward(self._merge_heads(grad_v, batch, keys))
        if self_attention:
            return (grad_x + grad_m).view(batch, queries, self.embed_dim)
        return grad_x.view(batch, queries, self.embed_dim), grad_m.view(batch, keys, self.embed_dim)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
