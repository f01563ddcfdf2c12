"""The summarization LightningModule: a sequence-to-sequence model trained with teacher forcing and a
label-smoothed cross-entropy, evaluated by beam-search (or minimum Bayes risk) generation and ROUGE.

The network (:mod:`models`) is a T5 or BART built from the sizes here with the data module's tokenizer, or a
pretrained model (``pretrained_name``) whose tokenizer then replaces the data module's. The tokenizer (as JSON)
and the model config travel in the checkpoint as plain data, so loading needs neither a download nor pickle;
next to the best checkpoint, ``hf_best/`` holds the same model in ``save_pretrained`` form.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bp_apps.core.callbacks import best_checkpoint_callback
from bp_apps.core.io import atomic_write_text
from bp_apps.core.task import NO_DECAY_KEYS, OptimizerConfig, TaskModule
from bp_apps.text.summarization.mbr import mbr_select
from bp_apps.text.summarization.rouge import rouge_scores

__all__ = ["TASK_NAME", "HFBestExport", "Summarizer", "export_pretrained", "load_summarizer", "summarize"]

TASK_NAME, STATE_KEY = "text.Summarizer", "bp_apps_summarization"
DEFAULT_MAX_SOURCE_TOKENS = 512
NOT_BUILT = "the network is not built yet: fit with a summarization data module or load a checkpoint"
MBR_SEED = 0  # the sampling seed of MBR decoding (the global random state is left as it was)
MBR_KEYS = ("mbr_samples", "mbr_epsilon")


def check_mbr_settings(samples: int, epsilon: float) -> None:
    """Refuse MBR settings generation cannot use."""
    if samples < 0:
        raise ValueError(f"mbr_samples must be >= 0 (0: beam search alone), got {samples}")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"mbr_epsilon must be in [0, 1) (0: no cutoff), got {epsilon}")


def export_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> Path:
    """Write ``model`` and ``tokenizer`` with ``save_pretrained`` into a temporary sibling folder, then rename it
    to ``directory`` (replacing an older export), so readers never see a half-written directory."""
    from transformers.utils import logging as hf_logging

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the training log at every new best
    try:
        model.save_pretrained(fresh)
        tokenizer.save_pretrained(fresh)
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old / directory.name)
        os.replace(fresh, directory)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return directory


class HFBestExport(L.Callback):
    """Keep ``<checkpoint dir>/hf_best/`` (``model.save_pretrained`` + ``tokenizer.save_pretrained``) in step with
    the best checkpoint (:func:`~bp_apps.core.callbacks.best_checkpoint_callback`'s): exported whenever a new best
    checkpoint is saved, or at the end of a fit without one."""

    def __init__(self) -> None:
        self.exported: str | None = None  # the best checkpoint path hf_best was last written for

    @staticmethod
    def directory(trainer: L.Trainer) -> Path:
        """``hf_best`` inside the checkpoint directory."""
        callback = best_checkpoint_callback(trainer)
        root = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        return Path(root) / "hf_best"

    def _export(self, trainer: L.Trainer, module: Summarizer, best: str) -> None:
        self.exported = best
        if trainer.is_global_zero and module.model is not None and module.tokenizer is not None:
            export_pretrained(module.model, module.tokenizer, self.directory(trainer))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A new best path whose score is the metric just computed: this save is of the new best weights (a resumed
        # fit's restored best path, or a later non-improving save, does not match).
        callback = best_checkpoint_callback(trainer)
        best, score = getattr(callback, "best_model_path", ""), getattr(callback, "best_model_score", None)
        current = trainer.callback_metrics.get(getattr(callback, "monitor", None) or "")
        changed = bool(best) and best != self.exported and score is not None and current is not None
        if changed and float(current) == float(score):
            self._export(trainer, pl_module, best)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.exported is None and getattr(best_checkpoint_callback(trainer), "best_model_score", None) is None:
            self._export(trainer, pl_module, "")


class Summarizer(TaskModule):
    """Abstractive summarization with a T5 or BART encoder-decoder: built from the sizes here (``arch``, with the
    data module's tokenizer) or pretrained (``pretrained_name``: a hub name or a local ``save_pretrained``
    directory; its tokenizer then replaces the data module's, so give the data module the same
    ``tokenizer_name`` to spare it training one first).

    Validation and test generate with beam search (``num_beams``, ``length_penalty``, ``no_repeat_ngram_size``,
    ``repetition_penalty`` (> 1 lowers tokens already generated), ``max_new_tokens``, ``min_new_tokens``) and log
    ROUGE-1/2/L/Lsum F1: with several references per example the best one counts, and ``*_refmean`` logs the mean
    over them too (how ROUGE-1.5.5 scores several references by default; with one reference both are the same).
    ``val_generate_limit`` caps how many validation examples are generated per epoch (all are scored for the
    loss). The first ``sample_generations`` generations of each evaluation are printed and kept in
    :attr:`samples`; testing writes every generation to ``predictions.jsonl`` in the log directory.

    ``mbr_samples`` > 0 turns on minimum Bayes risk decoding (:mod:`bp_apps.text.summarization.mbr`): the beam
    search's ``num_beams`` hypotheses and ``mbr_samples`` epsilon samples (tokens below probability
    ``mbr_epsilon`` cut, the same length and repetition settings, seeded with :data:`MBR_SEED` so a source's
    summary does not change from run to run) are the candidates, and the one with the highest ROUGE-1 against
    the others is the summary.

    ``copy_mechanism`` (``arch='bart'``) lets the decoder copy source tokens: its output distribution mixes the
    vocabulary softmax with an attention over the source (:mod:`bp_apps.text.summarization.copy`).
    """

    task_name = TASK_NAME
    task_title = "a summarization"

    def __init__(self, arch: Literal["t5", "bart"] = "t5", pretrained_name: str | None = None, d_model: int = 256,
                 layers: int = 3, heads: int = 4, ff: int = 1024, dropout: float = 0.1, label_smoothing: float = 0.1,
                 lr: float = 1e-3, weight_decay: float = 0.01, warmup_fraction: float = 0.05,
                 scheduler: Literal["constant", "cosine"] = "cosine", max_grad_norm: float | None = 1.0,
                 num_beams: int = 4, length_penalty: float = 1.0, no_repeat_ngram_size: int = 3,
                 max_new_tokens: int = 32, min_new_tokens: int = 1, val_generate_limit: int | None = None,
                 sample_generations: int = 3, copy_mechanism: bool = False, repetition_penalty: float = 1.0,
                 mbr_samples: int = 0, mbr_epsilon: float = 0.02) -> None:
        super().__init__(OptimizerConfig(lr=lr, weight_decay=weight_decay, scheduler=scheduler,
                                         warmup_fraction=warmup_fraction, max_grad_norm=max_grad_norm,
                                         no_decay_keys=NO_DECAY_KEYS))
        if arch not in ("t5", "bart"):
            raise ValueError(f"arch must be 't5' or 'bart', got {arch!r}")
        if copy_mechanism and (arch != "bart" or pretrained_name):
            raise ValueError("copy_mechanism needs arch='bart' and a model built from scratch (no pretrained_name)")
        if scheduler not in ("constant", "cosine"):
            raise ValueError(f"scheduler must be 'constant' or 'cosine', got {scheduler!r}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive (1.0: none), got {repetition_penalty}")
        check_mbr_settings(mbr_samples, mbr_epsilon)
        if not 0 <= min_new_tokens <= max_new_tokens or max_new_tokens < 1:
            raise ValueError(f"need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, got "
                             f"{min_new_tokens} and {max_new_tokens}")
        if val_generate_limit is not None and val_generate_limit < 1:
            raise ValueError(f"val_generate_limit must be >= 1 or None, got {val_generate_limit}")
        self.save_hyperparameters()
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.net_state: dict[str, Any] = {}  # tokenizer JSON, special tokens, model config: saved with the checkpoint
        self.samples: dict[str, list[dict[str, Any]]] = {}
        self._outputs: dict[str, list[dict[str, Any]]] = {}

    # -- building ---------------------------------------------------------------------------

    @property
    def max_source_tokens(self) -> int:
        """The source length (in tokens) the model was trained with: longer inputs are truncated."""
        return self.net_state.get("max_source_tokens") or DEFAULT_MAX_SOURCE_TOKENS

    def _attach(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_source_tokens: int | None
                ) -> None:
        from bp_apps.text.tokenization import tokenizer_to_json

        self.model, self.tokenizer = model.train(self.training), tokenizer  # from_pretrained returns eval mode
        self.net_state = {"tokenizer": tokenizer_to_json(tokenizer),
                          "special_tokens": {k: v for k, v in tokenizer.special_tokens_map.items()
                                             if isinstance(v, str)},
                          "config": model.config.to_dict(), "max_source_tokens": max_source_tokens}
        if self._trainer is not None:
            self.to(self.device)

    def build(self, tokenizer: PreTrainedTokenizerBase, max_source_tokens: int | None = None,
              max_target_tokens: int | None = None) -> None:
        """Create a fresh network for ``tokenizer`` (its [CLS]/BOS starts the decoder, its [SEP]/EOS ends it)."""
        from bp_apps.text.summarization.models import build_seq2seq

        h = self.hparams
        bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        if None in (bos, eos, tokenizer.pad_token_id):
            raise ValueError("the tokenizer needs a pad token, a start token ([CLS] or BOS) and an end token "
                             "([SEP] or EOS)")
        positions = max(DEFAULT_MAX_SOURCE_TOKENS, max_source_tokens or 0, max_target_tokens or 0,
                        h.max_new_tokens + 2)
        model = build_seq2seq(h.arch, len(tokenizer), tokenizer.pad_token_id, eos, bos, d_model=h.d_model,
                              layers=h.layers, heads=h.heads, ff=h.ff, dropout=h.dropout, max_positions=positions,
                              copy=h.copy_mechanism)
        self._attach(model, tokenizer, max_source_tokens)

    def _build_from_state(self, state: dict[str, Any]) -> None:
        from transformers import AutoConfig, AutoModelForSeq2SeqLM

        import bp_apps.text.summarization.models  # noqa: F401  (registers the copy model's config type)
        from bp_apps.text.tokenization import tokenizer_from_json

        tokenizer = tokenizer_from_json(state["tokenizer"], state.get("special_tokens"))
        model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(**state["config"]))
        self._attach(model, tokenizer, state.get("max_source_tokens"))

    def setup(self, stage: str) -> None:
        """Build the network from the data module's tokenizer, or load the pretrained one (unless a checkpoint
        already built it); the data module then encodes with the model's tokenizer."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "tokenizer"):
            if self.model is None:
                raise ValueError("Summarizer needs a data module with a tokenizer, or a checkpoint")
            return
        if self.model is None:
            source_len = getattr(datamodule, "max_source_tokens", None)
            if self.hparams.pretrained_name:
                from bp_apps.text.summarization.models import load_pretrained_seq2seq

                self._attach(*load_pretrained_seq2seq(self.hparams.pretrained_name), source_len)
            elif datamodule.tokenizer is None:
                raise ValueError("the data module has no tokenizer after setup()")
            else:
                self.build(datamodule.tokenizer, source_len, getattr(datamodule, "max_target_tokens", None))
        datamodule.tokenizer = self.tokenizer

    # -- forward, loss, generation ----------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """Teacher-forced next-token logits [B, T, V] for the batch's ``labels``."""
        if self.model is None:
            raise RuntimeError(NOT_BUILT)
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).logits

    def loss(self, batch: dict[str, Any]) -> Tensor:
        """Label-smoothed cross-entropy over the target tokens (padding, -100, ignored)."""
        logits = self(batch)
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                               label_smoothing=self.hparams.label_smoothing)

    def generation_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """The ``generate`` settings from the hyperparameters, updated with ``overrides``."""
        h = self.hparams
        kwargs = {"num_beams": h.num_beams, "length_penalty": h.length_penalty,
                  "no_repeat_ngram_size": h.no_repeat_ngram_size, "max_new_tokens": h.max_new_tokens,
                  "min_new_tokens": h.min_new_tokens, "repetition_penalty": h.get("repetition_penalty", 1.0),
                  **overrides}
        if kwargs["num_beams"] == 1:  # a beam-search setting: greedy decoding would warn about it
            kwargs.pop("length_penalty")
        return kwargs

    def mbr_settings(self, **overrides: Any) -> dict[str, Any]:
        """The MBR decoding settings (``mbr_samples`` 0: off) from the hyperparameters, updated with ``overrides``."""
        h = self.hparams
        settings = {"mbr_samples": h.get("mbr_samples", 0), "mbr_epsilon": h.get("mbr_epsilon", 0.02), **overrides}
        check_mbr_settings(settings["mbr_samples"], settings["mbr_epsilon"])
        return settings

    def _decode(self, ids: Tensor) -> list[str]:
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def _settings(self, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The MBR settings and the ``generate`` settings, from the hyperparameters updated with ``overrides``."""
        mbr = {k: v for k, v in overrides.items() if k in MBR_KEYS}
        rest = {k: v for k, v in overrides.items() if k not in MBR_KEYS}
        return self.mbr_settings(**mbr), self.generation_kwargs(**rest)

    @torch.no_grad()
    def generate_candidates(self, input_ids: Tensor, attention_mask: Tensor, **overrides: Any) -> list[list[str]]:
        """For each source, the MBR candidates: the beam search's hypotheses (best first), then ``mbr_samples``
        epsilon samples drawn with the same length and repetition settings (seeded with :data:`MBR_SEED`, the
        global random state left untouched). ``overrides`` update the MBR and ``generate`` settings."""
        if self.model is None or self.tokenizer is None:
            raise RuntimeError(NOT_BUILT)
        mbr, beam = self._settings(overrides)
        beams = self._decode(self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                                 num_return_sequences=beam["num_beams"], **beam))
        sampled: list[str] = []
        if mbr["mbr_samples"]:
            sampling = {k: v for k, v in beam.items() if k not in ("num_beams", "length_penalty")}
            devices = [input_ids.device.index or 0] if input_ids.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(MBR_SEED)
                ids = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                          num_beams=1, top_k=0, top_p=1.0, temperature=1.0,
                                          epsilon_cutoff=mbr["mbr_epsilon"] or None,
                                          num_return_sequences=mbr["mbr_samples"], **sampling)
            sampled = self._decode(ids)
        n, k = beam["num_beams"], mbr["mbr_samples"]
        return [beams[i * n:(i + 1) * n] + sampled[i * k:(i + 1) * k] for i in range(len(input_ids))]

    @torch.no_grad()
    def generate_texts(self, input_ids: Tensor, attention_mask: Tensor, **overrides: Any) -> list[str]:
        """Generated summaries (special tokens removed) for encoded sources: beam search, or with ``mbr_samples``
        > 0 the MBR choice among :meth:`generate_candidates`."""
        if self.model is None or self.tokenizer is None:
            raise RuntimeError(NOT_BUILT)
        mbr, beam = self._settings(overrides)
        if not mbr["mbr_samples"]:
            return self._decode(self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **beam))
        candidates = self.generate_candidates(input_ids, attention_mask, **overrides)
        return [options[mbr_select(options)] for options in candidates]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def _generate_limit(self, stage: str) -> int | None:
        """How many examples this process generates for in a ``stage`` epoch (None: all)."""
        limit = self.hparams.val_generate_limit if stage == "val" else None
        return None if limit is None else math.ceil(limit / max(1, self.trainer.world_size))

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        size = len(batch["input_ids"])
        if "labels" in batch:
            self.log(f"{stage}_loss", self.loss(batch), prog_bar=stage == "val", batch_size=size, sync_dist=True)
        elif stage == "val":
            raise ValueError("validation batches need labels (reference summaries)")
        records = self._outputs.setdefault(stage, [])
        limit = self._generate_limit(stage)
        take = size if limit is None else max(0, min(size, limit - len(records)))
        if not take:
            return
        predictions = self.generate_texts(batch["input_ids"][:take], batch["attention_mask"][:take])
        for i, prediction in enumerate(predictions):
            records.append({"id": batch["ids"][i], "source": batch["sources"][i],
                            "references": list(batch["references"][i]), "prediction": prediction})

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """The generated summaries of the batch's sources."""
        return self.generate_texts(batch["input_ids"], batch["attention_mask"])

    def _finish(self, stage: str) -> list[dict[str, Any]]:
        """Gather the epoch's generations from every process, log ROUGE, keep and print the samples."""
        records = self._outputs.pop(stage, [])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        scored = [r for r in records if r["references"]]
        if scored:
            scores = rouge_scores([r["prediction"] for r in scored], [r["references"] for r in scored])
            for key, value in scores.items():
                self.log(f"{stage}_{key}", value, prog_bar=key == "rouge1", sync_dist=True)
            means = scores  # the mean over the references, stricter; the same figure with one reference
            if any(len(r["references"]) > 1 for r in scored):
                means = rouge_scores([r["prediction"] for r in scored], [r["references"] for r in scored],
                                     multi_reference="mean")
            for key, value in means.items():
                self.log(f"{stage}_{key}_refmean", value, sync_dist=True)
        self.samples[stage] = records[: self.hparams.sample_generations]
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            for sample in self.samples[stage]:
                print(format_sample(sample, stage))
        return records

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        records = self._finish("test")
        log_dir = self.trainer.log_dir  # a broadcast: every process asks
        if self.trainer.is_global_zero and log_dir:
            path = Path(log_dir) / "predictions.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    # -- metrics.json -----------------------------------------------------------------------

    def metrics_summary(self) -> dict[str, Any]:
        """For ``metrics.json``: the generation settings and the latest sample generations."""
        return {"generation": self.generation_kwargs(), "mbr": self.mbr_settings(), "samples": self.samples}

    # -- checkpoints ------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[STATE_KEY] = dict(self.net_state)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse other tasks' checkpoints; build the network and tokenizer the checkpoint's weights need."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint[STATE_KEY]
        same = self.model is not None and all(self.net_state.get(k) == state.get(k) for k in ("tokenizer", "config"))
        if not same:
            self._build_from_state(state)
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            if datamodule is not None and hasattr(datamodule, "tokenizer"):
                datamodule.tokenizer = self.tokenizer


def format_sample(sample: dict[str, Any], stage: str, width: int = 300) -> str:
    """A generation next to its references, for printing (long sources shortened to ``width`` characters)."""
    source = sample["source"] if len(sample["source"]) <= width else sample["source"][:width] + " ..."
    lines = [f"[{stage}] {sample['id'] or ''}".rstrip(), f"  source:     {source}"]
    lines += [f"  reference:  {reference}" for reference in sample["references"]]
    lines.append(f"  prediction: {sample['prediction']}")
    return "\n".join(lines)


# -- prediction -----------------------------------------------------------------------------

def load_summarizer(path: str | Path) -> Summarizer:
    """A Summarizer from a checkpoint, loaded safely (``weights_only=True``, no download), in eval mode."""
    return Summarizer.load(path)


def summarize(module: Summarizer, texts: Sequence[str], batch_size: int = 16, max_source_tokens: int | None = None,
              **generation: Any) -> list[str]:
    """Summaries of ``texts`` (``generation`` overrides the module's ``generate`` settings). Texts longer than
    ``max_source_tokens`` (default: the training source length) are truncated, with one warning."""
    if module.model is None or module.tokenizer is None:
        raise RuntimeError(NOT_BUILT)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text {i} is empty")
    if not texts:
        return []
    limit = max_source_tokens or module.max_source_tokens
    tokenizer = module.tokenizer
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=limit + 1)["input_ids"]]
    truncated = sum(n > limit for n in lengths)
    if truncated:
        warnings.warn(f"{truncated} of {len(texts)} texts are longer than {limit} tokens and were truncated",
                      UserWarning, stacklevel=2)
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    try:
        summaries: list[str] = []
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start:start + batch_size], truncation=True, max_length=limit, padding=True,
                                return_tensors="pt")
            summaries += module.generate_texts(encoded["input_ids"].to(device), encoded["attention_mask"].to(device),
                                               **generation)
    finally:
        module.train(was_training)
    return summaries
