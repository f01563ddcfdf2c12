"""The summarization LightningModule: a sequence-to-sequence model trained with teacher forcing and a
label-smoothed cross-entropy, evaluated by beam-search (or minimum Bayes risk) generation and ROUGE.

The network (``net``, a class of :mod:`models`: a T5 or BART built from sizes, or a pretrained model) is built
for the tokenizer the data module wrote to its ``tokenizer_file``; decoding settings are one
:class:`GenerationSettings` group. The tokenizer (as JSON) and the model config travel in the checkpoint as
plain data, so loading needs neither a download nor pickle; next to the best checkpoint, ``hf_best/`` holds the
same model in ``save_pretrained`` form.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bp_apps.core.callbacks import best_checkpoint_callback, report_dir
from bp_apps.core.compose import network_factory, settings
from bp_apps.core.io import atomic_write_text
from bp_apps.core.task import NO_DECAY_KEYS, OptimizerConfig, TaskModule
from bp_apps.engine import SoftmaxCrossEntropy
from bp_apps.text.summarization.data import load_tokenizer_file, tokenizer_state
from bp_apps.text.summarization.engine_models import EngineBartNet, engine_net_from_config
from bp_apps.text.summarization.mbr import mbr_select
from bp_apps.text.summarization.models import Seq2SeqNet, T5Net
from bp_apps.text.summarization.rouge import rouge_scores
from bp_apps.text.tokenization import tokenizer_from_json

__all__ = ["DEFAULT_GENERATION", "DEFAULT_OPTIM", "TASK_NAME", "GenerationSettings", "HFBestExport", "Summarizer",
           "export_pretrained", "load_summarizer", "summarize"]

TASK_NAME, STATE_KEY = "text.Summarizer", "bp_apps_summarization"
DEFAULT_MAX_SOURCE_TOKENS = 512
NOT_BUILT = "the network is not built yet: fit with a summarization data module or load a checkpoint"
MBR_SEED = 0  # the sampling seed of MBR decoding (the global random state is left as it was)


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
    """Keep ``<checkpoint dir>/hf_best/`` in step with the best checkpoint
    (:func:`~bp_apps.core.callbacks.best_checkpoint_callback`'s): exported whenever a new best checkpoint is saved,
    or at the end of a fit without one. It is a full export
    (:func:`~bp_apps.text.summarization.hf_export.write_summarizer_export`): weights and tokenizer, the decoding
    settings in ``generation_config.json``, remote code for the copy BART, and a model card."""

    def __init__(self) -> None:
        self.exported: str | None = None  # the best checkpoint path hf_best was last written for

    @staticmethod
    def directory(trainer: L.Trainer) -> Path:
        """``hf_best`` inside the checkpoint directory."""
        callback = best_checkpoint_callback(trainer)
        root = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        return Path(root) / "hf_best"

    def _export(self, trainer: L.Trainer, module: Summarizer, best: str,
                checkpoint: dict[str, Any] | None = None) -> None:
        """Write the export; the model card describes the data from the checkpoint being saved (its data-module
        hyperparameters), when there is one."""
        from bp_apps.text.summarization.hf_export import write_summarizer_export

        self.exported = best
        if trainer.is_global_zero and module.model is not None and module.tokenizer is not None:
            write_summarizer_export(module, self.directory(trainer), checkpoint=best or None,
                                    raw_checkpoint=checkpoint or {}, replace_any=True)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A new best path whose score is the metric just computed: this save is of the new best weights (a resumed
        # fit's restored best path, or a later non-improving save, does not match).
        callback = best_checkpoint_callback(trainer)
        best, score = getattr(callback, "best_model_path", ""), getattr(callback, "best_model_score", None)
        current = trainer.callback_metrics.get(getattr(callback, "monitor", None) or "")
        changed = bool(best) and best != self.exported and score is not None and current is not None
        if changed and float(current) == float(score):
            self._export(trainer, pl_module, best, checkpoint)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.exported is None and getattr(best_checkpoint_callback(trainer), "best_model_score", None) is None:
            self._export(trainer, pl_module, "")


@dataclass
class GenerationSettings:
    """How validation, test and :func:`summarize` decode, checked together.

    Beam search with ``num_beams`` beams, ``length_penalty``, ``no_repeat_ngram_size`` (0: off),
    ``repetition_penalty`` (> 1 lowers tokens already generated; 1: none), and between ``min_new_tokens`` and
    ``max_new_tokens`` new tokens. ``mbr_samples`` > 0 turns on minimum Bayes risk decoding
    (:mod:`bp_apps.text.summarization.mbr`): the beams' hypotheses and ``mbr_samples`` epsilon samples (tokens
    below probability ``mbr_epsilon`` cut, the same length and repetition settings) are the candidates."""

    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    repetition_penalty: float = 1.0
    max_new_tokens: int = 32
    min_new_tokens: int = 1
    mbr_samples: int = 0
    mbr_epsilon: float = 0.02

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0 (0: off), got {self.no_repeat_ngram_size}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive (1.0: none), got {self.repetition_penalty}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens or self.max_new_tokens < 1:
            raise ValueError(f"need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1, got "
                             f"{self.min_new_tokens} and {self.max_new_tokens}")
        if self.mbr_samples < 0:
            raise ValueError(f"mbr_samples must be >= 0 (0: beam search alone), got {self.mbr_samples}")
        if not 0.0 <= self.mbr_epsilon < 1.0:
            raise ValueError(f"mbr_epsilon must be in [0, 1) (0: no cutoff), got {self.mbr_epsilon}")

    def generate_kwargs(self) -> dict[str, Any]:
        """The ``generate`` arguments of beam search (without the MBR settings)."""
        kwargs = {"num_beams": self.num_beams, "length_penalty": self.length_penalty,
                  "no_repeat_ngram_size": self.no_repeat_ngram_size, "max_new_tokens": self.max_new_tokens,
                  "min_new_tokens": self.min_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.num_beams == 1:  # a beam-search setting: greedy decoding would warn about it
            kwargs.pop("length_penalty")
        return kwargs

    def mbr(self) -> dict[str, Any]:
        return {"mbr_samples": self.mbr_samples, "mbr_epsilon": self.mbr_epsilon}


DEFAULT_GENERATION = GenerationSettings()
DEFAULT_OPTIM = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.01, scheduler="cosine", warmup_fraction=0.05,
                                max_grad_norm=1.0, no_decay_keys=NO_DECAY_KEYS)
"""The Summarizer's optimizer settings when a config gives none (a config's ``optim`` mapping overrides fields)."""

ENGINE_BACKEND = "engine"  # the checkpoint's network field "backend" for an engine-trained network
NetFromTokenizer = Callable[[int, int, int, int, int], nn.Module]
"""A network class called with the tokenizer's ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id`` and the
``max_positions`` the data and generation need (:mod:`bp_apps.text.summarization.models`)."""


class Summarizer(TaskModule):
    """Abstractive summarization with an encoder-decoder ``net`` (:mod:`~bp_apps.text.summarization.models`:
    ``T5Net``, ``BartNet``, ``BartCopyNet`` (a BART whose decoder can copy source tokens) built from their sizes,
    or ``PretrainedNet`` by hub name or ``save_pretrained`` directory), given as a class (``class_path`` and
    ``init_args`` in a config) that is called with what the tokenizer gives.

    The tokenizer is the data module's ``tokenizer_file`` (``bp-apps`` links it, and ``max_source_tokens`` /
    ``max_target_tokens``, from the data module; a Trainer built by hand passes ``tokenizer_file=dm.tokenizer_file``):
    :meth:`setup` reads it and builds the network. The tokenizer (as JSON) and the model config travel in the
    checkpoint as plain data, so loading needs neither the file nor a download nor pickle; next to the best
    checkpoint, ``hf_best/`` holds the same model in ``save_pretrained`` form.

    Training minimises a label-smoothed (``label_smoothing``) cross-entropy with ``optim``
    (:class:`~bp_apps.core.task.OptimizerConfig`, defaults :data:`DEFAULT_OPTIM`); an engine network
    (:mod:`~bp_apps.text.summarization.engine_models`) is trained by its hand-written backward and decodes through
    its Hugging Face twin (:attr:`model`). Validation and test decode
    with ``generation`` (:class:`GenerationSettings`: beam search, or minimum Bayes risk decoding seeded with
    :data:`MBR_SEED` so a source's summary does not change from run to run) and log ROUGE-1/2/L/Lsum F1: with
    several references per example the best one counts, and ``*_refmean`` logs the mean over them too (how
    ROUGE-1.5.5 scores several references by default; with one reference both are the same).
    ``val_generate_limit`` caps how many validation examples are generated per epoch (all are scored for the
    loss). The first ``sample_generations`` generations of each evaluation are printed and kept in
    :attr:`samples`; testing writes every generation to ``predictions.jsonl`` in the log directory.
    """

    task_name = TASK_NAME
    task_title = "a summarization"
    default_optim = DEFAULT_OPTIM

    def __init__(self, net: NetFromTokenizer = T5Net, optim: OptimizerConfig = DEFAULT_OPTIM,
                 generation: GenerationSettings = DEFAULT_GENERATION, label_smoothing: float = 0.1,
                 val_generate_limit: int | None = None, sample_generations: int = 3,
                 tokenizer_file: str | None = None, max_source_tokens: int | None = None,
                 max_target_tokens: int | None = None) -> None:
        super().__init__(optim)
        self.generation = settings(GenerationSettings, generation, "generation", DEFAULT_GENERATION)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if val_generate_limit is not None and val_generate_limit < 1:
            raise ValueError(f"val_generate_limit must be >= 1 or None, got {val_generate_limit}")
        optim, generation = self.optim, self.generation  # the whole groups are saved, not only the fields given
        self.save_hyperparameters()
        self.net_factory = network_factory(net, "net")
        self.net: Seq2SeqNet | EngineBartNet | None = None  # built in setup() from the tokenizer file, or a checkpoint
        self.engine_loss = SoftmaxCrossEntropy(label_smoothing=label_smoothing, ignore_index=-100)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.net_state: dict[str, Any] = {}  # tokenizer JSON, special tokens, model config: saved with the checkpoint
        self.samples: dict[str, list[dict[str, Any]]] = {}
        self._outputs: dict[str, list[dict[str, Any]]] = {}

    # -- building ---------------------------------------------------------------------------

    @property
    def model(self) -> PreTrainedModel | None:
        """The transformers encoder-decoder inside :attr:`net` (None before it is built); for an engine network, its
        Hugging Face twin holding the engine's current weights."""
        if self.net is None:
            return None
        return self.net.generation_model() if self.engine else self.net.model

    @property
    def max_source_tokens(self) -> int:
        """The source length (in tokens) the model was trained with: longer inputs are truncated."""
        return self.hparams.get("max_source_tokens") or DEFAULT_MAX_SOURCE_TOKENS

    def _attach(self, net: Seq2SeqNet | EngineBartNet, tokenizer: PreTrainedTokenizerBase) -> None:
        net.model.train(self.training)  # from_pretrained returns eval mode
        self.net, self.tokenizer = net, tokenizer
        self.net_state = {**tokenizer_state(tokenizer), "config": net.model.config.to_dict()}
        if self.engine:  # a checkpoint then rebuilds the engine network
            self.net_state["backend"] = ENGINE_BACKEND
        if self._trainer is not None:
            self.to(self.device)

    def build(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Create the network for ``tokenizer`` with :attr:`net_factory` (its [CLS]/BOS starts the decoder, its
        [SEP]/EOS ends it); its learned positions cover the data's and the generation's lengths."""
        h = self.hparams
        bos = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        positions = max(DEFAULT_MAX_SOURCE_TOKENS, h.get("max_source_tokens") or 0, h.get("max_target_tokens") or 0,
                        self.generation.max_new_tokens + 2)
        net = self.net_factory(len(tokenizer), tokenizer.pad_token_id, bos, eos, positions)
        if not isinstance(net, (Seq2SeqNet, EngineBartNet)):
            raise ValueError(f"net: {type(net).__name__} is not a Seq2SeqNet (bp_apps.text.summarization.models) or "
                             "an EngineBartNet (bp_apps.text.summarization.engine_models)")
        self._attach(net, tokenizer)

    def _build_from_state(self, state: dict[str, Any]) -> None:
        tokenizer = tokenizer_from_json(state["tokenizer"], state.get("special_tokens"))
        engine = state.get("backend") == ENGINE_BACKEND
        self._attach((engine_net_from_config if engine else Seq2SeqNet.from_config)(state["config"]), tokenizer)

    def setup(self, stage: str) -> None:
        """Read the tokenizer file and build the network (unless a checkpoint already built it)."""
        super().setup(stage)
        if self.net is not None:
            return
        if not self.hparams.get("tokenizer_file"):
            raise ValueError("Summarizer needs tokenizer_file (the data module's tokenizer_file: bp-apps links it; "
                             "a Trainer built by hand passes tokenizer_file=dm.tokenizer_file), or a "
                             "checkpoint")
        self.build(load_tokenizer_file(self.hparams.tokenizer_file))

    # -- forward, loss, generation ----------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """Teacher-forced next-token logits [B, T, V] for the batch's ``labels``."""
        if self.net is None:
            raise RuntimeError(NOT_BUILT)
        if self.engine:
            return self.net.forward(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).logits

    def loss(self, batch: dict[str, Any]) -> Tensor:
        """Label-smoothed cross-entropy over the target tokens (padding, -100, ignored), in float32 at least (float64
        logits stay float64)."""
        logits = self(batch)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                               label_smoothing=self.hparams.label_smoothing)

    def autograd_loss(self, batch: dict[str, Any]) -> Tensor:
        """The training loss of an autograd network: :meth:`loss`."""
        return self.loss(batch)

    def engine_backward(self, batch: dict[str, Any]) -> Tensor:
        """An engine network's forward, the engine's label-smoothed cross-entropy (:meth:`loss`'s) on its logits and
        the hand-written backward into its gradient buffers; the loss."""
        logits = self.net.forward(batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss = self.engine_loss.forward(logits, batch["labels"])
        self.net.backward(self.engine_loss.backward())
        return loss

    def generation_settings(self, **overrides: Any) -> GenerationSettings:
        """:attr:`generation` with ``overrides`` (fields of :class:`GenerationSettings`; checked, unknown names
        refused)."""
        return settings(GenerationSettings, overrides, "generation", self.generation) if overrides else self.generation

    def generation_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """The ``generate`` settings of beam search, updated with ``overrides``."""
        return self.generation_settings(**overrides).generate_kwargs()

    def mbr_settings(self, **overrides: Any) -> dict[str, Any]:
        """The MBR decoding settings (``mbr_samples`` 0: off), updated with ``overrides``."""
        return self.generation_settings(**overrides).mbr()

    def _decode(self, ids: Tensor) -> list[str]:
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def _settings(self, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The MBR settings and the ``generate`` settings, from :attr:`generation` updated with ``overrides``."""
        chosen = self.generation_settings(**overrides)
        return chosen.mbr(), chosen.generate_kwargs()

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
        loss = self.backend_training_step(batch) if self.engine else self.autograd_loss(batch)
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
        folder = report_dir(self.trainer)  # None without a logger: no file, never into the current folder
        if folder is not None and self.trainer.is_global_zero:
            path = folder / "predictions.jsonl"
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
        """Refuse other tasks' checkpoints, and one whose tokenizer is not the tokenizer file this module was
        built from (the data would encode with other ids); build the network the checkpoint's weights need."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(STATE_KEY)
        if not isinstance(state, dict) or not {"tokenizer", "config"} <= state.keys():
            raise ValueError(f"the checkpoint has no summarization network (field {STATE_KEY!r})")
        if self.net is not None:
            if tokenizer_state(self.tokenizer) != {k: state.get(k) for k in ("tokenizer", "special_tokens")}:
                raise ValueError(f"the checkpoint's tokenizer is not the data's ({self.hparams.get('tokenizer_file')})"
                                 ": its ids would mean other tokens; use the data and tokenizer settings the "
                                 "checkpoint was trained with")
            if self.net_state.get("config") == state["config"]:
                return
        self._build_from_state(state)


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
    """Summaries of ``texts``; ``generation`` overrides fields of the module's :class:`GenerationSettings`
    (``num_beams=1``, ``mbr_samples=0`` ...; checked like the group). Texts longer than ``max_source_tokens``
    (default: the training source length) are truncated, with one warning."""
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
