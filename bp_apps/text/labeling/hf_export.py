"""A transformer tagger as a Hugging Face token-classification folder that tags words as the suite does.

The tagger's network is a standard ``*ForTokenClassification`` model: saved with ``id2label`` / ``label2id``, it
loads with ``AutoModelForTokenClassification.from_pretrained(folder)`` and no custom code, and its logits are the
suite's sub-word scores. The suite's *tags* need two more steps the standard class does not take: each word is
scored at its first sub-word (the predicate's sub-words carry token type 1 for semantic role labeling), and the tag
sequence is decoded by Viterbi, under the CRF's learned transitions or, without a CRF, over the log-softmax with the
BIO constraints (``I-X`` only after ``B-X``/``I-X``). Per-sub-word argmax, which a token-classification pipeline
does, can differ from that.

So the export also writes ``modeling_bp_tagger.py``: a subclass of the same transformers class adding
``tag_words(tokenizer, sentences, predicates=None)``, registered in ``config.json``'s ``auto_map``. With
``trust_remote_code=True`` the Auto class loads it and ``tag_words`` returns the tags ``bp-apps label`` gives for
already tokenised words. The decoding scores travel in ``config.json`` (``bp_apps_decoding``); the Viterbi code is
the suite's own (:func:`~bp_apps.text.labeling.crf.viterbi_decode`, copied into the file), and the file imports
only torch and transformers.

The BiLSTM tagger is not a transformers model and is refused here (export it as ONNX).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers

from bp_apps.core.io import atomic_write_text, load_checkpoint_dict
from bp_apps.core.model_card import ModelCard, checkpoint_data, run_metrics, staged_export, write_model_card
from bp_apps.text.labeling import crf as crf_module
from bp_apps.text.labeling.crf import _constraint_scores
from bp_apps.text.labeling.models import SubwordTagger

if TYPE_CHECKING:
    from bp_apps.text.labeling.task import TokenLabeler

__all__ = ["DECODING_KEY", "REMOTE_MODULE", "decoding_settings", "export_hugging_face", "remote_code",
           "write_labeler_export"]

REMOTE_MODULE = "modeling_bp_tagger"
REMOTE_CLASS = "BpTaggerForTokenClassification"
DECODING_KEY = "bp_apps_decoding"
"""The ``config.json`` entry holding how tags are decoded (see :func:`decoding_settings`)."""

_REMOTE_TEMPLATE = '''# Remote code of a bp-apps export: tags words as bp-apps does (first sub-word scores, Viterbi).
# Self-contained (torch and transformers only): load with trust_remote_code=True.
"""Word tagging of a bp-apps export: ``{cls}`` is
``{base}`` with :meth:`tag_words`.

Decoding settings come from ``config.{key}``: ``scores`` is ``"emissions"`` (a CRF: Viterbi on the raw scores
with its ``transitions``, ``start`` and ``end`` scores) or ``"log_softmax"`` (Viterbi on log-probabilities with
only the BIO constraints); ``null`` in those tables forbids a move. ``max_subwords`` bounds a window's sub-words,
``max_window`` its words; ``mark_predicate`` gives the predicate's sub-words token type 1.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import {base} as _Base


{viterbi}

def _table(values) -> Tensor:
    """A score table of the config (None: a forbidden move) as a float32 tensor with -inf."""
    def number(value):
        return -float("inf") if value is None else float(value)

    return torch.tensor([[number(v) for v in row] if isinstance(row, list) else number(row) for row in values],
                        dtype=torch.float32)


class {cls}(_Base):
    """{base} that tags whole words: :meth:`tag_words`."""

    @torch.no_grad()
    def tag_words(self, tokenizer, sentences, predicates=None, batch_size: int = 64) -> list[list[str]]:
        """One tag per word of each sentence (a list of words; ``predicates``: each sentence's predicate index
        for semantic role labeling, else None). Long sentences are tagged in windows of ``max_window`` words."""
        settings = self.config.{key}
        labels = [self.config.id2label[i] for i in range(len(self.config.id2label))]
        window = settings["max_window"]
        predicates = list(predicates) if predicates is not None else [None] * len(sentences)
        pieces = []
        for i, (words, predicate) in enumerate(zip(sentences, predicates)):
            words = list(words)
            if not words:
                raise ValueError(f"sentence {{i}} has no words")
            for start in range(0, len(words), window or len(words)):
                end = start + (window or len(words))
                inside = predicate is not None and start <= predicate < end
                pieces.append((i, words[start:end], predicate - start if inside else None))
        transitions, start_scores, end_scores = (_table(settings[k]) for k in ("transitions", "start", "end"))
        tags = [[] for _ in sentences]
        device = next(self.parameters()).device
        for first_piece in range(0, len(pieces), batch_size):
            chunk = pieces[first_piece:first_piece + batch_size]
            scores, mask = self._word_scores(tokenizer, [w for _, w, _ in chunk], [p for *_, p in chunk], settings,
                                             device)
            if settings["scores"] == "log_softmax":
                scores = scores.float().log_softmax(-1)
            dtype = scores.dtype
            paths = viterbi_decode(scores, mask, transitions.to(device, dtype), start_scores.to(device, dtype),
                                   end_scores.to(device, dtype))
            for (i, _, _), path in zip(chunk, paths):
                tags[i].extend(labels[k] for k in path)
        return tags

    def _word_scores(self, tokenizer, words, predicates, settings, device) -> tuple[Tensor, Tensor]:
        """Scores [B, T, L] at each word's first sub-word (0 for words cut off) and the word mask [B, T]."""
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=settings["max_subwords"],
                        padding=True, return_tensors="pt")
        length = max(len(w) for w in words)
        first = torch.full((len(words), length), -1, dtype=torch.long)
        type_ids = torch.zeros_like(enc["input_ids"])
        for i in range(len(words)):
            for pos, word in enumerate(enc.word_ids(i)):
                if word is None:
                    continue
                if first[i, word] < 0:
                    first[i, word] = pos
                if settings["mark_predicate"] and word == predicates[i]:
                    type_ids[i, pos] = 1
        inputs = {{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}}
        if getattr(self.config, "type_vocab_size", 0) >= 2:
            inputs["token_type_ids"] = type_ids
        logits = self(**{{k: v.to(device) for k, v in inputs.items()}}).logits
        first = first.to(device)
        gathered = logits.gather(1, first.clamp(min=0).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        mask = torch.arange(length, device=device)[None] < torch.tensor([len(w) for w in words], device=device)[:, None]
        return gathered.masked_fill((first < 0).unsqueeze(-1), 0.0), mask
'''


def remote_code(base: str) -> str:
    """The text of ``modeling_bp_tagger.py`` for a model of the transformers class ``base``: the suite's Viterbi
    (:func:`~bp_apps.text.labeling.crf.viterbi_decode` and its mask check, copied from their source) and the
    word-tagging subclass."""
    viterbi = "\n\n".join(inspect.getsource(f) for f in (crf_module.check_mask, crf_module.viterbi_decode))
    return _REMOTE_TEMPLATE.format(cls=REMOTE_CLASS, base=base, key=DECODING_KEY, viterbi=viterbi)


def _json_table(tensor: torch.Tensor) -> list[Any]:
    """A float tensor as nested lists, ``-inf`` (a forbidden move) as None (JSON has no infinity)."""
    values = tensor.detach().float().cpu().tolist()
    if tensor.dim() == 1:
        return [None if math.isinf(v) else v for v in values]
    return [[None if math.isinf(v) else v for v in row] for row in values]


def decoding_settings(module: TokenLabeler) -> dict[str, Any]:
    """How ``module`` turns sub-word scores into tags, as plain data: the transition, start and end scores Viterbi
    uses (the CRF's with its forbidden moves, or zeros with the BIO constraints), which scores it reads, and the
    windowing of :func:`~bp_apps.text.labeling.task.label_sentences`."""
    net = module.net
    if not isinstance(net, SubwordTagger) or module.vocab is None:
        raise ValueError("only a transformer tagger's network can be exported")
    if module.crf is not None:
        crf = module.crf
        transitions = crf.transitions.detach().float().masked_fill(~crf.allowed, float("-inf"))
        start = crf.start.detach().float().masked_fill(~crf.start_allowed, float("-inf"))
        end = crf.end.detach().float().masked_fill(~crf.end_allowed, float("-inf"))
        scores = "emissions"
    else:
        transitions, start, end = _constraint_scores(module.vocab.labels, torch.float32, "cpu")
        scores = "log_softmax"
    return {"scores": scores, "transitions": _json_table(transitions), "start": _json_table(start),
            "end": _json_table(end), "max_subwords": net.max_subwords, "max_window": net.max_subwords // 2,
            "mark_predicate": bool(net.mark_predicate)}


def _refuse(module: TokenLabeler) -> SubwordTagger:
    net = module.net
    if not isinstance(net, SubwordTagger):
        raise ValueError(f"the {type(net).__name__} is not a transformers model and has no Hugging Face form: export "
                         "it with --format onnx, or train a TransformerTagger / PretrainedTagger")
    return net


def _card(module: TokenLabeler, net: SubwordTagger, checkpoint: Path | None, data: tuple[list[str], str],
          remote: bool) -> ModelCard:
    metrics, source = run_metrics(checkpoint) if checkpoint is not None else ({}, "")
    labels = module.vocab.labels if module.vocab else []
    kind = ("semantic role labeling" if module.has_predicates else
            "named entities / BIO spans" if module.uses_spans else "punctuation and case restoration")
    decoding = "a CRF (Viterbi)" if module.crf is not None else "BIO-constrained Viterbi over the softmax"
    usage = ("from transformers import AutoModelForTokenClassification, AutoTokenizer\n\n"
             "tokenizer = AutoTokenizer.from_pretrained(folder)\n"
             "model = AutoModelForTokenClassification.from_pretrained(folder, trust_remote_code=True).eval()\n"
             "tags = model.tag_words(tokenizer, [[\"The\", \"cat\", \"sat\"]]"
             + (", predicates=[2])" if module.has_predicates else ")")
             + "  # one tag per word, as bp-apps label gives\n"
             "# without trust_remote_code: the plain token-classification model (sub-word logits, config.id2label)")
    notes = [f"Tags are decoded with {decoding}; the scores it needs are `{DECODING_KEY}` in `config.json` and the "
             f"code is `{REMOTE_MODULE}.py` in this folder (torch and transformers only). The plain class's "
             "per-sub-word argmax (a token-classification pipeline) ignores them and can give other tags."]
    if not remote:
        notes = [f"Tags are decoded with {decoding}: the scores are `{DECODING_KEY}` in `config.json`."]
    if module.has_predicates:
        notes.append("Semantic role labeling: each call tags one predicate's arguments; its sub-words carry token "
                     "type 1.")
    return ModelCard(
        title=f"bp-apps tagger ({kind})",
        summary=(f"A {net.model.config.model_type} token classifier trained with bp-apps for {kind}, scoring each "
                 f"word at its first sub-word; {len(labels)} labels: " + ", ".join(f"`{t}`" for t in labels[:40])
                 + (" ..." if len(labels) > 40 else "") + "."),
        pipeline_tag="token-classification", tags=["token-classification", net.model.config.model_type],
        datasets=data[0], data=data[1], metrics=metrics, metrics_source=source,
        intended_use=(f"Tagging tokenised English sentences like the training data ({kind}) for research and "
                      "teaching."),
        limitations=["Input is a list of words tokenised as the training corpus was (bp-apps splits raw text into "
                     "words and punctuation; punctuation models read lower-case words without marks).",
                     f"Sentences over {net.max_subwords // 2} words are tagged in windows of that many words.",
                     "Trained on one corpus: accuracy drops on other domains."],
        usage=usage, notes=notes)


def write_labeler_export(module: TokenLabeler, out: str | Path, *, checkpoint: str | Path | None = None,
                         raw_checkpoint: dict[str, Any] | None = None) -> Path:
    """Write the export of a TokenLabeler with a transformer tagger into ``out`` (staged and renamed; a non-empty
    ``out`` that is not an earlier export is refused). A BiLSTM tagger is refused with a ValueError."""
    net = _refuse(module)
    from transformers.utils import logging as hf_logging

    assert module.vocab is not None
    labels = list(module.vocab.labels)
    base = type(net.model).__name__
    remote = getattr(transformers, base, None) is type(net.model)  # the subclass needs a public transformers class
    checkpoint = Path(checkpoint) if checkpoint else None
    marker = {"format": "hf", "task": module.task_name, "checkpoint": str(checkpoint) if checkpoint else None,
              "remote_code": f"{REMOTE_MODULE}.py" if remote else None}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with staged_export(out, marker) as folder:
            net.model.save_pretrained(folder)
            net.tokenizer.save_pretrained(folder)
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            config["id2label"] = {str(i): label for i, label in enumerate(labels)}
            config["label2id"] = {label: i for i, label in enumerate(labels)}
            config[DECODING_KEY] = decoding_settings(module)
            if remote:
                config["auto_map"] = {"AutoModelForTokenClassification": f"{REMOTE_MODULE}.{REMOTE_CLASS}"}
                atomic_write_text(folder / f"{REMOTE_MODULE}.py", remote_code(base))
            atomic_write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
            write_model_card(folder, _card(module, net, checkpoint, checkpoint_data(raw_checkpoint), remote))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return Path(out)


def export_hugging_face(checkpoint: str | Path, out: str | Path) -> Path:
    """Export a token-labeling checkpoint with a transformer tagger (loaded safely,
    :func:`~bp_apps.text.labeling.task.load_labeler`) as a Hugging Face folder ``out``: the token-classification
    model with ``id2label``, its tokenizer, the decoding settings and remote code for word tagging, and a model
    card. A BiLSTM tagger's checkpoint is refused (it is not a transformers model)."""
    from bp_apps.text.labeling.task import load_labeler

    module = load_labeler(checkpoint)
    _refuse(module)
    return write_labeler_export(module, out, checkpoint=checkpoint, raw_checkpoint=load_checkpoint_dict(checkpoint))
