"""Recurrent layers over padded batches without packing.

``nn.LSTM`` on a ``PackedSequence`` runs on CPU one time step at a time over a narrowed view of the packed input,
and each step's backward pass writes a zero tensor the size of the whole packed input: the cost grows with the
square of the sentence length (most of a semantic-role-labeling training step on 2 cores). :func:`run_lstm`
computes exactly what the packed call computes, from the same ``nn.LSTM`` parameters, on the padded batch:
the forward direction runs as is (padding only ever follows a sentence's tokens), and the backward direction runs
forward over each sentence reversed within its length, then is reversed back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["run_lstm"]


def _direction(lstm: nn.LSTM, x: Tensor, layer: int, suffix: str) -> Tensor:
    """One direction of one layer of ``lstm`` over batch-first ``x``, from zero states."""
    names = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if lstm.bias else ())
    params = [getattr(lstm, f"{name}_l{layer}{suffix}") for name in names]
    zeros = x.new_zeros(1, x.shape[0], lstm.hidden_size)
    return torch.lstm(x, (zeros, zeros), params, lstm.bias, 1, 0.0, lstm.training, False, True)[0]


def run_lstm(lstm: nn.LSTM, x: Tensor, lengths: Tensor) -> Tensor:
    """``lstm`` (batch-first, any depth, one or two directions) over ``x[B, T, F]`` whose row ``b`` holds
    ``lengths[b]`` >= 1 tokens followed by padding; the output ``[B, T, directions * hidden]`` equals
    ``pad_packed_sequence(lstm(pack_padded_sequence(x, lengths)))``, zero at padding. Inter-layer dropout applies
    as in ``nn.LSTM`` (training mode only)."""
    if not lstm.batch_first or lstm.proj_size:
        raise ValueError("run_lstm needs a batch_first nn.LSTM without proj_size")
    if x.dim() != 3 or lengths.shape != (x.shape[0],):
        raise ValueError(f"x must be [B, T, F] with lengths [B], got {tuple(x.shape)} and {tuple(lengths.shape)}")
    steps = x.shape[1]
    lengths = lengths.to(x.device)
    positions = torch.arange(steps, device=x.device)
    valid = positions < lengths[:, None]  # [B, T]
    # Position t of a sentence of length n is read at n - 1 - t by the backward direction; padding stays put.
    reverse = torch.where(valid, lengths[:, None] - 1 - positions, positions).unsqueeze(-1)
    out = x
    for layer in range(lstm.num_layers):
        if layer and lstm.dropout and lstm.training:
            out = F.dropout(out, lstm.dropout, training=True)
        outputs = [_direction(lstm, out, layer, "")]
        if lstm.bidirectional:
            backward = _direction(lstm, out.gather(1, reverse.expand(-1, -1, out.shape[2])), layer, "_reverse")
            outputs.append(backward.gather(1, reverse.expand(-1, -1, backward.shape[2])))
        out = torch.cat(outputs, dim=-1)
    return out.masked_fill(~valid.unsqueeze(-1), 0.0)
