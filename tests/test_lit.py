"""The Lightning classifier (the vision task's ``mlp`` on the digits): both backends learn, the engine one without
autograd, and resume exactly."""

import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bp_apps.engine import NonFiniteError
from bp_apps.engine import Optimizer as EngineOptimizer
from bp_apps.vision.data import DigitsImageDataModule
from bp_apps.vision.models import EngineImageMLP, ImageMLP
from bp_apps.vision.task import ImageClassifier

HIDDEN = (64, 64)


def mlp(backend: str = "engine", hidden: tuple[int, ...] = (128,), dropout: float = 0.0, norm: str | None = None,
        seed: int = 0, label_smoothing: float = 0.0, **optim: Any) -> ImageClassifier:
    """The digits MLP, the engine's unless ``backend`` is autograd (its torch.nn twin); no dropout, Adam at a
    constant rate without weight decay unless ``optim`` says otherwise."""
    net = partial(EngineImageMLP if backend == "engine" else ImageMLP, hidden=hidden, dropout=dropout, norm=norm)
    optim = {"name": "adam", "weight_decay": 0.0, "scheduler": "constant", **optim}
    return ImageClassifier(net, optim=optim, input_shape=(1, 8, 8), seed=seed, label_smoothing=label_smoothing)


def digits() -> DigitsImageDataModule:
    return DigitsImageDataModule(batch_size=64)


def trainer(**kwargs: Any) -> L.Trainer:
    """A quiet CPU trainer (no logger, checkpoints or progress bar unless asked)."""
    options = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_progress_bar": False, "logger": False,
               "enable_checkpointing": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
    return L.Trainer(**{**options, **kwargs})


def fit(model: ImageClassifier, epochs: int, ckpt_path: Path | None = None, **kwargs: Any) -> L.Trainer:
    """Fit with every RNG seeded, so two calls with equal arguments train identically."""
    L.seed_everything(0, verbose=False)
    t = trainer(max_epochs=epochs, **kwargs)
    t.fit(model, datamodule=digits(), ckpt_path=ckpt_path)
    return t


def params(model: ImageClassifier) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.net.parameters()]


def test_same_initial_weights_for_both_backends() -> None:
    before = torch.random.get_rng_state()
    engine = mlp(hidden=HIDDEN, norm="layer", seed=3)
    auto = mlp(hidden=HIDDEN, norm="layer", seed=3, backend="autograd")
    assert torch.equal(torch.random.get_rng_state(), before), "building a model must not move the global RNG"
    assert isinstance(auto.net, torch.nn.Sequential)
    assert not engine.automatic_optimization and auto.automatic_optimization
    for p, q in zip(engine.net.parameters(), auto.net.parameters(), strict=True):
        assert torch.equal(p, q)
    other = mlp(hidden=HIDDEN, norm="layer", seed=4)
    assert not torch.equal(next(other.net.parameters()), next(engine.net.parameters()))
    assert not any(p.requires_grad for p in engine.net.parameters())
    assert all(p.requires_grad for p in auto.net.parameters())


@pytest.mark.parametrize("backend", ["engine", "autograd"])
def test_backends_learn_digits(backend: str, tmp_path: Path) -> None:
    model = mlp(hidden=HIDDEN, backend=backend, lr=1e-2)
    recorded = []  # every tensor autograd saves for a backward pass goes through this hook
    with warnings.catch_warnings(record=True) as caught, torch.autograd.graph.saved_tensors_hooks(
            lambda t: recorded.append(t.shape) or t, lambda t: t):
        warnings.simplefilter("always")
        t = fit(model, 3, default_root_dir=tmp_path)  # the test run writes its confusion matrix there
    assert not [w for w in caught if "configure_optimizers" in str(w.message)]
    assert bool(recorded) == (backend == "autograd"), "the engine backend must never record an autograd graph"
    assert t.global_step == 3 * len(t.train_dataloader), "every engine step counts as an optimizer step"
    assert float(t.callback_metrics["val_acc"]) > 0.88  # 0.933 for both backends on CPU (test: 0.947)
    assert float(t.callback_metrics["train_loss_epoch"]) < 0.5
    if backend == "engine":
        assert not any(p.requires_grad for p in model.net.parameters()), "autograd was used"
        (optimizer,) = t.optimizers
        assert isinstance(optimizer, EngineOptimizer), "the engine's optimizer, stepped through Lightning"
        assert all(state["step"] == t.global_step for state in optimizer.state.values())
    (test,) = t.test(model, datamodule=digits(), verbose=False)
    assert test["test_acc"] > 0.88 and test["test_loss"] < 0.5
    probs = torch.cat(t.predict(model, datamodule=digits()))
    assert probs.shape == (450, 10) and torch.allclose(probs.sum(1), torch.ones(450))


def test_backends_train_alike_with_sgd_and_clipping() -> None:
    config = {"hidden": (32,), "name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3,
              "max_grad_norm": 0.5, "label_smoothing": 0.1, "norm": "batch"}
    engine = mlp(**config)
    auto = mlp(**config, backend="autograd")
    fit(engine, 1)
    fit(auto, 1)
    for p, q in zip(engine.net.parameters(), auto.net.parameters(), strict=True):
        torch.testing.assert_close(p, q.detach(), rtol=1e-4, atol=1e-5)
    running = {k.removeprefix("layers."): v for k, v in engine.net.state_dict().items() if "running" in k}
    assert running, "BatchNorm running statistics expected"
    for name, value in running.items():
        torch.testing.assert_close(value, auto.net.state_dict()[name], rtol=1e-4, atol=1e-5)


def test_same_seed_same_result() -> None:
    results = []
    for _ in range(2):
        model = mlp(hidden=HIDDEN, dropout=0.2, lr=3e-3)
        t = fit(model, 1)
        results.append((float(t.callback_metrics["val_acc"]), params(model)))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(p, q) for p, q in zip(results[0][1], results[1][1], strict=True))


def test_resume_restores_engine_optimizer(tmp_path: Path) -> None:
    config = {"hidden": (32,), "name": "adam", "lr": 3e-3}
    straight = mlp(**config)
    t_straight = fit(straight, 2)

    first = mlp(**config)
    t = fit(first, 1)
    steps = t.global_step
    path = tmp_path / "epoch1.ckpt"
    t.save_checkpoint(path)
    (saved,) = torch.load(path, weights_only=True)["optimizer_states"]  # Lightning checkpoints it as its own
    live = t.optimizers[0].state_dict()["state"]
    assert saved["state"].keys() == live.keys() and all(s["step"] == steps for s in saved["state"].values())
    for index, entries in live.items():
        assert all(torch.equal(entries[k], saved["state"][index][k]) for k in ("exp_avg", "exp_avg_sq"))

    resumed = mlp(**{**config, "seed": 1})  # different initial weights: the checkpoint must win
    t2 = fit(resumed, 2, ckpt_path=path)
    assert t2.global_step == 2 * steps
    opt, ref = t2.optimizers[0].state_dict()["state"], t_straight.optimizers[0].state_dict()["state"]
    assert opt.keys() == ref.keys()
    for index in opt:
        assert opt[index]["step"] == ref[index]["step"] == 2 * steps, "Adam's step count continued"
        assert all(torch.equal(opt[index][k], ref[index][k]) for k in ("exp_avg", "exp_avg_sq"))
    assert all(torch.equal(p, q) for p, q in zip(params(resumed), params(straight), strict=True))

    # Loading weights only (no resume) starts a fresh optimizer, as Lightning does for its own.
    loaded = ImageClassifier.load(path)
    assert all(torch.equal(p, q) for p, q in zip(params(loaded), params(first), strict=True))
    assert not loaded.training


@pytest.mark.parametrize("backend", ["engine", "autograd"])
def test_nonfinite_policy(backend: str) -> None:
    x = torch.randn(32, 64)
    x[3, 5] = float("nan")
    loader = DataLoader(TensorDataset(x, torch.arange(32) % 10), batch_size=16)
    model = mlp(hidden=(16,), backend=backend, nonfinite="skip")
    before = params(model)
    L.seed_everything(0, verbose=False)
    trainer(max_steps=2).fit(model, train_dataloaders=loader)
    assert model.skipped_steps == 1, "only the batch holding the NaN is skipped"
    assert not all(torch.equal(p, q) for p, q in zip(params(model), before, strict=True))
    with pytest.raises(NonFiniteError, match="non-finite"):
        trainer(max_steps=2).fit(mlp(hidden=(16,), backend=backend), train_dataloaders=loader)


def test_engine_backend_precision() -> None:
    model = mlp(hidden=(16,))
    with pytest.raises(ValueError, match="does not support precision"):
        trainer(precision="bf16-mixed", max_steps=1).fit(model, datamodule=digits())
    model = mlp(hidden=(16,))
    trainer(precision="64-true", max_steps=3, limit_val_batches=1).fit(model, datamodule=digits())
    assert all(p.dtype == torch.float64 for p in model.net.parameters())
    states = list(model.trainer.optimizers[0].state.values())
    assert states and all(s["step"] == 3 and s["exp_avg"].dtype == torch.float64 for s in states)


def test_lightning_cli_config() -> None:
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(ImageClassifier, DigitsImageDataModule, run=False,
                       args=["--model.net=bp_apps.vision.models.ImageMLP", "--model.net.init_args.hidden=[32, 16]",
                             "--model.net.init_args.norm=layer", "--model.input_shape=[1, 8, 8]",
                             "--model.optim.max_grad_norm=1.0", "--trainer.logger=false"])
    assert isinstance(cli.model.net, ImageMLP) and cli.model.automatic_optimization
    net = cli.model.hparams.net
    assert net["class_path"] == "bp_apps.vision.models.ImageMLP"
    assert list(net["init_args"]["hidden"]) == [32, 16] and net["init_args"]["norm"] == "layer"
    assert cli.model.hparams.optim["max_grad_norm"] == 1.0 == cli.model.optim.max_grad_norm
    assert (cli.model.optim.name, cli.model.optim.lr, cli.model.optim.scheduler) == ("adamw", 1e-3, "cosine")


def test_plain_ddp_is_refused_for_the_engine_with_a_message_naming_ddp_engine() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    from bp_apps.core.distributed import EngineDDPStrategy

    engine, autograd = mlp(hidden=(8,), backend="engine"), mlp(hidden=(8,), backend="autograd")
    engine.trainer = autograd.trainer = SimpleNamespace(strategy=DDPStrategy())
    with pytest.raises(ValueError, match=r"--trainer\.strategy=ddp_engine"):
        engine.setup("fit")
    autograd.setup("fit")  # DDP wraps autograd networks as usual
    engine.trainer = SimpleNamespace(strategy=EngineDDPStrategy())
    engine.setup("fit")
