"""Bring your own data: a LightningDataModule of the user's own, and torchvision-style data sets through
:class:`~bp_apps.vision.data.DatasetDataModule`, train, checkpoint, test and predict; where a task needs what only
the suite's data modules give, the run fails before training and says what the data module must provide.

Everything is synthetic and tiny (a few steps on 8×8 or 12×12 images)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from bp_apps.cli import main
from bp_apps.core.datalink import USER_DATA_KEY, saved_preprocessing
from bp_apps.core.io import load_checkpoint_dict
from bp_apps.vision.data import DatasetDataModule
from bp_apps.vision.models import SmallCNN
from bp_apps.vision.task import ImageClassifier, predict_images

PREPROCESSING = ("class_names", "input_shape", "mean", "std")


def _images(n: int, shape: tuple[int, int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class (0, 1 or 2) is which third of the picture is bright: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.rand(n, *shape, generator=generator) * 0.2
    width = shape[2] // 3
    for i, label in enumerate(labels.tolist()):
        images[i, :, :, label * width:(label + 1) * width] += 0.8
    return images, labels


class ShapesData(L.LightningDataModule):
    """A plain data module of the user's own: (images, labels) batches of 3×12×12 float images, with the
    attributes the suite's modules have (bp-apps links the first three; mean and std are read for prediction)."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.class_names = ["left", "middle", "right"]
        self.num_classes = 3
        self.input_shape = (3, 12, 12)
        self.mean, self.std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]

    def setup(self, stage: str) -> None:
        images, labels = _images(48, self.input_shape)
        self.data = TensorDataset((images - 0.5) / 0.25, labels)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.hparams.batch_size)


class BareData(L.LightningDataModule):
    """A data module that says nothing about its data: 3×8×8 images, labels 0..2."""

    def __init__(self, shape: tuple[int, int, int] = (3, 8, 8)) -> None:
        super().__init__()
        self.shape = shape

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*_images(24, self.shape)), batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*_images(12, self.shape, seed=1)), batch_size=8)


def _trainer(root: Path, **kwargs: object) -> L.Trainer:
    """A Trainer built by hand, with the callbacks ``bp-apps`` would give an image classifier's run."""
    from bp_apps.core.callbacks import task_callbacks
    from bp_apps.vision.task import ImageClassifier

    return L.Trainer(default_root_dir=root, accelerator="cpu", max_epochs=1, enable_progress_bar=False,
                     enable_model_summary=False,
                     callbacks=[*task_callbacks("val_acc", "max"), ImageClassifier.user_data_callback()], **kwargs)


def _png(path: Path, third: int, size: int = 24) -> Path:
    pixels = np.full((size, size, 3), 40, dtype=np.uint8)
    pixels[:, third * size // 3:(third + 1) * size // 3] = 240
    Image.fromarray(pixels).save(path)
    return path


def test_own_data_module_fits_tests_and_predicts_from_the_command_line(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    assert main(["fit", "--model=bp_apps.vision.task.ImageClassifier", f"--data={__name__}.ShapesData",
                 "--model.net=bp_apps.vision.models.SmallCNN", "--model.net.width=8", "--model.net.hidden=[16]",
                 "--model.optim.lr=0.01", "--trainer.max_epochs=2", "--trainer.accelerator=cpu",
                 "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                 f"--trainer.default_root_dir={root}"]) == 0
    folder = root / "lightning_logs" / "version_0"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert "test_acc" in metrics["test"] and (folder / "confusion_matrix.png").is_file()
    checkpoint_path = Path(metrics["best_checkpoint"])
    checkpoint = load_checkpoint_dict(checkpoint_path)
    assert checkpoint[USER_DATA_KEY] == {"class_names": ["left", "middle", "right"], "input_shape": [3, 12, 12],
                                         "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    capsys.readouterr()
    image = _png(tmp_path / "right.png", third=2)
    assert main(["predict-image", str(image), "--ckpt", str(checkpoint_path), "--json", "--top-k", "3"]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    assert {t["class"] for t in result["top"]} == {"left", "middle", "right"}
    assert abs(sum(t["probability"] for t in result["top"]) - 1.0) < 1e-5


def test_a_silent_data_module_gets_sane_defaults(tmp_path: Path) -> None:
    model = ImageClassifier(net=SmallCNN, num_classes=3, input_shape=(3, 8, 8))
    trainer = _trainer(tmp_path)
    trainer.fit(model, datamodule=BareData())
    path = trainer.checkpoint_callback.best_model_path
    prep = saved_preprocessing(load_checkpoint_dict(path), PREPROCESSING)
    assert prep == {"class_names": ["0", "1", "2"], "input_shape": [3, 8, 8], "mean": [0.0] * 3, "std": [1.0] * 3}
    [result] = predict_images([_png(tmp_path / "x.png", third=0)], path, top_k=2)
    assert len(result["top"]) == 2 and result["top"][0]["class"] in {"0", "1", "2"}


def test_a_batch_the_model_cannot_take_fails_before_training_naming_the_setting(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    with pytest.raises(ValueError, match=r"images are 3×8×8 but the model was built for input_shape=\[1, 28, 28\]: "
                                         r"build it with input_shape=\[3, 8, 8\]"):
        trainer.fit(ImageClassifier(net=SmallCNN, num_classes=3), datamodule=BareData())
    assert trainer.global_step == 0 and not list(tmp_path.rglob("*.ckpt"))
    with pytest.raises(ValueError, match="labels run from 0 to 2 but the model has num_classes=2"):
        _trainer(tmp_path).fit(ImageClassifier(net=SmallCNN, num_classes=2, input_shape=(3, 8, 8)),
                               datamodule=BareData())


def test_torchvision_data_set_through_the_adapter(tmp_path: Path) -> None:
    from torchvision.datasets import FakeData

    train = FakeData(size=30, image_size=(3, 10, 14), num_classes=3, random_offset=0)
    val = FakeData(size=9, image_size=(3, 10, 14), num_classes=3, random_offset=100)
    data = DatasetDataModule(train=train, val=val, num_classes=3, input_shape=[3, 8, 8], mean=[0.5], std=[0.5],
                             batch_size=10)
    assert (data.class_names, data.input_shape, data.mean) == (["0", "1", "2"], (3, 8, 8), (0.5, 0.5, 0.5))
    assert not {"train", "val", "num_classes"} & set(data.hparams)  # data sets and sizes stay out
    model = ImageClassifier(net=SmallCNN, num_classes=data.num_classes, input_shape=data.input_shape,
                            class_names=data.class_names)
    trainer = _trainer(tmp_path)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, ckpt_path="best", verbose=False)
    assert "test_acc" in trainer.callback_metrics
    path = trainer.checkpoint_callback.best_model_path
    state = load_checkpoint_dict(path)["DatasetDataModule"]
    assert state["input_shape"] == [3, 8, 8] and state["std"] == [0.5, 0.5, 0.5]
    [result] = predict_images([_png(tmp_path / "x.png", third=1)], path, top_k=3)
    assert sorted(t["class"] for t in result["top"]) == ["0", "1", "2"]


def test_adapter_reads_what_it_is_not_told_from_the_data() -> None:
    images, labels = _images(30, (1, 6, 9))
    pixels = (images * 255).round().to(torch.uint8)
    data = DatasetDataModule(train=TensorDataset(pixels[:, 0], labels), val_fraction=0.2, seed=1)
    assert (data.num_classes, data.class_names, data.input_shape) == (3, ["0", "1", "2"], (1, 6, 9))
    assert (data.mean, data.std) == ((0.0,), (1.0,))  # no normalisation
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set)) == (24, 6) and data.test_set is data.val_set
    x, y = data.train_set[0]
    assert x.dtype == torch.float32 and x.shape == (1, 6, 9) and float(x.max()) <= 1.0 and isinstance(y, int)
    val_labels = sorted(data.val_set[i][1] for i in range(len(data.val_set)))
    assert val_labels == [0, 0, 1, 1, 2, 2]  # stratified

    class Named(TensorDataset):
        classes = ("cat", "dog", "owl")

    assert DatasetDataModule(train=Named(images, labels)).class_names == ["cat", "dog", "owl"]
    bad = DatasetDataModule(train=TensorDataset(images, labels), val=TensorDataset(images[:, :, :4], labels))
    bad.setup("fit")
    with pytest.raises(ValueError, match=r"val item 0: image of shape \(1, 4, 9\), but input_shape is \(1, 6, 9\)"):
        bad.val_set[0]
    with pytest.raises(ValueError, match="num_classes"):
        DatasetDataModule(train=TensorDataset(images, labels), class_names=["a", "b"], num_classes=3)
    with pytest.raises(ValueError, match=r"train item 0: expected an \(image, label\) pair"):
        DatasetDataModule(train=TensorDataset(images))


def test_speech_recognizer_trains_on_an_own_data_module_and_transcribes(tmp_path: Path) -> None:
    """A speech data module of the user's own trains the recognizer; with ``features`` it also leaves a checkpoint
    that ``transcribe`` reads (the settings it gave), without them the run stops before training, saying so."""
    from bp_apps.speech.audio import save_audio
    from bp_apps.speech.data import SpeechBatch
    from bp_apps.speech.decoding import encode_text
    from bp_apps.speech.features import FeatureConfig
    from bp_apps.speech.task import SpeechRecognizer, load_speech_model, transcribe

    class Utterances(L.LightningDataModule):
        def __init__(self, features: dict | None) -> None:
            super().__init__()
            self.save_hyperparameters()  # features as a hyperparameter: read from there

        def train_dataloader(self) -> DataLoader:
            texts = ["one two", "three", "four five six", "seven"]
            targets = [encode_text(t) for t in texts]
            generator = torch.Generator().manual_seed(0)
            batch = SpeechBatch(torch.randn(4, 60, 16, generator=generator), torch.tensor([60, 50, 60, 40]),
                                torch.nn.utils.rnn.pad_sequence(targets, batch_first=True),
                                torch.tensor([len(t) for t in targets]), texts)
            return DataLoader([batch], batch_size=None)

    def make_trainer() -> L.Trainer:
        return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=2, enable_progress_bar=False,
                         enable_model_summary=False, logger=False, callbacks=[SpeechRecognizer.user_data_callback()])

    for features, input_dim, message in ((None, 16, "must give `features`"),
                                         ({"sample_rate": 8000, "n_mels": 24}, 16, "input_dim=24")):
        refused = make_trainer()
        with pytest.raises(ValueError, match=message):
            refused.fit(SpeechRecognizer(input_dim=input_dim, augment=None), datamodule=Utterances(features))
        assert refused.global_step == 0  # stopped before the first step
    trainer = make_trainer()
    own = Utterances({"sample_rate": 8000, "n_mels": 16})
    trainer.fit(SpeechRecognizer(input_dim=16, augment=None), datamodule=own)
    path = tmp_path / "own.ckpt"
    trainer.save_checkpoint(path)
    _, prep = load_speech_model(path)
    assert FeatureConfig(**prep["features"]) == FeatureConfig(sample_rate=8000, n_mels=16)
    wav = save_audio(tmp_path / "tone.wav", 0.3 * np.sin(np.arange(8000) * 0.2), 8000)
    (result,) = transcribe([wav], path)
    assert isinstance(result["text"], str)


def test_labeler_without_a_vocabulary_file_fails_before_training(tmp_path: Path) -> None:
    from bp_apps.text.labeling.task import TokenLabeler

    class Sentences(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader([])

    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=1, enable_progress_bar=False,
                        enable_model_summary=False, logger=False)
    with pytest.raises(ValueError, match="TokenLabeler needs vocab_file"):
        trainer.fit(TokenLabeler(), datamodule=Sentences())
    assert trainer.global_step == 0
