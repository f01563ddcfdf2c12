"""The tasks' real models built of engine layers: same weights as their autograd twins, the same training
trajectory from the same batches (float32, ≤ 1e-5), float64 gradients within 1e-10, and a fit through Lightning."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from bp_apps.cli import main
from bp_apps.core.callbacks import task_callbacks
from bp_apps.experiments.compare_tasks import compare_task_modules, map_floats
from bp_apps.speech.data import SpeechBatch
from bp_apps.speech.models import (
    ConvGRUCTC,
    DigitCNNNet,
    EngineConvGRUCTC,
    EngineDigitCNNNet,
    MaskedMeanMaxPool,
    PooledDigitNet,
)
from bp_apps.speech.task import SpeechRecognizer, SpokenDigitClassifier
from bp_apps.vision.data import DigitsImageDataModule
from bp_apps.vision.models import EngineSmallCNN, SmallCNN
from bp_apps.vision.task import ImageClassifier

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_CNN = {"width": 4, "hidden": [16], "dropout": 0.25}
TINY_CTC = {"conv_channels": 4, "subsample": 4, "hidden": 8, "layers": 2, "dropout": 0.15}
TINY_DIGITS = {"conv_channels": 4, "hidden": 8, "head_hidden": [8], "dropout": 0.2}


def same_state(engine: torch.nn.Module, twin: torch.nn.Module) -> None:
    engine_state, twin_state = engine.state_dict(), twin.state_dict()
    assert list(engine_state) == list(twin_state)
    for name, value in engine_state.items():
        assert torch.equal(value, twin_state[name]), name


@pytest.mark.parametrize(("engine_cls", "torch_cls", "args", "kwargs"), [
    (EngineSmallCNN, SmallCNN, ((1, 12, 12), 5), TINY_CNN),
    (EngineConvGRUCTC, ConvGRUCTC, (16,), TINY_CTC),
    (EngineDigitCNNNet, DigitCNNNet, (16, 10), TINY_DIGITS),
])
def test_engine_networks_have_the_autograd_networks_names_and_initial_weights(engine_cls, torch_cls, args,
                                                                              kwargs) -> None:
    torch.manual_seed(3)
    engine = engine_cls(*args, **kwargs)
    torch.manual_seed(3)
    same_state(engine, torch_cls(*args, **kwargs))
    same_state(engine, engine.to_autograd())
    assert engine.backend == "engine"
    assert all(not p.requires_grad for p in engine.parameters())


def _speech_batch(batch: int = 4, frames: int = 60, dim: int = 16, seed: int = 0) -> SpeechBatch:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([frames, frames - 7, frames - 20, 33][:batch])
    target_lengths = torch.tensor([5, 3, 4, 1][:batch])
    return SpeechBatch(torch.randn(batch, frames, dim, generator=generator), lengths,
                       torch.randint(1, 29, (batch, 5), generator=generator), target_lengths, [""] * batch)


def _digit_batch(batch: int = 6, frames: int = 40, dim: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(frames // 2, frames, batch).long()
    return (torch.randn(batch, frames, dim, generator=generator), lengths), torch.randint(0, 10, (batch,),
                                                                                        generator=generator)


def _image_batches(steps: int):
    data = DigitsImageDataModule(batch_size=16)
    data.setup("fit")
    batches = []
    while len(batches) < steps:
        batches += list(data.train_dataloader())
    return batches[:steps]


def _modules():
    optim = {"name": "adamw", "lr": 0.003, "max_grad_norm": 1.0}
    return {
        "vision": (ImageClassifier(net={"class_path": "bp_apps.vision.models.EngineSmallCNN", "init_args": TINY_CNN},
                                   optim=optim, input_shape=(1, 8, 8), num_classes=10, label_smoothing=0.1),
                   _image_batches(12)),
        "speech": (SpeechRecognizer(net={"class_path": "bp_apps.speech.models.EngineConvGRUCTC",
                                         "init_args": TINY_CTC}, optim=optim, input_dim=16,
                                    augment={"freq_masks": 1, "freq_width": 3, "time_masks": 1, "time_width": 5}),
                   [_speech_batch(seed=i) for i in range(8)]),
        "digits": (SpokenDigitClassifier(net={"class_path": "bp_apps.speech.models.EngineDigitCNNNet",
                                              "init_args": TINY_DIGITS}, optim=optim, input_dim=16,
                                         augment={"freq_masks": 1, "freq_width": 3, "time_masks": 1,
                                                  "time_width": 5}),
                   [_digit_batch(seed=i) for i in range(8)]),
    }


@pytest.mark.parametrize("task", ["vision", "speech", "digits"])
def test_engine_and_autograd_train_the_same_trajectory(task: str) -> None:
    """Same weights, same batches, same augmentation and dropout masks: float32 losses within 1e-5 over every step,
    float64 gradients within 1e-10 (clipping and AdamW on both sides)."""
    module, batches = _modules()[task]
    report = compare_task_modules(module, batches, steps=len(batches))
    assert report["steps"] == len(batches)
    assert report["max_grad_rel_error"] <= 1e-10, report["grad_rel_error_per_parameter"]
    assert set(report["grad_rel_error_per_parameter"]) == {n for n, _ in module.net.to_autograd().named_parameters()}
    assert report["max_loss_trajectory_diff"] <= 1e-5, report["loss_curves"]
    engine = report["loss_curves"]["engine"]
    assert len(set(engine)) == len(engine), "every step must see a new batch or new weights"
    for name in ("engine", "autograd"):
        assert report["backends"][name]["ms_per_step"] > 0 and report["backends"][name]["peak_memory_mb"] > 0


def test_the_pooling_gradient_splits_ties_as_autograd_does() -> None:
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.5, 0.0], [9.0, 9.0]]], dtype=torch.float64)
    lengths = torch.tensor([3])
    grad = torch.tensor([[0.3, -0.2, 1.0, 2.0]], dtype=torch.float64)
    pool = MaskedMeanMaxPool()
    out = pool.forward(x, lengths)
    dx = pool.backward(grad)

    reference = x.clone().requires_grad_(True)
    mask = (torch.arange(4)[None] < lengths[:, None]).unsqueeze(-1)
    mean = (reference * mask).sum(1) / mask.sum(1)
    peak = reference.masked_fill(~mask, float("-inf")).amax(1)
    expected = torch.cat([mean, peak], -1)
    expected.backward(grad)
    assert torch.equal(out, expected.detach())
    torch.testing.assert_close(dx, reference.grad, rtol=0, atol=1e-15)
    assert dx[0, 3].abs().sum() == 0, "a padded frame gets no gradient"
    assert issubclass(DigitCNNNet, PooledDigitNet)


def test_map_floats_converts_only_floating_tensors_inside_named_tuples() -> None:
    batch = _speech_batch()
    doubled = map_floats(batch, torch.Tensor.double)
    assert isinstance(doubled, SpeechBatch)
    assert doubled.features.dtype == torch.float64 and doubled.lengths.dtype == torch.int64


@pytest.mark.parametrize("task", ["vision", "speech", "digits"])
def test_engine_models_fit_and_reload_through_lightning(task: str, tmp_path: Path) -> None:
    module, batches = _modules()[task]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=4, default_root_dir=tmp_path, accelerator="cpu",
                        enable_progress_bar=False,
                        enable_model_summary=False, logger=False, limit_val_batches=2,
                        callbacks=task_callbacks("val_loss", "min"))
    before = [p.clone() for p in module.parameters()]
    assert not module.automatic_optimization
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert trainer.global_step == 4
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters())), "every weight trains"
    (checkpoint,) = tmp_path.rglob("best*.ckpt")
    loaded = type(module).load(checkpoint)
    same_state(module, loaded)
    assert type(loaded.net) is type(module.net)


def test_compare_command_on_a_task_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bp-apps compare --task vision` builds the model and data from the engine config, as fit would."""
    out = tmp_path / "report"
    code = main(["compare", "--task", "vision", "--config", str(CONFIGS / "vision" / "mnist_cnn_engine.yaml"),
                 "--steps", "3", "--out", str(out), "--json", str(tmp_path / "report.json"),
                 "--set", "data=bp_apps.vision.data.DigitsImageDataModule", "--set", "data.batch_size=8",
                 "--set", "model.net.init_args.width=4", "--set", "model.net.init_args.hidden=[8]"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["network"] == "EngineSmallCNN" and report["steps"] == 3
    assert report["max_grad_rel_error"] <= 1e-10 and report["max_loss_trajectory_diff"] <= 1e-5
    assert set(report["backends"]["engine"]) >= {"ms_per_step", "peak_memory_mb"}
    assert (out / "compare.png").stat().st_size > 0
    assert "| ms per step (median) |" in capsys.readouterr().out


def test_compare_refuses_an_autograd_config(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compare", "--task", "vision", "--config", str(CONFIGS / "vision" / "mnist_cnn.yaml"), "--steps", "1",
                 "--set", "data=bp_apps.vision.data.DigitsImageDataModule"])
    assert code == 2
    assert "engine layers" in capsys.readouterr().err


ENGINE_CONFIGS = sorted(CONFIGS.glob("*/*_engine.yaml"))


def _parsed(config: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    import yaml

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", ENGINE_CONFIGS, ids=lambda p: p.stem)
def test_engine_configs_are_their_autograd_configs_with_the_engine_network(config: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`X_engine.yaml` differs from `X.yaml` only in the network class: its engine twin."""
    twin = config.with_name(config.name.replace("_engine", ""))
    engine = _parsed(config, capsys)
    autograd = _parsed(twin if twin.exists() else config.with_name(config.name.replace("_engine", "_autograd")), capsys)
    engine_net = engine["model"]["init_args"].pop("net")
    autograd_net = autograd["model"]["init_args"].pop("net")
    assert engine_net["class_path"].rsplit(".", 1)[1] == "Engine" + autograd_net["class_path"].rsplit(".", 1)[1]
    for name, value in engine_net["init_args"].items():  # (SmallCNN has more options: its torch/bridge heads)
        assert autograd_net["init_args"].get(name) == value, name
    assert engine == autograd


def test_every_engine_config_has_a_parity_test() -> None:
    assert {p.stem for p in ENGINE_CONFIGS} >= {"mnist_cnn_engine", "fsdd_connected_ctc_engine", "fsdd_digits_engine",
                                             "srl_propbank_ewt_engine", "summarize_aeslc_engine"}
