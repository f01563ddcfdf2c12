"""Punctuation and capitalisation restoration examples: tags, the prose filter, chunking and restoring text."""

import pytest

from bp_apps.text.corpus import Docstring, stdlib_docstrings
from bp_apps.text.labeling.punctuation import (
    CASES,
    MARKS,
    PUNCT_TAGS,
    case_of,
    examples_from_text,
    mark_of,
    punctuation_corpus,
    restore_text,
)


def _labels(text: str, max_tokens: int = 48) -> list[tuple[str, str]]:
    return [pair for ex in examples_from_text(text, max_tokens) for pair in zip(ex.tokens, ex.tags)]


def test_tag_set():
    assert len(PUNCT_TAGS) == len(set(PUNCT_TAGS)) == 15
    assert PUNCT_TAGS[:4] == ("O|L", "O|C", "O|U", "COMMA|L")
    assert {(mark_of(t), case_of(t)) for t in PUNCT_TAGS} == {(m, c) for m in MARKS for c in CASES}
    assert mark_of("QUESTION|U") == "QUESTION" and case_of("QUESTION|U") == "U"
    for bad in ("B-ARG0", "O", "COMMA|X", "comma|L"):
        with pytest.raises(ValueError, match=repr(bad)):
            mark_of(bad)


def test_marks_and_cases_of_a_hand_written_paragraph():
    text = "Hello world, how are you? I'm fine: the NASA built-in value is 3.14; OK!"
    assert _labels(text) == [
        ("hello", "O|C"), ("world", "COMMA|L"), ("how", "O|L"), ("are", "O|L"), ("you", "QUESTION|L"),
        ("i'm", "O|C"), ("fine", "COLON|L"), ("the", "O|L"), ("nasa", "O|U"), ("built-in", "O|L"), ("value", "O|L"),
        ("is", "O|L"), ("3.14", "COLON|L"), ("ok", "PERIOD|U"),
    ]


def test_quotes_brackets_dashes_and_abbreviations():
    text = 'He said "stop." (See the end.) A tool - e.g., a hammer, i.e. this etc. U.S. law.'
    assert _labels(text) == [
        ("he", "O|C"), ("said", "O|L"), ("stop", "PERIOD|L"), ("see", "O|C"), ("the", "O|L"), ("end", "PERIOD|L"),
        ("a", "O|C"), ("tool", "O|L"), ("e.g.", "COMMA|L"), ("a", "O|L"), ("hammer", "COMMA|L"), ("i.e.", "O|L"),
        ("this", "O|L"), ("etc.", "O|L"), ("u.s.", "O|U"), ("law", "PERIOD|L"),
    ]
    assert _labels('So it ends?".')[-1] == ("ends", "PERIOD|L")  # the last mark wins


PROSE = "This paragraph is plain English prose. It should be kept."


@pytest.mark.parametrize("code", [
    ">>> import json\n>>> json.dumps(1)",
    "Example::\n\nSee below.",  # the "::" paragraph goes, "See below." is too short
    "Some text that\n    continues indented",
    ".. note:: This is a directive.",
    "Use ``json.dumps`` for this.",
    "Call f(x) to compute it.",
    "Set a=b in the file.",
    "See os.path for more.",
    "Use snake_case names here.",
    "Read https://example.org for details.",
    "Raise a ValueError here.",
    "Pass *args and **kwargs along.",
    "Items of a list[int] are fine.",
    "Read from stdin and/or a file.",
    "- first item\n- second item",
    "Parameters\n----------",
    "Return x # the value.",
])
def test_code_and_markup_paragraphs_are_dropped(code):
    examples = examples_from_text(f"{PROSE}\n\n{code}\n\n{PROSE}", where="mod.f")
    assert [restore_text(ex.tokens, ex.tags) for ex in examples] == [PROSE, PROSE]
    assert [ex.where for ex in examples] == ["mod.f#0", "mod.f#1"]


def test_text_is_cleandoced_before_the_indentation_check():
    assert len(examples_from_text(f"    {PROSE}\n    Still prose here.")) == 1


def test_chunks_respect_max_tokens_and_prefer_sentence_ends():
    sentence = "one two three four five."  # five tokens, PERIOD on the fifth
    examples = examples_from_text(" ".join([sentence] * 4), max_tokens=8)
    assert [len(ex.tokens) for ex in examples] == [5, 5, 5, 5]  # cut after each period, in the last half
    assert all(mark_of(ex.tags[-1]) == "PERIOD" for ex in examples)
    run_on = " ".join(f"w{i}" for i in range(20))
    assert [len(ex.tokens) for ex in examples_from_text(run_on, max_tokens=8)] == [8, 8, 4]
    early = "a b. c d e f g h i j k l."  # the only inner period lies in the first half: a plain cut
    assert [ex.tokens for ex in examples_from_text(early, max_tokens=8)] == [
        ("a", "b", "c", "d", "e", "f", "g", "h"), ("i", "j", "k", "l")]
    assert [len(ex.tokens) for ex in examples_from_text(" ".join(["w"] * 10), max_tokens=4)] == [4, 4]  # 2 dropped
    with pytest.raises(ValueError, match="max_tokens"):
        examples_from_text(PROSE, max_tokens=2)


@pytest.mark.parametrize("text", [
    "Hello world, how are you?",
    "Return the value of x: a number, or None. The NASA API is built-in.",
    "Use it, e.g., when the value is 3.14. Don't worry: it works, and I think so too.",
])
def test_restore_text_inverts_examples_on_clean_prose(text):
    for max_tokens in (48, 5):
        examples = examples_from_text(text, max_tokens)
        assert " ".join(restore_text(ex.tokens, ex.tags) for ex in examples) == text
        assert all(len(ex.tokens) <= max_tokens for ex in examples)


def test_restore_text():
    tokens = ["hello", "world", "how", "are", "you"]
    tags = ["O|C", "COMMA|L", "O|L", "O|L", "QUESTION|L"]
    assert restore_text(tokens, tags) == "Hello world, how are you?"
    assert restore_text(["nasa", "rocks"], ["O|U", "PERIOD|L"]) == "NASA rocks."
    with pytest.raises(ValueError, match="'B-ARG0'"):
        restore_text(["a", "b"], ["O|L", "B-ARG0"])
    with pytest.raises(ValueError, match="2 tokens but 1 tags"):
        restore_text(["a", "b"], ["O|L"])


def test_punctuation_corpus_names_examples_after_docstrings():
    docs = [Docstring("m.f", "Return one thing.\n\nThen another thing."), Docstring("m.g", "Do it, twice now.")]
    examples = punctuation_corpus(docs)
    assert [(ex.where, ex.tokens) for ex in examples] == [
        ("m.f#0", ("return", "one", "thing")), ("m.f#1", ("then", "another", "thing")),
        ("m.g#0", ("do", "it", "twice", "now"))]


def test_real_docstrings_give_clean_examples(tmp_path):
    examples = punctuation_corpus(stdlib_docstrings(limit=300, cache_dir=tmp_path), max_tokens=16)
    assert len(examples) > 100
    for ex in examples:
        assert 3 <= len(ex.tokens) <= 16 and set(ex.tags) <= set(PUNCT_TAGS)
        for token in ex.tokens:
            assert token == token.lower() and token[-1] not in ",?:;!" and not set(token) & set("()[]{}=_`*<>|#@\\/")
    marks = {mark_of(tag) for ex in examples for tag in ex.tags}
    assert {"O", "COMMA", "PERIOD"} <= marks
