"""The token-labeling LightningModule: semantic role labeling, punctuation restoration, NER.

The tagger (:mod:`models`) gives per-word scores; the loss is a CRF's negative log-likelihood
or per-token cross-entropy, and decoding (CRF Viterbi, or Viterbi over the softmax scores)
never produces an invalid BIO sequence. BIO label sets are scored by spans with CoNLL
conventions (``exclude_labels=[V]`` for SRL); other label sets (punctuation ``MARK|CASE``
tags) per token. The vocabulary, the label set and, for transformers, the tokenizer and the
model config travel in the checkpoint as plain data, so loading needs no pickle.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from bp_apps.core.io import atomic_write_text, default_cache_dir
from bp_apps.core.task import NO_DECAY_KEYS, OptimizerConfig, TaskModule
from bp_apps.text.labeling.crf import CRF, constrained_decode
from bp_apps.text.labeling.data import LabelingVocab, collate_sentences
from bp_apps.text.labeling.metrics import span_scores, token_scores
from bp_apps.text.labeling.models import BiLSTMTagger, TransformerTagger
from bp_apps.text.labeling.records import TaggedSentence, make_sentence

__all__ = ["TASK_NAME", "TokenLabeler", "label_sentences", "load_labeler", "spans_of", "tokenize_text"]

TASK_NAME, STATE_KEY = "text.TokenLabeler", "bp_apps_labeling"


class TokenLabeler(TaskModule):
    """Token labeling with a BiLSTM (word + character CNN + predicate indicator) or a transformer
    encoder (``transformer``: built from the sizes here with a tokenizer trained on the training
    words; ``pretrained``: ``pretrained_name``, a hub name or a local directory).

    The network is built once the data module's vocabulary is known (``setup``), or from the
    checkpoint when loading. ``head='engine_mlp'`` puts the engine's hand-written MLP on the BiLSTM.
    ``shared_layers`` (SRL, BiLSTM): that many of the ``layers`` read each sentence once for all of
    its predicates; the rest (``predicate_hidden`` wide) read it per predicate instance.
    ``predicate_pos_dim`` > 0 (SRL, BiLSTM) embeds the predicate's coarse POS class (the data's
    ``predicate_pos``; unknown when a record has none).
    ``val_f1`` (the figure to monitor) is span F1 (without ``exclude_labels``) for BIO tags, otherwise the
    micro F1 of the tags' first ``|`` field (the punctuation mark) over tokens that carry one.
    """

    task_name = TASK_NAME
    task_title = "a token-labeling"

    def __init__(self, model: Literal["bilstm", "transformer", "pretrained"] = "bilstm", crf: bool = True,
                 word_dim: int = 100, char_dim: int = 30, char_channels: int = 50, predicate_dim: int = 16,
                 hidden: int = 200, layers: int = 2, dropout: float = 0.33, word_dropout: float = 0.0,
                 head: Literal["linear", "engine_mlp"] = "linear", head_hidden: int = 128,
                 transformer_hidden: int = 256, transformer_layers: int = 4, transformer_heads: int = 4,
                 tokenizer_vocab_size: int = 8000, pretrained_name: str | None = None, max_subwords: int = 256,
                 exclude_labels: Sequence[str] = (), lr: float = 2e-3, weight_decay: float = 0.0,
                 warmup_fraction: float = 0.05, scheduler: Literal["constant", "cosine"] = "cosine",
                 max_grad_norm: float | None = 5.0, label_smoothing: float = 0.0, shared_layers: int = 0,
                 predicate_hidden: int | None = None, predicate_pos_dim: int = 0) -> None:
        super().__init__(OptimizerConfig(lr=lr, weight_decay=weight_decay, scheduler=scheduler,
                                         warmup_fraction=warmup_fraction, max_grad_norm=max_grad_norm,
                                         no_decay_keys=NO_DECAY_KEYS))
        if model not in ("bilstm", "transformer", "pretrained"):
            raise ValueError(f"model must be 'bilstm', 'transformer' or 'pretrained', got {model!r}")
        if model == "pretrained" and not pretrained_name:
            raise ValueError("model='pretrained' needs pretrained_name (a hub name or a local directory)")
        if head == "engine_mlp" and model != "bilstm":
            raise ValueError("head='engine_mlp' is available for model='bilstm' only")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if predicate_pos_dim < 0:
            raise ValueError(f"predicate_pos_dim must be >= 0, got {predicate_pos_dim}")
        self.save_hyperparameters()
        self.vocab: LabelingVocab | None = None
        self.net: torch.nn.Module | None = None
        self.crf: CRF | None = None
        self.extra_state: dict[str, Any] = {}  # tokenizer / transformer config, saved with the checkpoint
        self._outputs: dict[str, tuple[list, list]] = {}
        self.test_report: dict[str, Any] = {}

    # -- building ---------------------------------------------------------------------------

    def build(self, vocab: LabelingVocab, has_predicates: bool, extra_state: dict[str, Any] | None = None,
              train_tokens: Sequence[Sequence[str]] = ()) -> None:
        """Create the network for ``vocab`` (fresh weights, or the shapes a checkpoint needs)."""
        h = self.hparams
        self.vocab, num_labels = vocab, len(vocab.labels)
        self.extra_state = dict(extra_state or {})
        self.extra_state.setdefault("has_predicates", has_predicates)
        has_predicates = self.extra_state["has_predicates"]
        if h.model == "bilstm":
            self.net = BiLSTMTagger(len(vocab.words), len(vocab.chars), num_labels, h.word_dim, h.char_dim,
                                    h.char_channels, h.predicate_dim if has_predicates else 0, h.hidden, h.layers,
                                    h.dropout, h.head, h.head_hidden, word_dropout=h.word_dropout,
                                    shared_layers=h.shared_layers if has_predicates else 0,
                                    predicate_hidden=h.predicate_hidden,
                                    predicate_pos_dim=h.get("predicate_pos_dim", 0) if has_predicates else 0)
        else:
            self.net = self._build_transformer(num_labels, has_predicates, train_tokens)
        self.crf = CRF(vocab.labels) if h.crf else None
        if self._trainer is not None:
            self.to(self.device)

    def _build_transformer(self, num_labels: int, has_predicates: bool, train_tokens: Sequence[Sequence[str]]
                           ) -> TransformerTagger:
        from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer, BertConfig

        from bp_apps.text.tokenization import tokenizer_from_json, tokenizer_to_json, train_tokenizer

        h, state = self.hparams, self.extra_state
        if "tokenizer" in state:  # from a checkpoint: no download, no training
            tokenizer = tokenizer_from_json(state["tokenizer"], state.get("special_tokens"))
            config = AutoConfig.for_model(**state["config"])
            model = AutoModelForTokenClassification.from_config(config)
        elif h.model == "pretrained":
            tokenizer = AutoTokenizer.from_pretrained(h.pretrained_name)
            if not tokenizer.is_fast:
                raise ValueError(f"{h.pretrained_name}: sub-word label alignment needs a fast tokenizer")
            model = AutoModelForTokenClassification.from_pretrained(h.pretrained_name, num_labels=num_labels,
                                                                    ignore_mismatched_sizes=True)
        else:
            if not train_tokens:
                raise ValueError("model='transformer' trains its tokenizer on the training words; none were given")
            tokenizer = train_tokenizer((" ".join(t) for t in train_tokens), h.tokenizer_vocab_size,
                                        cache_dir=default_cache_dir() / "tokenizers")
            config = BertConfig(vocab_size=len(tokenizer), hidden_size=h.transformer_hidden,
                                num_hidden_layers=h.transformer_layers, num_attention_heads=h.transformer_heads,
                                intermediate_size=4 * h.transformer_hidden,
                                max_position_embeddings=max(512, h.max_subwords),
                                num_labels=num_labels, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
            model = AutoModelForTokenClassification.from_config(config)
        state["tokenizer"] = tokenizer_to_json(tokenizer)
        state["special_tokens"] = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        state["config"] = model.config.to_dict()
        return TransformerTagger(model, tokenizer, h.max_subwords, mark_predicate=has_predicates)

    def setup(self, stage: str) -> None:
        """Build the network from the data module's vocabulary (unless a checkpoint already did)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "vocab"):
            if self.net is None:
                raise ValueError("TokenLabeler needs a labeling data module (with a vocabulary) or a checkpoint")
            return
        datamodule.setup(stage)
        if self.net is None:
            self.build(datamodule.vocab, datamodule.has_predicates,
                       train_tokens=[s.tokens for s in datamodule.splits["train"]])
        elif datamodule.vocab.to_dict() != self.vocab.to_dict():  # type: ignore[union-attr]
            raise ValueError("the data's vocabulary or label set differs from the model's; evaluate with the data "
                             "the model was trained on")

    # -- forward, loss, decoding ------------------------------------------------------------

    @property
    def uses_spans(self) -> bool:
        return self.vocab is not None and self.vocab.is_bio

    def forward(self, batch: dict[str, Any]) -> Tensor:
        if self.net is None:
            raise RuntimeError("the network is not built yet: call build() or fit with a labeling data module")
        return self.net(batch)

    def loss(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        if self.crf is not None:
            return self.crf.nll(emissions, tags.clamp(min=0), mask, reduction="token_mean")
        return F.cross_entropy(emissions.flatten(0, 1), tags.flatten(), ignore_index=-100,
                               label_smoothing=self.hparams.label_smoothing)

    def decode(self, emissions: Tensor, mask: Tensor) -> list[list[str]]:
        """Best valid tag sequence per sentence (CRF Viterbi, or constrained Viterbi on softmax scores)."""
        assert self.vocab is not None
        if self.crf is not None:
            paths = self.crf.decode(emissions, mask)
        else:
            paths = constrained_decode(emissions.float().log_softmax(-1), mask, self.vocab.labels)
        return [[self.vocab.labels[i] for i in path] for path in paths]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(self(batch), batch["tags"], batch["mask"])
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["tokens"]))
        return loss

    def _evaluate(self, batch: dict[str, Any], stage: str) -> Tensor:
        emissions = self(batch)
        loss = self.loss(emissions, batch["tags"], batch["mask"])
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val", batch_size=len(batch["tokens"]), sync_dist=True)
        gold, pred = self._outputs.setdefault(stage, ([], []))
        labels = self.vocab.labels  # type: ignore[union-attr]
        for row, length in zip(batch["tags"].tolist(), batch["mask"].sum(1).tolist()):
            gold.append([labels[i] for i in row[:length]])
        pred.extend(self.decode(emissions, batch["mask"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    def _scores(self, stage: str) -> dict[str, Any]:
        gold, pred = self._outputs.pop(stage, ([], []))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (gold, pred))
            gold = [s for g, _ in gathered for s in g]
            pred = [s for _, p in gathered for s in p]
        if self.uses_spans:
            return span_scores(gold, pred, exclude=tuple(self.hparams.exclude_labels))
        scores = token_scores(gold, pred, project=lambda t: t.split("|")[0])
        case = token_scores(gold, pred, project=lambda t: t.split("|")[-1], ignore=("L",))
        return {"precision": scores["micro"]["precision"], "recall": scores["micro"]["recall"],
                "f1": scores["micro"]["f1"], "accuracy": scores["accuracy"], "per_label": scores["per_label"],
                "case_f1": case["micro"]["f1"], "case_per_label": case["per_label"]}

    def _log_scores(self, stage: str) -> dict[str, Any]:
        scores = self._scores(stage)
        for key in ("precision", "recall", "f1", "accuracy", "case_f1"):
            if key in scores:
                self.log(f"{stage}_{key}", float(scores[key]), prog_bar=key == "f1")
        return scores

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        self.test_report = self._log_scores("test")
        log_dir = self.trainer.log_dir  # a broadcast: every process must ask, not only rank 0
        if self.trainer.is_global_zero and log_dir:
            path = Path(log_dir) / "label_report.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, format_report(self.test_report))

    # -- metrics.json -----------------------------------------------------------------------

    def metrics_summary(self) -> dict[str, Any]:
        """For ``metrics.json``: the label set and, after a test, the per-label report."""
        out: dict[str, Any] = {"labels": self.vocab.labels if self.vocab else []}
        if self.test_report:
            out["test_report"] = self.test_report
        return out

    # -- checkpoints ------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[STATE_KEY] = {"vocab": self.vocab.to_dict() if self.vocab else None, **self.extra_state}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse other tasks' checkpoints; build the network the checkpoint's weights need."""
        super().on_load_checkpoint(checkpoint)
        state = dict(checkpoint[STATE_KEY])
        vocab = LabelingVocab.from_dict(state.pop("vocab"))
        if self.net is None:
            self.build(vocab, state.get("has_predicates", False), state)
        elif vocab.to_dict() != self.vocab.to_dict():  # type: ignore[union-attr]
            raise ValueError("the checkpoint's vocabulary or label set differs from the data module's")


def format_report(report: dict[str, Any]) -> str:
    """Per-label precision / recall / F1 / support as a Markdown table (percentages)."""
    lines = ["| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for label, s in sorted(report.get("per_label", {}).items(), key=lambda kv: -kv[1]["support"]):
        lines.append(f"| {label} | {100 * s['precision']:.2f} | {100 * s['recall']:.2f} | {100 * s['f1']:.2f} | "
                     f"{s['support']} |")
    lines.append(f"| **all** | {100 * report['precision']:.2f} | {100 * report['recall']:.2f} | "
                 f"{100 * report['f1']:.2f} | |")
    return "\n".join(lines) + "\n"


# -- prediction -----------------------------------------------------------------------------

def load_labeler(path: str | Path) -> TokenLabeler:
    """A TokenLabeler from a checkpoint, loaded safely (``weights_only=True``), in eval mode."""
    return TokenLabeler.load(path)


_TOKEN = re.compile(r"\w+(?:['’.-]\w+)*|[^\w\s]")


def tokenize_text(text: str) -> list[str]:
    """Split raw text into words and punctuation marks (the tokenisation of the labeling corpora)."""
    return _TOKEN.findall(text)


def label_sentences(module: TokenLabeler, sentences: Sequence[TaggedSentence], batch_size: int = 64,
                    max_window: int | None = None) -> list[list[str]]:
    """Predicted tags for each sentence. Sentences longer than ``max_window`` words (by default
    half the transformer's sub-word budget; unlimited for the BiLSTM) are labelled in consecutive
    windows, with a warning."""
    assert module.vocab is not None
    if max_window is None and module.hparams.model != "bilstm":
        max_window = module.hparams.max_subwords // 2
    pieces: list[tuple[int, TaggedSentence]] = []
    for i, sentence in enumerate(sentences):
        n = len(sentence.tokens)
        if max_window is None or n <= max_window:
            pieces.append((i, replace(sentence, tags=None)))
            continue
        warnings.warn(f"{sentence.where or f'sentence {i}'}: {n} words, labelled in windows of {max_window}",
                      stacklevel=2)
        for start in range(0, n, max_window):
            p = sentence.predicate
            inside = p is not None and start <= p < start + max_window
            pieces.append((i, replace(sentence, tokens=sentence.tokens[start:start + max_window], tags=None,
                                      predicate=p - start if inside else None,
                                      predicate_pos=sentence.predicate_pos if inside else None)))
    tags: list[list[str]] = [[] for _ in sentences]
    device = next(module.parameters()).device
    with torch.no_grad():
        for start in range(0, len(pieces), batch_size):
            chunk = pieces[start:start + batch_size]
            batch = collate_sentences([s for _, s in chunk], module.vocab)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            for (i, _), path in zip(chunk, module.decode(module(batch), batch["mask"])):
                tags[i].extend(path)
    return tags


def spans_of(tokens: Sequence[str], tags: Sequence[str]) -> list[dict[str, Any]]:
    """BIO tags as spans: ``{"label", "start", "end" (exclusive), "text"}``."""
    spans: list[dict[str, Any]] = []
    for i, tag in enumerate(tags):
        if tag.startswith("B-") or (tag.startswith("I-") and (not spans or spans[-1]["end"] != i
                                                               or spans[-1]["label"] != tag[2:])):
            spans.append({"label": tag[2:], "start": i, "end": i + 1})
        elif tag.startswith("I-"):
            spans[-1]["end"] = i + 1
    for span in spans:
        span["text"] = " ".join(tokens[span["start"]:span["end"]])
    return spans


def resolve_predicate(tokens: Sequence[str], predicate: str | None) -> int | None:
    """A predicate given as a token index or as a word (its first occurrence, case-insensitive)."""
    if predicate is None:
        return None
    if predicate.lstrip("-").isdigit():
        index = int(predicate)
        if not 0 <= index < len(tokens):
            raise ValueError(f"predicate index {index} is out of range for {len(tokens)} tokens")
        return index
    lowered = [t.lower() for t in tokens]
    if predicate.lower() not in lowered:
        raise ValueError(f"predicate word {predicate!r} is not among the tokens {list(tokens)}")
    return lowered.index(predicate.lower())


def label_text(module: TokenLabeler, text: str, predicate: str | None = None, predicate_pos: str | None = None
               ) -> dict[str, Any]:
    """Tokenize ``text``, label it, and add spans (BIO models) or the restored text (punctuation models).
    ``predicate_pos`` (SRL, optional) is the predicate's POS tag, for models trained with ``predicate_pos_dim``."""
    if not text.strip():
        raise ValueError("the text is empty")
    tokens = tokenize_text(text)
    punctuation_model = not module.uses_spans
    if punctuation_model:  # the model reads lower-case words without marks
        tokens = [t.lower() for t in tokens if re.search(r"\w", t)]
        if not tokens:
            raise ValueError("the text has no words")
    index = resolve_predicate(tokens, predicate)
    if predicate_pos is not None and index is None:
        raise ValueError("--predicate-pos needs --predicate")
    if module.extra_state.get("has_predicates") and index is None:
        raise ValueError("this is a semantic role labeling model: give the predicate (--predicate INDEX|WORD)")
    sentence = make_sentence(tokens, predicate=index, where="text", predicate_pos=predicate_pos)
    tags = label_sentences(module, [sentence])[0]
    result: dict[str, Any] = {"tokens": tokens, "tags": tags}
    if index is not None:
        result["predicate"] = index
    if punctuation_model:
        from bp_apps.text.labeling.punctuation import restore_text

        result["text"] = restore_text(tokens, tags)
    else:
        result["spans"] = spans_of(tokens, tags)
    return result


def format_labeled(result: dict[str, Any]) -> str:
    """Human-readable output of :func:`label_text`: one ``token<TAB>tag`` line each, then spans or text."""
    lines = [f"{t}\t{g}" for t, g in zip(result["tokens"], result["tags"])]
    if "text" in result:
        lines.append(result["text"])
    for span in result.get("spans", []):
        lines.append(f"{span['label']}: {span['text']}")
    return "\n".join(lines)
