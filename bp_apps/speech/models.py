"""Speech models as plain ``nn.Module``s (no Lightning here). A task is given one of these classes (``net:`` with
``class_path`` in a config) and calls it with the sizes only the data knows, which are therefore the first
parameters of each class: ``input_dim`` (the feature size per frame), and ``num_classes`` for the classifiers.

CTC acoustic models map padded inputs ``(B, T, F)`` and their lengths to log-probabilities ``(B, T', V)`` over
the character vocabulary and the output lengths ``T'``:

- :class:`ConvGRUCTC`: convolutional subsampling (×2 or ×4 in time) and a bidirectional GRU;
  :class:`EngineConvGRUCTC` is the same network of engine layers, trained by the hand-written backward (with the
  engine's CTC loss), under the same parameter names and with the same initial weights for one seed;
- :class:`ConformerCTC`: the same subsampling and torchaudio's Conformer;
- :class:`Wav2Vec2CTC`: transformers' ``Wav2Vec2ForCTC`` on raw waveforms (``input_dim`` 1), built from a small
  config here or from a pretrained name / folder (for online users).

Isolated spoken digits: :class:`DigitCNNNet` (a VGG-style 2-D CNN) or :class:`DigitGRUNet` (conv subsampling +
BiGRU) encodes, the frames are mean- and max-pooled, and the engine's hand-written MLP is the head, trained through
the autograd bridge; :class:`EngineDigitCNNNet` is ``DigitCNNNet`` built entirely of engine layers.

:func:`build_seeded` builds any of them with initial weights that depend on a seed only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bp_apps.engine import MLP, Dropout, Layer, LayerNorm, Linear, ReLU, Sequential
from bp_apps.engine.bridge import EngineMLPHead
from bp_apps.engine.conv import BatchNorm2d, Conv2d, MaxPool2d
from bp_apps.engine.models import twin_with_weights
from bp_apps.engine.recurrent import GRU
from bp_apps.speech.decoding import TOKENS

__all__ = ["ConformerCTC", "ConvBlocksEncoder", "ConvGRUCTC", "ConvSubsampling", "DigitCNNNet", "DigitGRUNet",
           "EngineConvGRUCTC", "EngineConvSubsampling", "EngineDigitCNNNet", "MaskedMeanMaxPool", "PooledDigitNet",
           "Wav2Vec2CTC", "build_seeded"]


def build_seeded(factory: Callable[..., nn.Module], seed: int, *sizes: Any) -> nn.Module:
    """``factory(*sizes)`` with initial weights that depend on ``seed`` only (drawn from a forked CPU generator,
    so the global random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return factory(*sizes)


class ConvSubsampling(nn.Module):
    """``log2(factor)`` stride-2 3×3 convolutions over (time, frequency) with ReLU, flattened, projected to
    ``out_dim`` and layer-normalised: cuts the frame rate (10 ms → 20 or 40 ms) before the sequence model."""

    def __init__(self, input_dim: int, out_dim: int, channels: int = 32, factor: int = 4) -> None:
        super().__init__()
        if factor not in (1, 2, 4, 8):
            raise ValueError(f"subsampling factor must be 1, 2, 4 or 8, got {factor}")
        layers: list[nn.Module] = []
        c_in, freq = 1, input_dim
        for _ in range(factor.bit_length() - 1):
            layers += [nn.Conv2d(c_in, channels, 3, stride=2, padding=1), nn.ReLU()]
            c_in, freq = channels, (freq - 1) // 2 + 1
        self.convs = nn.Sequential(*layers)
        self.steps = factor.bit_length() - 1
        self.proj = nn.Sequential(nn.Linear(c_in * freq, out_dim), nn.LayerNorm(out_dim))

    def output_lengths(self, lengths: Tensor) -> Tensor:
        for _ in range(self.steps):
            lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
        return lengths

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = self.convs(features.unsqueeze(1))  # (B, C, T', F')
        x = x.transpose(1, 2).flatten(2)
        return self.proj(x), self.output_lengths(lengths)


def _masked_gru(gru: nn.GRU, x: Tensor, lengths: Tensor) -> Tensor:
    packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
    out, _ = gru(packed)
    return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]


class ConvGRUCTC(nn.Module):
    """Convolutional subsampling + bidirectional GRU + linear layer to the characters (log-softmax)."""

    def __init__(self, input_dim: int, vocab_size: int = len(TOKENS), conv_channels: int = 32, subsample: int = 4,
                 hidden: int = 192, layers: int = 2, dropout: float = 0.15) -> None:
        super().__init__()
        self.subsampling = ConvSubsampling(input_dim, hidden, conv_channels, subsample)
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True, bidirectional=True,
                          dropout=dropout if layers > 1 else 0.0)
        self.out = nn.Linear(2 * hidden, vocab_size)

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x, lengths = self.subsampling(features, lengths)
        x = _masked_gru(self.gru, self.dropout(x), lengths)
        return F.log_softmax(self.out(self.dropout(x)), dim=-1), lengths


class EngineConvSubsampling(Layer):
    """:class:`ConvSubsampling` of engine layers (same names, same initial weights for one random state); its
    backward takes dL/d(output frames) and trains every weight (no gradient for the input features)."""

    def __init__(self, input_dim: int, out_dim: int, channels: int = 32, factor: int = 4) -> None:
        super().__init__()
        if factor not in (1, 2, 4, 8):
            raise ValueError(f"subsampling factor must be 1, 2, 4 or 8, got {factor}")
        layers: list[Layer] = []
        c_in, freq = 1, input_dim
        for _ in range(factor.bit_length() - 1):
            layers += [Conv2d(c_in, channels, 3, stride=2, padding=1), ReLU(inplace=True)]
            c_in, freq = channels, (freq - 1) // 2 + 1
        self.convs = Sequential(*layers)
        if layers:
            layers[0].needs_input_grad = False  # nothing trains below the first convolution
        self.steps = factor.bit_length() - 1
        self.out_dim = out_dim
        self.proj = Sequential(Linear(c_in * freq, out_dim), LayerNorm(out_dim))
        self.proj[0].needs_input_grad = bool(layers)
        self._conv_shape: torch.Size | None = None

    output_lengths = ConvSubsampling.output_lengths

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = self.convs.forward(features.unsqueeze(1))  # (B, C, T', F')
        self._conv_shape = x.shape
        batch, _, frames, _ = x.shape
        x = self.proj.forward(x.transpose(1, 2).reshape(batch * frames, -1))
        return x.reshape(batch, frames, self.out_dim), self.output_lengths(lengths)

    def backward(self, grad_output: Tensor) -> None:
        batch, channels, frames, freq = self._conv_shape
        grad = self.proj.backward(grad_output.reshape(batch * frames, self.out_dim))
        if self.steps:
            self.convs.backward(grad.reshape(batch, frames, channels, freq).transpose(1, 2).contiguous())


class EngineConvGRUCTC(Layer):
    """:class:`ConvGRUCTC` built of engine layers: the same parameter names and, for one random state, the same
    initial weights and dropout masks. ``forward`` returns log-probabilities and output lengths as the autograd
    network does; ``backward`` takes dL/d(logits) — what the engine's ``CTCLoss.backward`` gives for logits under
    a log-softmax — and writes every parameter's gradient."""

    def __init__(self, input_dim: int, vocab_size: int = len(TOKENS), conv_channels: int = 32, subsample: int = 4,
                 hidden: int = 192, layers: int = 2, dropout: float = 0.15) -> None:
        super().__init__()
        self.settings = {"input_dim": input_dim, "vocab_size": vocab_size, "conv_channels": conv_channels,
                         "subsample": subsample, "hidden": hidden, "layers": layers, "dropout": dropout}
        self.subsampling = EngineConvSubsampling(input_dim, hidden, conv_channels, subsample)
        self.dropout_in, self.dropout_out = Dropout(dropout), Dropout(dropout)  # ConvGRUCTC applies one twice
        self.gru = GRU(hidden, hidden, num_layers=layers, batch_first=True, bidirectional=True,
                       dropout=dropout if layers > 1 else 0.0)
        self.out = Linear(2 * hidden, vocab_size)
        self.vocab_size = vocab_size

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x, lengths = self.subsampling.forward(features, lengths)
        x = self.gru.forward(self.dropout_in.forward(x), lengths.clamp(min=1))
        x = self.dropout_out.forward(x)
        batch, frames, width = x.shape
        logits = self.out.forward(x.reshape(batch * frames, width)).reshape(batch, frames, self.vocab_size)
        return torch.log_softmax(logits, dim=-1), lengths

    def backward(self, grad_logits: Tensor) -> None:
        batch, frames, _ = grad_logits.shape
        grad = self.out.backward(grad_logits.reshape(batch * frames, self.vocab_size)).reshape(batch, frames, -1)
        grad = self.gru.backward(self.dropout_out.backward(grad))
        self.subsampling.backward(self.dropout_in.backward(grad))

    def to_autograd(self) -> ConvGRUCTC:
        """The :class:`ConvGRUCTC` twin with copies of these weights, dtype and device."""
        return twin_with_weights(self, lambda: ConvGRUCTC(**self.settings))


class ConformerCTC(nn.Module):
    """Convolutional subsampling + torchaudio's Conformer + linear layer to the characters (log-softmax)."""

    def __init__(self, input_dim: int, vocab_size: int = len(TOKENS), conv_channels: int = 32, subsample: int = 4,
                 d_model: int = 144, heads: int = 4, ffn_dim: int = 576, layers: int = 4, kernel_size: int = 15,
                 dropout: float = 0.1) -> None:
        super().__init__()
        from torchaudio.models import Conformer

        self.subsampling = ConvSubsampling(input_dim, d_model, conv_channels, subsample)
        self.conformer = Conformer(input_dim=d_model, num_heads=heads, ffn_dim=ffn_dim, num_layers=layers,
                                   depthwise_conv_kernel_size=kernel_size, dropout=dropout)
        self.out = nn.Linear(d_model, vocab_size)

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x, lengths = self.subsampling(features, lengths)
        lengths = lengths.clamp(min=1, max=x.shape[1])
        x, lengths = self.conformer(x, lengths)
        return F.log_softmax(self.out(x), dim=-1), lengths


class Wav2Vec2CTC(nn.Module):
    """transformers' ``Wav2Vec2ForCTC`` on waveform inputs ``(B, T, 1)`` (``input_dim`` must be 1: the data's
    ``features.kind`` is ``waveform``): from ``pretrained`` (a hub name or a ``save_pretrained`` folder; its CTC
    layer is rebuilt for this vocabulary), from ``hf_config`` (a ``Wav2Vec2Config`` as a dict: what a checkpoint
    stores, so loading it never downloads), or from a small config built here of the other arguments."""

    def __init__(self, input_dim: int = 1, vocab_size: int = len(TOKENS), pretrained: str | None = None,
                 hidden: int = 96, layers: int = 3, heads: int = 4, ffn_dim: int = 192, conv_dim: int = 64,
                 dropout: float = 0.1, hf_config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

        if input_dim != 1:
            raise ValueError(f"Wav2Vec2CTC reads waveforms (input_dim 1), got input_dim={input_dim}: use the data "
                             "setting features.kind=waveform")
        if pretrained and hf_config is not None:
            raise ValueError("Wav2Vec2CTC: give pretrained or hf_config, not both")
        if hf_config is not None:
            self.model = Wav2Vec2ForCTC(Wav2Vec2Config.from_dict(dict(hf_config)))
        elif pretrained:
            self.model = Wav2Vec2ForCTC.from_pretrained(pretrained, vocab_size=vocab_size, pad_token_id=0,
                                                        ignore_mismatched_sizes=True)
        else:
            config = Wav2Vec2Config(vocab_size=vocab_size, pad_token_id=0, hidden_size=hidden,
                                    num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn_dim,
                                    conv_dim=(conv_dim,) * 7, num_conv_pos_embeddings=32,
                                    num_conv_pos_embedding_groups=4, hidden_dropout=dropout, activation_dropout=dropout,
                                    attention_dropout=dropout, feat_proj_dropout=dropout, final_dropout=dropout,
                                    mask_time_prob=0.05, layerdrop=0.0, feat_extract_norm="layer",
                                    do_stable_layer_norm=True)
            self.model = Wav2Vec2ForCTC(config)

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        waveform = features.squeeze(-1)
        mask = (torch.arange(waveform.shape[1], device=waveform.device)[None] < lengths[:, None]).long()
        logits = self.model(input_values=waveform, attention_mask=mask).logits
        out_lengths = self.model._get_feat_extract_output_lengths(lengths).clamp(max=logits.shape[1])
        return F.log_softmax(logits.float(), dim=-1), out_lengths.long()


class ConvBlocksEncoder(nn.Module):
    """VGG-style 2-D CNN over (time, mel): three blocks of two 3×3 convolutions (batch norm, ReLU) and a 2×2
    max-pool, ``channels``, 2×``channels`` and 4×``channels`` wide; the pooled frequency axis is flattened and
    projected to ``out_dim`` per frame. Output frames are 8× longer than the input's 10 ms."""

    def __init__(self, input_dim: int, out_dim: int, channels: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, freq = 1, input_dim
        for c_out in (channels, 2 * channels, 4 * channels):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.MaxPool2d(2, ceil_mode=True)]
            c_in, freq = c_out, -(-freq // 2)
        self.blocks = nn.Sequential(*layers)
        self.proj = nn.Sequential(nn.Linear(c_in * freq, out_dim), nn.LayerNorm(out_dim), nn.ReLU())

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = self.blocks(features.unsqueeze(1))  # (B, C, T / 8, F / 8)
        x = self.proj(x.transpose(1, 2).flatten(2))
        return x, torch.div(lengths + 7, 8, rounding_mode="floor").clamp(min=1, max=x.shape[1])


class PooledDigitNet(nn.Module):
    """Isolated-word classifier: a subclass's encoder gives frames ``(B, T', width)`` and their lengths; they are
    mean- and max-pooled over the true frames, and the engine's MLP (hand-written forward and backward, through the
    autograd bridge) classifies the pooled vector.

    Takes ``(features (B, T, F), lengths)`` as one tuple, like a batch's input."""

    def _add_head(self, width: int, num_classes: int, head_hidden: Sequence[int], dropout: float) -> None:
        """The dropout and the engine MLP head on the ``2 * width`` pooled features (built after the encoder, so
        a seed gives the same weights as before the encoders became classes)."""
        self.dropout = nn.Dropout(dropout)
        self.head = EngineMLPHead(2 * width, list(head_hidden), num_classes, dropout=dropout)

    def encode(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, inputs: tuple[Tensor, Tensor]) -> Tensor:
        features, lengths = inputs
        x, lengths = self.encode(features, lengths)
        mask = (torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None]).unsqueeze(-1)
        mean = (x * mask).sum(1) / mask.sum(1).clamp(min=1)
        peak = x.masked_fill(~mask, float("-inf")).amax(1)
        return self.head(self.dropout(torch.cat([mean, peak], dim=-1)))


class DigitGRUNet(PooledDigitNet):
    """Conv subsampling (×``subsample`` in time, ``conv_channels`` wide) + a BiGRU of ``hidden`` units, pooled,
    under the engine MLP head (``head_hidden`` widths)."""

    def __init__(self, input_dim: int, num_classes: int = 10, conv_channels: int = 16, subsample: int = 2,
                 hidden: int = 96, head_hidden: Sequence[int] = (64,), dropout: float = 0.2) -> None:
        super().__init__()
        self.subsampling = ConvSubsampling(input_dim, hidden, conv_channels, subsample)
        self.gru = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self._add_head(2 * hidden, num_classes, head_hidden, dropout)

    def encode(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x, lengths = self.subsampling(features, lengths)
        return _masked_gru(self.gru, x, lengths), lengths


class DigitCNNNet(PooledDigitNet):
    """The VGG-style 2-D CNN of :class:`ConvBlocksEncoder` (``conv_channels``, 2× and 4× as wide; frames 8×
    longer) projected to ``hidden``, pooled, under the engine MLP head (``head_hidden`` widths)."""

    def __init__(self, input_dim: int, num_classes: int = 10, conv_channels: int = 16, hidden: int = 96,
                 head_hidden: Sequence[int] = (64,), dropout: float = 0.2) -> None:
        super().__init__()
        self.cnn = ConvBlocksEncoder(input_dim, hidden, conv_channels)
        self._add_head(hidden, num_classes, head_hidden, dropout)

    def encode(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        return self.cnn(features, lengths)


class MaskedMeanMaxPool(Layer):
    """Frames ``(B, T, D)`` with lengths → ``[mean, max]`` over each utterance's true frames ``(B, 2D)``, as
    :class:`PooledDigitNet` pools. Backward: the mean's gradient spreads evenly over the true frames; the max's goes
    to the frames holding the maximum, shared equally among ties (as autograd's ``amax``)."""

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        mask = (torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None]).unsqueeze(-1)
        count = mask.sum(1).clamp(min=1)
        mean = (x * mask).sum(1) / count
        masked = x.masked_fill(~mask, float("-inf"))
        peak = masked.amax(1)
        winners = masked == peak.unsqueeze(1)
        self.saved = (mask, count, winners)
        return torch.cat([mean, peak], dim=-1)

    def backward(self, grad_output: Tensor) -> Tensor:
        mask, count, winners = self.saved
        grad_mean, grad_peak = grad_output.chunk(2, dim=-1)
        share = grad_peak / winners.sum(1)
        return mask * (grad_mean / count).unsqueeze(1) + winners * share.unsqueeze(1)


class _EngineMLPHolder(Layer):
    """The engine MLP under the name ``mlp``, as :class:`~bp_apps.engine.bridge.EngineMLPHead` holds it (so the
    parameter names of the engine and the autograd digit networks agree)."""

    def __init__(self, mlp: MLP) -> None:
        super().__init__()
        mlp.input_grad = True
        self.mlp = mlp

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp.forward(x)

    def backward(self, grad_output: Tensor) -> Tensor | None:
        return self.mlp.backward(grad_output)


class EngineConvBlocksEncoder(Layer):
    """:class:`ConvBlocksEncoder` of engine layers (same names, same initial weights for one random state)."""

    def __init__(self, input_dim: int, out_dim: int, channels: int = 16) -> None:
        super().__init__()
        layers: list[Layer] = []
        c_in, freq = 1, input_dim
        for c_out in (channels, 2 * channels, 4 * channels):
            layers += [Conv2d(c_in, c_out, 3, padding=1), BatchNorm2d(c_out), ReLU(inplace=True),
                       Conv2d(c_out, c_out, 3, padding=1), BatchNorm2d(c_out), ReLU(inplace=True),
                       MaxPool2d(2, ceil_mode=True)]
            c_in, freq = c_out, -(-freq // 2)
        layers[0].needs_input_grad = False  # nothing trains below the first convolution
        self.blocks = Sequential(*layers)
        self.proj = Sequential(Linear(c_in * freq, out_dim), LayerNorm(out_dim), ReLU(inplace=True))
        self.out_dim = out_dim
        self._block_shape: torch.Size | None = None

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = self.blocks.forward(features.unsqueeze(1))  # (B, C, T / 8, F / 8)
        self._block_shape = x.shape
        batch, _, frames, _ = x.shape
        x = self.proj.forward(x.transpose(1, 2).reshape(batch * frames, -1)).reshape(batch, frames, self.out_dim)
        return x, torch.div(lengths + 7, 8, rounding_mode="floor").clamp(min=1, max=frames)

    def backward(self, grad_output: Tensor) -> None:
        batch, channels, frames, freq = self._block_shape
        grad = self.proj.backward(grad_output.reshape(batch * frames, self.out_dim))
        self.blocks.backward(grad.reshape(batch, frames, channels, freq).transpose(1, 2).contiguous())


class EngineDigitCNNNet(Layer):
    """:class:`DigitCNNNet` built entirely of engine layers — the CNN encoder, the masked mean/max pooling and the
    MLP head — and trained by the hand-written backward: same parameter names, and for one random state the same
    initial weights and dropout masks. Takes ``(features (B, T, F), lengths)`` as one tuple, like a batch's input."""

    def __init__(self, input_dim: int, num_classes: int = 10, conv_channels: int = 16, hidden: int = 96,
                 head_hidden: Sequence[int] = (64,), dropout: float = 0.2) -> None:
        super().__init__()
        self.settings = {"input_dim": input_dim, "num_classes": num_classes, "conv_channels": conv_channels,
                         "hidden": hidden, "head_hidden": list(head_hidden), "dropout": dropout}
        self.cnn = EngineConvBlocksEncoder(input_dim, hidden, conv_channels)
        self.pool = MaskedMeanMaxPool()
        self.dropout = Dropout(dropout)
        self.head = _EngineMLPHolder(MLP(2 * hidden, list(head_hidden), num_classes, dropout=dropout))

    def forward(self, inputs: tuple[Tensor, Tensor]) -> Tensor:
        features, lengths = inputs
        x, lengths = self.cnn.forward(features, lengths)
        return self.head.forward(self.dropout.forward(self.pool.forward(x, lengths)))

    def backward(self, grad_output: Tensor) -> None:
        grad = self.pool.backward(self.dropout.backward(self.head.backward(grad_output)))
        self.cnn.backward(grad)

    def to_autograd(self) -> DigitCNNNet:
        """The :class:`DigitCNNNet` twin with copies of these weights, dtype and device."""
        return twin_with_weights(self, lambda: DigitCNNNet(**self.settings))
