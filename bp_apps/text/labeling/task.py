"""The token-labeling LightningModule: semantic role labeling, punctuation restoration, NER.

The tagger (``net``, a class from :mod:`models` given by ``class_path``) gives per-word scores; the loss is a CRF's
negative log-likelihood or per-token cross-entropy, and decoding (CRF Viterbi, or Viterbi over the softmax scores)
never produces an invalid BIO sequence. An engine tagger (``EngineBiLSTMTagger``, :mod:`engine_models`) trains with
the engine's CRF (:mod:`bp_apps.engine.crf`, the same parameters) by hand-written backward. BIO label sets are
scored by spans with CoNLL conventions (``exclude_labels=[V]`` for SRL); other label sets (punctuation ``MARK|CASE``
tags) per token. The network is built from the data module's vocabulary file (``vocab_file``; and, for
``TransformerTagger``, its ``tokenizer_file``), both linked by ``bp-apps``. The vocabulary, the label set and what
the tagger needs to be rebuilt (a tokenizer, a pretrained model's config) travel in the checkpoint as plain data, so
loading needs neither those files nor pickle. A test writes ``label_report.md``, ``test_predictions.jsonl`` and the
span confusion (``span_confusion.csv`` / ``.png``, :mod:`bp_apps.text.labeling.reports`) into the run's folder.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bp_apps.core.callbacks import report_dir
from bp_apps.core.compose import network_factory
from bp_apps.core.io import atomic_write_text, write_jsonl
from bp_apps.core.reports import evaluation_order, gather_rows, running_test_loader
from bp_apps.core.task import NO_DECAY_KEYS, OptimizerConfig, TaskModule
from bp_apps.engine import Layer, SoftmaxCrossEntropy
from bp_apps.engine.crf import CRF as EngineCRF
from bp_apps.text.labeling.crf import CRF, bio_constraints, constrained_decode
from bp_apps.text.labeling.data import LabelingVocab, collate_sentences, read_vocab_file
from bp_apps.text.labeling.metrics import span_scores, token_scores
from bp_apps.text.labeling.models import BiLSTMTagger
from bp_apps.text.labeling.records import TaggedSentence, make_sentence
from bp_apps.text.labeling.reports import span_confusion

__all__ = ["DEFAULT_OPTIM", "TASK_NAME", "TokenLabeler", "label_sentences", "label_text", "labeled_result",
           "load_labeler", "spans_of", "text_sentence", "tokenize_text"]

TASK_NAME, STATE_KEY = "text.TokenLabeler", "bp_apps_labeling"
DEFAULT_OPTIM = OptimizerConfig(lr=2e-3, weight_decay=0.0, scheduler="cosine", warmup_fraction=0.05,
                                max_grad_norm=5.0, no_decay_keys=NO_DECAY_KEYS)
"""The labeler's optimizer settings when a config gives none (a config's ``optim`` mapping overrides fields)."""


class TokenLabeler(TaskModule):
    """Token labeling with a tagger network and an optional CRF.

    ``net`` is the tagger's class with its settings (``class_path`` / ``init_args`` in a config;
    :class:`~bp_apps.text.labeling.models.BiLSTMTagger` by default, or ``TransformerTagger``, ``PretrainedTagger``);
    the labeler calls it as ``net(num_words, num_chars, num_labels, predicates)`` with the sizes of the vocabulary
    file (``vocab_file``, the data module's; ``bp-apps`` links it). A ``TransformerTagger`` also gets the tokenizer
    of ``tokenizer_file`` (the data module builds one when given ``tokenizer_vocab_size``). The network is built in
    ``setup``, when the files exist, or from the checkpoint when loading. ``optim`` is the
    :class:`~bp_apps.core.task.OptimizerConfig` group (defaults: :data:`DEFAULT_OPTIM`).
    ``val_f1`` (the figure to monitor) is span F1 (without ``exclude_labels``) for BIO tags, otherwise the
    micro F1 of the tags' first ``|`` field (the punctuation mark) over tokens that carry one.
    """

    task_name = TASK_NAME
    task_title = "a token-labeling"
    default_optim = DEFAULT_OPTIM

    def __init__(self, net: Callable[[int, int, int, bool], nn.Module] = BiLSTMTagger, crf: bool = True,
                 optim: OptimizerConfig = DEFAULT_OPTIM, label_smoothing: float = 0.0,
                 exclude_labels: Sequence[str] = (), vocab_file: str | None = None,
                 tokenizer_file: str | None = None) -> None:
        super().__init__(optim)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if label_smoothing and crf:
            raise ValueError("label_smoothing applies to the per-token cross-entropy: set crf=false to use it")
        self.net_factory = network_factory(net, "net")
        self.save_hyperparameters()
        self.vocab: LabelingVocab | None = None
        self.has_predicates = False
        self.net: nn.Module | None = None
        self.crf: CRF | EngineCRF | None = None  # the engine's CRF for an engine network
        self.net_state: dict[str, Any] = {}  # what rebuilds the network (tokenizer, config), saved with the checkpoint
        self._outputs: dict[str, tuple[list, list]] = {}
        self.test_report: dict[str, Any] = {}

    # -- building ---------------------------------------------------------------------------

    def build(self, vocab: LabelingVocab, has_predicates: bool, net_state: dict[str, Any] | None = None) -> None:
        """Create the network for ``vocab`` (fresh weights, or the shapes a checkpoint needs). ``net_state`` is
        passed to the network class as keyword arguments (a tokenizer's JSON, a pretrained model's config)."""
        net_state = dict(net_state or {})
        if net_state:
            accepted = inspect.signature(self.net_factory).parameters
            extra = sorted(set(net_state) - set(accepted))
            if extra and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
                name = getattr(self.net_factory, "func", self.net_factory)
                raise ValueError(f"net: {getattr(name, '__name__', name)} takes no {', '.join(extra)}; a tokenizer "
                                 "file is for TransformerTagger (drop the data's tokenizer_vocab_size otherwise)")
        self.vocab, self.has_predicates = vocab, bool(has_predicates)
        self.net = self.net_factory(len(vocab.words), len(vocab.chars), len(vocab.labels), self.has_predicates,
                                    **net_state)
        build_state = getattr(self.net, "build_state", None)
        self.net_state = build_state() if callable(build_state) else {}
        self.crf = None
        if self.hparams.crf:  # an engine network trains with the engine's CRF (same parameters as the text CRF)
            labels = vocab.labels
            self.crf = EngineCRF(len(labels), *bio_constraints(labels)) if self.engine else CRF(labels)
        if self._trainer is not None:
            self.to(self.device)

    def setup(self, stage: str) -> None:
        """Build the network from the vocabulary file (and tokenizer file), unless a checkpoint already did."""
        if self.net is None:
            h = self.hparams
            if not h.vocab_file:
                raise ValueError("TokenLabeler needs vocab_file: the labeling data module's vocab_file (bp-apps "
                                 "links it; by hand: TokenLabeler(vocab_file=data.vocab_file)), or a checkpoint")
            vocab, has_predicates = read_vocab_file(h.vocab_file)
            net_state = {}
            if h.tokenizer_file:
                path = Path(h.tokenizer_file)
                if not path.is_file():
                    raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist: the labeling data module "
                                            "builds it in prepare_data when given tokenizer_vocab_size")
                net_state["tokenizer"] = path.read_text(encoding="utf-8")
            self.build(vocab, has_predicates, net_state)
        super().setup(stage)

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

    def autograd_loss(self, batch: dict[str, Any]) -> Tensor:
        return self.loss(self(batch), batch["tags"], batch["mask"])

    def engine_backward(self, batch: dict[str, Any]) -> Tensor:
        """Forward, the engine CRF's loss (or per-token cross-entropy) and the hand-written backward."""
        assert self.net is not None
        emissions = self.net.forward(batch)
        if self.crf is not None:
            loss = self.crf.forward(emissions, batch["tags"].clamp(min=0), batch["mask"], reduction="token_mean")
            grad = self.crf.backward()
        else:
            criterion = SoftmaxCrossEntropy(label_smoothing=self.hparams.label_smoothing, ignore_index=-100)
            loss = criterion.forward(emissions, batch["tags"])
            grad = criterion.backward()
        self.net.backward(grad)
        return loss

    def engine_layers(self) -> dict[str, Layer]:
        """The network and, with ``crf``, the engine CRF beside it."""
        return {"net": self.net, **({"crf": self.crf} if self.crf is not None else {})}

    def autograd_copy(self) -> TokenLabeler:
        """The autograd twin of an engine labeler: ``net.to_autograd()`` and the text CRF with the same weights."""
        twin = super().autograd_copy()
        if self.crf is not None:
            assert self.vocab is not None
            twin.crf = CRF(self.vocab.labels).to(device=self.crf.transitions.device, dtype=self.crf.transitions.dtype)
            twin.crf.load_state_dict(self.crf.state_dict())
        return twin

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.backend_training_step(batch)
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

    def on_test_epoch_start(self) -> None:
        loader = running_test_loader(self.trainer)
        self._test_order = evaluation_order(loader)
        self._test_sentences = getattr(loader, "dataset", None)
        self._test_rows: list[dict[str, Any]] = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self._evaluate(batch, "test")
        gold, pred = self._outputs["test"]
        size = len(batch["tokens"])
        order = self._test_order
        indices = order[batch_idx] if order is not None and batch_idx < len(order) else []
        if len(indices) != size:
            indices = [None] * size
        for index, tokens, predicate, gold_tags, predicted in zip(indices, batch["tokens"], batch["predicates"],
                                                                  gold[-size:], pred[-size:]):
            row: dict[str, Any] = {}
            if index is not None:
                row["sentence"] = index
                sentence = self._sentence(index)
                if sentence is not None and sentence.id is not None:
                    row["id"] = sentence.id
            row["tokens"] = list(tokens)
            if predicate is not None:
                row["predicate"] = predicate
            row.update(gold=list(gold_tags), predicted=list(predicted))
            self._test_rows.append(row)
        return loss

    def _sentence(self, index: int) -> TaggedSentence | None:
        sentences = getattr(self, "_test_sentences", None)
        try:
            sentence = sentences[index] if sentences is not None else None
        except (IndexError, TypeError, KeyError):
            return None
        return sentence if isinstance(sentence, TaggedSentence) else None

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
        """Log the test scores and write ``label_report.md``, ``test_predictions.jsonl`` (one line per sentence, in
        the order of the test file when the loader's order is known: tokens, gold and predicted tags) and the span
        confusion. Under several processes the rows of every shard are gathered first."""
        self.test_report = self._log_scores("test")
        folder = report_dir(self.trainer)  # None without a logger: no report, never into the current folder
        if folder is None:
            return
        rows = gather_rows(getattr(self, "_test_rows", []))
        if all("sentence" in row for row in rows):
            rows.sort(key=lambda row: row["sentence"])
        if self.trainer.is_global_zero:
            path = folder / "label_report.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, format_report(self.test_report))
            path = write_jsonl(folder / "test_predictions.jsonl", rows)
            print(f"test predictions written to {path}")
            confusion = span_confusion([row["gold"] for row in rows], [row["predicted"] for row in rows],
                                       bio=self.uses_spans, exclude=tuple(self.hparams.exclude_labels))
            csv_path, _ = confusion.write(folder / "span_confusion.csv", folder / "span_confusion.png")
            print(f"span confusion written to {csv_path} and .png")

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
        checkpoint[STATE_KEY] = {"vocab": self.vocab.to_dict() if self.vocab else None,
                                 "has_predicates": self.has_predicates, "net_state": self.net_state}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse other tasks' checkpoints; build the network the checkpoint's weights need."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(STATE_KEY) or {}
        if not state.get("vocab") or "net_state" not in state:
            raise ValueError("the checkpoint has no labeling vocabulary in the layout of this version (field "
                             f"{STATE_KEY!r}); it was written by an earlier bp_apps: retrain")
        vocab = LabelingVocab.from_dict(state["vocab"])
        if self.net is None:
            self.build(vocab, state.get("has_predicates", False), state["net_state"])
        elif vocab.to_dict() != self.vocab.to_dict():  # type: ignore[union-attr]
            raise ValueError("the checkpoint's vocabulary or label set differs from the data's (vocab_file); use "
                             "the data settings it was trained with")


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
    if max_window is None and getattr(module.net, "max_subwords", None):
        max_window = module.net.max_subwords // 2  # type: ignore[union-attr]
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
    sentence = text_sentence(module, text, predicate, predicate_pos)
    return labeled_result(module, sentence, label_sentences(module, [sentence])[0])


def text_sentence(module: TokenLabeler, text: str, predicate: str | None = None, predicate_pos: str | None = None
                  ) -> TaggedSentence:
    """The sentence :func:`label_text` labels for ``text``: its tokens (lower-cased words without marks for a
    punctuation model) and the predicate, checked (a ValueError says what is missing or wrong)."""
    if not text.strip():
        raise ValueError("the text is empty")
    tokens = tokenize_text(text)
    if not module.uses_spans:  # a punctuation model reads lower-case words without marks
        tokens = [t.lower() for t in tokens if re.search(r"\w", t)]
        if not tokens:
            raise ValueError("the text has no words")
    index = resolve_predicate(tokens, predicate)
    if predicate_pos is not None and index is None:
        raise ValueError("--predicate-pos needs --predicate")
    if module.has_predicates and index is None:
        raise ValueError("this is a semantic role labeling model: give the predicate (--predicate INDEX|WORD)")
    return make_sentence(tokens, predicate=index, where="text", predicate_pos=predicate_pos)


def labeled_result(module: TokenLabeler, sentence: TaggedSentence, tags: Sequence[str]) -> dict[str, Any]:
    """What :func:`label_text` returns for a sentence of :func:`text_sentence` and its predicted ``tags``."""
    tokens, tags = list(sentence.tokens), list(tags)
    result: dict[str, Any] = {"tokens": tokens, "tags": tags}
    if sentence.predicate is not None:
        result["predicate"] = sentence.predicate
    if not module.uses_spans:
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
