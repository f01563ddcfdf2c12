"""MBR selection: the consensus candidate by ROUGE-1 (stemmed as rouge_score stems), ties to the earliest, and
its pairwise utility is the ROUGE-1 F1 the evaluation reports."""

from __future__ import annotations

from collections import Counter

import pytest
from rouge_score import tokenizers

from bp_apps.text.summarization.mbr import mbr_select, unigram_f1
from bp_apps.text.summarization.rouge import rouge_scores


def test_the_consensus_candidate_wins_wherever_it_stands() -> None:
    candidates = ["golf on friday", "meeting budget review", "budget meeting", "budget meeting today"]
    assert mbr_select(candidates) == 2
    assert mbr_select(candidates[::-1]) == 1


def test_stemmed_words_agree_and_ties_go_to_the_earliest() -> None:
    assert mbr_select(["golf", "Meetings", "meeting"]) == 1  # "meetings" and "meeting" share a stem
    assert mbr_select(["golf", "tennis", "chess"]) == 0  # nothing agrees: the first (the best beam) stays
    assert mbr_select(["only one"]) == 0


def test_pairwise_utility_is_rouge1_f1() -> None:
    tokenizer = tokenizers.DefaultTokenizer(use_stemmer=True)
    pairs = [("The budget meetings moved to Friday", "budget meeting friday"), ("Q3 numbers!", "numbers for Q3"),
             ("golf", "tennis"), ("", "anything")]
    for a, b in pairs:
        expected = rouge_scores([a], [[b]])["rouge1"] if a else 0.0
        assert unigram_f1(Counter(tokenizer.tokenize(a)), Counter(tokenizer.tokenize(b))) == pytest.approx(expected)


def test_bad_candidates() -> None:
    for bad in ([], "a string"):
        with pytest.raises(ValueError, match="non-empty sequence of strings"):
            mbr_select(bad)
