"""Safe loading across the suite: every loader refuses a checkpoint whose pickle would run code, without running it,
and names a truncated file; the Lightning CLI's --ckpt_path does the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bp_apps.cli import main
from bp_apps.core.io import load_checkpoint_dict
from bp_apps.speech.features import FeatureCache, FeatureConfig
from bp_apps.speech.task import load_speech_model
from bp_apps.text.labeling.task import load_labeler
from bp_apps.text.summarization.task import load_summarizer
from bp_apps.vision.task import load_image_classifier

ROOT = Path(__file__).resolve().parents[1]
LOADERS = {
    "core": load_checkpoint_dict,
    "vision": load_image_classifier,
    "labeling": load_labeler,
    "summarization": load_summarizer,
    "speech": load_speech_model,
}


class Payload:
    """Unpickling this creates ``marker``: a stand-in for any code an attacker chooses."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted_checkpoint(folder: Path, task: str = "") -> tuple[Path, Path]:
    """A checkpoint carrying a :class:`Payload`, and the marker file it would create."""
    marker = folder / "payload_ran"
    path = folder / "evil.ckpt"
    torch.save({"bp_apps_task": task, "state_dict": {}, "hyper_parameters": {}, "payload": Payload(marker)}, path)
    return path, marker


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_code_payload_is_refused_without_running(name: str, tmp_path: Path) -> None:
    path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"evil\.ckpt: not a loadable checkpoint"):
        LOADERS[name](path)
    assert not marker.exists(), "the pickled payload ran"


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_truncated_and_missing_checkpoints_name_the_file(name: str, tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}, "hyper_parameters": {}}, good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.ckpt: not a loadable checkpoint"):
        LOADERS[name](cut)
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        LOADERS[name](tmp_path / "missing.ckpt")


def test_lightning_cli_ckpt_path_refuses_a_payload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, marker = crafted_checkpoint(tmp_path, task="vision.ImageClassifier")
    argv = ["test", "--config", str(ROOT / "configs" / "vision" / "digits_mlp_engine.yaml"), f"--ckpt_path={path}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    assert main(argv) == 2
    assert f"--ckpt_path {path}: not a loadable checkpoint" in capsys.readouterr().err
    assert not marker.exists(), "the pickled payload ran"


def test_feature_cache_with_a_payload_is_rebuilt_not_run(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    config = FeatureConfig(kind="logmel", sample_rate=8000, n_mels=16, hop_ms=10.0)
    key = FeatureCache.key(["a.wav"], config)
    marker = tmp_path / "payload_ran"
    torch.save([Payload(marker)], tmp_path / f"train-{key}.pt")
    built = cache.get_or_build("train", key, lambda: [torch.ones(3, 16)])
    assert not marker.exists(), "the pickled payload ran"
    assert torch.equal(built[0], torch.ones(3, 16))
    assert torch.equal(cache.get_or_build("train", key, lambda: [torch.zeros(1)])[0], torch.ones(3, 16))
