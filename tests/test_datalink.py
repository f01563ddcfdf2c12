"""What the data modules share with their models: no task model reads ``trainer.datamodule``, the linked sizes exist
right after ``__init__``, a hand-built model of other sizes is refused by the data module, and the preprocessing
is the data module's checkpoint state, found again by :func:`saved_preprocessing`."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from inspect import signature
from pathlib import Path
from types import SimpleNamespace

import pytest

import bp_apps
from bp_apps.core.datalink import LINKED, saved_preprocessing
from bp_apps.speech.data import ConnectedDigitsDataModule, FSDDDigitsDataModule, ManifestDataModule
from bp_apps.speech.decoding import DIGIT_WORDS
from bp_apps.speech.task import SpeechRecognizer, SpokenDigitClassifier
from bp_apps.text.labeling.data import LabelingDataModule
from bp_apps.text.labeling.task import TokenLabeler
from bp_apps.text.summarization.data import EmbeddedSummarizationDataModule, SummarizationDataModule
from bp_apps.text.summarization.task import Summarizer
from bp_apps.vision.data import DigitsImageDataModule
from bp_apps.vision.models import SmallCNN
from bp_apps.vision.task import ImageClassifier

PACKAGE = Path(bp_apps.__file__).resolve().parent
STILL_READING: set[str] = set()  # task or model modules allowed to read trainer.datamodule: none


def test_no_task_or_model_module_reads_the_data_module() -> None:
    tasks = sorted({*PACKAGE.glob("*/task.py"), *PACKAGE.glob("text/*/task.py"), *PACKAGE.glob("*/models.py"),
                    *PACKAGE.glob("text/*/models.py")})
    checked = [p for p in tasks if p.relative_to(PACKAGE).as_posix() not in STILL_READING]
    assert {p.relative_to(PACKAGE).as_posix() for p in checked} >= {"vision/task.py", "speech/task.py",
                                                                    "text/labeling/task.py",
                                                                    "text/summarization/task.py"}
    found = [f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}" for path in checked
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\bdatamodule\b", line)]  # trainer.datamodule, getattr(trainer, "datamodule")
    assert found == [], "models get what they need from the data through the CLI's links, not trainer.datamodule"


def test_linked_attributes_exist_right_after_init_without_reading_data(tmp_path: Path) -> None:
    digits = DigitsImageDataModule()
    assert (digits.num_classes, digits.input_shape, digits.class_names[:2]) == (10, (1, 8, 8), ["0", "1"])
    assert ManifestDataModule(features={"n_mels": 24}, cache=False).input_dim == 24
    assert ManifestDataModule(features={"kind": "waveform"}, cache=False).input_dim == 1
    assert ManifestDataModule(cache=False).lexicon_words == []  # no manifest yet: setup says what is missing
    nowhere = str(tmp_path / "nowhere")  # nothing is read
    assert ConnectedDigitsDataModule(data_root=nowhere, cache=False).lexicon_words == list(DIGIT_WORDS)
    fsdd = FSDDDigitsDataModule(data_root=nowhere, cache=False)
    assert (fsdd.num_classes, fsdd.input_dim) == (10, 40)
    labeling = LabelingDataModule("labeling/none/train.jsonl", data_root=nowhere, tokenizer_vocab_size=100)
    assert Path(labeling.vocab_file).name.startswith("vocab-") and Path(labeling.tokenizer_file).suffix == ".json"
    assert labeling.vocab is None and labeling.splits == {}  # named, not built: nothing was read


@pytest.mark.parametrize("make_data, model", [(DigitsImageDataModule, ImageClassifier),
                                              (partial(ManifestDataModule, cache=False), SpeechRecognizer),
                                              (partial(FSDDDigitsDataModule, cache=False), SpokenDigitClassifier),
                                              (partial(LabelingDataModule, "train.jsonl"), TokenLabeler),
                                              (partial(SummarizationDataModule, "train.jsonl"), Summarizer),
                                              (partial(EmbeddedSummarizationDataModule, max_pairs=10), Summarizer)],
                         ids=["vision", "recognition", "digits", "labeling", "summarization", "summarization_embedded"])
def test_a_data_module_offers_only_links_its_model_takes(make_data: Callable[[], object], model: type) -> None:
    """LightningCLI would record an offered value the model cannot take in its saved hyperparameters, and
    ``--ckpt_path`` would then fail on it."""
    data, accepted = make_data(), set(signature(model).parameters)
    offered = {name for name in LINKED if hasattr(data, name)}
    assert offered and offered <= accepted, offered - accepted


def test_the_data_module_refuses_a_model_built_for_another_class_count() -> None:
    data = DigitsImageDataModule()
    data.trainer = SimpleNamespace(lightning_module=ImageClassifier(partial(SmallCNN, width=4, hidden=(8,)),
                                                                    num_classes=5, input_shape=(1, 8, 8)))
    with pytest.raises(ValueError, match=r"gives num_classes=10 but the model was built for num_classes=5: build it "
                                         r"with num_classes=10"):
        data.setup("fit")
    assert data.train_set is None, "refused before any data is loaded"


def test_a_checkpoint_of_other_features_is_refused_on_resume() -> None:
    with pytest.raises(ValueError, match=r"preprocessed differently \(features: .*'n_mels': 32.*'n_mels': 16"):
        ManifestDataModule(features={"n_mels": 16}, cache=False).load_state_dict(
            ManifestDataModule(features={"n_mels": 32}, cache=False).state_dict())


def test_saved_preprocessing_is_the_state_under_its_own_class_name() -> None:
    state = DigitsImageDataModule().state_dict()
    required = ("class_names", "mean", "std", "input_shape")
    assert saved_preprocessing({"hyper_parameters": {}, "DigitsImageDataModule": state}, required) == state
    assert saved_preprocessing({"OtherName": state}, required) is None  # stored under another class's name
    assert saved_preprocessing({"DigitsImageDataModule": state}, ("features",)) is None  # another task's
    legacy = {k: v for k, v in state.items() if k != "datamodule"}
    assert saved_preprocessing({"bp_apps_preprocessing": legacy}, required) == legacy
    assert saved_preprocessing({"state_dict": {}}, required) is None
