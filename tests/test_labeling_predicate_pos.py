"""The predicate's POS class as an SRL feature: tag mapping, reading and validation, batching, the tagger's
embedding (with its dropout to "unknown"), and a task where only the POS tells the roles apart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_labeling_task import fit_small, synthetic_srl, write_jsonl

from bp_apps.cli import main
from bp_apps.text.labeling.data import LabelingVocab, collate_sentences
from bp_apps.text.labeling.formats import read_jsonl
from bp_apps.text.labeling.models import BiLSTMTagger
from bp_apps.text.labeling.records import LabelingDataError, make_sentence, predicate_class
from bp_apps.text.labeling.task import label_text, load_labeler


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory):
    """The vocabulary files the data modules build go to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BP_APPS_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def pos_dependent_srl(n: int, seed: int) -> list[dict]:
    """synthetic_srl's sentences with the predicate always 'run'. As a verb (VBD) the word before it is ARG0 and
    the next one ARG1; as a noun (NN) only the next word is an argument. Nothing but the POS tells them apart."""
    records = []
    for i, record in enumerate(synthetic_srl(n, seed)):
        tokens, p = list(record["tokens"]), record["predicate"]
        tokens[p] = "run"
        tags = ["O"] * len(tokens)
        tags[p], tags[p + 1] = "B-V", "B-ARG1"
        pos = "VBD" if i % 2 else "NN"
        if pos == "VBD":
            tags[p - 1] = "B-ARG0"
        records.append({"tokens": tokens, "tags": tags, "predicate": p, "predicate_pos": pos})
    return records


def test_predicate_class_maps_ptb_and_universal_tags() -> None:
    assert [predicate_class(t) for t in ("VBD", "VBG", "MD", "VERB", "aux")] == [1] * 5
    assert [predicate_class(t) for t in ("NN", "NNS", "NNP", "NOUN", "PROPN")] == [2] * 5
    assert [predicate_class(t) for t in ("JJ", "JJR", "ADJ")] == [3] * 3
    assert [predicate_class(t) for t in ("IN", "RB", "ADP")] == [4] * 3
    assert predicate_class(None) == 0


def test_reading_validation_and_batching(tmp_path: Path) -> None:
    records = pos_dependent_srl(4, 0)
    sentences = read_jsonl(write_jsonl(tmp_path / "a.jsonl", records))
    assert [s.predicate_pos for s in sentences] == ["NN", "VBD", "NN", "VBD"]
    batch = collate_sentences(sentences, LabelingVocab.build(sentences, min_word_freq=1))
    assert batch["predicate_class"].tolist() == [2, 1, 2, 1]
    bad = write_jsonl(tmp_path / "bad.jsonl", [records[0], {**records[1], "predicate_pos": " "}])
    with pytest.raises(LabelingDataError, match=r"bad\.jsonl:2: 'predicate_pos' must be a non-blank POS tag"):
        read_jsonl(bad)
    with pytest.raises(LabelingDataError, match="'predicate_pos' is given without a predicate"):
        make_sentence(["a", "b"], predicate_pos="NN")


def test_tagger_embeds_the_class_and_drops_it_to_unknown_while_training() -> None:
    torch.manual_seed(0)
    sentences = [make_sentence(r["tokens"], r["tags"], r["predicate"], predicate_pos=r["predicate_pos"])
                 for r in pos_dependent_srl(2, 1)]
    vocab = LabelingVocab.build(sentences, min_word_freq=1)
    with pytest.raises(ValueError, match="predicate_pos_dim needs predicate_dim > 0"):
        BiLSTMTagger(len(vocab.words), len(vocab.chars), 3, True, predicate_dim=0, predicate_pos_dim=4)
    net = BiLSTMTagger(len(vocab.words), len(vocab.chars), 3, True, word_dim=8, char_channels=4, predicate_dim=4,
                       hidden=8, layers=2, shared_layers=1, dropout=0.0, predicate_pos_dim=4, predicate_pos_dropout=1.0)
    batch = collate_sentences(sentences, vocab)
    unknown = {**batch, "predicate_class": torch.zeros_like(batch["predicate_class"])}
    net.eval()
    scores = net(batch)
    assert not torch.allclose(scores, net(unknown))  # the class is read
    torch.testing.assert_close(net({k: v for k, v in batch.items() if k != "predicate_class"}), net(unknown))
    net.train()  # predicate_pos_dropout=1: every instance reads "unknown"
    torch.testing.assert_close(net(batch), net(unknown))
    net(batch).sum().backward()
    assert net.predicate_pos_embed.weight.grad[0].abs().sum() > 0


def test_task_learns_roles_only_the_pos_separates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    files = (write_jsonl(tmp_path / "train.jsonl", pos_dependent_srl(400, 0)),
             write_jsonl(tmp_path / "val.jsonl", pos_dependent_srl(80, 1)))
    with pytest.raises(ValueError, match="predicate_pos_dim must be >= 0"):
        BiLSTMTagger(10, 10, 3, True, predicate_pos_dim=-1)
    trainer = fit_small(tmp_path, files, epochs=10, predicate_pos_dim=4)[1]
    assert trainer.callback_metrics["val_f1"] > 0.9
    ckpt = trainer.checkpoint_callback.best_model_path
    module = load_labeler(ckpt)
    as_verb = label_text(module, "the man run the ball", "run", "VBD")["tags"]
    as_noun = label_text(module, "the man run the ball", "run", "NN")["tags"]
    assert as_verb[1:4] == ["B-ARG0", "B-V", "B-ARG1"] and as_noun[1:4] == ["O", "B-V", "B-ARG1"]
    with pytest.raises(ValueError, match="--predicate-pos needs --predicate"):
        label_text(module, "the man run the ball", None, "NN")
    assert main(["label", "the man run the ball", "--ckpt", ckpt, "--predicate", "2", "--predicate-pos", "NN",
                 "--json"]) == 0
    assert '"tags": ["O", "O", "B-V", "B-ARG1", "O"]' in capsys.readouterr().out
