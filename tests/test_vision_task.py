"""Image classification task on the embedded digits: every model trains, runs leave metrics.json,
a confusion matrix and a best checkpoint, predict-image works, and wrong checkpoints are refused."""

import json
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from bp_apps.cli import main
from bp_apps.core.callbacks import task_callbacks
from bp_apps.vision.data import DigitsImageDataModule
from bp_apps.vision.models import EngineImageMLP, ImageMLP, ResNet18, SmallCNN
from bp_apps.vision.task import DEFAULT_OPTIM, ImageClassifier, load_image_classifier, predict_images

ROOT = Path(__file__).resolve().parents[1]


def fit_and_test(model: ImageClassifier, tmp_path: Path, epochs: int = 1, **trainer: Any) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    t = L.Trainer(max_epochs=epochs, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=task_callbacks("val_acc", "max"), **trainer)
    data = DigitsImageDataModule(batch_size=64)
    t.fit(model, datamodule=data)
    t.test(model, datamodule=data, ckpt_path="best", verbose=False)
    return t


NETWORKS = {
    "engine_mlp": partial(EngineImageMLP, hidden=(64,), dropout=0.0),
    "autograd_mlp": partial(ImageMLP, hidden=(64,), dropout=0.0),
    "cnn": partial(SmallCNN, width=8, hidden=(64,), dropout=0.0),
    "cnn_engine_head": partial(SmallCNN, width=8, hidden=(64,), dropout=0.0, head="engine_mlp"),
    "resnet18": ResNet18,
}


def engine_mlp(**kwargs: Any) -> ImageClassifier:
    """The digits MLP trained by the engine (hidden 64, no dropout, lr 3e-3) with ``kwargs`` for the task."""
    return ImageClassifier(NETWORKS["engine_mlp"], **{"input_shape": (1, 8, 8), "optim": {"lr": 3e-3}, **kwargs})


@pytest.mark.parametrize("model", sorted(NETWORKS))
def test_every_model_trains_and_leaves_its_files(model, tmp_path):
    classifier = ImageClassifier(NETWORKS[model], input_shape=(1, 8, 8), optim={"lr": 3e-3})
    backend = "engine" if model == "engine_mlp" else "autograd"
    assert classifier.engine == (backend == "engine")
    t = fit_and_test(classifier, tmp_path, epochs=2 if model != "resnet18" else 1,
                     limit_train_batches=1.0 if model != "resnet18" else 4)
    log_dir = Path(t.log_dir)
    metrics = json.loads((log_dir / "metrics.json").read_text())
    assert set(metrics["validation"]) >= {"val_acc", "val_loss", "val_acc_top5"}
    assert set(metrics["test"]) >= {"test_acc", "test_loss", "test_acc_top5"}
    assert metrics["class_names"] == [str(i) for i in range(10)]
    assert metrics["skipped_images"]["count"] == 0
    assert metrics["best_checkpoint"].endswith(".ckpt") and Path(metrics["best_checkpoint"]).exists()
    assert (log_dir / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    if model != "resnet18":  # a couple of epochs is enough for the small models
        assert metrics["test"]["test_acc"] > 0.6
        assert metrics["test"]["test_acc_top5"] >= metrics["test"]["test_acc"]
    if backend == "engine":
        assert not any(p.requires_grad for p in classifier.net.parameters())


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("digits")
    t = fit_and_test(engine_mlp(), tmp_path, epochs=3)
    return Path(t.checkpoint_callback.best_model_path)


def _digit_png(path: Path, index: int, size: int = 32, mode: str = "RGB") -> int:
    """Write digits test image ``index`` as a ``size``-pixel PNG in ``mode``; return its label."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images[index] / 16 * 255).astype(np.uint8)
    Image.fromarray(pixels, mode="L").resize((size, size), Image.NEAREST).convert(mode).save(path)
    return int(digits.target[index])


def test_predict_image_any_size_and_mode(digits_checkpoint, tmp_path, capsys):
    paths, labels = [], []
    for i, mode in enumerate(["L", "RGB", "RGBA", "P"]):
        path = tmp_path / f"digit_{i}.png"
        labels.append(_digit_png(path, i * 7, size=8 * (i + 1), mode=mode))
        paths.append(path)
    results = predict_images(paths, digits_checkpoint, top_k=3)
    assert [len(r["top"]) for r in results] == [3] * 4
    for r in results:
        probs = [t["probability"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert sum(r["top"][0]["class"] == str(y) for r, y in zip(results, labels)) >= 3
    assert main(["predict-image", *map(str, paths), "--ckpt", str(digits_checkpoint), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith(str(paths[0]) + "\t")
    assert main(["predict-image", str(paths[1]), "--ckpt", str(digits_checkpoint), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["path"] == str(paths[1])


def test_predict_image_unreadable_file_is_named(digits_checkpoint, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["predict-image", str(bad), "--ckpt", str(digits_checkpoint)]) == 2
    assert "broken.png" in capsys.readouterr().err


def test_checkpoint_of_another_task_is_refused(digits_checkpoint, tmp_path, capsys):
    from bp_apps.speech.task import SpokenDigitClassifier

    # The spoken-digit classifier shares the classifier module (and the hyperparameter names) with this task:
    # only the task name its checkpoints carry tells them apart.
    checkpoint = torch.load(digits_checkpoint, map_location="cpu", weights_only=True)
    other = tmp_path / "spoken.ckpt"
    torch.save({**checkpoint, "bp_apps_task": SpokenDigitClassifier.task_name}, other)
    with pytest.raises(ValueError, match="not an image-classification checkpoint"):
        load_image_classifier(other)
    image = tmp_path / "x.png"
    _digit_png(image, 0)
    assert main(["predict-image", str(image), "--ckpt", str(other)]) == 2
    assert "not an image-classification checkpoint" in capsys.readouterr().err


def test_checkpoint_with_another_class_count_is_refused(digits_checkpoint, tmp_path):
    model = engine_mlp(num_classes=5)
    checkpoint = torch.load(digits_checkpoint, map_location="cpu", weights_only=True)
    with pytest.raises(ValueError, match="trained for 10 classes, but this model has 5"):
        model.on_load_checkpoint(checkpoint)


def test_data_and_model_mismatch_is_refused(tmp_path):
    model = engine_mlp(input_shape=(1, 28, 28))
    t = L.Trainer(max_epochs=1, default_root_dir=tmp_path, enable_progress_bar=False, logger=False,
                  enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"gives input_shape=\(1, 8, 8\).*built for input_shape=\(1, 28, 28\)"):
        t.fit(model, datamodule=DigitsImageDataModule())


def test_the_network_is_injected_and_saved_as_its_class_and_arguments():
    """The task takes the network's class (a config's ``class_path``), builds it for the data's sizes under its own
    seed, and saves it, with the optimizer group, as plain data that rebuilds it."""
    before = torch.random.get_rng_state()
    model = ImageClassifier(partial(SmallCNN, width=4, hidden=(8,)), input_shape=(3, 12, 12), num_classes=4, seed=5,
                            optim={"lr": 0.02})
    assert torch.equal(torch.random.get_rng_state(), before), "building a model must not move the global RNG"
    assert isinstance(model.net, SmallCNN) and model.net(torch.zeros(2, 3, 12, 12)).shape == (2, 4)
    assert model.hparams["net"] == {"class_path": "bp_apps.vision.models.SmallCNN",
                                    "init_args": {"width": 4, "hidden": (8,)}}
    assert model.hparams["optim"]["lr"] == 0.02 and model.optim.weight_decay == DEFAULT_OPTIM.weight_decay
    again = ImageClassifier(model.hparams["net"], input_shape=(3, 12, 12), num_classes=4, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(model.net.parameters(), again.net.parameters(), strict=True))
    other = ImageClassifier(model.hparams["net"], input_shape=(3, 12, 12), num_classes=4, seed=6)
    assert not torch.equal(next(other.net.parameters()), next(model.net.parameters()))
    assert isinstance(ImageClassifier().net, SmallCNN) and ImageClassifier().optim == DEFAULT_OPTIM


def test_bad_network_settings_are_refused_naming_them():
    with pytest.raises(ValueError, match="norm normalises the engine MLP head"):
        ImageClassifier(partial(SmallCNN, norm="batch"))
    with pytest.raises(ValueError, match="head must be 'torch' or 'engine_mlp'"):
        ImageClassifier(partial(SmallCNN, head="manual"))
    with pytest.raises(ValueError, match=r"SmallCNN needs images of at least 4×4 pixels"):
        ImageClassifier(SmallCNN, input_shape=(1, 3, 3))
    with pytest.raises(ValueError, match=r"EngineImageMLP: input_shape must be \(channels, height, width\)"):
        ImageClassifier(EngineImageMLP, input_shape=(64,))
    with pytest.raises(ValueError, match=r"unknown pretrained weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        ImageClassifier(partial(ResNet18, pretrained="IMAGENET9K"), input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match=r"net: class_path 'os\.system' is outside the modules"):
        ImageClassifier({"class_path": "os.system", "init_args": {}})
    with pytest.raises(ValueError, match=r"lr must be positive"):
        ImageClassifier(optim={"lr": -1.0})
    with pytest.raises(ValueError, match=r"optim: unknown setting\(s\) learning_rate"):
        ImageClassifier(optim={"learning_rate": 0.1})


def test_digits_configs_start_both_backends_from_the_same_weights():
    """digits_mlp_engine and digits_mlp_autograd differ only in the network's backend: for the same seed the
    engine MLP and its torch.nn twin start from identical weights (so their figures are comparable)."""
    from lightning.pytorch.cli import LightningCLI

    nets = {}
    for config in ("digits_mlp_engine", "digits_mlp_autograd"):
        cli = LightningCLI(ImageClassifier, DigitsImageDataModule, run=False, subclass_mode_model=True,
                           subclass_mode_data=True, save_config_callback=None,
                           args=["--config", str(ROOT / "configs" / "vision" / f"{config}.yaml"),
                                 "--trainer.logger=false", "--model.init_args.input_shape=[1, 8, 8]"])
        nets[config] = cli.model
    engine, twin = nets["digits_mlp_engine"], nets["digits_mlp_autograd"]
    assert isinstance(engine.net, EngineImageMLP) and engine.engine
    assert isinstance(twin.net, ImageMLP) and not twin.engine
    pairs = list(zip(engine.net.parameters(), twin.net.parameters(), strict=True))
    assert len(pairs) == 6 and all(torch.equal(p, q) for p, q in pairs)
    assert engine.hparams["optim"] == twin.hparams["optim"]
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(engine.eval()(x), twin.eval()(x))
    assert isinstance(engine.net.to_autograd(), ImageMLP)
    torch.testing.assert_close(engine.net.to_autograd()(x), twin(x))


def test_a_pretrained_resnet_checkpoint_is_rebuilt_without_downloading():
    saved = {"net": {"class_path": "bp_apps.vision.models.ResNet18", "init_args": {"pretrained": "IMAGENET1K_V1"}},
             "input_shape": [1, 32, 32]}
    overrides = ImageClassifier.load_overrides(saved)
    assert overrides["net"]["init_args"] == {"pretrained": None, "small_stem": False}
    offline = ImageClassifier(overrides["net"], input_shape=(1, 32, 32))  # the architecture the weights were for
    assert offline.net.conv1.kernel_size == (7, 7) and offline.net.conv1.in_channels == 1
    assert ImageClassifier.load_overrides({"net": {"class_path": "bp_apps.vision.models.SmallCNN"}}) == {}
    assert ImageClassifier(ResNet18, input_shape=(3, 32, 32)).net.conv1.kernel_size == (3, 3)


def test_checkpoints_of_the_flat_constructor_are_refused_naming_the_file(digits_checkpoint, tmp_path):
    checkpoint = torch.load(digits_checkpoint, map_location="cpu", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    del hparams["net"], hparams["optim"]
    hparams.update(model="mlp", backend="engine", hidden=[64], lr=3e-3)  # as written before the network was injected
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)
    with pytest.raises(ValueError, match=r"older\.ckpt: its hyperparameters .*ImageClassifier.*earlier bp_apps"):
        ImageClassifier.load(older)


def test_checkpoint_with_code_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.ckpt"
    torch.save({"bp_apps_task": "vision.ImageClassifier", "payload": Payload()}, evil)
    with pytest.raises(ValueError, match="not a loadable checkpoint"):
        load_image_classifier(evil)
    assert not marker.exists(), "the pickled payload must never run"


def test_truncated_checkpoint_gives_a_clear_error(digits_checkpoint, tmp_path):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(digits_checkpoint.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a loadable checkpoint"):
        load_image_classifier(cut)


@pytest.mark.parametrize("config", ["digits_mlp_engine", "digits_mlp_autograd"])
def test_cli_fit_tests_the_best_checkpoint(config, tmp_path, capsys):
    argv = ["fit", "--config", str(ROOT / "configs" / "vision" / f"{config}.yaml"), "--trainer.max_epochs=2",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "metrics written to" in out
    (metrics_path,) = tmp_path.rglob("metrics.json")
    metrics = json.loads(metrics_path.read_text())
    assert metrics["test"]["test_acc"] > 0.8 and metrics["validation"]["val_acc"] > 0.8
    assert list(tmp_path.rglob("confusion_matrix.png"))
    assert Path(metrics["best_checkpoint"]).is_file(), "fit must save a checkpoint"
    assert list(tmp_path.rglob("config.yaml")), "LightningCLI saves the config next to the run"


def test_imagefolder_run_counts_skipped_images_in_its_summary(tmp_path):
    from bp_apps.vision.data import ImageFolderDataModule

    rng = np.random.default_rng(0)
    for person in ("alice", "bob"):
        folder = tmp_path / "faces" / person
        folder.mkdir(parents=True)
        for i in range(12):
            shade = 40 if person == "alice" else 200
            pixels = np.clip(rng.normal(shade, 20, (20 + i, 16 + i, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg")
    (tmp_path / "faces" / "bob" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    data = ImageFolderDataModule(data_root=str(tmp_path / "faces"), image_size=16, batch_size=8,
                                 skip_bad_images=True)
    model = ImageClassifier(partial(SmallCNN, width=4, hidden=(8,), dropout=0.0, head="engine_mlp"), num_classes=2,
                            input_shape=(3, 16, 16), optim={"lr": 1e-2})
    L.seed_everything(0, verbose=False)
    t = L.Trainer(max_epochs=6, default_root_dir=tmp_path / "run", enable_progress_bar=False,
                  enable_model_summary=False, log_every_n_steps=1, callbacks=task_callbacks("val_acc", "max"))
    t.fit(model, datamodule=data)
    t.test(model, datamodule=data, ckpt_path="best", verbose=False)
    metrics = json.loads((Path(t.log_dir) / "metrics.json").read_text())
    assert metrics["skipped_images"]["count"] == 1
    assert metrics["skipped_images"]["paths"][0].endswith("broken.jpg")
    assert metrics["class_names"] == ["alice", "bob"]
    assert metrics["test"]["test_acc"] >= 0.5


@pytest.mark.parametrize("config", sorted(p.stem for p in (ROOT / "configs" / "vision").glob("*.yaml")))
def test_every_vision_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "vision" / f"{config}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "bp_apps.vision.task.ImageClassifier" in printed and "bp_apps.vision.data." in printed


def test_train_vision_script_runs(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_vision.py"), "--config",
         str(ROOT / "configs" / "vision" / "digits_mlp_autograd.yaml"), "--trainer.max_epochs=1",
         f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "metrics written to" in result.stdout
    assert json.loads(next(tmp_path.rglob("metrics.json")).read_text())["test"]["test_acc"] > 0.5


def test_cli_links_the_folder_to_the_model_and_predict_reads_the_data_state(tmp_path):
    """No class count or shape on the command line (the config's are dropped): the CLI links them from the image
    folder, and ``predict-image`` reads the class names and normalisation from the data module's checkpoint state."""
    from test_vision_data import make_face_folder

    faces = make_face_folder(tmp_path / "faces", classes=("alice", "bob", "carol"))
    argv = ["fit", "--config", str(ROOT / "configs" / "vision" / "imagefolder.yaml"), f"--data.data_root={faces}",
            "--data.image_size=16", "--data.channels=1", "--data.batch_size=4",
            "--model.net.init_args.width=4", "--model.net.init_args.hidden=[8]", "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]
    assert main(argv) == 0
    ckpt = json.loads(next((tmp_path / "run").rglob("metrics.json")).read_text())["best_checkpoint"]
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["num_classes"] == 3
    assert list(checkpoint["hyper_parameters"]["input_shape"]) == [1, 16, 16]
    assert checkpoint["hyper_parameters"]["net"] == {
        "class_path": "bp_apps.vision.models.SmallCNN",
        "init_args": {"width": 4, "hidden": [8], "dropout": 0.25, "head": "engine_mlp", "norm": None}}
    assert checkpoint["ImageFolderDataModule"] == {"class_names": ["alice", "bob", "carol"], "input_shape": [1, 16, 16],
                                                   "mean": [0.5], "std": [0.5], "datamodule": "ImageFolderDataModule"}
    (result,) = predict_images([next((faces / "bob").glob("*.png"))], ckpt, top_k=3)
    assert sorted(t["class"] for t in result["top"]) == ["alice", "bob", "carol"]


def test_checkpoints_with_the_preprocessing_of_earlier_versions_still_predict(digits_checkpoint, tmp_path):
    """Before the data module's state carried it, the model stored the same entries under ``bp_apps_preprocessing``;
    without either, the error names the file."""
    checkpoint = torch.load(digits_checkpoint, map_location="cpu", weights_only=True)
    image = tmp_path / "seven.png"
    _digit_png(image, 7)
    older = tmp_path / "older.ckpt"
    state = checkpoint.pop("DigitsImageDataModule")
    torch.save({**checkpoint, "bp_apps_preprocessing": state}, older)
    assert predict_images([image], older, top_k=1) == predict_images([image], digits_checkpoint, top_k=1)
    bare = tmp_path / "bare.ckpt"
    torch.save(checkpoint, bare)  # neither entry
    with pytest.raises(ValueError, match=r"bare\.ckpt carries no preprocessing"):
        load_image_classifier(bare)


def test_a_checkpoint_of_differently_preprocessed_data_is_refused_on_resume():
    data = DigitsImageDataModule()
    data.load_state_dict(data.state_dict())  # the same data: accepted
    with pytest.raises(ValueError, match=r"preprocessed differently \(mean: checkpoint \[0\.5\], data \[0\.3052\]\)"):
        data.load_state_dict({**data.state_dict(), "mean": [0.5]})
