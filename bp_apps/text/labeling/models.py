"""Taggers: plain ``nn.Module``s mapping a batch (see :func:`data.collate_sentences`) to word-level
emission scores ``[B, T, num_labels]``. The task adds the loss (softmax or CRF) and decoding.

Every tagger is built as ``Tagger(num_words, num_chars, num_labels, predicates, **settings)``: the first four are
what the data's vocabulary file says (word, character and label counts; whether the records mark a predicate), the
settings come from the config (``net: {class_path: ..., init_args: {...}}``). A tagger that needs more than the
vocabulary to be rebuilt (a tokenizer, a pretrained model's config) returns it from ``build_state()``; the task keeps
it in the checkpoint as plain data and passes it back as keyword arguments when loading.

- :class:`BiLSTMTagger`: word embeddings + a character CNN (+ predicate features for SRL), a
  bidirectional LSTM, and a linear head or the engine's hand-written MLP through the bridge.
- :class:`TransformerTagger`: a BERT encoder built from its sizes, on the sub-word tokenizer the data module
  trained on the training words (its ``tokenizer_file``).
- :class:`PretrainedTagger`: a transformers ``AutoModelForTokenClassification`` by hub name or directory, with its
  own tokenizer.

Both transformer taggers score each word at its first sub-word and mark the predicate with token type 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bp_apps.engine.bridge import EngineMLPHead
from bp_apps.text.labeling.records import PREDICATE_CLASSES
from bp_apps.text.labeling.rnn import run_lstm

__all__ = ["BiLSTMTagger", "CharCNN", "PretrainedTagger", "SubwordTagger", "TransformerTagger"]


class CharCNN(nn.Module):
    """Character embeddings, one convolution, max over the word: spelling features for rare words."""

    def __init__(self, num_chars: int, char_dim: int = 30, channels: int = 50, kernel: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_chars, char_dim, padding_idx=0)
        self.conv = nn.Conv1d(char_dim, channels, kernel, padding=kernel // 2)
        self.out_features = channels

    def forward(self, chars: Tensor) -> Tensor:
        """[B, T, C] character ids -> [B, T, channels]."""
        b, t, c = chars.shape
        x = self.embed(chars.reshape(b * t, c)).transpose(1, 2)  # [BT, D, C]
        x = torch.relu(self.conv(x))
        x = x.masked_fill((chars.reshape(b * t, 1, c) == 0), float("-inf")).amax(dim=2)
        return torch.nan_to_num(x, neginf=0.0).reshape(b, t, -1)  # all-padding words give 0


class BiLSTMTagger(nn.Module):
    """Embeddings (word + character CNN + predicate indicator) -> BiLSTM -> per-word scores.

    ``predicates`` (the data marks a predicate: semantic role labeling) with ``predicate_dim`` > 0 makes the tagger
    predicate-aware: every word gets
    an embedding of "is this the predicate", of its signed distance to the predicate (clipped to
    ``max_distance``) and the predicate's own word embedding. While training, ``word_dropout`` of
    the words are read as unknown (so the unknown-word embedding is learned for rare words).
    ``head='engine_mlp'`` scores with the engine's hand-written MLP (``head_hidden`` wide),
    whose backward pass is the engine's, inside this autograd model.

    ``predicate_pos_dim`` > 0 (SRL) adds an embedding of the predicate's coarse POS class (verb, noun,
    adjective, other; see ``records.predicate_class``) to every word's predicate features; while
    training, ``predicate_pos_dropout`` of the instances read it as unknown, as unlabeled input without
    a POS tag does.

    ``shared_layers`` (SRL) splits the ``layers``: the first ``shared_layers`` read the sentence
    without the predicate and run once per distinct sentence of the batch (a sentence has several
    predicates: batch them together, see ``BucketBatchSampler(groups=...)``); the remaining
    layers (``predicate_hidden`` wide, default ``hidden``) read those states with the predicate
    features (indicator, distance, and the shared state at the predicate, projected to
    ``word_dim``) once per predicate instance.

    Without ``predicates`` (punctuation, NER) the predicate settings (``predicate_dim``, ``shared_layers``,
    ``predicate_pos_dim``) are not used, so one config fits data with and without predicates.
    """

    def __init__(self, num_words: int, num_chars: int, num_labels: int, predicates: bool, word_dim: int = 100,
                 char_dim: int = 30, char_channels: int = 50, predicate_dim: int = 16, hidden: int = 200,
                 layers: int = 2, dropout: float = 0.33, head: Literal["linear", "engine_mlp"] = "linear",
                 head_hidden: int = 128, max_distance: int = 20, word_dropout: float = 0.0, shared_layers: int = 0,
                 predicate_hidden: int | None = None, predicate_pos_dim: int = 0,
                 predicate_pos_dropout: float = 0.1) -> None:
        super().__init__()
        if min(num_words, num_chars, num_labels) < 1:
            raise ValueError(f"the vocabulary sizes must be positive, got num_words={num_words}, "
                             f"num_chars={num_chars}, num_labels={num_labels}")
        for name, value in (("word_dim", word_dim), ("hidden", hidden), ("layers", layers)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("char_dim", char_dim), ("char_channels", char_channels), ("predicate_dim", predicate_dim),
                            ("predicate_pos_dim", predicate_pos_dim), ("head_hidden", head_hidden)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, value in (("dropout", dropout), ("word_dropout", word_dropout),
                            ("predicate_pos_dropout", predicate_pos_dropout)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not predicates:  # no predicate in the data: a plain tagger
            predicate_dim = shared_layers = predicate_pos_dim = 0
        self.predicates = bool(predicates)
        if head not in ("linear", "engine_mlp"):
            raise ValueError(f"head must be 'linear' or 'engine_mlp' (formerly 'manual_mlp'), got {head!r}")
        if shared_layers and (predicate_dim <= 0 or not 0 < shared_layers < layers):
            raise ValueError(f"shared_layers needs predicate_dim > 0 and 0 < shared_layers < layers, got "
                             f"shared_layers={shared_layers}, layers={layers}, predicate_dim={predicate_dim}")
        self.word_embed = nn.Embedding(num_words, word_dim, padding_idx=0)
        self.chars = CharCNN(num_chars, char_dim, char_channels) if char_channels > 0 else None
        self.predicate_embed = nn.Embedding(2, predicate_dim) if predicate_dim > 0 else None
        self.distance_embed = nn.Embedding(2 * max_distance + 1, predicate_dim) if predicate_dim > 0 else None
        if predicate_pos_dim and predicate_dim <= 0:
            raise ValueError("predicate_pos_dim needs predicate_dim > 0 (a predicate-aware tagger)")
        self.predicate_pos_embed = (nn.Embedding(len(PREDICATE_CLASSES), predicate_pos_dim) if predicate_pos_dim
                                    else None)
        self.max_distance, self.word_dropout = max_distance, word_dropout
        self.predicate_pos_dropout = predicate_pos_dropout
        in_features = word_dim + (char_channels if self.chars else 0)
        if predicate_dim > 0:
            in_features += 2 * predicate_dim + word_dim + predicate_pos_dim
        self.dropout = nn.Dropout(dropout)
        self.shared_layers = shared_layers
        if shared_layers:
            sentence_features = word_dim + (char_channels if self.chars else 0)
            self.shared_lstm = nn.LSTM(sentence_features, hidden, num_layers=shared_layers, bidirectional=True,
                                       batch_first=True, dropout=dropout if shared_layers > 1 else 0.0)
            self.predicate_state = nn.Linear(2 * hidden, word_dim)  # the shared state at the predicate, narrowed
            in_features = 2 * hidden + word_dim + 2 * predicate_dim + predicate_pos_dim
            layers -= shared_layers
            hidden = predicate_hidden or hidden
        self.lstm = nn.LSTM(in_features, hidden, num_layers=layers, bidirectional=True, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)
        if head == "linear":
            self.head: nn.Module = nn.Linear(2 * hidden, num_labels)
        else:
            self.head = EngineMLPHead(2 * hidden, (head_hidden,), num_labels)

    def _predicate_features(self, batch: dict[str, Any]) -> tuple[Tensor, list[Tensor]]:
        """The predicate's position [B, 1], and the indicator, clipped distance and (with ``predicate_pos_dim``)
        POS class embeddings, each [B, T, *]."""
        assert self.predicate_embed is not None and self.distance_embed is not None
        indicator = batch["predicate"]
        position = torch.arange(indicator.shape[1], device=indicator.device)
        where = indicator.argmax(dim=1, keepdim=True)  # sentences without one: position 0
        distance = (position.unsqueeze(0) - where).clamp(-self.max_distance, self.max_distance)
        features = [self.predicate_embed(indicator), self.distance_embed(distance + self.max_distance)]
        if self.predicate_pos_embed is not None:
            classes = batch.get("predicate_class")
            if classes is None:
                classes = torch.zeros(len(indicator), dtype=torch.long, device=indicator.device)
            if self.training and self.predicate_pos_dropout > 0:
                classes = classes.masked_fill(torch.rand(classes.shape, device=classes.device)
                                              < self.predicate_pos_dropout, 0)
            features.append(self.predicate_pos_embed(classes).unsqueeze(1).expand(-1, indicator.shape[1], -1))
        return where, features

    def _forward_shared(self, batch: dict[str, Any]) -> Tensor:
        """The sentence layers once per distinct sentence, then the predicate layers per instance."""
        words, mask = batch["words"], batch["mask"]
        key = words if self.chars is None else torch.cat([words, batch["chars"].flatten(1)], dim=1)
        unique, inverse = torch.unique(key, dim=0, return_inverse=True)
        rows = torch.zeros(len(unique), dtype=torch.long, device=words.device).scatter_(
            0, inverse, torch.arange(len(words), device=words.device))  # one instance of each distinct sentence
        sentence_words = words[rows]
        if self.training and self.word_dropout > 0:
            drop = (torch.rand(sentence_words.shape, device=words.device) < self.word_dropout) & (sentence_words > 1)
            sentence_words = sentence_words.masked_fill(drop, 1)
        parts = [self.word_embed(sentence_words)]
        if self.chars is not None:
            parts.append(self.chars(batch["chars"][rows]))
        lengths = mask.sum(dim=1)
        states = run_lstm(self.shared_lstm, self.dropout(torch.cat(parts, dim=-1)), lengths[rows])
        states = states[inverse]  # [B, T, 2H] per instance
        where, features = self._predicate_features(batch)
        at_predicate = self.predicate_state(states.gather(1, where.unsqueeze(-1).expand(-1, 1, states.shape[-1])))
        x = self.dropout(torch.cat([states, at_predicate.expand(-1, states.shape[1], -1), *features], -1))
        return self.head(self.dropout(run_lstm(self.lstm, x, lengths)))

    def forward(self, batch: dict[str, Any]) -> Tensor:
        if self.shared_layers:
            return self._forward_shared(batch)
        words = batch["words"]
        if self.training and self.word_dropout > 0:
            drop = (torch.rand(words.shape, device=words.device) < self.word_dropout) & (words > 1)
            words = words.masked_fill(drop, 1)
        parts = [self.word_embed(words)]
        if self.chars is not None:
            parts.append(self.chars(batch["chars"]))
        if self.predicate_embed is not None:
            where, features = self._predicate_features(batch)
            predicate_word = parts[0].gather(1, where.unsqueeze(-1).expand(-1, 1, parts[0].shape[-1]))
            # indicator, distance, the predicate's word, then the POS class: the order checkpoints were trained with
            parts += [features[0], features[1], predicate_word.expand_as(parts[0]), *features[2:]]
        x = self.dropout(torch.cat(parts, dim=-1))
        out = run_lstm(self.lstm, x, batch["mask"].sum(dim=1))
        return self.head(self.dropout(out))


class SubwordTagger(nn.Module):
    """A transformers token-classification model, scored per word at the word's first sub-word.

    ``model`` is the ``AutoModelForTokenClassification``; ``tokenizer`` a fast tokenizer (for
    ``word_ids``). Words past ``max_subwords`` get zero scores (prediction labels long sentences in windows).
    The predicate (``mark_predicate``) is marked with token type 1.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_subwords: int = 256, mark_predicate: bool = False
                 ) -> None:
        super().__init__()
        if max_subwords < 8:
            raise ValueError(f"max_subwords must be >= 8, got {max_subwords}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__}: sub-word label alignment needs a fast tokenizer")
        if mark_predicate and getattr(model.config, "type_vocab_size", 0) < 2:
            raise ValueError(f"{type(model).__name__} has no token type embeddings to mark the predicate with; "
                             "use a BERT-family encoder (type_vocab_size >= 2) for semantic role labeling")
        self.model, self.tokenizer = model, tokenizer
        self.max_subwords, self.mark_predicate = max_subwords, mark_predicate

    def build_state(self) -> dict[str, Any]:
        """What rebuilds this tagger without any file or download (plain data, kept in the checkpoint): the
        tokenizer as JSON and its special tokens."""
        from bp_apps.text.tokenization import tokenizer_to_json

        return {"tokenizer": tokenizer_to_json(self.tokenizer),
                "special_tokens": {k: v for k, v in self.tokenizer.special_tokens_map.items() if isinstance(v, str)}}

    def encode(self, tokens: Sequence[Sequence[str]], predicates: Sequence[int | None]) -> tuple[dict, Tensor]:
        """Sub-word inputs and, per sentence, each word's first sub-word position (-1 when cut off)."""
        enc = self.tokenizer([list(t) for t in tokens], is_split_into_words=True, truncation=True,
                             max_length=self.max_subwords, padding=True, return_tensors="pt")
        length = max(len(t) for t in tokens)
        first = torch.full((len(tokens), length), -1, dtype=torch.long)
        type_ids = torch.zeros_like(enc["input_ids"])
        for i in range(len(tokens)):
            for pos, word in enumerate(enc.word_ids(i)):
                if word is None:
                    continue
                if first[i, word] < 0:
                    first[i, word] = pos
                if self.mark_predicate and word == predicates[i]:
                    type_ids[i, pos] = 1
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if getattr(self.model.config, "type_vocab_size", 0) >= 2:
            inputs["token_type_ids"] = type_ids
        return inputs, first

    def forward(self, batch: dict[str, Any]) -> Tensor:
        inputs, first = self.encode(batch["tokens"], batch["predicates"])
        device = batch["mask"].device
        logits = self.model(**{k: v.to(device) for k, v in inputs.items()}).logits  # [B, S, L]
        first = first.to(device)
        gathered = logits.gather(1, first.clamp(min=0).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return gathered.masked_fill((first < 0).unsqueeze(-1), 0.0)


class TransformerTagger(SubwordTagger):
    """A BERT encoder built from its sizes (fresh weights) on the sub-word tokenizer trained on the training words.

    ``tokenizer`` is that tokenizer as JSON (the data module's ``tokenizer_file``, which it builds when given a
    ``tokenizer_vocab_size``; the task reads the file, or the checkpoint, and passes its text here).
    """

    def __init__(self, num_words: int, num_chars: int, num_labels: int, predicates: bool,
                 tokenizer: str | None = None, special_tokens: dict[str, str] | None = None, hidden: int = 256,
                 layers: int = 4, heads: int = 4, max_subwords: int = 256, dropout: float = 0.1) -> None:
        from transformers import AutoModelForTokenClassification, BertConfig

        from bp_apps.text.tokenization import tokenizer_from_json

        if not tokenizer:
            raise ValueError("TransformerTagger needs the sub-word tokenizer trained on the training words: give the "
                             "data module a tokenizer_vocab_size (--data.tokenizer_vocab_size=8000); its "
                             "tokenizer_file is linked to the model's (by hand: "
                             "TokenLabeler(tokenizer_file=data.tokenizer_file))")
        for name, value in (("hidden", hidden), ("layers", layers), ("heads", heads)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        tok = tokenizer_from_json(tokenizer, special_tokens)
        config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=4 * hidden,
                            max_position_embeddings=max(512, max_subwords), num_labels=num_labels,
                            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        super().__init__(AutoModelForTokenClassification.from_config(config), tok, max_subwords,
                         mark_predicate=predicates)


class PretrainedTagger(SubwordTagger):
    """A pretrained transformers encoder (``name``: a hub name or a local ``save_pretrained`` directory) with a new
    token-classification head for ``num_labels``, on its own fast tokenizer.

    When the task rebuilds it from a checkpoint it passes ``tokenizer`` (JSON), ``special_tokens`` and ``config``
    (the model's config as a dict): the architecture is then built from them, nothing is downloaded, and ``name``
    need not exist any more.
    """

    def __init__(self, num_words: int, num_chars: int, num_labels: int, predicates: bool, name: str = "",
                 max_subwords: int = 256, tokenizer: str | None = None, special_tokens: dict[str, str] | None = None,
                 config: dict[str, Any] | None = None) -> None:
        from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

        from bp_apps.text.tokenization import tokenizer_from_json

        if config is not None and tokenizer:  # from a checkpoint: no download
            tok = tokenizer_from_json(tokenizer, special_tokens)
            model = AutoModelForTokenClassification.from_config(AutoConfig.for_model(**config))
        else:
            if not name:
                raise ValueError("PretrainedTagger needs name: a hub name or a local directory")
            tok = AutoTokenizer.from_pretrained(name)
            if not tok.is_fast:
                raise ValueError(f"{name}: sub-word label alignment needs a fast tokenizer")
            model = AutoModelForTokenClassification.from_pretrained(name, num_labels=num_labels,
                                                                    ignore_mismatched_sizes=True)
        super().__init__(model, tok, max_subwords, mark_predicate=predicates)

    def build_state(self) -> dict[str, Any]:
        return {**super().build_state(), "config": self.model.config.to_dict()}
