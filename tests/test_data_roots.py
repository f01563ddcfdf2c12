"""Where the data sets are read from: ``data_root`` when given, else ``$BP_APPS_DATA``, else ``./data``; the
configs name no developer-only folder, and a missing data set is an error that says where it was looked for and
how to point elsewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bp_apps.core.io import data_file, default_data_root, resolve_data_root
from bp_apps.speech.data import ConnectedDigitsDataModule, FSDDDigitsDataModule, fsdd_root
from bp_apps.text.labeling.data import LabelingDataModule
from bp_apps.text.summarization.data import SummarizationDataModule
from bp_apps.vision.data import CIFAR10DataModule, FashionMNISTDataModule, ImageFolderDataModule, MNISTDataModule

pytestmark = pytest.mark.usefixtures("session_cache")  # vocabulary files go to a test cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ``$BP_APPS_DATA`` and an empty current folder (a fresh machine); returns that folder."""
    monkeypatch.delenv("BP_APPS_DATA", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


# ------------------------------------------------------------------------------------------------ the helpers

def test_default_is_data_in_the_current_folder(no_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_data_root() == Path("data") == resolve_data_root(None)
    monkeypatch.setenv("BP_APPS_DATA", "")  # empty counts as unset
    assert default_data_root() == Path("data")


def test_the_environment_variable_wins(no_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BP_APPS_DATA", str(tmp_path / "mine"))
    assert default_data_root() == resolve_data_root(None) == tmp_path / "mine"
    monkeypatch.setenv("BP_APPS_DATA", "~/datasets")
    assert default_data_root() == Path.home() / "datasets"


def test_an_explicit_data_root_wins_over_both(no_env: Path, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setenv("BP_APPS_DATA", str(tmp_path / "mine"))
    assert resolve_data_root(tmp_path / "given") == tmp_path / "given"
    assert resolve_data_root("relative") == Path("relative")
    assert resolve_data_root("~/x") == Path.home() / "x"


def test_data_file_resolves_against_the_root_looked_up_when_called(no_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    env_root, given = tmp_path / "env", tmp_path / "given"
    for root in (env_root, given, no_env / "data"):
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "f.jsonl").write_text("{}\n")
    assert data_file("sub/f.jsonl", None) == Path("data") / "sub" / "f.jsonl"
    monkeypatch.setenv("BP_APPS_DATA", str(env_root))
    assert data_file("sub/f.jsonl", None) == env_root / "sub" / "f.jsonl"
    assert data_file("sub/f.jsonl", str(given)) == given / "sub" / "f.jsonl"
    absolute = tmp_path / "elsewhere.jsonl"
    assert data_file(str(absolute), None) == absolute == data_file(str(absolute), str(given))


# ------------------------------------------------------------------------------------------------ the data modules

def test_modules_read_the_environment_variable_when_used_not_when_built(no_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    mnist, fsdd = MNISTDataModule(), FSDDDigitsDataModule()
    assert mnist.hparams.data_root is None and fsdd.data_root is None
    assert mnist.data_root_path == Path("data") and fsdd_root(fsdd.data_root) == Path("data") / "fsdd"
    monkeypatch.setenv("BP_APPS_DATA", str(tmp_path / "mine"))
    assert mnist.data_root_path == tmp_path / "mine"
    assert Path(fsdd.source("train")) == tmp_path / "mine" / "fsdd"
    assert MNISTDataModule(data_root=str(tmp_path / "given")).data_root_path == tmp_path / "given"
    assert fsdd_root(str(tmp_path / "given")) == tmp_path / "given"


def test_download_goes_into_the_resolved_root(no_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(MNISTDataModule, "DOWNLOADER", staticmethod(lambda **kwargs: calls.append(kwargs)))
    monkeypatch.setenv("BP_APPS_DATA", str(tmp_path / "mine"))
    MNISTDataModule(download=True).prepare_data()
    monkeypatch.delenv("BP_APPS_DATA")
    MNISTDataModule(download=True).prepare_data()
    assert calls == [{"root": str(tmp_path / "mine"), "download": True}, {"root": "data", "download": True}]

    fetched: list[Path] = []
    monkeypatch.setattr("bp_apps.speech.data.download_fsdd", lambda root: fetched.append(Path(root)))
    with pytest.raises(FileNotFoundError):  # the stand-in downloads nothing
        FSDDDigitsDataModule(download=True).split()
    assert fetched == [Path("data") / "fsdd"]


@pytest.mark.parametrize(("make", "expected"), [
    (MNISTDataModule, "data/MNIST/raw"),
    (FashionMNISTDataModule, "data/FashionMNIST/raw"),
    (CIFAR10DataModule, "data/cifar-10-batches-py"),
    (FSDDDigitsDataModule, "data/fsdd"),
    (ConnectedDigitsDataModule, "data/fsdd"),
])
def test_missing_data_under_the_default_root_names_the_path_and_the_variable(no_env: Path, make,
                                                                             expected: str) -> None:
    module = make()
    with pytest.raises(FileNotFoundError) as info:
        if isinstance(module, (FSDDDigitsDataModule, ConnectedDigitsDataModule)):
            module.utterances("train")
        else:
            module.setup()
    message = str(info.value)
    assert str(no_env / expected) in message
    assert "BP_APPS_DATA" in message and "--data.data_root" in message and "download=true" in message


@pytest.mark.parametrize("make", [LabelingDataModule, SummarizationDataModule])
def test_missing_text_files_under_the_default_root_name_the_path_and_the_variable(no_env: Path, make) -> None:
    module = make(train_file="labeling/propbank_ewt/train.jsonl")
    with pytest.raises(FileNotFoundError) as info:
        module.setup()
    message = str(info.value)
    assert str(no_env / "data" / "labeling" / "propbank_ewt" / "train.jsonl") in message
    assert "BP_APPS_DATA" in message and "--data.data_root" in message


def test_text_files_are_read_from_the_environment_root(no_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    folder = tmp_path / "mine" / "labeling" / "x"
    folder.mkdir(parents=True)
    line = '{"tokens": ["the", "cat"], "tags": ["O", "B-X"]}\n'
    (folder / "train.jsonl").write_text(line * 20)
    monkeypatch.setenv("BP_APPS_DATA", str(tmp_path / "mine"))
    module = LabelingDataModule(train_file="labeling/x/train.jsonl", batch_size=4)
    module.setup()
    assert len(module.splits["train"]) + len(module.splits["val"]) == 20


def test_image_folder_without_a_root_names_the_variable(no_env: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(no_env / "data")) + ".*BP_APPS_DATA"):
        ImageFolderDataModule()


# ------------------------------------------------------------------------------------------------ the configs

def test_no_config_names_the_developers_data_folder() -> None:
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert configs
    offending = [str(p.relative_to(ROOT)) for p in configs
                 if "../shared" in (text := p.read_text(encoding="utf-8")) or "shared/data" in text]
    assert not offending, f"configs naming ../shared: {offending}"
