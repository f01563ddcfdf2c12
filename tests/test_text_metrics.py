"""Span scores (CoNLL chunking via seqeval) and token scores, on hand-computed examples."""

from __future__ import annotations

import pytest

from bp_apps.text.labeling.metrics import span_scores, token_scores


def test_span_scores_hand_computed():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "O"]]
    # gold spans: PER(0-1), LOC(3), ORG(0), PER(2); predicted: PER(0-1), ORG(3), ORG(0); 2 correct.
    scores = span_scores(gold, pred)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(4 / 7)
    assert scores["support"] == 4
    assert scores["per_label"] == {
        "LOC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "ORG": {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1},
        "PER": {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2},
    }


def test_excluding_the_verb_span():
    gold = [["B-ARG0", "I-ARG0", "B-V", "B-ARG1", "I-ARG1"], ["B-V", "B-ARGM-TMP"]]
    pred = [["B-ARG0", "I-ARG0", "B-V", "B-ARG1", "O"], ["B-V", "B-ARGM-TMP"]]
    with_verb = span_scores(gold, pred)
    assert with_verb["f1"] == pytest.approx(4 / 5) and with_verb["support"] == 5  # both V spans count as hits
    without_verb = span_scores(gold, pred, exclude=["V"])
    assert without_verb["precision"] == pytest.approx(2 / 3)
    assert without_verb["recall"] == pytest.approx(2 / 3)
    assert without_verb["support"] == 3
    assert set(without_verb["per_label"]) == {"ARG0", "ARG1", "ARGM-TMP"}
    assert without_verb["per_label"]["ARG1"]["recall"] == 0.0


def test_excluding_applies_to_predictions_too():
    gold = [["B-ARG0", "O", "O"]]
    pred = [["B-ARG0", "B-V", "I-V"]]  # a spurious V span is not a false positive once V is excluded
    assert span_scores(gold, pred)["precision"] == pytest.approx(1 / 2)
    assert span_scores(gold, pred, exclude=["V"])["precision"] == 1.0


def test_conlleval_chunk_starting_with_inside_tag():
    # conlleval: an I-X after O (or after another type) starts a new chunk of type X.
    gold = [["O", "I-A", "I-A", "O"], ["B-B", "I-A"]]
    pred = [["O", "B-A", "I-A", "O"], ["B-B", "B-A"]]
    scores = span_scores(gold, pred)
    assert scores["f1"] == 1.0 and scores["support"] == 3
    assert span_scores([["B-A", "I-B"]], [["B-A", "I-A"]])["f1"] == 0.0  # A(0) B(1) vs A(0-1)


def test_span_scores_with_no_spans():
    scores = span_scores([["O", "O"], []], [["O", "O"], []])
    assert scores == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "per_label": {}}
    spurious = span_scores([["O", "O"]], [["B-A", "O"]])
    assert spurious["precision"] == 0.0 and spurious["support"] == 0 and spurious["per_label"]["A"]["support"] == 0


@pytest.mark.parametrize("scorer", [span_scores, token_scores])
def test_mismatched_lengths_raise(scorer):
    with pytest.raises(ValueError, match="1 sentences but pred has 2"):
        scorer([["O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="sentence 1"):
        scorer([["O"], ["O", "B-A"]], [["O"], ["O"]])


def test_token_scores_with_projection():
    gold = [["O|C", "COMMA|U", "O|L", "PERIOD|L"], ["O|U", "QUESTION|L"]]
    pred = [["O|C", "COMMA|L", "PERIOD|L", "O|L"], ["O|U", "QUESTION|L"]]
    scores = token_scores(gold, pred, project=lambda tag: tag.split("|")[0])
    assert scores["per_label"] == {
        "COMMA": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
        "O": {"precision": 2 / 3, "recall": 2 / 3, "f1": pytest.approx(2 / 3), "support": 3},
        "PERIOD": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "QUESTION": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
    }
    assert scores["micro"] == {"precision": 2 / 3, "recall": 2 / 3, "f1": pytest.approx(2 / 3), "support": 3}
    assert scores["accuracy"] == pytest.approx(4 / 6)
    # Without projection the case part must match too: only O|C, O|U and QUESTION|L are right.
    raw = token_scores(gold, pred)
    assert raw["accuracy"] == pytest.approx(3 / 6)
    assert raw["per_label"]["COMMA|U"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert raw["per_label"]["COMMA|L"]["support"] == 0


def test_token_scores_micro_respects_ignore():
    gold = [["O", "A", "B", "O"]]
    pred = [["O", "A", "O", "B"]]
    assert token_scores(gold, pred)["micro"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    everything = token_scores(gold, pred, ignore=())
    assert everything["micro"]["precision"] == everything["accuracy"] == 0.5
    assert everything["micro"]["support"] == 4
    assert token_scores([[]], [[]]) == {"per_label": {}, "micro": {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                                                   "support": 0}, "accuracy": 0.0}
