"""DP-SGD in the tasks: the privacy settings, the accounting (σ solved for a target ε, refused when out of reach),
Poisson sampling (its statistics, disjoint shares under DDP, empty batches), a private fit through Lightning that
logs ε and writes it to metrics.json, resume of the accounting, and the membership-inference audit."""

from __future__ import annotations

import csv
import json
import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from bp_apps.cli import main
from bp_apps.core.callbacks import LastCheckpoint, task_callbacks
from bp_apps.core.privacy import (
    MAX_NOISE_MULTIPLIER,
    PRIVACY_KEY,
    EmptyBatchCollate,
    PoissonBatchSampler,
    PrivacyConfig,
    PrivacyLedger,
    PrivateTraining,
    epsilon_spent,
    plan_privacy,
    privacy_settings,
    solve_noise_multiplier,
)
from bp_apps.experiments.privacy_audit import attack_figures, audit_checkpoint, example_losses
from bp_apps.vision.data import DigitsImageDataModule
from bp_apps.vision.dp_models import EngineDPMLP
from bp_apps.vision.models import EngineSmallCNN, ImageMLP
from bp_apps.vision.task import ImageClassifier

TINY_MLP = partial(EngineDPMLP, hidden=(32,), activation="tanh")


# -- settings ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "message"), [
    ({}, "exactly one of target_epsilon"),
    ({"target_epsilon": 3.0, "noise_multiplier": 1.0}, "exactly one of target_epsilon"),
    ({"target_epsilon": 0.0}, "privacy.target_epsilon must be a positive number"),
    ({"target_epsilon": float("inf")}, "privacy.target_epsilon"),
    ({"noise_multiplier": 0.0}, "privacy.noise_multiplier must be a positive number"),
    ({"noise_multiplier": MAX_NOISE_MULTIPLIER * 2}, "privacy.noise_multiplier must be at most"),
    ({"target_epsilon": 3.0, "delta": 0.0}, "privacy.delta must be in"),
    ({"target_epsilon": 3.0, "delta": 1.0}, "privacy.delta must be in"),
    ({"target_epsilon": 3.0, "max_grad_norm": -1.0}, "privacy.max_grad_norm must be a positive number"),
    ({"target_epsilon": 3.0, "accountant": "gdp"}, "privacy.accountant must be one of rdp, prv"),
    ({"target_epsilon": 3.0, "seed": -1}, "privacy.seed must be a non-negative integer"),
    ({"target_epsilon": 3.0, "seed": "0"}, "privacy.seed"),
    ({"target_epsilon": 3.0, "epsilon": 1.0}, "unknown setting.*epsilon"),
])
def test_bad_privacy_settings_are_refused_naming_the_field(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        privacy_settings(settings)


def test_privacy_settings_take_a_mapping_an_instance_or_none() -> None:
    assert privacy_settings(None) is None
    config = privacy_settings({"target_epsilon": 3, "delta": 1e-6})
    assert isinstance(config, PrivacyConfig) and config.target_epsilon == 3.0 and config.delta == 1e-6
    assert privacy_settings(config) is config
    with pytest.raises(ValueError, match="expected a mapping"):
        privacy_settings(3.0)  # type: ignore[arg-type]


# -- accounting -------------------------------------------------------------------------------------------------------

def test_the_solved_noise_spends_the_target_and_no_less_noise_would() -> None:
    sample_rate, steps, delta = 256 / 60_000, 2_000, 1e-5
    sigma = solve_noise_multiplier(3.0, delta, sample_rate, steps)
    assert 0.3 < sigma < MAX_NOISE_MULTIPLIER
    spent = epsilon_spent(sigma, sample_rate, steps, delta)
    assert 3.0 - 0.02 <= spent <= 3.0 + 1e-9
    assert epsilon_spent(sigma * 0.97, sample_rate, steps, delta) > 3.0  # the smallest such σ


def test_the_prv_accountant_is_tighter_than_rdp() -> None:
    rdp, prv = (epsilon_spent(0.8, 0.01, 500, 1e-5, kind) for kind in ("rdp", "prv"))
    assert 0.5 * rdp < prv < rdp
    ledger = PrivacyLedger("prv", 1e-5)
    for _ in range(500):
        ledger.step(0.8, 0.01)
    assert ledger.epsilon() == pytest.approx(prv)


def test_the_ledger_stepped_per_step_agrees_with_the_closed_form_and_survives_its_state() -> None:
    ledger = PrivacyLedger("rdp", 1e-5)
    assert ledger.epsilon() == 0.0 and ledger.steps == 0
    for _ in range(300):
        ledger.step(1.1, 0.01)
    assert ledger.steps == 300
    assert ledger.epsilon() == pytest.approx(epsilon_spent(1.1, 0.01, 300, 1e-5), rel=1e-12)
    assert ledger.epsilon((1.1, 0.01, 300)) == pytest.approx(epsilon_spent(1.1, 0.01, 600, 1e-5), rel=1e-12)
    again = PrivacyLedger("rdp", 1e-5)
    again.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert again.steps == 300 and again.epsilon() == ledger.epsilon()
    with pytest.raises(ValueError, match="does not continue"):
        PrivacyLedger("prv", 1e-5).load_state_dict(ledger.state_dict())


def test_an_unreachable_target_is_refused_with_what_to_change() -> None:
    with pytest.raises(ValueError, match=r"target_epsilon=0.001 .* cannot be reached: even noise_multiplier=50"):
        solve_noise_multiplier(0.001, 1e-5, 0.5, 10_000)


def test_the_plan_counts_poisson_steps_over_every_process() -> None:
    config = PrivacyConfig(noise_multiplier=1.0)
    plan = plan_privacy(config, num_examples=10_000, batch_size=128, epochs=3, world_size=2)
    assert plan.sample_rate == pytest.approx(256 / 10_000)
    assert plan.steps_per_epoch == 10_000 // 256 and plan.planned_steps == 3 * (10_000 // 256)
    assert plan.expected_batch_size == 128
    assert plan.planned_epsilon == pytest.approx(epsilon_spent(1.0, 256 / 10_000, plan.planned_steps, 1e-5))
    assert plan_privacy(config, 10_000, 128, epochs=3, max_steps=7).planned_steps == 7
    solved = plan_privacy(PrivacyConfig(target_epsilon=2.0), 10_000, 100, epochs=2)
    assert solved.planned_epsilon <= 2.0 and solved.noise_multiplier == pytest.approx(
        solve_noise_multiplier(2.0, 1e-5, 0.01, 200))
    with pytest.raises(ValueError, match=r"privacy\.delta=0\.005 must be below 1/N = 1/500"):
        plan_privacy(PrivacyConfig(noise_multiplier=1.0, delta=5e-3), 500, 10, 1)
    with pytest.raises(ValueError, match="expected batch of 600"):
        plan_privacy(config, 500, 300, 1, world_size=2)


# -- Poisson sampling -------------------------------------------------------------------------------------------------

def test_poisson_batches_draw_each_example_independently_at_the_sample_rate() -> None:
    n, q, steps = 2_000, 0.05, 400
    sampler = PoissonBatchSampler(n, q, steps, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == steps
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert all(len(set(b)) == len(b) for b in batches)  # no example twice in a batch
    # batch size ~ Binomial(n, q): mean n·q = 100, variance n·q·(1 − q) = 95 (not a fixed size)
    assert abs(sizes.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / steps)
    assert 95 * 0.75 < sizes.var() < 95 * 1.3
    counts = torch.zeros(n)
    for b in batches:
        counts[b] += 1
    assert abs(counts.mean() / steps - q) < 0.002  # every example's inclusion rate is q
    assert counts.std() / steps < 1.3 * math.sqrt(q * (1 - q) / steps)
    assert list(PoissonBatchSampler(n, q, steps, seed=3)) == batches  # (seed, epoch) replay the draws
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_under_ddp_each_process_draws_from_its_own_disjoint_share() -> None:
    n, q, steps, world = 1_000, 0.1, 50, 3
    samplers = [PoissonBatchSampler(n, q, steps, seed=5, num_replicas=world, rank=r) for r in range(world)]
    shares = [set(s.indices.tolist()) for s in samplers]
    assert set().union(*shares) == set(range(n)) and sum(map(len, shares)) == n
    per_rank = [list(s) for s in samplers]
    for step in range(steps):
        drawn = [set(batches[step]) for batches in per_rank]
        for rank in range(world):
            assert drawn[rank] <= shares[rank]
        assert len(set().union(*drawn)) == sum(map(len, drawn))  # no example on two processes
    total = sum(len(b) for batches in per_rank for b in batches)
    assert abs(total / steps - n * q) < 4 * math.sqrt(n * q / steps)  # together: the expected global batch


def test_an_empty_poisson_batch_collates_to_a_batch_of_no_example() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(12.0).view(4, 3), torch.arange(4))
    collate = EmptyBatchCollate(None, data)
    x, y = collate([])
    assert x.shape == (0, 3) and x.dtype == torch.float32 and y.shape == (0,) and y.dtype == torch.int64
    x, y = collate([data[1], data[2]])
    assert x.shape == (2, 3) and y.tolist() == [1, 2]
    assert list(PoissonBatchSampler(50, 1e-9, 3)) == [[], [], []]


def test_an_empty_batch_is_a_step_of_noise_alone_and_only_process_zero_adds_noise() -> None:
    torch.manual_seed(0)
    net = EngineDPMLP((1, 8, 8), 10, hidden=(64,))
    private = PrivateTraining(PrivacyConfig(noise_multiplier=2.0, max_grad_norm=0.5, seed=1))
    private.plan = plan_privacy(private.config, 1_000, 50, epochs=1)
    empty = (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))

    def backward(batch):  # the task's forward, loss and backward: never run for an empty batch
        raise AssertionError("no forward for an empty batch")

    loss = private.step(net, backward, empty, 0, rank=0)
    noise = torch.cat([g.reshape(-1) for g in net.gradients()])
    assert float(loss) == 0.0 and private.ledger.steps == 1
    expected_std = 2.0 * 0.5 / 50
    assert abs(noise.std().item() / expected_std - 1) < 0.1 and abs(noise.mean().item()) < 0.1 * expected_std
    private.step(net, backward, empty, 0, rank=1)  # another process: the clipped sum (none here), no noise
    assert all(bool((g == 0).all()) for g in net.gradients())


# -- the module's refusals --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("net", "optim", "message"), [
    (partial(ImageMLP, hidden=(16,)), {}, "DP-SGD trains engine networks"),
    (partial(EngineSmallCNN, width=2, hidden=(8,)), {}, "cannot train by DP-SGD.*BatchNorm"),
    (TINY_MLP, {"max_grad_norm": 1.0}, "optim.max_grad_norm=1 conflicts with privacy"),
    (TINY_MLP, {"nonfinite": "skip"}, "nonfinite='skip' conflicts with privacy"),
])
def test_settings_dp_sgd_cannot_train_with_are_refused(net, optim, message) -> None:
    with pytest.raises(ValueError, match=message):
        ImageClassifier(net, input_shape=(1, 8, 8), optim=optim, privacy={"target_epsilon": 3.0})


# -- a private fit --------------------------------------------------------------------------------------------------

def private_model(**privacy) -> ImageClassifier:
    return ImageClassifier(TINY_MLP, input_shape=(1, 8, 8), optim={"name": "sgd", "lr": 0.5, "momentum": 0.9},
                           privacy={"max_grad_norm": 1.0, "seed": 0, **privacy})


def private_fit(model: ImageClassifier, root: Path, epochs: int, ckpt_path: str | None = None,
                data: DigitsImageDataModule | None = None) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=CSVLogger(root, name="logs", version=0),
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        callbacks=task_callbacks("val_acc", "max"))
    trainer.fit(model, datamodule=data or DigitsImageDataModule(batch_size=64), ckpt_path=ckpt_path)
    return trainer


SPE = 1212 // 64  # steps per epoch: 1,212 training digits after the validation split, expected batch 64


@pytest.fixture(scope="module")
def private_run(tmp_path_factory) -> tuple[Path, list[int], DigitsImageDataModule]:
    """Two epochs of the tiny MLP by DP-SGD for ε = 4 on the digits: the log folder, the size of every training
    batch and the data module."""
    root = tmp_path_factory.mktemp("private")
    with torch.random.fork_rng(devices=[]):
        L.seed_everything(0, verbose=False)
        data = DigitsImageDataModule(batch_size=64)
        model = private_model(target_epsilon=4.0)
        sizes: list[int] = []
        model.on_train_batch_start = lambda batch, batch_idx: sizes.append(len(batch[1]))  # type: ignore[method-assign]
        trainer = private_fit(model, root, epochs=2, data=data)
    return Path(trainer.log_dir), sizes, data


def test_a_private_fit_samples_poisson_batches_logs_epsilon_and_writes_the_privacy_block(private_run) -> None:
    log_dir, sizes, data = private_run
    assert len(sizes) == 2 * SPE
    assert len(set(sizes)) > 3 and abs(sum(sizes) / len(sizes) - 64) < 8  # Poisson sizes around 64
    assert "train_dataloader" not in vars(data)  # the data module has its own loader back
    metrics = json.loads((log_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 2 * SPE
    privacy = metrics["privacy"]
    assert set(privacy) >= {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate"}
    assert privacy["sample_rate"] == pytest.approx(64 / 1212) and privacy["max_grad_norm"] == 1.0
    assert privacy["delta"] == 1e-5 and privacy["steps"] == 2 * SPE
    assert 4.0 - 0.02 <= privacy["epsilon"] <= 4.0 + 1e-9  # the whole planned run spent the target
    assert privacy["epsilon"] == pytest.approx(epsilon_spent(privacy["noise_multiplier"], 64 / 1212, 2 * SPE, 1e-5))
    with open(log_dir / "metrics.csv") as handle:
        logged = [float(row["privacy_epsilon"]) for row in csv.DictReader(handle) if row.get("privacy_epsilon")]
    assert len(logged) == 2 and 0 < logged[0] < logged[1] == pytest.approx(privacy["epsilon"])
    assert metrics["validation"]["val_acc"] > 0.5  # it learns despite the noise
    checkpoint = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint[PRIVACY_KEY]["steps"] == 2 * SPE and "noise_state" in checkpoint[PRIVACY_KEY]


def test_a_resumed_private_fit_continues_its_accounting_and_refuses_to_overspend(private_run, tmp_path) -> None:
    last = private_run[0] / "checkpoints" / "last.ckpt"
    sigma = torch.load(last, weights_only=True)[PRIVACY_KEY]["noise_multiplier"]
    resumed = private_model(noise_multiplier=1.5)
    private_fit(resumed, tmp_path / "more", epochs=3, ckpt_path=str(last))
    expected = PrivacyLedger("rdp", 1e-5)
    for noise, steps in ((sigma, 2 * SPE), (1.5, SPE)):
        for _ in range(steps):
            expected.step(noise, 64 / 1212)
    assert resumed.private.ledger.steps == 3 * SPE  # the checkpoint's steps, then the new ones
    assert resumed.private.summary()["epsilon"] == pytest.approx(expected.epsilon())
    with pytest.raises(ValueError, match=r"beyond privacy\.target_epsilon=4"):  # σ was solved for two epochs
        private_fit(private_model(target_epsilon=4.0), tmp_path / "over", epochs=4, ckpt_path=str(last))


def write_config(path: Path, privacy: str) -> Path:
    path.write_text(f"""
seed_everything: 0
trainer: {{max_epochs: 2, accelerator: cpu, enable_progress_bar: false, enable_model_summary: false}}
model:
  class_path: bp_apps.vision.task.ImageClassifier
  init_args:
    net: {{class_path: bp_apps.vision.dp_models.EngineDPMLP, init_args: {{hidden: [16]}}}}
    optim: {{name: sgd, lr: 0.5, momentum: 0.9, scheduler: constant}}
    privacy: {privacy}
data:
  class_path: bp_apps.vision.data.DigitsImageDataModule
  init_args: {{batch_size: 64}}
""")
    return path


def test_fit_refuses_an_unreachable_target_in_one_line(tmp_path, capsys) -> None:
    config = write_config(tmp_path / "dp.yaml", "{target_epsilon: 0.001, delta: 1.0e-5}")
    assert main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("bp-apps fit: error: privacy.target_epsilon=0.001")
    assert "cannot be reached" in errors[0] and "raise target_epsilon" in errors[0]
    assert not list(tmp_path.rglob("*.ckpt"))


# -- the audit --------------------------------------------------------------------------------------------------------

def test_attack_figures_on_known_losses() -> None:
    perfect = attack_figures(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.6, 0.7]))
    assert perfect["auc"] == 1.0 and perfect["advantage"] == 1.0 and 0.3 <= perfect["threshold"] < 0.5
    blind = attack_figures(torch.tensor([0.4, 0.4]), torch.tensor([0.4, 0.4]))
    assert blind["auc"] == 0.5 and blind["advantage"] == 0.0
    reversed_ = attack_figures(torch.tensor([0.9]), torch.tensor([0.1]))
    assert reversed_["auc"] == 0.0


@pytest.fixture(scope="module")
def overfit_checkpoint(tmp_path_factory) -> Path:
    """An engine MLP trained without privacy on 60 digits until it has memorised them."""
    root = tmp_path_factory.mktemp("overfit")
    with torch.random.fork_rng(devices=[]):
        L.seed_everything(0, verbose=False)
        model = ImageClassifier(partial(EngineDPMLP, hidden=(128,)), input_shape=(1, 8, 8),
                                optim={"name": "adamw", "lr": 3e-3, "weight_decay": 0.0, "scheduler": "constant"})
        trainer = L.Trainer(max_epochs=25, accelerator="cpu", logger=CSVLogger(root, name="logs", version=0),
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            callbacks=[LastCheckpoint()], log_every_n_steps=50)
        trainer.fit(model, datamodule=DigitsImageDataModule(batch_size=10, train_subset=60))
    return root / "logs" / "version_0" / "checkpoints" / "last.ckpt"


def test_the_audit_tells_the_overfitted_models_members_apart_and_a_random_split_not(overfit_checkpoint,
                                                                                     tmp_path, capsys) -> None:
    report = audit_checkpoint(overfit_checkpoint)
    assert report["data"] == "DigitsImageDataModule" and report["members"] == report["non_members"] == 60
    assert 0.0 <= report["attack"]["auc"] <= 1.0 and 0.0 <= report["attack"]["advantage"] <= 1.0
    assert report["train_accuracy"] == 1.0 and report["accuracy_gap"] > 0.05
    assert report["train_loss"] < report["test_loss"] and report["privacy"] is None
    # the control: "members" and "non-members" that are both unseen test images, split at random
    model = ImageClassifier.load(overfit_checkpoint)
    data = DigitsImageDataModule()
    data.setup("test")
    losses, _ = example_losses(model, data.test_set, data.test_dataloader().collate_fn)
    halves = torch.randperm(len(losses), generator=torch.Generator().manual_seed(0)).chunk(2)
    control = attack_figures(losses[halves[0]], losses[halves[1]])
    assert abs(control["auc"] - 0.5) < 0.1
    assert report["attack"]["auc"] > max(0.65, control["auc"] + 0.12)  # 0.75 when written
    out = tmp_path / "audit.json"
    assert main(["privacy-audit", "--ckpt", str(overfit_checkpoint), "--members", "40", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "attack AUC" in printed and "trained without differential privacy" in printed
    saved = json.loads(out.read_text())
    assert saved["members"] == 40 and set(saved["attack"]) == {"auc", "advantage", "threshold"}


def test_the_audit_reports_a_private_checkpoints_accounting_and_refuses_bad_input(private_run, tmp_path,
                                                                                 capsys) -> None:
    last = private_run[0] / "checkpoints" / "last.ckpt"
    report = audit_checkpoint(last, members=50)
    assert report["privacy"]["steps"] == 2 * SPE and 3.9 < report["privacy"]["epsilon"] <= 4.0
    assert abs(report["attack"]["auc"] - 0.5) < 0.25
    assert main(["privacy-audit", "--ckpt", str(tmp_path / "missing.ckpt")]) == 2
    assert main(["privacy-audit", "--ckpt", str(last), "--members", "0"]) == 2
    err = capsys.readouterr().err
    assert "bp-apps privacy-audit: error:" in err and "--members must be at least 1" in err


def test_train_subset_keeps_that_many_training_examples() -> None:
    data = DigitsImageDataModule(train_subset=100)
    data.setup("fit")
    assert len(data.train_set) == 100 and len(data.val_set) == 135
    again = DigitsImageDataModule(train_subset=100)
    again.setup("fit")
    assert torch.equal(again.train_set.tensors[0], data.train_set.tensors[0])  # drawn by the seed
    with pytest.raises(ValueError, match="train_subset=5000 exceeds the 1212 training examples"):
        DigitsImageDataModule(train_subset=5000).setup("fit")
    with pytest.raises(ValueError, match="train_subset must be a positive number"):
        DigitsImageDataModule(train_subset=0)


def test_missing_opacus_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from bp_apps.core import privacy

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "opacus" else real(name, *a))
    with pytest.raises(ValueError, match=r'pip install "bp_apps\[privacy\]"'):
        privacy.solve_noise_multiplier(3.0, 1e-5, 0.01, 100)
    with pytest.raises(ValueError, match="needs Opacus"):
        privacy._accountant("rdp")
