"""Sub-word tokenizers trained here with ``tokenizers`` (no download), wrapped as transformers fast
tokenizers, and stored as one JSON string so a checkpoint can carry its tokenizer."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "tokenizer_from_json", "tokenizer_to_json", "train_tokenizer"]

SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000, kind: Literal["wordpiece", "unigram"] = "wordpiece",
                    lowercase: bool = True, cache_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Train a WordPiece or Unigram tokenizer on ``texts`` (BERT-style special tokens and
    ``[CLS] ... [SEP]`` framing) and wrap it for transformers.

    With ``cache_dir`` the trained tokenizer is kept there under a digest of the texts and settings, and the same
    request loads it instead of training again. Besides saving time, that makes runs repeatable: the Unigram trainer
    of ``tokenizers`` breaks ties in hash-map order, so two trainings on the same texts can pick different pieces."""
    texts = list(texts)
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(f"{kind}|{vocab_size}|{lowercase}|v1".encode())
        for text in texts:
            digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
        path = Path(cache_dir) / f"{kind}-{vocab_size}-{digest.hexdigest()[:24]}.json"
        if path.is_file():
            try:
                return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path)), **SPECIAL_TOKENS)
            except Exception:  # a corrupt cache file: train again and replace it
                pass
    tokenizer = _train(texts, vocab_size, kind, lowercase)
    if path is not None:
        from bp_apps.core.io import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, tokenizer_to_json(tokenizer))
    return tokenizer


def _train(texts: list[str], vocab_size: int, kind: str, lowercase: bool) -> PreTrainedTokenizerFast:
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()))
        tok.decoder = decoders.WordPiece()
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                          unk_token="[UNK]")
        tok.decoder = decoders.Metaspace()
    else:
        raise ValueError(f"kind must be 'wordpiece' or 'unigram', got {kind!r}")
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = (pre_tokenizers.BertPreTokenizer() if kind == "wordpiece"
                         else pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()]))
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def tokenizer_to_json(tokenizer: PreTrainedTokenizerFast) -> str:
    """The whole tokenizer (vocabulary, normalizer, framing) as a JSON string."""
    return tokenizer.backend_tokenizer.to_str()


def tokenizer_from_json(text: str, special_tokens: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """Inverse of :func:`tokenizer_to_json`; ``special_tokens`` is the original tokenizer's
    ``special_tokens_map`` (default: the BERT-style tokens :func:`train_tokenizer` uses)."""
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), **(special_tokens or SPECIAL_TOKENS))
