"""Speech-to-text with Lightning: a CTC recognizer (``SpeechRecognizer``) and an isolated spoken-digit classifier
(``SpokenDigitClassifier``, whose head is the hand-written MLP through the bridge), plus checkpoint loading and
``transcribe`` for the ``bp-apps transcribe`` command.

The config's callbacks keep the best checkpoint by validation CER/WER (or accuracy) and write ``metrics.json`` (with
the data module's feature settings and a few test transcripts); the CLI then tests that checkpoint, and the test
writes its reports into the run's folder (:mod:`bp_apps.speech.reports`): ``test_predictions.jsonl`` (one line per
utterance with its word errors) and ``ctc_alignment.png`` for the recognizer, ``test_predictions.jsonl`` and
``confusion_matrix.png`` for the digit classifier. Checkpoints
carry the task name and, as the data module's state, the feature settings and training words, so a checkpoint alone
is enough to transcribe files. The models never read the data module: the CLI links what they need from it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.text import CharErrorRate, WordErrorRate

from bp_apps.core.callbacks import report_dir
from bp_apps.core.compose import network_factory, settings
from bp_apps.core.datalink import saved_preprocessing
from bp_apps.core.io import load_checkpoint_dict, write_jsonl
from bp_apps.core.lit import ClassifierModule
from bp_apps.core.reports import evaluation_order, gather_rows, running_test_loader, save_count_matrix
from bp_apps.core.task import NO_DECAY_KEYS, OptimizerConfig, TaskModule, check_task
from bp_apps.engine.ctc import CTCLoss
from bp_apps.speech.data import SpeechBatch
from bp_apps.speech.decoding import DIGIT_WORDS, BeamSearchDecoder, DecodingConfig, greedy_decode, write_lexicon
from bp_apps.speech.features import FeatureConfig, FrequencyWarp, SpecAugmentConfig, TimeStretch, make_extractor
from bp_apps.speech.models import ConvGRUCTC, DigitGRUNet, Wav2Vec2CTC, build_seeded
from bp_apps.speech.reports import ALIGNMENT_EXAMPLES, AlignmentExample, prediction_row, save_ctc_alignment

__all__ = ["CLASSIFIER_TASK", "DIGITS_AUGMENT", "DIGITS_OPTIM", "RECOGNIZER_AUGMENT", "RECOGNIZER_DECODING",
           "RECOGNIZER_OPTIM", "RECOGNIZER_TASK", "SpeechRecognizer", "SpokenDigitClassifier", "load_speech_model",
           "transcribe"]

RECOGNIZER_TASK = "speech.SpeechRecognizer"
CLASSIFIER_TASK = "speech.SpokenDigitClassifier"
EXAMPLES = 8
MIN_PIECE_SECONDS = 0.1
"""The shortest audio ``transcribe`` hands a model: shorter files are padded with silence, shorter last pieces of
a long file are joined to the piece before."""

RECOGNIZER_OPTIM = OptimizerConfig(lr=2e-3, weight_decay=1e-2, scheduler="cosine", warmup_fraction=0.05,
                                   max_grad_norm=5.0, no_decay_keys=NO_DECAY_KEYS)
"""The recognizer's optimizer settings when a config gives none (a config's ``optim`` mapping overrides fields)."""
RECOGNIZER_AUGMENT = SpecAugmentConfig(freq_masks=2, freq_width=10, time_masks=2, time_width=20)
DIGITS_OPTIM = OptimizerConfig(lr=3e-3, weight_decay=1e-2, scheduler="cosine", warmup_fraction=0.05,
                               max_grad_norm=5.0)
"""The digit classifier's optimizer settings (weight decay on every parameter, as it was tuned)."""
DIGITS_AUGMENT = SpecAugmentConfig(freq_masks=2, freq_width=6, time_masks=2, time_width=8)
RECOGNIZER_DECODING = DecodingConfig(beam_size=0, lexicon=True)
"""Greedy decoding only, unless a config asks for beam search."""


class SpeechRecognizer(TaskModule):
    """Character CTC speech recognizer. ``net`` is the network class, called with ``input_dim``: a class of
    ``models.py`` (:class:`~bp_apps.speech.models.ConvGRUCTC`, the default, or ``ConformerCTC`` on log-mel;
    ``Wav2Vec2CTC`` on waveforms, ``input_dim`` 1, with ``pretrained`` for online users), given in a config as
    ``{class_path, init_args}``. Its initial weights depend on ``seed`` only.

    ``augment`` (SpecAugment, None: off) masks the training inputs, after speed perturbation (``time_stretch``, a
    factor in ``[1 - a, 1 + a]`` per utterance) and vocal-tract-length perturbation in the mel domain
    (``freq_warp``), both off at 0. Validation decodes greedily; test also runs
    the beam search of ``decoding`` when its ``beam_size`` > 0, restricted to ``lexicon_words`` (the training
    words) when its ``lexicon`` is set. ``bp-apps`` links ``input_dim`` and ``lexicon_words`` from the data module,
    whose ``setup`` refuses another feature size."""

    task_name = RECOGNIZER_TASK
    task_title = "a speech-recognizer"
    default_optim = RECOGNIZER_OPTIM

    def __init__(self, net: Callable[[int], nn.Module] = ConvGRUCTC, optim: OptimizerConfig = RECOGNIZER_OPTIM,
                 augment: SpecAugmentConfig | None = RECOGNIZER_AUGMENT,
                 decoding: DecodingConfig = RECOGNIZER_DECODING, seed: int = 0, input_dim: int = 64,
                 lexicon_words: Sequence[str] = (), time_stretch: float = 0.0, freq_warp: float = 0.0) -> None:
        super().__init__(optim)
        self.save_hyperparameters(ignore=["lexicon_words"])  # the data's, saved as its state
        self.augment_config = _augment(augment, RECOGNIZER_AUGMENT)
        self.decoding = settings(DecodingConfig, decoding, "decoding", RECOGNIZER_DECODING)
        self.net = build_seeded(network_factory(net, "net"), seed, input_dim)
        self.augment = self.augment_config.build() if self.augment_config is not None else None
        self.stretch, self.warp = TimeStretch(time_stretch), FrequencyWarp(freq_warp)
        self.engine_ctc = CTCLoss(blank=0, reduction="mean", zero_infinity=True)  # F.ctc_loss's settings below
        self.metrics = torch.nn.ModuleDict({f"{stage}_{name}": metric() for stage in ("val", "test", "test_beam")
                                            for name, metric in (("wer", WordErrorRate), ("cer", CharErrorRate))})
        self.lexicon_words = list(lexicon_words)
        self.test_examples: list[dict[str, str]] = []
        self._beam: BeamSearchDecoder | None = None

    @staticmethod
    def user_data_callback() -> L.Callback:
        """What lets a speech data module of the user's own train this model: its batches checked and the feature
        settings ``transcribe`` needs kept in every checkpoint (:func:`~bp_apps.speech.data.user_speech_check`);
        ``bp-apps`` adds it to every run, a ``Trainer`` built by hand takes it from here."""
        from bp_apps.speech.data import user_speech_check

        return user_speech_check()

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probabilities ``(B, T', V)`` and output lengths."""
        return self.net(features, lengths)

    def _ctc_loss(self, log_probs: Tensor, out_lengths: Tensor, batch: SpeechBatch) -> Tensor:
        return F.ctc_loss(log_probs.transpose(0, 1), batch.targets, out_lengths, batch.target_lengths, blank=0,
                          reduction="mean", zero_infinity=True)

    def training_batch(self, batch: SpeechBatch) -> SpeechBatch:
        """Speed and vocal-tract-length perturbation, then SpecAugment's masks, on the training features."""
        features, lengths = self.stretch(batch.features, batch.lengths)
        features = self.warp(features)
        if self.augment is not None:
            features = self.augment(features, lengths)
        return batch._replace(features=features, lengths=lengths)

    def autograd_loss(self, batch: SpeechBatch) -> Tensor:
        log_probs, out_lengths = self(batch.features, batch.lengths)
        return self._ctc_loss(log_probs, out_lengths, batch)

    def training_step(self, batch: SpeechBatch, batch_idx: int) -> Tensor:
        loss = self.backend_training_step(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch.texts))
        return loss

    def engine_backward(self, batch: SpeechBatch) -> Tensor:
        """Forward, the engine's CTC loss and the hand-written backward of an engine network."""
        log_probs, out_lengths = self.net.forward(batch.features, batch.lengths)
        loss = self.engine_ctc.forward(log_probs, batch.targets, out_lengths, batch.target_lengths)
        self.net.backward(self.engine_ctc.backward())
        return loss

    def _evaluate(self, batch: SpeechBatch, stage: str) -> tuple[list[str], Tensor, Tensor]:
        """Log the stage's loss, WER and CER; return the greedy transcripts with the log-probabilities and output
        lengths they were decoded from."""
        log_probs, out_lengths = self(batch.features, batch.lengths)
        size = len(batch.texts)
        self.log(f"{stage}_loss", self._ctc_loss(log_probs, out_lengths, batch), prog_bar=stage == "val",
                 batch_size=size, sync_dist=True)
        predictions = greedy_decode(log_probs, out_lengths)
        for name in ("wer", "cer"):
            metric = self.metrics[f"{stage}_{name}"]
            metric(predictions, batch.texts)
            self.log(f"{stage}_{name}", metric, prog_bar=stage == "val", batch_size=size)
        if stage == "test" and self.decoding.beam_size > 0:
            beam = self._beam_decoder()(log_probs, out_lengths)
            for name in ("wer", "cer"):
                metric = self.metrics[f"test_beam_{name}"]
                metric(beam, batch.texts)
                self.log(f"test_beam_{name}", metric, batch_size=size)
        return predictions, log_probs, out_lengths

    def _beam_decoder(self) -> BeamSearchDecoder:
        if self._beam is None:
            lexicon = None
            if self.decoding.lexicon and self.lexicon_words:
                root = report_dir(self.trainer)
                if root is None:  # no logger: a temporary folder, never the current one
                    self._lexicon_dir = tempfile.TemporaryDirectory(prefix="bp_apps-lexicon-")
                    root = Path(self._lexicon_dir.name)
                lexicon = write_lexicon(self.lexicon_words, root / "lexicon.txt")
            self._beam = BeamSearchDecoder(self.decoding.beam_size, lexicon)
        return self._beam

    def validation_step(self, batch: SpeechBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_test_epoch_start(self) -> None:
        self.test_examples = []
        self._report = _TestReport(self.trainer)

    def test_step(self, batch: SpeechBatch, batch_idx: int) -> None:
        predictions, log_probs, out_lengths = self._evaluate(batch, "test")
        for prediction, reference in zip(predictions, batch.texts):
            if len(self.test_examples) < EXAMPLES:
                self.test_examples.append({"reference": reference, "prediction": prediction})
        sources = self._report.sources(batch_idx, len(predictions))
        for i, (source, prediction, reference) in enumerate(zip(sources, predictions, batch.texts)):
            self._report.rows.append(prediction_row(reference, prediction, **source))
            if len(self._report.figures) < ALIGNMENT_EXAMPLES:  # this process's first ones; the first overall kept
                self._report.figures.append(AlignmentExample(
                    batch.features[i, :int(batch.lengths[i])].detach().cpu(),
                    log_probs[i, :int(out_lengths[i])].detach().float().cpu(), reference, prediction,
                    source.get("index", i)))

    def on_test_epoch_end(self) -> None:
        """Write ``test_predictions.jsonl`` and ``ctc_alignment.png`` (the first test utterances) into the run's
        report folder; under several processes the rows of every shard are gathered first."""
        report = getattr(self, "_report", None)
        folder = report_dir(self.trainer)  # None without a logger: no report, never into the current folder
        if report is None or folder is None:
            return
        rows, figures = report.gather()
        if self.trainer.is_global_zero:
            path = write_jsonl(folder / "test_predictions.jsonl", rows)
            print(f"test predictions written to {path}")
            if figures:
                path = save_ctc_alignment(figures[:ALIGNMENT_EXAMPLES], folder / "ctc_alignment.png")
                print(f"CTC alignment figure written to {path}")

    def predict_step(self, batch: SpeechBatch | tuple[Tensor, Tensor], batch_idx: int,
                     dataloader_idx: int = 0) -> list[str]:
        """Greedy transcripts of a batch (a :class:`~bp_apps.speech.data.SpeechBatch`, or ``(features, lengths)``):
        ``bp-apps predict`` writes them to ``predictions.jsonl``, one string per utterance."""
        features, lengths = (batch.features, batch.lengths) if isinstance(batch, SpeechBatch) else batch[:2]
        log_probs, out_lengths = self(features, lengths)
        return greedy_decode(log_probs, out_lengths)

    def metrics_summary(self) -> dict[str, Any]:
        """For ``metrics.json``: the last test's first transcripts next to their references."""
        return {"test_examples": list(self.test_examples)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A wav2vec 2.0 network is saved with its transformers configuration in place of ``pretrained``
        (``net.init_args.hf_config``), so the checkpoint alone rebuilds it and loading it never downloads."""
        super().on_save_checkpoint(checkpoint)
        hparams = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if isinstance(self.net, Wav2Vec2CTC) and isinstance(hparams, dict) and isinstance(hparams.get("net"), Mapping):
            saved = hparams["net"]
            init_args = {**(saved.get("init_args") or {}), "pretrained": None,
                         "hf_config": self.net.model.config.to_dict()}
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = {**hparams, "net": {**saved, "init_args": init_args}}


class SpokenDigitClassifier(ClassifierModule):
    """Isolated spoken digits (FSDD): cross-entropy, accuracy; SpecAugment (``augment``, None: off) and optional
    speed perturbation (``time_stretch``) and mel-domain vocal-tract-length perturbation (``freq_warp``) while
    training. ``net`` is the network class, called with
    ``(input_dim, num_classes)``: :class:`~bp_apps.speech.models.DigitGRUNet` (conv + BiGRU, the default) or
    ``DigitCNNNet`` (a VGG-style CNN), both with the engine's hand-written MLP head through the autograd bridge;
    its initial weights depend on ``seed`` only. Batches are ``((features, lengths), y)``. ``bp-apps`` links
    ``input_dim`` and ``num_classes`` from the data module, whose ``setup`` refuses other sizes.
    """

    task_name = CLASSIFIER_TASK
    task_title = "a spoken-digit-classifier"
    default_optim = DIGITS_OPTIM

    def __init__(self, net: Callable[[int, int], nn.Module] = DigitGRUNet, optim: OptimizerConfig = DIGITS_OPTIM,
                 augment: SpecAugmentConfig | None = DIGITS_AUGMENT, time_stretch: float = 0.0, freq_warp: float = 0.0,
                 label_smoothing: float = 0.05, seed: int = 0, input_dim: int = 40, num_classes: int = 10) -> None:
        network = build_seeded(network_factory(net, "net"), seed, input_dim, num_classes)
        super().__init__(network, num_classes, optim=optim, label_smoothing=label_smoothing)
        self.save_hyperparameters()
        self.augment_config = _augment(augment, DIGITS_AUGMENT)
        self.augment = self.augment_config.build() if self.augment_config is not None else None
        self.stretch, self.warp = TimeStretch(time_stretch), FrequencyWarp(freq_warp)
        self.class_names = list(DIGIT_WORDS) if num_classes == len(DIGIT_WORDS) else [str(i)
                                                                                     for i in range(num_classes)]
        self.confusion = MulticlassConfusionMatrix(num_classes=num_classes)

    def training_batch(self, batch: tuple[tuple[Tensor, Tensor], Tensor]) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """Speed perturbation, then SpecAugment's masks, on the training features."""
        (features, lengths), labels = batch
        features, lengths = self.stretch(features, lengths)
        features = self.warp(features)
        if self.augment is not None:
            features = self.augment(features, lengths)
        return (features, lengths), labels

    @staticmethod
    def user_data_callback() -> L.Callback:
        """What lets a speech data module of the user's own train this model: its batches checked and the feature
        settings ``transcribe`` needs kept in every checkpoint (:func:`~bp_apps.speech.data.user_speech_check`);
        ``bp-apps`` adds it to every run, a ``Trainer`` built by hand takes it from here."""
        from bp_apps.speech.data import user_speech_check

        return user_speech_check()

    def metrics_summary(self) -> dict[str, Any]:
        """For ``metrics.json``: the recognizer's keys; a classifier keeps no test transcripts."""
        return {"test_examples": []}

    # -- test reports: confusion matrix and per-recording predictions ---------------------------

    def on_test_epoch_start(self) -> None:
        self._report = _TestReport(self.trainer)

    def test_step(self, batch: tuple[tuple[Tensor, Tensor], Tensor], batch_idx: int) -> Tensor:
        loss, logits, labels = self._evaluate(batch, "test")
        predicted = logits.argmax(-1)
        self.confusion.update(predicted, labels)
        probability = torch.softmax(logits.detach().float(), -1).gather(-1, predicted[:, None])[:, 0]
        sources = self._report.sources(batch_idx, len(labels))
        for source, label, guess, p in zip(sources, labels.tolist(), predicted.tolist(), probability.tolist()):
            self._report.rows.append({**source, "reference": self.class_names[label],
                                      "hypothesis": self.class_names[guess], "probability": round(p, 6),
                                      "correct": label == guess})
        return loss

    def on_test_epoch_end(self) -> None:
        """Write ``confusion_matrix.png`` (rows: spoken digit, columns: predicted) and ``test_predictions.jsonl``
        into the run's report folder; the matrix is summed and the rows gathered over every process."""
        matrix = self.confusion.compute().cpu()
        self.confusion.reset()
        report = getattr(self, "_report", None)
        folder = report_dir(self.trainer)  # None without a logger: no report, never into the current folder
        if report is None or folder is None:
            return
        rows, _ = report.gather()
        if self.trainer.is_global_zero:
            path = save_count_matrix(matrix.tolist(), self.class_names, self.class_names,
                                     folder / "confusion_matrix.png", "confusion matrix (test)",
                                     ylabel="spoken digit")
            print(f"confusion matrix written to {path}")
            path = write_jsonl(folder / "test_predictions.jsonl", rows)
            print(f"test predictions written to {path}")


class _TestReport:
    """What one process collects for the report files during a test: a row per example, the examples of the
    alignment figure, and where each batch's examples sit in the test set (when the loader's order is known)."""

    def __init__(self, trainer: L.Trainer) -> None:
        loader = running_test_loader(trainer)
        self.order = evaluation_order(loader)
        self.utterances = getattr(getattr(loader, "dataset", None), "utterances", None)
        self.rows: list[dict[str, Any]] = []
        self.figures: list[AlignmentExample] = []

    def sources(self, batch_idx: int, size: int) -> list[dict[str, Any]]:
        """``{"index": i, "audio": [files]}`` for each example of the batch (empty when the order is unknown)."""
        if self.order is None or batch_idx >= len(self.order) or len(self.order[batch_idx]) != size:
            return [{} for _ in range(size)]
        out = []
        for index in self.order[batch_idx]:
            source: dict[str, Any] = {"index": index}
            if self.utterances is not None and 0 <= index < len(self.utterances):
                source["audio"] = [str(part) for part in self.utterances[index].parts]
            out.append(source)
        return out

    def gather(self) -> tuple[list[dict[str, Any]], list[AlignmentExample]]:
        """Every process's rows and figure examples, in test-set order when it is known (the order of one
        process); a collective call under several processes."""
        parts = gather_rows([(self.rows, self.figures)])
        rows = [row for part_rows, _ in parts for row in part_rows]
        figures = [example for _, part_figures in parts for example in part_figures]
        if all("index" in row for row in rows):
            rows.sort(key=lambda row: row["index"])
            figures.sort(key=lambda example: example.index)
        return rows, figures


def _augment(value: SpecAugmentConfig | Mapping[str, Any] | None, default: SpecAugmentConfig
             ) -> SpecAugmentConfig | None:
    """``augment`` as settings: None (or false) turns SpecAugment off; a mapping overrides the task's defaults."""
    if value is None or value is False:
        return None
    return settings(SpecAugmentConfig, value, "augment", default)


def load_speech_model(path: str | Path) -> tuple[L.LightningModule, dict[str, Any]]:
    """Load a speech checkpoint safely (``weights_only=True``): the model in eval mode and the preprocessing its
    data module saved (feature settings, training words, class names). The network is rebuilt from the
    checkpoint's ``net`` (``class_path`` within bp_apps, torchvision or torch.nn); a wav2vec 2.0 network from the
    transformers configuration saved with it, never downloaded. Errors name the file and what is wrong with it;
    checkpoints written before networks were given as classes (flat ``model``, ``hidden``, ``lr``, ...) are refused
    (:meth:`~bp_apps.core.task.TaskModule.load`)."""
    path = Path(path)
    checkpoint = load_checkpoint_dict(path)
    task = check_task(checkpoint, (RECOGNIZER_TASK, CLASSIFIER_TASK), str(path), "a speech")
    preprocessing = saved_preprocessing(checkpoint, ("features",))
    if preprocessing is None:
        raise ValueError(f"{path} carries no feature settings (no speech data module's state); it was saved outside "
                         "a trainer run with a speech data module")
    cls = SpeechRecognizer if task == RECOGNIZER_TASK else SpokenDigitClassifier
    return cls.load(path), preprocessing


DIGIT_BEAM = 8
"""The beam width a digit recognizer decodes with by default (with its digit lexicon)."""


def default_decoder(model: L.LightningModule, prep: dict[str, Any], beam_size: int | None = None
                    ) -> BeamSearchDecoder | None:
    """How a speech checkpoint decodes: ``beam_size`` > 1, beam search restricted to the training words when the
    checkpoint holds them; 0 or 1, greedy; None, the default: a recognizer whose training words are all digit
    words (a digit model) uses the lexicon beam of :data:`DIGIT_BEAM` beams — on unheard voices it clearly beats
    greedy decoding (see the results log) — and any other model decodes greedily. A digit classifier needs none."""
    if not isinstance(model, SpeechRecognizer):
        return None
    words = list(prep.get("words") or [])
    if beam_size is None:
        beam_size = DIGIT_BEAM if words and set(words) <= set(DIGIT_WORDS) else 0
    if beam_size <= 1:
        return None
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bp_apps_lexicon_") as tmp:  # read once by the decoder
        lexicon = write_lexicon(words, Path(tmp) / "lexicon.txt") if words else None
        return BeamSearchDecoder(beam_size, lexicon)


def transcribe(paths: Sequence[str | Path], checkpoint: str | Path, beam_size: int | None = None,
               chunk_seconds: float = 20.0) -> list[dict[str, str]]:
    """Transcribe audio files of any sample rate and channel count with a speech checkpoint.

    Documented handling: silent files give an empty transcript; files longer than ``chunk_seconds`` are cut into
    pieces transcribed one by one and joined (a last piece under :data:`MIN_PIECE_SECONDS` joins the one before);
    audio shorter than :data:`MIN_PIECE_SECONDS` is padded with silence to that length (so short a sound rarely
    holds a word: expect an empty or one-word transcript); unreadable or empty files raise ValueError naming it. With a
    digit-classifier checkpoint the transcript is the predicted digit word. Decoding follows
    :func:`default_decoder`: ``beam_size`` > 1 beam search (restricted to the training words when the checkpoint
    holds them), 0 or 1 greedy, None the model's default (the lexicon beam for digit recognizers)."""
    from bp_apps.speech.audio import load_audio

    model, prep = load_speech_model(checkpoint)
    config = FeatureConfig(**prep["features"])
    extract = make_extractor(config)
    decoder = default_decoder(model, prep, beam_size)
    results = []
    for path in paths:
        pieces = waveform_features(load_audio(path, config.sample_rate, allow_silent=True), config, extract,
                                   chunk_seconds)
        texts = [decode_features(model, prep, [piece], decoder)[0] for piece in pieces]
        results.append({"path": str(path), "text": " ".join(t for t in texts if t)})
    return results


def waveform_features(waveform: Tensor, config: FeatureConfig, extract: Callable[[Tensor], Tensor],
                      chunk_seconds: float = 20.0) -> list[Tensor]:
    """The features ``(T, F)`` of each piece :func:`transcribe` hands the model for a mono waveform at
    ``config.sample_rate``: none for silence, pieces of at most ``chunk_seconds``, each at least
    :data:`MIN_PIECE_SECONDS` long (padded with silence)."""
    from bp_apps.speech.audio import SILENCE_PEAK, chunk_waveform

    if waveform.numel() == 0 or float(waveform.abs().max()) < SILENCE_PEAK:
        return []
    pieces = []
    for chunk in chunk_waveform(waveform, config.sample_rate, chunk_seconds, min_tail_seconds=MIN_PIECE_SECONDS):
        shortfall = int(MIN_PIECE_SECONDS * config.sample_rate) - chunk.numel()
        if shortfall > 0:  # the spectrogram's window needs more samples than a few milliseconds give
            chunk = torch.nn.functional.pad(chunk, (0, shortfall))
        pieces.append(extract(chunk))
    return pieces


def decode_features(model: L.LightningModule, prep: dict[str, Any], pieces: Sequence[Tensor],
                    decoder: Callable[[Tensor, Tensor], list[str]] | None = None) -> list[str]:
    """The text of each feature sequence ``(T, F)``, padded into one batch and run in one model call (``bp-apps
    serve`` batches requests through it): the transcript (``decoder``, else greedy), or a digit classifier's
    class word."""
    features = torch.nn.utils.rnn.pad_sequence(list(pieces), batch_first=True)
    lengths = torch.tensor([piece.shape[0] for piece in pieces])
    with torch.no_grad():
        if isinstance(model, SpokenDigitClassifier):
            names = prep.get("class_names", list(DIGIT_WORDS))
            return [names[int(i)] for i in model((features, lengths)).argmax(-1)]
        log_probs, out_lengths = model(features, lengths)
    return (decoder or greedy_decode)(log_probs, out_lengths)
