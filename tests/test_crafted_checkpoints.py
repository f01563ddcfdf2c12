"""Damaged or crafted checkpoints are refused with a message naming the file: non-finite weights, hyperparameters
that describe a far larger model than the weights saved, too few class names, weights of the wrong shape."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from bp_apps.cli import main
from bp_apps.vision.models import SmallCNN
from bp_apps.vision.task import ImageClassifier

DIGITS_STATE = {"datamodule": "DigitsImageDataModule", "class_names": [str(i) for i in range(10)], "mean": [0.5],
                "std": [0.25], "input_shape": [1, 8, 8]}


def save(tmp_path, model: ImageClassifier, **changes) -> str:
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  "bp_apps_task": ImageClassifier.task_name, "pytorch-lightning_version": L.__version__,
                  "DigitsImageDataModule": dict(DIGITS_STATE), **changes}
    path = tmp_path / "model.ckpt"
    torch.save(checkpoint, path)
    return str(path)


@pytest.fixture
def model() -> ImageClassifier:
    return ImageClassifier(functools.partial(SmallCNN, width=4, hidden=(8,)), input_shape=(1, 8, 8))


def test_a_well_formed_checkpoint_loads(tmp_path, model) -> None:
    loaded = ImageClassifier.load(save(tmp_path, model))
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


def test_non_finite_weights_are_refused_at_load(tmp_path, model, capsys) -> None:
    state = model.state_dict()
    state["net.head.0.weight"][0, 0] = float("nan")
    path = save(tmp_path, model, state_dict=state)
    with pytest.raises(ValueError, match=r"model.ckpt: weight 'net.head.0.weight' holds NaN or infinite values"):
        ImageClassifier.load(path)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (8, 8), 128).save(image)
    assert main(["predict-image", str(image), "--ckpt", path]) == 2
    assert "holds NaN or infinite values" in capsys.readouterr().err


def test_hyperparameters_asking_for_a_huge_model_are_refused_before_building_it(tmp_path, model) -> None:
    hparams = {**model.hparams, "net": {"class_path": "bp_apps.vision.models.SmallCNN",
                                        "init_args": {"width": 200_000, "hidden": [8]}}}
    path = save(tmp_path, model, hyper_parameters=hparams)
    with pytest.raises(ValueError, match=r"describe a model of [\d,]+ weights but the checkpoint holds"):
        ImageClassifier.load(path)


def test_weights_of_the_wrong_shape_and_too_few_class_names_are_named(tmp_path, model, capsys) -> None:
    state = model.state_dict()
    state["net.head.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"model.ckpt: the weights \(field 'state_dict'\) do not fit the model"):
        ImageClassifier.load(save(tmp_path, model, state_dict=state))
    path = save(tmp_path, model, DigitsImageDataModule={**DIGITS_STATE, "class_names": ["0", "1"]})
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (8, 8), 128).save(image)
    assert main(["predict-image", str(image), "--ckpt", path]) == 2
    assert "names 2 classes but the model predicts 10" in capsys.readouterr().err
