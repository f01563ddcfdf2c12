"""Embedding lookup with a hand-written backward.

Forward: ``out[..., :] = weight[ids[...], :]``. Backward: each output row's gradient is added to the row of the id
it came from, ``dW[v] = Σ_{positions p with ids[p] = v} g[p]`` (one ``index_add_``; repeated ids accumulate), and
the padding row's gradient is zero, as ``nn.Embedding(padding_idx=...)`` gives. Ids have no gradient.

With ``sparse=True`` backward clears only the rows the previous call wrote and writes only the rows this batch
touched (``touched`` holds them, unique and sorted), so its cost follows the batch, not the vocabulary: the
gradient buffer is the same dense tensor either way, so every engine optimizer steps on it unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bp_apps.engine.layers import Layer

__all__ = ["Embedding"]


class Embedding(Layer):
    """A ``num_embeddings × embedding_dim`` table, initialised exactly like ``nn.Embedding`` (N(0, 1), then the
    padding row zeroed) and named ``weight`` like it, so ``state_dict``s load into either."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, sparse: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for label, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Embedding: {label} must be a positive int, got {value!r}")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"Embedding: padding_idx={padding_idx} is outside the table of {num_embeddings}")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.sparse = padding_idx, bool(sparse)
        weight = torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype)
        nn.init.normal_(weight)  # nn.Embedding.reset_parameters
        if padding_idx is not None:
            weight[padding_idx].zero_()
        self._add_param("weight", weight)
        self.touched: Tensor | None = None

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dtype not in (torch.int64, torch.int32) or ids.is_floating_point():
            raise TypeError(f"Embedding: ids must be an int64 or int32 tensor, got {ids.dtype}")
        if ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.num_embeddings:
                bad = low if low < 0 else high
                raise IndexError(f"Embedding: id {bad} is outside the table of {self.num_embeddings} rows")
        self.saved = (ids,)
        return self.weight[ids]

    def backward(self, grad_output: Tensor) -> None:
        (ids,) = self.saved
        if grad_output.shape != (*ids.shape, self.embedding_dim):
            raise ValueError(f"Embedding: grad_output must be {(*ids.shape, self.embedding_dim)}, "
                             f"got {tuple(grad_output.shape)}")
        flat_ids = ids.reshape(-1)
        rows = grad_output.reshape(-1, self.embedding_dim)
        if self.sparse:
            if self.touched is not None:
                self.weight_grad.index_fill_(0, self.touched, 0.0)
            self.touched = torch.unique(flat_ids)
        else:
            self.weight_grad.zero_()
        self.weight_grad.index_add_(0, flat_ids, rows)
        if self.padding_idx is not None:
            self.weight_grad[self.padding_idx].zero_()
        return None

    def torch_module(self) -> nn.Module:
        return nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                            device=self.weight.device, dtype=self.weight.dtype)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}" + (", sparse=True" if self.sparse else "")
