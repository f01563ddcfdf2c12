"""Characters, CTC decoding and error rates.

The character vocabulary is blank ``-`` (index 0), word boundary ``|`` (a space), ``a``–``z`` and the
apostrophe. :func:`normalise_transcript` maps any text onto it (documented policy: lower-case, digits spelled
out, accents stripped, other punctuation dropped, spaces collapsed) or, with ``strict``, refuses characters it
would have to drop. Greedy decoding collapses repeats and removes blanks; beam search is torchaudio's
``ctc_decoder`` (flashlight-text), optionally restricted to a lexicon of words.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics.text import CharErrorRate, WordErrorRate

__all__ = ["BLANK", "DIGIT_WORDS", "TOKENS", "WORD_BOUNDARY", "BeamSearchDecoder", "DecodingConfig", "cer",
           "decode_indices",
           "encode_text", "greedy_decode", "normalise_transcript", "wer", "write_lexicon"]

BLANK = "-"
WORD_BOUNDARY = "|"
TOKENS: tuple[str, ...] = (BLANK, WORD_BOUNDARY, *"abcdefghijklmnopqrstuvwxyz", "'")
TOKEN_INDEX = {t: i for i, t in enumerate(TOKENS)}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_ALLOWED = re.compile(r"[a-z' ]")


def normalise_transcript(text: str, *, strict: bool = False, source: str = "transcript") -> str:
    """``text`` in the model's alphabet: lower case, digits as words ("42" -> "four two"), accents stripped,
    hyphens and other separators as spaces, other punctuation dropped, runs of spaces collapsed.

    With ``strict``, a character that would be dropped (other than ordinary punctuation) raises ValueError
    naming ``source`` and the character."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"\d", lambda m: f" {DIGIT_WORDS[int(m.group())]} ", text)
    text = re.sub(r"[\s\-_/]+", " ", text)
    kept = []
    for char in text:
        if _ALLOWED.fullmatch(char):
            kept.append(char)
        elif strict and not unicodedata.category(char).startswith("P"):
            raise ValueError(f"{source}: character {char!r} (U+{ord(char):04X}) is outside the vocabulary "
                             "a-z, apostrophe and space")
    return " ".join("".join(kept).split())


def encode_text(text: str) -> Tensor:
    """Normalised text → token indices (spaces become the word boundary). Raises on characters outside TOKENS."""
    try:
        return torch.tensor([TOKEN_INDEX[WORD_BOUNDARY if c == " " else c] for c in text], dtype=torch.long)
    except KeyError as error:
        raise ValueError(f"character {error.args[0]!r} is not in the vocabulary; normalise the text first") from None


def decode_indices(indices: Iterable[int]) -> str:
    """Token indices (no blanks) → text."""
    text = "".join(TOKENS[i] for i in indices if i != 0).replace(WORD_BOUNDARY, " ")
    return " ".join(text.split())


def greedy_decode(log_probs: Tensor, lengths: Tensor | None = None) -> list[str]:
    """Best path of ``(B, T, V)`` scores: argmax per frame, collapse repeats, drop blanks (index 0)."""
    best = log_probs.argmax(-1)
    lengths = lengths if lengths is not None else torch.full((best.shape[0],), best.shape[1])
    texts = []
    for path, length in zip(best.tolist(), lengths.tolist()):
        path = path[:length]
        collapsed = [t for i, t in enumerate(path) if t != 0 and (i == 0 or t != path[i - 1])]
        texts.append(decode_indices(collapsed))
    return texts


def write_lexicon(words: Iterable[str], path: str | Path) -> Path:
    """A flashlight lexicon file: one ``word w o r d |`` line per distinct normalised word."""
    path = Path(path)
    lines = []
    for word in sorted({w for text in words for w in normalise_transcript(text).split()}):
        lines.append(f"{word} {' '.join(word)} {WORD_BOUNDARY}")
    if not lines:
        raise ValueError("a lexicon needs at least one word")
    from bp_apps.core.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class DecodingConfig:
    """How a recognizer decodes at test time besides greedy decoding: beam search of ``beam_size`` (0: none),
    restricted to the training words when ``lexicon`` is set. Validation always decodes greedily."""

    beam_size: int = 0
    lexicon: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.beam_size, bool) or not isinstance(self.beam_size, int) or self.beam_size < 0:
            raise ValueError(f"decoding.beam_size must be an integer >= 0 (0: greedy only), got {self.beam_size!r}")
        if not isinstance(self.lexicon, bool):
            raise ValueError(f"decoding.lexicon must be true or false, got {self.lexicon!r}")


class BeamSearchDecoder:
    """Beam search over CTC emissions with torchaudio's ``ctc_decoder`` (needs the ``flashlight-text`` package).

    With ``lexicon`` (a file from :func:`write_lexicon`) only its words can be output; without it any character
    sequence can. No language model is used (``lm_weight`` only matters with one)."""

    def __init__(self, beam_size: int = 16, lexicon: str | Path | None = None, word_score: float = 0.0,
                 beam_threshold: float = 50.0) -> None:
        try:
            from torchaudio.models.decoder import ctc_decoder
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("beam search needs the flashlight-text package: pip install flashlight-text") from error
        if beam_size < 1:
            raise ValueError(f"beam size must be at least 1, got {beam_size}")
        if lexicon is not None and not Path(lexicon).is_file():
            raise FileNotFoundError(f"lexicon file {lexicon} does not exist")
        self.decoder = ctc_decoder(lexicon=str(lexicon) if lexicon is not None else None, tokens=list(TOKENS), lm=None,
                                   nbest=1, beam_size=beam_size, beam_threshold=beam_threshold, word_score=word_score,
                                   blank_token=BLANK, sil_token=WORD_BOUNDARY, unk_word="<unk>")
        self.lexicon, self.beam_size = lexicon is not None, beam_size

    def __call__(self, log_probs: Tensor, lengths: Tensor | None = None) -> list[str]:
        emissions = log_probs.detach().float().cpu().contiguous()
        lengths = lengths.cpu().to(torch.int32) if lengths is not None else None
        results = self.decoder(emissions, lengths)
        texts = []
        for hypotheses in results:
            if not hypotheses:
                texts.append("")
            elif self.lexicon:
                texts.append(" ".join(w for w in hypotheses[0].words if w != "<unk>"))
            else:
                texts.append(decode_indices(hypotheses[0].tokens.tolist()))
        return texts


def wer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Word error rate (torchmetrics)."""
    return float(WordErrorRate()(list(predictions), list(references)))


def cer(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Character error rate (torchmetrics)."""
    return float(CharErrorRate()(list(predictions), list(references)))
