"""The BiLSTM tagger built of engine layers: forward and backward by hand, no autograd.

:class:`EngineBiLSTMTagger` is :class:`~bp_apps.text.labeling.models.BiLSTMTagger` (same constructor, parameter
names and shapes, the same initial weights for one random state, and in training mode the same random draws in
the same order: word dropout, predicate-POS dropout, the dropout masks, the LSTMs' inter-layer dropout as
``run_lstm`` draws it), so one ``state_dict`` loads into either and ``to_autograd()`` is its twin. ``forward(batch)``
returns the emission scores ``[B, T, num_labels]``; ``backward(grad)`` takes dL/demissions (what the engine
``CRF.backward`` or ``SoftmaxCrossEntropy.backward`` gives) and writes every parameter's gradient.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from bp_apps.engine import LSTM, Conv1d, Dropout, Embedding, Layer, Linear, ReLU
from bp_apps.engine.models import twin_with_weights
from bp_apps.engine.sequence import Concat, MaskedMax, PositionGather, RowGather
from bp_apps.text.labeling.models import BiLSTMTagger
from bp_apps.text.labeling.records import PREDICATE_CLASSES

__all__ = ["EngineBiLSTMTagger", "EngineCharCNN"]


class EngineCharCNN(Layer):
    """:class:`~bp_apps.text.labeling.models.CharCNN` of engine layers: character embeddings, one convolution,
    ReLU, the maximum over the word's characters (an all-padding word gives 0)."""

    def __init__(self, num_chars: int, char_dim: int = 30, channels: int = 50, kernel: int = 3) -> None:
        super().__init__()
        self.embed = Embedding(num_chars, char_dim, padding_idx=0)
        self.conv = Conv1d(char_dim, channels, kernel, padding=kernel // 2)
        self.relu, self.pool = ReLU(inplace=True), MaskedMax()
        self.out_features = channels

    def forward(self, chars: Tensor) -> Tensor:
        """[B, T, C] character ids -> [B, T, channels]."""
        b, t, c = chars.shape
        flat = chars.reshape(b * t, c)
        x = self.relu.forward(self.conv.forward(self.embed.forward(flat).transpose(1, 2)))  # [BT, channels, C]
        return self.pool.forward(x, flat != 0).reshape(b, t, -1)

    def backward(self, grad_output: Tensor) -> None:
        b, t, channels = grad_output.shape
        grad = self.conv.backward(self.relu.backward(self.pool.backward(grad_output.reshape(b * t, channels))))
        self.embed.backward(grad.transpose(1, 2))


class EngineBiLSTMTagger(Layer):
    """:class:`~bp_apps.text.labeling.models.BiLSTMTagger` of engine layers (its docstring tells the model);
    ``head='engine_mlp'`` is not offered here: the linear head only."""

    def __init__(self, num_words: int, num_chars: int, num_labels: int, predicates: bool, word_dim: int = 100,
                 char_dim: int = 30, char_channels: int = 50, predicate_dim: int = 16, hidden: int = 200,
                 layers: int = 2, dropout: float = 0.33, head: Literal["linear", "engine_mlp"] = "linear",
                 head_hidden: int = 128, max_distance: int = 20, word_dropout: float = 0.0, shared_layers: int = 0,
                 predicate_hidden: int | None = None, predicate_pos_dim: int = 0,
                 predicate_pos_dropout: float = 0.1) -> None:
        super().__init__()
        if head != "linear":
            raise ValueError(f"EngineBiLSTMTagger has the linear head only, got head={head!r} (the engine MLP head "
                             "is for the autograd BiLSTMTagger, through the bridge)")
        self.settings = {"num_words": num_words, "num_chars": num_chars, "num_labels": num_labels,
                         "predicates": predicates, "word_dim": word_dim, "char_dim": char_dim,
                         "char_channels": char_channels, "predicate_dim": predicate_dim, "hidden": hidden,
                         "layers": layers, "dropout": dropout, "head": head, "head_hidden": head_hidden,
                         "max_distance": max_distance, "word_dropout": word_dropout, "shared_layers": shared_layers,
                         "predicate_hidden": predicate_hidden, "predicate_pos_dim": predicate_pos_dim,
                         "predicate_pos_dropout": predicate_pos_dropout}
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            twin = BiLSTMTagger(**self.settings)  # checks the settings as the twin does, and derives the sizes
        self.predicates, self.shared_layers = twin.predicates, twin.shared_layers
        self.max_distance, self.word_dropout = max_distance, word_dropout
        self.predicate_pos_dropout = predicate_pos_dropout
        self.word_embed = Embedding(num_words, word_dim, padding_idx=0)
        self.chars = EngineCharCNN(num_chars, char_dim, char_channels) if twin.chars is not None else None
        predicate_dim = twin.predicate_embed.embedding_dim if twin.predicate_embed is not None else 0
        self.predicate_embed = Embedding(2, predicate_dim) if predicate_dim else None
        self.distance_embed = Embedding(2 * max_distance + 1, predicate_dim) if predicate_dim else None
        self.predicate_pos_embed = (Embedding(len(PREDICATE_CLASSES), twin.predicate_pos_embed.embedding_dim)
                                    if twin.predicate_pos_embed is not None else None)
        self.dropout_input, self.dropout_output = Dropout(dropout), Dropout(dropout)
        if self.shared_layers:
            shared = twin.shared_lstm
            self.shared_lstm = LSTM(shared.input_size, shared.hidden_size, num_layers=shared.num_layers,
                                    bidirectional=True, dropout=shared.dropout, dropout_order="padded")
            self.predicate_state = Linear(2 * shared.hidden_size, word_dim)
            self.dropout_features = Dropout(dropout)
            self.sentence_features, self.states_per_instance = Concat(), RowGather()
        lstm = twin.lstm
        self.lstm = LSTM(lstm.input_size, lstm.hidden_size, num_layers=lstm.num_layers, bidirectional=True,
                         dropout=lstm.dropout, dropout_order="padded")
        self.head = Linear(2 * lstm.hidden_size, num_labels)
        self.features, self.at_predicate = Concat(), PositionGather()
        self.word_embed.needs_input_grad = False

    def to_autograd(self) -> BiLSTMTagger:
        """The :class:`BiLSTMTagger` twin with copies of these weights, dtype and device."""
        return twin_with_weights(self, lambda: BiLSTMTagger(**self.settings))

    # ------------------------------------------------------------------ forward

    def _dropped_words(self, words: Tensor) -> Tensor:
        """Training: ``word_dropout`` of the known words read as unknown (id 1), drawn as the twin draws."""
        if self.training and self.word_dropout > 0:
            drop = (torch.rand(words.shape, device=words.device) < self.word_dropout) & (words > 1)
            words = words.masked_fill(drop, 1)
        return words

    def _predicate_features(self, batch: dict[str, Any]) -> tuple[Tensor, list[Tensor]]:
        """The predicate's position [B], and the indicator and clipped distance embeddings [B, T, *], and the POS
        class embedding [B, 1, *] (with ``predicate_pos_dim``)."""
        assert self.predicate_embed is not None and self.distance_embed is not None
        indicator = batch["predicate"]
        position = torch.arange(indicator.shape[1], device=indicator.device)
        where = indicator.argmax(dim=1, keepdim=True)  # sentences without one: position 0
        distance = (position.unsqueeze(0) - where).clamp(-self.max_distance, self.max_distance)
        features = [self.predicate_embed.forward(indicator), self.distance_embed.forward(distance + self.max_distance)]
        if self.predicate_pos_embed is not None:
            classes = batch.get("predicate_class")
            if classes is None:
                classes = torch.zeros(len(indicator), dtype=torch.long, device=indicator.device)
            if self.training and self.predicate_pos_dropout > 0:
                classes = classes.masked_fill(torch.rand(classes.shape, device=classes.device)
                                              < self.predicate_pos_dropout, 0)
            features.append(self.predicate_pos_embed.forward(classes).unsqueeze(1))
        return where[:, 0], features

    def _emissions(self, x: Tensor, lengths: Tensor, dropout: Dropout) -> Tensor:
        """The predicate LSTM layers over ``x`` (after ``dropout``), output dropout, the linear head."""
        out = self.dropout_output.forward(self.lstm.forward(dropout.forward(x), lengths))
        batch, steps, width = out.shape
        return self.head.forward(out.reshape(batch * steps, width)).reshape(batch, steps, -1)

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """Emission scores ``[B, T, num_labels]``; keeps what :meth:`backward` needs."""
        lengths = batch["mask"].sum(dim=1)
        if self.shared_layers:
            return self._forward_shared(batch, lengths)
        parts = [self.word_embed.forward(self._dropped_words(batch["words"]))]
        if self.chars is not None:
            parts.append(self.chars.forward(batch["chars"]))
        if self.predicate_embed is not None:
            where, features = self._predicate_features(batch)
            predicate_word = self.at_predicate.forward(parts[0], where).unsqueeze(1)
            # indicator, distance, the predicate's word, then the POS class: the twin's order
            parts += [features[0], features[1], predicate_word, *features[2:]]
        return self._emissions(self.features.forward(*parts), lengths, self.dropout_input)

    def _forward_shared(self, batch: dict[str, Any], lengths: Tensor) -> Tensor:
        """The sentence layers once per distinct sentence, then the predicate layers per instance."""
        words = batch["words"]
        key = words if self.chars is None else torch.cat([words, batch["chars"].flatten(1)], dim=1)
        unique, inverse = torch.unique(key, dim=0, return_inverse=True)
        rows = torch.zeros(len(unique), dtype=torch.long, device=words.device).scatter_(
            0, inverse, torch.arange(len(words), device=words.device))  # one instance of each distinct sentence
        parts = [self.word_embed.forward(self._dropped_words(words[rows]))]
        if self.chars is not None:
            parts.append(self.chars.forward(batch["chars"][rows]))
        sentence = self.dropout_input.forward(self.sentence_features.forward(*parts))
        states = self.states_per_instance.forward(self.shared_lstm.forward(sentence, lengths[rows]), inverse)
        where, features = self._predicate_features(batch)
        at_predicate = self.predicate_state.forward(self.at_predicate.forward(states, where)).unsqueeze(1)
        return self._emissions(self.features.forward(states, at_predicate, *features), lengths,
                               self.dropout_features)

    # ------------------------------------------------------------------ backward

    def backward(self, grad_output: Tensor) -> None:
        """From dL/demissions ``[B, T, num_labels]``: every parameter's gradient, back to the embeddings."""
        batch, steps, labels = grad_output.shape
        grad = self.head.backward(grad_output.reshape(batch * steps, labels)).reshape(batch, steps, -1)
        grad = self.lstm.backward(self.dropout_output.backward(grad))
        dropout = self.dropout_features if self.shared_layers else self.dropout_input
        grads = self.features.backward(dropout.backward(grad))
        if self.shared_layers:
            grad_states, grad_at, *grad_features = grads
            self._predicate_backward(grad_features)
            grad_states = self.at_predicate.backward(self.predicate_state.backward(grad_at.squeeze(1)),
                                                     into=grad_states.contiguous())
            grad = self.shared_lstm.backward(self.states_per_instance.backward(grad_states))
            self._words_backward(self.sentence_features.backward(self.dropout_input.backward(grad)))
            return
        words = grads[:1 + (self.chars is not None)]
        if self.predicate_embed is not None:
            grad_indicator, grad_distance, grad_predicate_word, *grad_pos = grads[len(words):]
            self._predicate_backward([grad_indicator, grad_distance, *grad_pos])
            words[0] = self.at_predicate.backward(grad_predicate_word.squeeze(1), into=words[0].contiguous())
        self._words_backward(words)

    def _predicate_backward(self, grads: list[Tensor]) -> None:
        """The predicate indicator, distance and POS class embeddings' gradients."""
        assert self.predicate_embed is not None and self.distance_embed is not None
        self.predicate_embed.backward(grads[0])
        self.distance_embed.backward(grads[1])
        if self.predicate_pos_embed is not None:
            self.predicate_pos_embed.backward(grads[2].squeeze(1))

    def _words_backward(self, grads: list[Tensor]) -> None:
        """The word embeddings' and the character CNN's gradients from those of their outputs."""
        self.word_embed.backward(grads[0])
        if self.chars is not None:
            self.chars.backward(grads[1])
