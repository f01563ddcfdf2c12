"""Recurrent layers (GRU, LSTM) with backpropagation through time written out by hand.

Both layers take batch-first input ``x`` of shape (B, T, input_size) and optional valid ``lengths`` (B,), and
return only the output sequence (B, T, D·H), D = 2 when bidirectional: the same tensor as

    pad_packed_sequence(rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)),
                        batch_first=True, total_length=T)[0]

for the ``torch.nn`` twin (``torch_module()``) with the same weights. The initial state is zero and the final
state h_n is not returned (it is the output at each sequence's last valid step for the forward direction and
at step 0 for the reverse direction). Positions t ≥ length are exactly 0 and padding never reaches a state or a
gradient: the forward direction stops at each sequence's end, the reverse direction starts at each sequence's
own last valid step from the zero state. The gradient at padded positions of ``x`` is exactly zero.

Lengths are handled as torch's packed sequences are: the batch is sorted by length (longest first) so that at
step s only the first ``batch_sizes[s]`` rows are active, and the reverse direction runs over each sequence
reversed within its own length, so it is a forward pass over a re-indexed input. That is the masked update
h_t = m_t·h_new + (1 − m_t)·h_{t−1}, m_t = 1[t < length], with rows where m_t = 0 skipped rather than
multiplied by zero; its derivative is likewise dh_new = m_t·dh_t and dh_{t−1} += (1 − m_t)·dh_t, i.e. inactive
rows get no gate gradient and pass nothing back. Both directions of a layer advance together: their states are
stacked into (D, B, H) and each step does one batched matmul (``bmm``) for both.

Per layer and direction, the input projections x_t W_ihᵀ of all steps are one matmul before the time loop, and
the weight gradients dW_ih = Σ_t g_tᵀ x_t, dW_hh = Σ_t g_tᵀ h_{t−1} are one matmul each after it (the per-step
gate gradients g_t are stacked into a (T, B, G·H) buffer); dx = Σ g_t W_ih is one matmul too. Inside the loop
there are only the (B, H)×(H, G·H) recurrent products and elementwise ops; every factor of the backward step
that depends only on forward values (σ', tanh', ...) is computed for all steps at once before the loop.

Internally the gate blocks are kept in an order that lets one elementwise op cover several gates; the
parameters and their gradients use torch's order (GRU r, z, n; LSTM i, f, g, o).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn

from bp_apps.engine.layers import Layer

__all__ = ["GRU", "LSTM", "RecurrentSaved"]


class RecurrentSaved(NamedTuple):
    """What a recurrent layer's forward keeps for its backward (``layer.saved``).

    ``dropout_masks`` holds the inter-layer dropout scales of the call (mask / (1 − p), shape (B, T, D·H), in
    the caller's batch order), one per gap between stacked layers; empty in eval mode or with dropout 0. The
    scale i multiplies the output of layer i before it enters layer i + 1. The masks are drawn from the global
    RNG exactly as ``nn.GRU`` / ``nn.LSTM`` draw theirs on a packed sequence, so from one random state both give
    the same outputs in training mode too; with ``dropout_order="padded"`` they are drawn as ``F.dropout`` on the
    padded (B, T, D·H) output of each layer (what ``bp_apps.text.labeling.rnn.run_lstm`` draws), nonzero at
    padding too, where the output is 0 anyway.
    """

    batch: int
    steps: int  # T of the input
    active_steps: int  # max(lengths): steps the time loop runs
    batch_sizes: list[int]  # active rows per step (rows sorted by length, longest first)
    order: Tensor | None  # sorted row → caller's row (None: already sorted)
    reverse_index: Tensor | None  # flat (step, row) index of each sequence reversed within its length
    padded: bool  # some sequence shorter than active_steps
    layers: tuple[tuple[Tensor, ...], ...]
    dropout_masks: tuple[Tensor, ...]
    internal_masks: tuple[Tensor, ...]


def _block_index(blocks: tuple[int, ...], hidden: int, device: torch.device) -> Tensor:
    """Row indices that reorder gate blocks of height ``hidden``: new block j = old block ``blocks[j]``."""
    return torch.cat([torch.arange(b * hidden, (b + 1) * hidden, device=device) for b in blocks])


class _Recurrent(Layer):
    """Shared set-up, checks and layout plumbing of :class:`GRU` and :class:`LSTM`."""

    mode = ""
    gate_count = 0

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = True, dropout: float = 0.0, bidirectional: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 dropout_order: str = "packed") -> None:
        super().__init__()
        name = type(self).__name__
        if not batch_first:
            raise ValueError(f"{name}: only batch_first=True is supported (inputs are (B, T, features))")
        for label, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: {label} should be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name}: {label} must be greater than zero, got {value}")
        if not isinstance(bias, bool):
            raise TypeError(f"{name}: bias should be a bool, got {type(bias).__name__}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1:
            raise ValueError(f"{name}: dropout should be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"{name}: dropout is applied between stacked layers only, so dropout={dropout} "
                          "does nothing with num_layers=1", stacklevel=2)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        if dropout_order not in ("packed", "padded"):
            raise ValueError(f"{name}: dropout_order must be 'packed' (as nn.{self.mode} on a packed sequence) or "
                             f"'padded' (as F.dropout on the padded output), got {dropout_order!r}")
        self.dropout_order = dropout_order
        self.bias, self.batch_first, self.dropout = bias, True, float(dropout)
        self.bidirectional = bool(bidirectional)
        self.num_directions = 2 if bidirectional else 1
        self.needs_input_grad = True
        gates = self.gate_count * hidden_size
        factory = {"device": device, "dtype": dtype}
        tensors: list[tuple[str, Tensor]] = []
        for layer in range(num_layers):
            fan_in = input_size if layer == 0 else hidden_size * self.num_directions
            for direction in range(self.num_directions):
                suffix = f"l{layer}" + ("_reverse" if direction == 1 else "")
                tensors.append((f"weight_ih_{suffix}", torch.empty(gates, fan_in, **factory)))
                tensors.append((f"weight_hh_{suffix}", torch.empty(gates, hidden_size, **factory)))
                if bias:
                    tensors.append((f"bias_ih_{suffix}", torch.empty(gates, **factory)))
                    tensors.append((f"bias_hh_{suffix}", torch.empty(gates, **factory)))
        # RNNBase.reset_parameters: uniform(−1/√H, 1/√H) for every parameter, in registration order
        stdv = 1.0 / math.sqrt(hidden_size)
        for name_, tensor in tensors:
            nn.init.uniform_(tensor, -stdv, stdv)
            self._add_param(name_, tensor)
        self._flat_weights_names = [n for n, _ in tensors]

    # ------------------------------------------------------------------ description and twin

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        s += ", batch_first=True"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s

    def _describe(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def torch_module(self) -> nn.Module:
        weight = self.weight_ih_l0
        cls = nn.GRU if self.mode == "GRU" else nn.LSTM
        return cls(self.input_size, self.hidden_size, num_layers=self.num_layers, bias=self.bias, batch_first=True,
                   dropout=self.dropout, bidirectional=self.bidirectional, device=weight.device, dtype=weight.dtype)

    def _weights(self, layer: int, suffix: str = "") -> list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]]:
        """(W_ih, W_hh, b_ih, b_hh) of each direction of ``layer``; with ``suffix="_grad"`` their gradient
        buffers."""
        out = []
        for direction in range(self.num_directions):
            name = f"l{layer}" + ("_reverse" if direction == 1 else "") + suffix
            d = self.__dict__
            out.append((d[f"weight_ih_{name}"], d[f"weight_hh_{name}"], d.get(f"bias_ih_{name}"),
                        d.get(f"bias_hh_{name}")))
        return out

    # ------------------------------------------------------------------ checks

    def _check(self, x: Tensor, lengths: Tensor | None) -> list[int] | None:
        me = self._describe()
        if not isinstance(x, Tensor):
            raise TypeError(f"{me} expects a tensor input, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[2] != self.input_size:
            raise ValueError(f"{me} expects input (B, T, {self.input_size}), got {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{me} expects a non-empty input (B ≥ 1, T ≥ 1), got {tuple(x.shape)}")
        weight = self.weight_ih_l0
        if x.dtype != weight.dtype:
            raise TypeError(f"{me} has {weight.dtype} weights but got a {x.dtype} input")
        if x.device != weight.device:
            raise ValueError(f"{me} has weights on {weight.device} but got an input on {x.device}")
        if lengths is None:
            return None
        if not isinstance(lengths, Tensor):
            raise TypeError(f"{me} expects lengths as a tensor, got {type(lengths).__name__}")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"{me} expects integer lengths (int64), got {lengths.dtype}")
        batch, steps = x.shape[0], x.shape[1]
        if lengths.dim() != 1 or lengths.shape[0] != batch:
            raise ValueError(f"{me} expects lengths of shape ({batch},) for input {tuple(x.shape)}, "
                             f"got {tuple(lengths.shape)}")
        values = [int(v) for v in lengths.tolist()]
        bad = [v for v in values if not 1 <= v <= steps]
        if bad:
            raise ValueError(f"{me} expects lengths in [1, T={steps}], got {bad[0]}")
        return values

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Output (B, T, D·H); positions t ≥ lengths[b] are 0. Saves what ``backward`` needs in ``saved``."""
        values = self._check(x, lengths)
        batch, steps, _ = x.shape
        hidden, dirs = self.hidden_size, self.num_directions
        device = x.device
        if values is None:
            active, order, padded = steps, None, False
            batch_sizes = [batch] * steps
        else:
            # longest first, ranked exactly as pack_padded_sequence(enforce_sorted=False) ranks them, so the dropout
            # masks below land where nn.GRU / nn.LSTM put theirs
            ranked = torch.sort(torch.tensor(values, dtype=torch.int64), descending=True).indices.tolist()
            order = None if ranked == list(range(batch)) else torch.tensor(ranked, device=device)
            sorted_lengths = [values[b] for b in ranked]
            active = sorted_lengths[0]
            padded = sorted_lengths[-1] < active
            batch_sizes = [0] * active
            for length in sorted_lengths:  # batch_sizes[s] = #{b: length_b > s}
                for s in range(length):
                    batch_sizes[s] += 1
        reverse_index = None
        if dirs == 2:
            if padded:
                lens = torch.tensor(sorted_lengths, device=device)
                s = torch.arange(active, device=device)[:, None]
                rows = torch.where(s < lens, lens - 1 - s, s)
            else:
                rows = torch.arange(active - 1, -1, -1, device=device)[:, None].expand(active, batch)
            reverse_index = (rows * batch + torch.arange(batch, device=device)).reshape(-1)

        # layer input, time-major, rows sorted: (D, T', B, F); [1] is each sequence reversed within its length
        xs = x if order is None else x.index_select(0, order)
        inputs = x.new_empty((dirs, active, batch, self.input_size))
        inputs[0].copy_(xs[:, :active].transpose(0, 1))
        if padded:
            inputs[0].masked_fill_(self._pad_mask(batch_sizes, batch, device), 0)
        layers, masks, internal_masks = [], [], []
        for layer in range(self.num_layers):
            if dirs == 2:
                flat = inputs[0].view(active * batch, -1)
                torch.index_select(flat, 0, reverse_index, out=inputs[1].view(active * batch, -1))
            state, hbuf = self._layer_forward(layer, inputs, batch_sizes)
            layers.append(state)
            width = dirs * hidden
            if layer == self.num_layers - 1:
                seq = self._sequence_output(hbuf, reverse_index, active, batch)
                if order is None and active == steps:
                    output = seq.transpose(0, 1).contiguous()
                else:
                    output = x.new_zeros((batch, steps, width))
                    if order is None:
                        output[:, :active].copy_(seq.transpose(0, 1))
                    else:
                        output[:, :active].index_copy_(0, order, seq.transpose(0, 1))
                break
            inputs = x.new_empty((dirs, active, batch, width))
            self._sequence_output(hbuf, reverse_index, active, batch, out=inputs[0])
            if self.training and self.dropout > 0:
                if self.dropout_order == "padded":
                    inner, scale = self._padded_dropout(x, order, active)
                else:
                    inner, scale = self._packed_dropout(x, order, active, batch_sizes, padded)
                inputs[0].mul_(inner)
                masks.append(scale)
                internal_masks.append(inner)
        self.saved = RecurrentSaved(batch, steps, active, batch_sizes, order, reverse_index, padded, tuple(layers),
                                    tuple(masks), tuple(internal_masks))
        return output

    def _packed_dropout(self, x: Tensor, order: Tensor | None, active: int, batch_sizes: list[int], padded: bool
                        ) -> tuple[Tensor, Tensor]:
        """One gap's dropout scales drawn as torch's recurrent layers draw them: one Bernoulli draw per element of
        the time-major (packed) layer output — the active rows of each step, longest sequence first — then placed;
        (T', B, D·H) in sorted rows, and (B, T, D·H) in the caller's."""
        batch, steps, width = x.shape[0], x.shape[1], self.num_directions * self.hidden_size
        drawn = x.new_empty((sum(batch_sizes), width))
        drawn.zero_() if self.dropout == 1.0 else drawn.bernoulli_(1 - self.dropout).div_(1 - self.dropout)
        if padded:
            inner = x.new_zeros((active, batch, width))
            inner.masked_scatter_(~self._pad_mask(batch_sizes, batch, x.device).expand_as(inner), drawn)
        else:
            inner = drawn.view(active, batch, width)
        scale = x.new_zeros((batch, steps, width))
        if order is None:
            scale[:, :active].copy_(inner.transpose(0, 1))
        else:
            scale[:, :active].index_copy_(0, order, inner.transpose(0, 1))
        return inner, scale

    def _padded_dropout(self, x: Tensor, order: Tensor | None, active: int) -> tuple[Tensor, Tensor]:
        """One gap's dropout scales drawn as ``F.dropout`` draws them on the padded (B, T, D·H) output (caller's
        rows, every step): the (T', B, D·H) sorted-row view the time loop multiplies by, and the drawn tensor."""
        scale = x.new_empty((x.shape[0], x.shape[1], self.num_directions * self.hidden_size))
        scale.zero_() if self.dropout == 1.0 else scale.bernoulli_(1 - self.dropout).div_(1 - self.dropout)
        rows = scale if order is None else scale.index_select(0, order)
        return rows[:, :active].transpose(0, 1), scale

    @staticmethod
    def _pad_mask(batch_sizes: list[int], batch: int, device: torch.device) -> Tensor:
        """(T', B, 1) boolean: True at padded (step, sorted row) positions."""
        sizes = torch.tensor(batch_sizes, device=device)
        return (torch.arange(batch, device=device)[None, :] >= sizes[:, None]).unsqueeze(-1)

    def _sequence_output(self, hbuf: Tensor, reverse_index: Tensor | None, active: int, batch: int,
                         out: Tensor | None = None) -> Tensor:
        """Layer output (T', B, D·H) in real time order from the state buffer (D, T'+1, B, H)."""
        hidden = self.hidden_size
        forward_states = hbuf[0, 1:]
        if reverse_index is None:
            return forward_states.clone() if out is None else out.copy_(forward_states)
        backward_states = hbuf[1, 1:].reshape(active * batch, hidden).index_select(0, reverse_index)
        return torch.cat([forward_states, backward_states.view(active, batch, hidden)], dim=-1, out=out)

    # ------------------------------------------------------------------ backward

    def backward(self, grad_output: Tensor) -> Tensor | None:
        """dL/dx (B, T, input_size) from dL/doutput (B, T, D·H); writes every ``<param>_grad``."""
        st = self.saved
        if not isinstance(st, RecurrentSaved):
            raise RuntimeError(f"{self._describe()}: backward called before forward")
        hidden, dirs, active, batch = self.hidden_size, self.num_directions, st.active_steps, st.batch
        width = dirs * hidden
        if tuple(grad_output.shape) != (batch, st.steps, width):
            raise ValueError(f"{self._describe()} expects grad_output ({batch}, {st.steps}, {width}), "
                             f"got {tuple(grad_output.shape)}")
        go = grad_output if st.order is None else grad_output.index_select(0, st.order)
        grad_seq = go[:, :active].transpose(0, 1)  # (T', B, D·H) real time, sorted rows
        grad_input = None
        for layer in range(self.num_layers - 1, -1, -1):
            grads = grad_seq.new_empty((dirs, active, batch, hidden))
            grads[0].copy_(grad_seq[..., :hidden])
            if dirs == 2:
                rev = grad_seq[..., hidden:].reshape(active * batch, hidden)
                torch.index_select(rev, 0, st.reverse_index, out=grads[1].view(active * batch, hidden))
            want_input = layer > 0 or self.needs_input_grad
            dx = self._layer_backward(layer, st.layers[layer], grads, st.batch_sizes, want_input)
            if dx is None:
                return None
            # dx: (D, T', B, F) per direction's step order → real time
            grad_seq = dx[0]
            if dirs == 2:
                fan_in = dx.shape[-1]
                grad_seq = grad_seq.add(dx[1].reshape(active * batch, fan_in).index_select(0, st.reverse_index)
                                        .view(active, batch, fan_in))
            if layer > 0 and st.internal_masks:
                grad_seq = grad_seq * st.internal_masks[layer - 1]
            grad_input = grad_seq
        assert grad_input is not None
        if st.order is None and active == st.steps:
            return grad_input.transpose(0, 1).contiguous()
        out = grad_input.new_zeros((batch, st.steps, self.input_size))
        if st.order is None:
            out[:, :active].copy_(grad_input.transpose(0, 1))
        else:
            out[:, :active].index_copy_(0, st.order, grad_input.transpose(0, 1))
        return out

    def _write_grads(self, layer: int, dw_ih: Tensor, dw_hh: Tensor, db_ih: Tensor | None, db_hh: Tensor | None,
                     perm_ih: Tensor, perm_hh: Tensor) -> None:
        """Scatter internally ordered (D, G·H, ·) gradients into the torch-ordered ``_grad`` buffers."""
        for d, (gw_ih, gw_hh, gb_ih, gb_hh) in enumerate(self._weights(layer, "_grad")):
            gw_ih.index_copy_(0, perm_ih, dw_ih[d])
            gw_hh.index_copy_(0, perm_hh, dw_hh[d])
            if gb_ih is not None:
                gb_ih.index_copy_(0, perm_ih, db_ih[d])
                gb_hh.index_copy_(0, perm_hh, db_hh[d])

    def _layer_forward(self, layer: int, inputs: Tensor, batch_sizes: list[int]) -> tuple[tuple, Tensor]:
        raise NotImplementedError

    def _layer_backward(self, layer: int, state: tuple, grads: Tensor, batch_sizes: list[int],
                        want_input: bool) -> Tensor | None:
        raise NotImplementedError


class GRU(_Recurrent):
    """Gated recurrent unit, as ``nn.GRU(batch_first=True)``; ``forward(x, lengths=None)`` returns the output only.

    Forward, one step (x = x_t, h = h_{t−1}; gate order r, z, n as in torch):
        r = σ(W_ir x + b_ir + W_hr h + b_hr)
        z = σ(W_iz x + b_iz + W_hz h + b_hz)
        a = W_hn h + b_hn,   n = tanh(W_in x + b_in + r ⊙ a)
        h' = (1 − z) ⊙ n + z ⊙ h = n + z ⊙ (h − n)
    Backward, with dh = dL/dh' (from the output at t and from step t + 1):
        dn = dh ⊙ (1 − z)                   → g_n = dn ⊙ (1 − n²)        (dL/d(W_in x + b_in))
        dz = dh ⊙ (h − n)                   → g_z = dz ⊙ z(1 − z)
        dr = g_n ⊙ a                        → g_r = dr ⊙ r(1 − r)
        da = g_n ⊙ r                                                      (dL/d(W_hn h + b_hn))
        dh_{t−1} = dh ⊙ z + [g_r, g_z, da] W_hh
        dW_ih = Σ_t [g_r, g_z, g_n]ᵀ x_t,   db_ih = Σ_t [g_r, g_z, g_n]
        dW_hh = Σ_t [g_r, g_z, da]ᵀ h_{t−1}, db_hh = Σ_t [g_r, g_z, da]
        dx_t = [g_r, g_z, g_n] W_ih
    Factors precomputed for all steps: (1 − z)(1 − n²), (h − n) z(1 − z), a r(1 − r), and r.
    Internally the stacked gate gradients are [g_n, g_z, g_r, da], so [g_n, g_z] = dh·[...] and
    [g_r, da] = g_n·[...] are one op each; g_i = [g_n, g_z, g_r] and g_h = [g_z, g_r, da] are column windows of it.
    """

    mode = "GRU"
    gate_count = 3

    def _layer_forward(self, layer: int, inputs: Tensor, batch_sizes: list[int]) -> tuple[tuple, Tensor]:
        dirs, steps, batch, fan_in = inputs.shape
        hidden = self.hidden_size
        weights = self._weights(layer)
        w_ih = torch.stack([w[0] for w in weights])  # (D, 3H, F), torch order r, z, n
        w_hh = torch.stack([w[1] for w in weights])  # (D, 3H, H)
        flat_in = inputs.view(dirs, steps * batch, fan_in)
        if self.bias:
            b_ih = torch.stack([w[2] for w in weights]).unsqueeze(1)
            b_hh = torch.stack([w[3] for w in weights]).unsqueeze(1)
            proj = torch.baddbmm(b_ih, flat_in, w_ih.transpose(1, 2))
        else:
            b_hh = None
            proj = torch.bmm(flat_in, w_ih.transpose(1, 2))
        proj = proj.view(dirs, steps, batch, 3 * hidden)
        new = inputs.new_empty
        gh = new((dirs, steps, batch, 3 * hidden))  # W_hh h + b_hh
        rz = new((dirs, steps, batch, 2 * hidden))
        n = new((dirs, steps, batch, hidden))
        hmn = new((dirs, steps, batch, hidden))  # h − n
        hbuf = new((dirs, steps + 1, batch, hidden))
        hbuf[:, 0].zero_()
        if batch_sizes[-1] < batch:
            hbuf[:, 1:].zero_()
        w_hh_t = w_hh.transpose(1, 2)
        h2 = 2 * hidden
        proj_s, gh_s, rz_s, n_s, hmn_s, h_s = (t.unbind(1) for t in (proj, gh, rz, n, hmn, hbuf))
        for s in range(steps):
            bs = batch_sizes[s]
            if bs == batch:
                h, p, g, a, nn_, d, out = h_s[s], proj_s[s], gh_s[s], rz_s[s], n_s[s], hmn_s[s], h_s[s + 1]
            else:
                h, p, g, a = h_s[s][:, :bs], proj_s[s][:, :bs], gh_s[s][:, :bs], rz_s[s][:, :bs]
                nn_, d, out = n_s[s][:, :bs], hmn_s[s][:, :bs], h_s[s + 1][:, :bs]
            if b_hh is None:
                torch.bmm(h, w_hh_t, out=g)
            else:
                torch.baddbmm(b_hh, h, w_hh_t, out=g)
            torch.add(p[..., :h2], g[..., :h2], out=a)
            a.sigmoid_()
            torch.addcmul(p[..., h2:], a[..., :hidden], g[..., h2:], out=nn_)
            nn_.tanh_()
            torch.sub(h, nn_, out=d)
            torch.addcmul(nn_, a[..., hidden:], d, out=out)
        return (inputs, w_ih, w_hh, gh, rz, n, hmn, hbuf), hbuf

    def _layer_backward(self, layer: int, state: tuple, grads: Tensor, batch_sizes: list[int],
                        want_input: bool) -> Tensor | None:
        inputs, w_ih, w_hh, gh, rz, n, hmn, hbuf = state
        dirs, steps, batch, fan_in = inputs.shape
        hidden = self.hidden_size
        device = inputs.device
        r, z, a = rz[..., :hidden], rz[..., hidden:], gh[..., 2 * hidden:]
        # step-independent factors, all steps at once: pa = [(1 − z)(1 − n²), (h − n) z(1 − z)], pb = [a r(1 − r), r]
        pa = inputs.new_empty((dirs, steps, batch, 2, hidden))
        pb = inputs.new_empty((dirs, steps, batch, 2, hidden))
        one_minus_z = torch.rsub(z, 1)
        torch.mul(one_minus_z, torch.rsub(n * n, 1), out=pa[..., 0, :])
        torch.mul(hmn * z, one_minus_z, out=pa[..., 1, :])
        torch.mul(a * r, torch.rsub(r, 1), out=pb[..., 0, :])
        pb[..., 1, :].copy_(r)
        # internal gate-gradient layout [g_n, g_z, g_r, da]
        perm_ih = _block_index((2, 1, 0), hidden, device)  # g_i = [g_n, g_z, g_r]
        perm_hh = _block_index((1, 0, 2), hidden, device)  # g_h = [g_z, g_r, da]
        w_hh_p = w_hh.index_select(1, perm_hh)  # (D, 3H, H) rows z, r, n
        gates = inputs.new_zeros((dirs, steps, batch, 4 * hidden))
        dh_bufs = (inputs.new_zeros((dirs, batch, hidden)), inputs.new_zeros((dirs, batch, hidden)))
        g_s, pa_s, pb_s, z_s, dy_s = (t.unbind(1) for t in (gates, pa, pb, z, grads))
        h1, h2 = hidden, 2 * hidden
        current = 0
        bs = batch_sizes[-1]
        dh_bufs[0][:, :bs].copy_(dy_s[steps - 1][:, :bs])
        for s in range(steps - 1, -1, -1):
            bs = batch_sizes[s]
            g = g_s[s]
            dh = dh_bufs[current]
            if bs == batch:
                gb, pas, pbs, zs = g, pa_s[s], pb_s[s], z_s[s]
            else:
                dh, gb, pas, pbs, zs = dh[:, :bs], g[:, :bs], pa_s[s][:, :bs], pb_s[s][:, :bs], z_s[s][:, :bs]
            torch.mul(dh.unsqueeze(2), pas, out=gb[..., :h2].view(dirs, bs, 2, hidden))  # [g_n, g_z]
            torch.mul(gb[..., :h1].unsqueeze(2), pbs, out=gb[..., h2:].view(dirs, bs, 2, hidden))  # [g_r, da]
            if s == 0:
                break
            bs1 = batch_sizes[s - 1]
            nxt = dh_bufs[1 - current]
            if bs1 != batch:
                nxt, g, dy = nxt[:, :bs1], g[:, :bs1], dy_s[s - 1][:, :bs1]
            else:
                dy = dy_s[s - 1]
            torch.baddbmm(dy, g[..., h1:], w_hh_p, out=nxt)  # dY_{t−1} + g_h W_hh
            (nxt if bs == bs1 else nxt[:, :bs]).addcmul_(dh, zs)  # + dh ⊙ z
            current = 1 - current
        flat_g = gates.view(dirs, steps * batch, 4 * hidden)
        g_i, g_h = flat_g[..., :3 * hidden], flat_g[..., h1:]
        dw_ih = torch.bmm(g_i.transpose(1, 2), inputs.view(dirs, steps * batch, fan_in))
        dw_hh = torch.bmm(g_h.transpose(1, 2), hbuf[:, :steps].reshape(dirs, steps * batch, hidden))
        db_ih = g_i.sum(1) if self.bias else None
        db_hh = g_h.sum(1) if self.bias else None
        self._write_grads(layer, dw_ih, dw_hh, db_ih, db_hh, perm_ih, perm_hh)
        if not want_input:
            return None
        return torch.bmm(g_i, w_ih.index_select(1, perm_ih)).view(dirs, steps, batch, fan_in)


class LSTM(_Recurrent):
    """Long short-term memory, as ``nn.LSTM(batch_first=True)``; ``forward(x, lengths=None)`` returns the output only.

    Forward, one step (gate order i, f, g, o as in torch; c_0 = h_0 = 0):
        [a_i, a_f, a_g, a_o] = W_ih x + b_ih + W_hh h + b_hh
        i = σ(a_i), f = σ(a_f), g = tanh(a_g), o = σ(a_o)
        c' = f ⊙ c + i ⊙ g,   h' = o ⊙ tanh(c')
    Backward, with dh = dL/dh', dc_in = dL/dc' from step t + 1, and c = c_{t−1}, h = h_{t−1}:
        g_o = dh ⊙ tanh(c') ⊙ o(1 − o)
        dc = dc_in + dh ⊙ o ⊙ (1 − tanh²(c'))
        g_i = dc ⊙ g ⊙ i(1 − i),  g_f = dc ⊙ c ⊙ f(1 − f),  g_g = dc ⊙ i ⊙ (1 − g²)
        dc_{t−1} = dc ⊙ f,   dh_{t−1} = [g_i, g_f, g_g, g_o] W_hh
        dW_ih = Σ_t gᵀ x_t,  dW_hh = Σ_t gᵀ h_{t−1},  db_ih = db_hh = Σ_t g,  dx_t = g W_ih
    Factors precomputed for all steps: o(1 − tanh²c'), tanh(c') o(1 − o), g i(1 − i), c f(1 − f), i(1 − g²).
    Internally the gates are ordered [o, i, f, g]: σ covers one block of 3H and tanh one of H in forward, and
    g_o = dh·[...] and [g_i, g_f, g_g] = dc·[...] are one op each in backward.
    """

    mode = "LSTM"
    gate_count = 4

    def _layer_forward(self, layer: int, inputs: Tensor, batch_sizes: list[int]) -> tuple[tuple, Tensor]:
        dirs, steps, batch, fan_in = inputs.shape
        hidden = self.hidden_size
        perm = _block_index((3, 0, 1, 2), hidden, inputs.device)  # internal o, i, f, g
        weights = self._weights(layer)
        w_ih = torch.stack([w[0] for w in weights]).index_select(1, perm)  # (D, 4H, F)
        w_hh = torch.stack([w[1] for w in weights]).index_select(1, perm)  # (D, 4H, H)
        flat_in = inputs.view(dirs, steps * batch, fan_in)
        if self.bias:
            b = (torch.stack([w[2] for w in weights]) + torch.stack([w[3] for w in weights])).index_select(1, perm)
            act = torch.baddbmm(b.unsqueeze(1), flat_in, w_ih.transpose(1, 2))
        else:
            act = torch.bmm(flat_in, w_ih.transpose(1, 2))
        act = act.view(dirs, steps, batch, 4 * hidden)  # pre-activations, turned into activations in place
        new = inputs.new_empty
        cbuf = new((dirs, steps + 1, batch, hidden))
        tc = new((dirs, steps, batch, hidden))
        hbuf = new((dirs, steps + 1, batch, hidden))
        hbuf[:, 0].zero_()
        cbuf[:, 0].zero_()
        if batch_sizes[-1] < batch:
            hbuf[:, 1:].zero_()
        w_hh_t = w_hh.transpose(1, 2)
        h1, h3 = hidden, 3 * hidden
        act_s, c_s, tc_s, h_s = (t.unbind(1) for t in (act, cbuf, tc, hbuf))
        for s in range(steps):
            bs = batch_sizes[s]
            if bs == batch:
                h, a, c_prev, c, t, out = h_s[s], act_s[s], c_s[s], c_s[s + 1], tc_s[s], h_s[s + 1]
            else:
                h, a, c_prev, c = h_s[s][:, :bs], act_s[s][:, :bs], c_s[s][:, :bs], c_s[s + 1][:, :bs]
                t, out = tc_s[s][:, :bs], h_s[s + 1][:, :bs]
            a.baddbmm_(h, w_hh_t)
            a[..., :h3].sigmoid_()
            g = a[..., h3:]
            g.tanh_()
            torch.mul(a[..., h1:2 * h1], g, out=c)
            c.addcmul_(a[..., 2 * h1:h3], c_prev)
            torch.tanh(c, out=t)
            torch.mul(a[..., :h1], t, out=out)
        return (inputs, w_ih, w_hh, act, cbuf, tc, hbuf, perm), hbuf

    def _layer_backward(self, layer: int, state: tuple, grads: Tensor, batch_sizes: list[int],
                        want_input: bool) -> Tensor | None:
        inputs, w_ih, w_hh, act, cbuf, tc, hbuf, perm = state
        dirs, steps, batch, fan_in = inputs.shape
        hidden = self.hidden_size
        h1, h2, h3 = hidden, 2 * hidden, 3 * hidden
        o, i, f, g = act[..., :h1], act[..., h1:h2], act[..., h2:h3], act[..., h3:]
        # step-independent factors: q = o(1 − tanh²c'), po = tanh(c') o(1 − o), pifg = [g i(1−i), c f(1−f), i(1−g²)]
        q = o * torch.rsub(tc * tc, 1)
        po = tc * o * torch.rsub(o, 1)
        pifg = inputs.new_empty((dirs, steps, batch, 3, hidden))
        torch.mul(g * i, torch.rsub(i, 1), out=pifg[..., 0, :])
        torch.mul(cbuf[:, :steps] * f, torch.rsub(f, 1), out=pifg[..., 1, :])
        torch.mul(i, torch.rsub(g * g, 1), out=pifg[..., 2, :])
        gates = inputs.new_zeros((dirs, steps, batch, 4 * hidden))  # [g_o, g_i, g_f, g_g]
        dh_bufs = (inputs.new_zeros((dirs, batch, hidden)), inputs.new_zeros((dirs, batch, hidden)))
        dc_buf = inputs.new_zeros((dirs, batch, hidden))
        g_s, q_s, po_s, p_s, f_s, dy_s = (t.unbind(1) for t in (gates, q, po, pifg, f, grads))
        current = 0
        bs = batch_sizes[-1]
        dh_bufs[0][:, :bs].copy_(dy_s[steps - 1][:, :bs])
        for s in range(steps - 1, -1, -1):
            bs = batch_sizes[s]
            gs = g_s[s]
            dh, dc = dh_bufs[current], dc_buf
            if bs == batch:
                gb, qs, pos, ps, fs = gs, q_s[s], po_s[s], p_s[s], f_s[s]
            else:
                dh, dc, gb = dh[:, :bs], dc[:, :bs], gs[:, :bs]
                qs, pos, ps, fs = q_s[s][:, :bs], po_s[s][:, :bs], p_s[s][:, :bs], f_s[s][:, :bs]
            dc.addcmul_(dh, qs)
            torch.mul(dh, pos, out=gb[..., :h1])
            torch.mul(dc.unsqueeze(2), ps, out=gb[..., h1:].view(dirs, bs, 3, hidden))
            if s == 0:
                break
            dc.mul_(fs)
            bs1 = batch_sizes[s - 1]
            nxt = dh_bufs[1 - current]
            if bs1 != batch:
                nxt, gs, dy = nxt[:, :bs1], gs[:, :bs1], dy_s[s - 1][:, :bs1]
            else:
                dy = dy_s[s - 1]
            torch.baddbmm(dy, gs, w_hh, out=nxt)
            current = 1 - current
        flat_g = gates.view(dirs, steps * batch, 4 * hidden)
        dw_ih = torch.bmm(flat_g.transpose(1, 2), inputs.view(dirs, steps * batch, fan_in))
        dw_hh = torch.bmm(flat_g.transpose(1, 2), hbuf[:, :steps].reshape(dirs, steps * batch, hidden))
        db = flat_g.sum(1) if self.bias else None
        self._write_grads(layer, dw_ih, dw_hh, db, db, perm, perm)
        if not want_input:
            return None
        return torch.bmm(flat_g, w_ih).view(dirs, steps, batch, fan_in)
