"""Every task resumes exactly: a fit stopped by an injected fault in the middle of its second epoch and restarted
from its last checkpoint ends with the weights and metrics of an uninterrupted fit (tiny settings, the real
configs, through the CLI). The core's MLP with both backends, and SIGKILL, are covered in test_resume.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_determinism import FSDD, ROOT, RUNS

from bp_apps.cli import main
from bp_apps.core.resume import RNG_KEY

STEPS_PER_EPOCH, FAIL_AT = 4, 7  # the checkpoint of step 6 is two batches into the second epoch
TINY = ["--trainer.max_epochs=2", f"--trainer.limit_train_batches={STEPS_PER_EPOCH}", "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.deterministic=true"]


def callbacks(folder: Path, fail: bool) -> str:
    """A step checkpoint (and the fault) added to the config's callbacks (best and last checkpoints)."""
    every_step = {"class_path": "bp_apps.core.resume.StepCheckpoint",
                  "init_args": {"dirpath": str(folder / "steps"), "every_n_train_steps": 1}}
    fault = {"class_path": "bp_apps.core.resume.FailAtStep", "init_args": {"step": FAIL_AT}}
    return "--trainer.callbacks+=" + json.dumps([every_step, *([fault] if fail else [])])


# Enough training batches for the fault to land mid-epoch (the determinism test's speech subsets give fewer), and
# random augmentation while loading, which a resumed run must replay for the batches it has not trained on yet.
EXTRA = {"speech_classifier": ["--data.batch_size=8"], "speech_ctc": ["--data.train_utterances=16"],
         "vision_autograd": ["--data.augment=true"]}


def fit(config: str, extra: list[str], folder: Path, fail: bool = False, ckpt: Path | None = None) -> None:
    argv = ["fit", "--config", str(ROOT / "configs" / f"{config}.yaml"), f"--trainer.default_root_dir={folder}",
            *TINY, *extra, callbacks(folder, fail), *([f"--ckpt_path={ckpt}"] if ckpt else [])]
    assert main(argv) == 0


def outcome(folder: Path) -> tuple[dict, dict]:
    last = torch.load(folder / "steps" / "last-step.ckpt", weights_only=True)
    assert last["global_step"] == 2 * STEPS_PER_EPOCH
    (metrics,) = folder.rglob("metrics.json")
    metrics = json.loads(metrics.read_text())
    return last["state_dict"], {key: metrics[key] for key in ("validation", "test")}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_resume_mid_epoch_matches_an_uninterrupted_fit(name: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    config, extra = RUNS[name]
    extra = [*extra, *EXTRA.get(name, [])]
    if config.startswith("speech/") and not (FSDD / "recordings").is_dir():
        pytest.skip(f"{FSDD} is not on this machine")
    monkeypatch.chdir(ROOT)  # the configs' data roots are relative to the repository
    monkeypatch.setenv("BP_APPS_CACHE", str(tmp_path / "cache"))
    fit(config, extra, tmp_path / "straight")
    with pytest.raises(RuntimeError, match=f"injected fault at step {FAIL_AT}"):
        fit(config, extra, tmp_path / "faulty", fail=True)
    last = tmp_path / "faulty" / "steps" / "last-step.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == FAIL_AT - 1 and RNG_KEY in checkpoint
    for metrics in (tmp_path / "faulty").rglob("metrics.json"):
        metrics.unlink()  # a stale file from the first epoch must not stand in for the resumed run's
    fit(config, extra, tmp_path / "faulty", ckpt=last)
    straight_weights, straight_metrics = outcome(tmp_path / "straight")
    weights, metrics = outcome(tmp_path / "faulty")
    assert straight_weights.keys() == weights.keys()
    different = [key for key in weights if not torch.equal(weights[key], straight_weights[key])]
    assert not different, f"weights differ after resuming: {different[:5]}"
    assert metrics == straight_metrics and metrics["validation"]
