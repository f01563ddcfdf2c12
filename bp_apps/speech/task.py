"""Speech-to-text with Lightning: a CTC recognizer (``SpeechRecognizer``) and an isolated spoken-digit classifier
(``SpokenDigitClassifier``, whose head is the hand-written MLP through the bridge), plus checkpoint loading and
``transcribe`` for the ``bp-apps transcribe`` command.

The config's callbacks keep the best checkpoint by validation CER/WER (or accuracy) and write ``metrics.json`` (with
the data module's feature settings and a few test transcripts); the CLI then tests that checkpoint. Checkpoints
carry the task name and, as the data module's state, the feature settings and training words, so a checkpoint alone
is enough to transcribe files. The models never read the data module: the CLI links what they need from it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.text import CharErrorRate, WordErrorRate

from bp_apps.core.datalink import saved_preprocessing
from bp_apps.core.io import load_checkpoint_dict
from bp_apps.core.lit import ClassifierModule
from bp_apps.core.task import NO_DECAY_KEYS, OptimizerConfig, TaskModule, check_task
from bp_apps.speech.data import SpeechBatch
from bp_apps.speech.decoding import DIGIT_WORDS, BeamSearchDecoder, greedy_decode, write_lexicon
from bp_apps.speech.features import FeatureConfig, SpecAugment, TimeStretch, make_extractor
from bp_apps.speech.models import DigitClassifierNet, Wav2Vec2CTC, build_ctc_model

__all__ = ["RECOGNIZER_TASK", "SpeechRecognizer", "SpokenDigitClassifier", "load_speech_model", "transcribe"]

HF_CONFIG_KEY = "bp_apps_hf_config"
RECOGNIZER_TASK = "speech.SpeechRecognizer"
CLASSIFIER_TASK = "speech.SpokenDigitClassifier"
EXAMPLES = 8


class SpeechRecognizer(TaskModule):
    """Character CTC speech recognizer: ``conv_gru``, ``conformer`` (on log-mel, ``input_dim`` = ``n_mels``) or
    ``wav2vec2`` (on waveforms, ``input_dim`` = 1; ``pretrained`` names a model for online users).

    SpecAugment masks the training inputs. Validation decodes greedily; test also runs beam search when
    ``beam_size`` > 0, restricted to ``lexicon_words`` (the training words) when ``lexicon`` is set. ``bp-apps``
    links ``input_dim`` and ``lexicon_words`` from the data module, whose ``setup`` refuses another feature size."""

    task_name = RECOGNIZER_TASK
    task_title = "a speech-recognizer"

    def __init__(self, model: Literal["conv_gru", "conformer", "wav2vec2"] = "conv_gru", input_dim: int = 64,
                 hidden: int = 192, layers: int = 2, subsample: int = 4, conv_channels: int = 32,
                 dropout: float = 0.15, heads: int = 4, ffn_dim: int = 576, kernel_size: int = 15,
                 pretrained: str | None = None, spec_augment: bool = True, freq_masks: int = 2, freq_width: int = 10,
                 time_masks: int = 2, time_width: int = 20, lr: float = 2e-3, weight_decay: float = 1e-2,
                 scheduler: Literal["constant", "cosine"] = "cosine", warmup_fraction: float = 0.05,
                 max_grad_norm: float | None = 5.0, beam_size: int = 0, lexicon: bool = True, seed: int = 0,
                 lexicon_words: Sequence[str] = ()) -> None:
        super().__init__(OptimizerConfig(lr=lr, weight_decay=weight_decay, scheduler=scheduler,
                                         warmup_fraction=warmup_fraction, max_grad_norm=max_grad_norm,
                                         no_decay_keys=NO_DECAY_KEYS))
        self.save_hyperparameters(ignore=["lexicon_words"])  # the data's, saved as its state
        self.net = build_ctc_model(model, input_dim, hidden=hidden, layers=layers, subsample=subsample,
                                   conv_channels=conv_channels, dropout=dropout, heads=heads, ffn_dim=ffn_dim,
                                   kernel_size=kernel_size, pretrained=pretrained, seed=seed)
        self.augment = SpecAugment(freq_masks, freq_width, time_masks, time_width) if spec_augment else None
        self.metrics = torch.nn.ModuleDict({f"{stage}_{name}": metric() for stage in ("val", "test", "test_beam")
                                            for name, metric in (("wer", WordErrorRate), ("cer", CharErrorRate))})
        self.lexicon_words = list(lexicon_words)
        self.test_examples: list[dict[str, str]] = []
        self._beam: BeamSearchDecoder | None = None

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Log-probabilities ``(B, T', V)`` and output lengths."""
        return self.net(features, lengths)

    def _ctc_loss(self, log_probs: Tensor, out_lengths: Tensor, batch: SpeechBatch) -> Tensor:
        return F.ctc_loss(log_probs.transpose(0, 1), batch.targets, out_lengths, batch.target_lengths, blank=0,
                          reduction="mean", zero_infinity=True)

    def training_step(self, batch: SpeechBatch, batch_idx: int) -> Tensor:
        features = self.augment(batch.features, batch.lengths) if self.augment is not None else batch.features
        log_probs, out_lengths = self(features, batch.lengths)
        loss = self._ctc_loss(log_probs, out_lengths, batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch.texts))
        return loss

    def _evaluate(self, batch: SpeechBatch, stage: str) -> list[str]:
        log_probs, out_lengths = self(batch.features, batch.lengths)
        size = len(batch.texts)
        self.log(f"{stage}_loss", self._ctc_loss(log_probs, out_lengths, batch), prog_bar=stage == "val",
                 batch_size=size, sync_dist=True)
        predictions = greedy_decode(log_probs, out_lengths)
        for name in ("wer", "cer"):
            metric = self.metrics[f"{stage}_{name}"]
            metric(predictions, batch.texts)
            self.log(f"{stage}_{name}", metric, prog_bar=stage == "val", batch_size=size)
        if stage == "test" and self.hparams.beam_size > 0:
            beam = self._beam_decoder()(log_probs, out_lengths)
            for name in ("wer", "cer"):
                metric = self.metrics[f"test_beam_{name}"]
                metric(beam, batch.texts)
                self.log(f"test_beam_{name}", metric, batch_size=size)
        return predictions

    def _beam_decoder(self) -> BeamSearchDecoder:
        if self._beam is None:
            lexicon = None
            if self.hparams.lexicon and self.lexicon_words:
                root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
                lexicon = write_lexicon(self.lexicon_words, root / "lexicon.txt")
            self._beam = BeamSearchDecoder(self.hparams.beam_size, lexicon)
        return self._beam

    def validation_step(self, batch: SpeechBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_test_epoch_start(self) -> None:
        self.test_examples = []

    def test_step(self, batch: SpeechBatch, batch_idx: int) -> None:
        predictions = self._evaluate(batch, "test")
        for prediction, reference in zip(predictions, batch.texts):
            if len(self.test_examples) < EXAMPLES:
                self.test_examples.append({"reference": reference, "prediction": prediction})

    def metrics_summary(self) -> dict[str, Any]:
        """For ``metrics.json``: the last test's first transcripts next to their references."""
        return {"test_examples": list(self.test_examples)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also store a wav2vec 2.0 network's configuration, so the checkpoint alone rebuilds it."""
        super().on_save_checkpoint(checkpoint)
        if isinstance(self.net, Wav2Vec2CTC):
            checkpoint[HF_CONFIG_KEY] = self.net.model.config.to_dict()



class SpokenDigitClassifier(ClassifierModule):
    """Isolated spoken digits (FSDD): conv + BiGRU encoder and the engine's hand-written MLP head through the
    autograd bridge; cross-entropy, accuracy; SpecAugment and optional speed perturbation (``time_stretch``) while
    training. Batches are ``((features, lengths), y)``. ``bp-apps`` links ``input_dim`` and ``num_classes`` from the
    data module, whose ``setup`` refuses other sizes.
    """

    task_name = CLASSIFIER_TASK
    task_title = "a spoken-digit-classifier"

    def __init__(self, input_dim: int = 40, num_classes: int = 10, conv_channels: int = 16, subsample: int = 2,
                 hidden: int = 96, head_hidden: Sequence[int] = (64,), dropout: float = 0.2,
                 spec_augment: bool = True, freq_masks: int = 2, freq_width: int = 6, time_masks: int = 2,
                 time_width: int = 8, time_stretch: float = 0.0, optimizer: Literal["sgd", "adam", "adamw"] = "adamw",
                 lr: float = 3e-3, weight_decay: float = 1e-2, max_grad_norm: float | None = 5.0,
                 label_smoothing: float = 0.05, scheduler: Literal["constant", "cosine"] = "cosine",
                 warmup_fraction: float = 0.05, seed: int = 0, encoder: Literal["gru", "cnn"] = "gru") -> None:
        net = DigitClassifierNet(input_dim, num_classes, conv_channels, subsample, hidden, head_hidden, dropout, seed,
                                 encoder)
        optim = OptimizerConfig(optimizer, lr, weight_decay=weight_decay, scheduler=scheduler,
                                warmup_fraction=warmup_fraction, max_grad_norm=max_grad_norm)
        super().__init__(net, num_classes, optim=optim, label_smoothing=label_smoothing)
        self.save_hyperparameters()
        self.augment = SpecAugment(freq_masks, freq_width, time_masks, time_width) if spec_augment else None
        self.stretch = TimeStretch(time_stretch)

    def training_step(self, batch: tuple[tuple[Tensor, Tensor], Tensor], batch_idx: int) -> Tensor:
        (features, lengths), labels = batch
        features, lengths = self.stretch(features, lengths)
        if self.augment is not None:
            features = self.augment(features, lengths)
        return super().training_step(((features, lengths), labels), batch_idx)

    def metrics_summary(self) -> dict[str, Any]:
        """For ``metrics.json``: the recognizer's keys; a classifier keeps no test transcripts."""
        return {"test_examples": []}


def load_speech_model(path: str | Path) -> tuple[L.LightningModule, dict[str, Any]]:
    """Load a speech checkpoint safely (``weights_only=True``): the model in eval mode and the preprocessing its
    data module saved (feature settings, training words, class names; checkpoints written before that was the data
    module's state are read too). Errors name the file and what is wrong with it."""
    path = Path(path)
    checkpoint = load_checkpoint_dict(path)
    task = check_task(checkpoint, (RECOGNIZER_TASK, CLASSIFIER_TASK), str(path), "a speech")
    preprocessing = saved_preprocessing(checkpoint, ("features",))
    if preprocessing is None:
        raise ValueError(f"{path} carries no feature settings (no speech data module's state); it was saved outside "
                         "a trainer run with a speech data module")
    cls = SpeechRecognizer if task == RECOGNIZER_TASK else SpokenDigitClassifier
    # Only the constructor's arguments: older checkpoints also hold settings since dropped (e.g. ``monitor``).
    accepted = inspect.signature(cls).parameters
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if k in accepted}
    if task == RECOGNIZER_TASK:
        pretrained = hparams.get("pretrained")
        hparams["pretrained"] = None  # the weights come from the checkpoint: never download
        model: L.LightningModule = SpeechRecognizer(**hparams)
        if hparams.get("model") == "wav2vec2" and (pretrained or HF_CONFIG_KEY in checkpoint):
            from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

            model.net.model = Wav2Vec2ForCTC(Wav2Vec2Config.from_dict(checkpoint[HF_CONFIG_KEY]))
    else:
        model = SpokenDigitClassifier(**hparams)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError) as error:
        raise ValueError(f"{path}: the weights (field 'state_dict') do not fit the model: {error}") from error
    model.eval()
    return model, preprocessing


def transcribe(paths: Sequence[str | Path], checkpoint: str | Path, beam_size: int | None = None,
               chunk_seconds: float = 20.0) -> list[dict[str, str]]:
    """Transcribe audio files of any sample rate and channel count with a speech checkpoint.

    Documented handling: silent files give an empty transcript; files longer than ``chunk_seconds`` are cut into
    pieces transcribed one by one and joined; unreadable or empty files raise ValueError naming the file. With a
    digit-classifier checkpoint the transcript is the predicted digit word. ``beam_size`` > 1 uses beam search,
    restricted to the training words when the checkpoint holds them."""
    from bp_apps.speech.audio import SILENCE_PEAK, chunk_waveform, load_audio

    model, prep = load_speech_model(checkpoint)
    config = FeatureConfig(**prep["features"])
    extract = make_extractor(config)
    decoder = None
    if beam_size is not None and beam_size > 1 and isinstance(model, SpeechRecognizer):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bp_apps_lexicon_") as tmp:  # read once by the decoder
            lexicon = write_lexicon(prep["words"], Path(tmp) / "lexicon.txt") if prep.get("words") else None
            decoder = BeamSearchDecoder(beam_size, lexicon)
    results = []
    for path in paths:
        waveform = load_audio(path, config.sample_rate, allow_silent=True)
        if float(waveform.abs().max()) < SILENCE_PEAK:
            results.append({"path": str(path), "text": ""})
            continue
        pieces = []
        for chunk in chunk_waveform(waveform, config.sample_rate, chunk_seconds):
            features = extract(chunk).unsqueeze(0)
            lengths = torch.tensor([features.shape[1]])
            with torch.no_grad():
                if isinstance(model, SpokenDigitClassifier):
                    names = prep.get("class_names", list(DIGIT_WORDS))
                    pieces.append(names[int(model((features, lengths)).argmax(-1))])
                    continue
                log_probs, out_lengths = model(features, lengths)
            pieces.append((decoder or greedy_decode)(log_probs, out_lengths)[0])
        results.append({"path": str(path), "text": " ".join(p for p in pieces if p)})
    return results
