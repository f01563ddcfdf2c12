"""A summarizer as a Hugging Face folder that decodes as the suite does, without the suite.

``save_pretrained`` alone carries the weights but not how the Summarizer decodes: loaded elsewhere, ``generate()``
falls back to greedy search with no repetition guard and repeats itself. An export therefore holds

- the model and tokenizer (``save_pretrained``; the tokenizer truncates at the training source length and returns
  only the inputs the model takes, so ``model.generate(**tokenizer(texts, ...))`` works as it stands);
- ``generation_config.json`` with the module's beam-search settings (beams, length and repetition penalties,
  no-repeat n-grams, min/max new tokens) and the decoder's start, end and forced-end tokens, so a plain
  ``generate()`` returns the tokens ``bp-apps summarize`` returns with MBR off;
- for the copy-mechanism BART, ``modeling_bp_bart_copy.py`` (the code of :mod:`~bp_apps.text.summarization.copy`,
  which imports only torch and transformers) and an ``auto_map`` in ``config.json``, so
  ``AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True)`` loads it where bp_apps is absent;
- a model card (``README.md``, :mod:`bp_apps.core.model_card`) that says MBR decoding is a suite setting.

:func:`export_hugging_face` exports a checkpoint; :class:`~bp_apps.text.summarization.task.HFBestExport` writes
``hf_best/`` next to the best checkpoint with :func:`write_summarizer_export`.
"""

from __future__ import annotations

import ast
import copy
import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import GenerationConfig

from bp_apps.core.io import atomic_write_text, load_checkpoint_dict
from bp_apps.core.model_card import ModelCard, checkpoint_data, run_metrics, staged_export, write_model_card
from bp_apps.text.summarization import copy as copy_module
from bp_apps.text.summarization.copy import BartCopyConfig

if TYPE_CHECKING:
    from bp_apps.text.summarization.task import Summarizer

__all__ = ["REMOTE_MODULE", "export_hugging_face", "generation_config", "remote_code", "write_summarizer_export"]

REMOTE_MODULE = "modeling_bp_bart_copy"
"""The file (without ``.py``) an export of the copy BART carries as remote code."""


def generation_config(module: Summarizer) -> GenerationConfig:
    """The model's generation config with the Summarizer's beam-search settings: what ``generate()`` reads when
    called without arguments. MBR settings are not generation settings and are left out."""
    if module.model is None:
        raise RuntimeError("the summarizer's network is not built: load a checkpoint first")
    config = copy.deepcopy(module.model.generation_config)
    settings = module.generation_kwargs()
    config.update(**settings)
    if "length_penalty" not in settings:  # greedy: the suite passes none, generate() then uses the default
        config.length_penalty = GenerationConfig().length_penalty
    config.num_return_sequences = 1
    config.do_sample = False
    config._from_model_config = False  # True would let generate() prefer settings found in the model config
    return config


def remote_code() -> str:
    """The text of ``modeling_bp_bart_copy.py``: :mod:`~bp_apps.text.summarization.copy` up to its
    ``REMOTE_CODE_END`` marker (the classes, without registering them), after a header saying where it comes from.
    Checked to import nothing but the standard library, torch and transformers."""
    source = inspect.getsource(copy_module)
    end = source.find(copy_module.REMOTE_CODE_END)
    if end < 0:
        raise RuntimeError(f"{copy_module.__file__} has lost its {copy_module.REMOTE_CODE_END!r} marker")
    body = source[:end].rstrip() + "\n"
    for node in ast.walk(ast.parse(body)):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or "."] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            if name.split(".")[0] not in ("__future__", "math", "typing", "torch", "transformers"):
                raise RuntimeError(f"the copy model's remote code would import {name}: keep copy.py self-contained")
    header = ("# Remote code of a bp-apps export: the pointer-generator BART of bp_apps/text/summarization/copy.py.\n"
              "# Self-contained (torch and transformers only): load with trust_remote_code=True.\n")
    return header + body


def _auto_map() -> dict[str, str]:
    return {"AutoConfig": f"{REMOTE_MODULE}.BartCopyConfig",
            "AutoModelForSeq2SeqLM": f"{REMOTE_MODULE}.BartCopyForConditionalGeneration"}


def _export_tokenizer(module: Summarizer) -> Any:
    """A copy of the module's tokenizer that truncates at the training source length and gives only the inputs an
    encoder-decoder takes (no ``token_type_ids``)."""
    tokenizer = copy.deepcopy(module.tokenizer)
    tokenizer.model_max_length = module.max_source_tokens
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer


def _card(module: Summarizer, checkpoint: Path | None, copying: bool, data: tuple[list[str], str]) -> ModelCard:
    metrics, source = run_metrics(checkpoint) if checkpoint is not None else ({}, "")
    settings = module.generation_settings()
    net = (module.hparams.get("net") or {}) if isinstance(module.hparams.get("net"), dict) else {}
    kind = str(net.get("class_path", type(module.net).__name__)).rsplit(".", 1)[-1]
    remote = ", trust_remote_code=True" if copying else ""
    usage = (f"from transformers import AutoModelForSeq2SeqLM, AutoTokenizer\n\n"
             f"tokenizer = AutoTokenizer.from_pretrained(folder{remote})\n"
             f"model = AutoModelForSeq2SeqLM.from_pretrained(folder{remote}).eval()\n"
             f"inputs = tokenizer(texts, truncation=True, padding=True, return_tensors=\"pt\")\n"
             f"ids = model.generate(**inputs)  # the settings of generation_config.json\n"
             f"summaries = [s.strip() for s in tokenizer.batch_decode(ids, skip_special_tokens=True)]")
    notes = [f"Decoding: beam search with {settings.num_beams} beam(s), length penalty {settings.length_penalty}, "
             f"no repeated {settings.no_repeat_ngram_size}-grams (0: allowed), repetition penalty "
             f"{settings.repetition_penalty}, {settings.min_new_tokens} to {settings.max_new_tokens} new tokens, "
             "all in `generation_config.json`. MBR decoding is a bp-apps setting, not part of generation_config"
             + (f" (this model was evaluated with mbr_samples={settings.mbr_samples}: plain `generate()` gives its "
                "beam-search output instead)" if settings.mbr_samples else "") + "."]
    if copying:
        notes.append(f"The copy mechanism (a pointer-generator over the source tokens) is custom code: "
                     f"`{REMOTE_MODULE}.py` in this folder, which needs only torch and transformers.")
    return ModelCard(
        title=f"bp-apps summarizer ({kind})",
        summary=(f"An abstractive summarizer ({kind}: a {module.model.config.model_type} encoder-decoder) trained with "
                 "bp-apps: teacher forcing with label-smoothed cross-entropy, evaluated by ROUGE on generated "
                 "summaries."),
        pipeline_tag="summarization", tags=["summarization", module.model.config.model_type],
        datasets=data[0], data=data[1], metrics=metrics, metrics_source=source,
        intended_use=("Summarizing texts like the training data (e-mails, dialogues) for research and teaching. "
                      "Summaries are machine-written and can be wrong: check them before relying on them."),
        limitations=[f"Sources longer than {module.max_source_tokens} tokens are truncated (the training length).",
                     "Trained on one English corpus: other domains and languages summarize poorly.",
                     "Small models trained from scratch copy phrases and may state facts the source does not."],
        usage=usage, notes=notes)


def write_summarizer_export(module: Summarizer, out: str | Path, *, checkpoint: str | Path | None = None,
                            raw_checkpoint: dict[str, Any] | None = None, replace_any: bool = False) -> Path:
    """Write the export of a built Summarizer into ``out`` (staged and renamed, :func:`~bp_apps.core.model_card.
    staged_export`; ``replace_any`` for ``hf_best``, which the suite owns). ``checkpoint`` (and its loaded dict)
    give the card its figures and data."""
    from transformers.utils import logging as hf_logging

    if module.model is None or module.tokenizer is None:
        raise RuntimeError("the summarizer's network is not built: load a checkpoint first")
    checkpoint = Path(checkpoint) if checkpoint else None
    copying = isinstance(module.model.config, BartCopyConfig)
    marker = {"format": "hf", "task": module.task_name, "checkpoint": str(checkpoint) if checkpoint else None,
              "remote_code": f"{REMOTE_MODULE}.py" if copying else None}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the training log at every new best
    try:
        with staged_export(out, marker, replace_any=replace_any) as folder:
            module.model.save_pretrained(folder)
            _export_tokenizer(module).save_pretrained(folder)
            generation_config(module).save_pretrained(folder)
            if copying:
                atomic_write_text(folder / f"{REMOTE_MODULE}.py", remote_code())
                config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
                config["auto_map"] = _auto_map()
                atomic_write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
            write_model_card(folder, _card(module, checkpoint, copying, checkpoint_data(raw_checkpoint)))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return Path(out)


def export_hugging_face(checkpoint: str | Path, out: str | Path) -> Path:
    """Export a summarization checkpoint (loaded safely, :func:`~bp_apps.text.summarization.task.load_summarizer`)
    as a Hugging Face folder ``out``: weights, tokenizer, ``generation_config.json``, remote code for the copy
    BART, and a model card. ``out`` must be new, empty, or an earlier export (which is replaced)."""
    from bp_apps.text.summarization.task import load_summarizer

    module = load_summarizer(checkpoint)
    return write_summarizer_export(module, out, checkpoint=checkpoint, raw_checkpoint=load_checkpoint_dict(checkpoint))
