"""Scale-out: each task's `fit` runs with strategy=ddp (ddp_engine for the hand-written backend), devices=2 on CPU
(gloo) through the real command, and the validation figures it reports (synchronised across the two processes) equal
a single-process validation of the same checkpoint on the same data. The hand-written backend averages its gradients
across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from bp_apps.cli import main
from bp_apps.vision.models import EngineImageMLP, ImageMLP
from bp_apps.vision.task import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
FSDD = ROOT.parent / "shared" / "data" / "fsdd"
DDP = ["--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.max_epochs=1",
       "--trainer.limit_train_batches=4", "--trainer.enable_progress_bar=false",
       "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0"]
ENGINE = {"vision_engine"}  # tasks whose network trains by the hand-written engine: strategy ddp_engine
TASKS = {  # name -> (config, tiny settings, the validation metric to compare)
    "vision_engine": ("vision/digits_mlp_engine", [], "val_acc"),
    "labeling": ("text/label_punct_embedded", ["--data.max_docstrings=150", "--model.net.hidden=16",
                                              "--model.net.word_dim=16", "--model.net.char_channels=8"], "val_f1"),
    "summarization": ("text/summarize_embedded", ["--data.max_pairs=120", "--data.tokenizer_vocab_size=300",
                                                  "--model.net.d_model=32", "--model.net.ff=64", "--model.net.layers=1",
                                                  "--model.generation.max_new_tokens=4",
                                                  "--model.val_generate_limit=16"],
                      "val_loss"),
    "speech_classifier": ("speech/fsdd_digits", ["--data.limit_per_split=40", "--model.net.init_args.hidden=16"],
                          "val_acc"),
    "speech_ctc": ("speech/fsdd_connected_ctc", ["--data.train_utterances=16", "--data.val_utterances=6",
                                                 "--data.test_utterances=4", "--data.batch_size=4",
                                                 "--model.net.init_args.hidden=16",
                                                 "--model.decoding.beam_size=0"], "val_loss"),
}


def child_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "BP_APPS_CACHE": str(tmp_path / "cache")}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TASKS))
def test_fit_with_ddp_on_two_cpu_processes(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, tiny, metric = TASKS[name]
    if config.startswith("speech/") and not (FSDD / "recordings").is_dir():
        pytest.skip(f"{FSDD} is not on this machine")
    config_path = ROOT / "configs" / f"{config}.yaml"
    root = tmp_path / "ddp"
    strategy = "ddp_engine" if name in ENGINE else "ddp"
    command = [sys.executable, "-m", "bp_apps.cli", "fit", "--config", str(config_path),
               f"--trainer.default_root_dir={root}", f"--trainer.strategy={strategy}", *DDP, *tiny]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=child_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = root.rglob("metrics.json")  # rank 0 alone writes it
    ddp_metrics = json.loads(written.read_text())
    assert ddp_metrics["validation"] and ddp_metrics["test"]

    # The same checkpoint validated by one process: the DDP figure was reduced over both halves of the data.
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("BP_APPS_CACHE", str(tmp_path / "cache"))
    single = tmp_path / "single"
    argv = ["validate", "--config", str(config_path), f"--ckpt_path={ddp_metrics['best_checkpoint']}",
            f"--trainer.default_root_dir={single}", "--trainer.enable_progress_bar=false", *tiny]
    assert main(argv) == 0
    (validated,) = single.rglob("metrics.json")
    one = json.loads(validated.read_text())["validation"][metric]
    both = ddp_metrics["validation"][metric]
    # Each process validates its own shard of the split (bp_apps.core.samplers.EvaluationShard: no example repeated
    # to even out the processes), so counted metrics (accuracy, F1) equal the one-process figure. A loss is a mean of
    # per-batch means, and the two runs batch the split differently: close, not equal.
    if metric.endswith("_loss"):
        assert one == pytest.approx(both, rel=1e-3)
    else:
        assert one == pytest.approx(both, abs=1e-6)


SYNC_SCRIPT = """
import sys
from pathlib import Path
import lightning as L
import torch
from bp_apps.vision.data import DigitsImageDataModule
from bp_apps.vision.task import ImageClassifier

class SaveWeights(L.Callback):
    def on_train_end(self, trainer, module):
        torch.save([p.detach().clone() for p in module.net.parameters()],
                   Path(sys.argv[2]) / f"rank{trainer.global_rank}.pt")

L.seed_everything(0)
net = {"class_path": f"bp_apps.vision.models.{sys.argv[1]}", "init_args": {"hidden": [32], "dropout": 0.0}}
model = ImageClassifier(net, input_shape=(1, 8, 8),
                        optim={"name": "adam", "lr": 1e-2, "weight_decay": 0.0, "scheduler": "constant"})
trainer = L.Trainer(strategy="ddp_engine", devices=2, accelerator="cpu", max_epochs=1, limit_train_batches=6,
                    limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[SaveWeights()])
trainer.fit(model, datamodule=DigitsImageDataModule(batch_size=32))
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["engine", "autograd"])
def test_both_backends_keep_the_two_processes_in_sync(backend: str, tmp_path: Path) -> None:
    script = tmp_path / "sync.py"
    script.write_text(SYNC_SCRIPT)
    net = {"engine": EngineImageMLP, "autograd": ImageMLP}[backend]
    result = subprocess.run([sys.executable, str(script), net.__name__, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env=child_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    initial = [p.detach() for p in ImageClassifier(partial(net, hidden=(32,), dropout=0.0),
                                                   input_shape=(1, 8, 8)).net.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(rank0, initial, strict=True)), "it trained"
    # Each process saw different batches; only averaged gradients keep their weights identical.
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(rank0, rank1, strict=True))
