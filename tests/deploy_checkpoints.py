"""Tiny checkpoints of every exportable and servable task, written as ``Trainer.save_checkpoint`` writes them
(weights, hyperparameters, the task's own entries and the data module's preprocessing state) without training:
serving and exporting must reproduce the task's own predictions, whatever the weights."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

from bp_apps.speech.data import FSDDDigitsDataModule, ManifestDataModule
from bp_apps.speech.models import ConvGRUCTC, DigitCNNNet, DigitGRUNet, EngineConvGRUCTC, EngineDigitCNNNet
from bp_apps.speech.task import SpeechRecognizer, SpokenDigitClassifier
from bp_apps.text.labeling.data import LabelingVocab
from bp_apps.text.labeling.models import BiLSTMTagger
from bp_apps.text.labeling.task import TokenLabeler
from bp_apps.vision.data import DigitsImageDataModule
from bp_apps.vision.models import EngineImageMLP, EngineSmallCNN, ImageMLP, SmallCNN
from bp_apps.vision.task import ImageClassifier

N_MELS = 16
VISION_NETS = {
    "engine_mlp": partial(EngineImageMLP, hidden=(16,), dropout=0.0),
    "mlp": partial(ImageMLP, hidden=(16,), dropout=0.0),
    "cnn_engine_head": partial(SmallCNN, width=4, hidden=(16,), dropout=0.0, head="engine_mlp"),
    "engine_cnn": partial(EngineSmallCNN, width=4, hidden=(16,), dropout=0.0),
}
SPEECH_NETS = {
    "conv_gru": partial(ConvGRUCTC, hidden=8, layers=2, conv_channels=4, dropout=0.0),
    "engine_conv_gru": partial(EngineConvGRUCTC, hidden=8, layers=1, conv_channels=4, dropout=0.0),
}
DIGIT_NETS = {
    "digit_cnn": partial(DigitCNNNet, conv_channels=2, hidden=8, head_hidden=(8,), dropout=0.0),
    "digit_gru": partial(DigitGRUNet, conv_channels=2, hidden=8, head_hidden=(8,), dropout=0.0),
    "engine_digit_cnn": partial(EngineDigitCNNNet, conv_channels=2, hidden=8, head_hidden=(8,), dropout=0.0),
}
WORDS = ["the", "cat", "dog", "saw", "took", "ball", "park", "in", "a"]
LABELS = ["O", "B-ARG0", "I-ARG0", "B-ARG1", "I-ARG1", "B-V", "B-ARGM-LOC", "I-ARGM-LOC"]


def save(module: L.LightningModule, path: Path, data: L.LightningDataModule | None = None) -> Path:
    """``module`` as a Lightning checkpoint with ``data``'s state (what a Trainer saves)."""
    checkpoint: dict[str, Any] = {"epoch": 0, "global_step": 0, "pytorch-lightning_version": L.__version__,
                                  "state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    if data is not None:
        checkpoint[type(data).__qualname__] = data.state_dict()
    torch.save(checkpoint, path)
    return path


def vision_checkpoint(folder: Path, net: str = "engine_mlp") -> Path:
    model = ImageClassifier(VISION_NETS[net], input_shape=(1, 8, 8), seed=3)
    return save(model, folder / f"vision_{net}.ckpt", DigitsImageDataModule())


def speech_checkpoint(folder: Path, net: str = "conv_gru") -> Path:
    if net in DIGIT_NETS:
        model: L.LightningModule = SpokenDigitClassifier(DIGIT_NETS[net], input_dim=N_MELS, augment=None, seed=3)
        data: L.LightningDataModule = FSDDDigitsDataModule(features={"n_mels": N_MELS}, cache=False)
    else:
        model = SpeechRecognizer(SPEECH_NETS[net], input_dim=N_MELS, augment=None, seed=3)
        data = ManifestDataModule(features={"n_mels": N_MELS, "sample_rate": 8000}, cache=False)
    return save(model, folder / f"speech_{net}.ckpt", data)


def labeling_checkpoint(folder: Path, predicates: bool = True) -> Path:
    chars = sorted({c for w in WORDS for c in w})
    vocab = LabelingVocab(["<pad>", "<unk>", *WORDS], ["<pad>", "<unk>", *chars], LABELS)
    settings = {"word_dim": 8, "char_channels": 4, "char_dim": 4, "predicate_dim": 4, "hidden": 8, "layers": 1,
                "dropout": 0.0}
    torch.manual_seed(3)
    model = TokenLabeler(net=partial(BiLSTMTagger, **settings), exclude_labels=["V"])
    model.build(vocab, predicates)
    return save(model.eval(), folder / f"labeling_{'srl' if predicates else 'plain'}.ckpt")
