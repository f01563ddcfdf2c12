"""Composition helpers: networks given as classes, settings as dataclass groups, both saved as plain data."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from bp_apps.core.compose import network_factory, plain, settings
from bp_apps.core.io import load_checkpoint_dict
from bp_apps.core.task import OptimizerConfig, TaskModule


class TinyNet(nn.Module):
    def __init__(self, in_features: int, out_features: int, hidden: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@dataclass
class Decoding:
    beams: int = 1
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.beams < 1:
            raise ValueError(f"beams must be >= 1, got {self.beams}")


def test_plain_writes_dataclasses_and_network_classes_as_data() -> None:
    value = {"optim": OptimizerConfig(lr=0.5, no_decay_keys=("bias",)), "net": functools.partial(TinyNet, hidden=7),
             "bare": TinyNet, "sizes": [1, (2, 3)]}
    out = plain(value)
    assert out["optim"]["lr"] == 0.5 and out["optim"]["no_decay_keys"] == ("bias",)
    name = f"{TinyNet.__module__}.TinyNet"
    assert out["net"] == {"class_path": name, "init_args": {"hidden": 7}}
    assert out["bare"] == {"class_path": name, "init_args": {}}
    assert out["sizes"] == [1, (2, 3)]


def test_plain_refuses_a_callable_it_cannot_write_down() -> None:
    with pytest.raises(ValueError, match=r"net: give a class or functools.partial"):
        plain(lambda n: TinyNet(n, 2), "net")


def test_network_factory_rebuilds_a_saved_class_from_trusted_modules_only() -> None:
    factory = network_factory({"class_path": "torch.nn.Linear", "init_args": {"bias": False}})
    layer = factory(4, 2)
    assert isinstance(layer, nn.Linear) and layer.bias is None and layer.weight.shape == (2, 4)
    with pytest.raises(ValueError, match="outside the modules"):
        network_factory({"class_path": "os.system"}, "net")
    with pytest.raises(ValueError, match="does not exist"):
        network_factory({"class_path": "torch.nn.NoSuchLayer"}, "net")
    with pytest.raises(ValueError, match=r"not a torch.nn.Module class"):
        network_factory({"class_path": "torch.nn.functional.relu"}, "net")
    with pytest.raises(ValueError, match="needs 'class_path'"):
        network_factory({"init_args": {}}, "model.net")
    assert network_factory(TinyNet) is TinyNet


def test_settings_merge_a_mapping_over_the_task_defaults_and_validate() -> None:
    default = Decoding(beams=4)
    assert settings(Decoding, None, "generation", default) is default
    assert settings(Decoding, {"length_penalty": 2.0}, "generation", default) == Decoding(4, 2.0)
    with pytest.raises(ValueError, match=r"generation: unknown setting.*beam_width"):
        settings(Decoding, {"beam_width": 3}, "generation", default)
    with pytest.raises(ValueError, match="beams must be >= 1"):
        settings(Decoding, {"beams": 0}, "generation", default)
    with pytest.raises(ValueError, match=r"optim: .*lr must be positive|lr must be positive"):
        settings(OptimizerConfig, {"lr": -1.0}, "optim")


class TinyTask(TaskModule):
    task_name = "tests.TinyTask"
    default_optim = OptimizerConfig(name="sgd", lr=0.25)

    def __init__(self, net=TinyNet, optim: OptimizerConfig | dict | None = None, width: int = 4) -> None:
        super().__init__(optim)
        self.save_hyperparameters()
        self.net = network_factory(net)(width, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)


def test_a_task_given_objects_saves_plain_hyperparameters_and_loads_safely(tmp_path) -> None:
    import lightning as L

    task = TinyTask(net=functools.partial(nn.Linear, bias=False), optim={"lr": 0.125}, width=4)
    assert task.optim == OptimizerConfig(name="sgd", lr=0.125)  # the mapping overrides the task's defaults
    assert task.hparams["net"] == {"class_path": "torch.nn.modules.linear.Linear", "init_args": {"bias": False}}
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, torch.utils.data.DataLoader(data, batch_size=4))
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    assert load_checkpoint_dict(path)["hyper_parameters"]["optim"]["lr"] == 0.125  # weights_only reads it
    loaded = TinyTask.load(path)
    assert isinstance(loaded.net, nn.Linear) and loaded.net.bias is None and loaded.optim.lr == 0.125
    torch.testing.assert_close(loaded.net.weight, task.net.weight)


def test_a_checkpoint_with_arguments_this_version_does_not_take_is_refused_clearly(tmp_path) -> None:
    task = TinyTask()
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": {"lr": 0.1, "width": 4},
                  "bp_apps_task": TinyTask.task_name, "pytorch-lightning_version": "2.6.0"}
    path = tmp_path / "old.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"old.ckpt: its hyperparameters .* TinyTask no longer takes \(lr\)"):
        TinyTask.load(path)


def test_a_data_module_given_a_settings_dataclass_keeps_plain_hyperparameters() -> None:
    from bp_apps.speech.data import FSDDDigitsDataModule
    from bp_apps.speech.features import FeatureConfig

    data = FSDDDigitsDataModule(batch_size=7, features=FeatureConfig(n_mels=32))
    assert data.hparams["features"]["n_mels"] == 32 and isinstance(data.hparams["features"], dict)
    assert data.hparams["batch_size"] == 7  # the subclass's own arguments are collected too
