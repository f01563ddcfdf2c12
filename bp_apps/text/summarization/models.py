"""Sequence-to-sequence networks for summarization: a T5 or BART built from sizes (fresh weights, any
tokenizer's special ids; BART optionally with a copy mechanism, :mod:`copy`), or a pretrained model and its
tokenizer by hub name or local directory."""

from __future__ import annotations

from typing import Literal

from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BartConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
)

from bp_apps.text.summarization.copy import BartCopyConfig  # also registers the copy model with the Auto API

__all__ = ["build_seq2seq", "load_pretrained_seq2seq"]


def build_seq2seq(arch: Literal["t5", "bart"], vocab_size: int, pad_id: int, eos_id: int, bos_id: int,
                  d_model: int = 256, layers: int = 3, heads: int = 4, ff: int = 1024, dropout: float = 0.1,
                  max_positions: int = 512, copy: bool = False) -> PreTrainedModel:
    """A freshly initialised encoder-decoder (``layers`` each side) whose decoder starts from ``bos_id`` and
    stops at ``eos_id``. ``max_positions`` bounds BART's learned positions (T5's are relative: unbounded).
    ``copy`` (BART only) adds the pointer-generator head of :class:`~bp_apps.text.summarization.copy.
    BartCopyForConditionalGeneration`."""
    if d_model % heads:
        raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
    if copy and arch != "bart":
        raise ValueError(f"the copy mechanism is built on BART: arch must be 'bart' with copy, got {arch!r}")
    if arch == "t5":
        config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=ff, num_layers=layers,
                          num_decoder_layers=layers, num_heads=heads, dropout_rate=dropout, pad_token_id=pad_id,
                          eos_token_id=eos_id, decoder_start_token_id=bos_id, bos_token_id=bos_id)
    elif arch == "bart":
        config_class = BartCopyConfig if copy else BartConfig
        config = config_class(vocab_size=vocab_size, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                              encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ff,
                              decoder_ffn_dim=ff, dropout=dropout, max_position_embeddings=max_positions,
                              pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
                              decoder_start_token_id=bos_id, forced_eos_token_id=eos_id)
    else:
        raise ValueError(f"arch must be 't5' or 'bart', got {arch!r}")
    return AutoModelForSeq2SeqLM.from_config(config)


def load_pretrained_seq2seq(name_or_dir: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A pretrained encoder-decoder and its tokenizer (a hub name, or a ``save_pretrained`` directory)."""
    model = AutoModelForSeq2SeqLM.from_pretrained(name_or_dir)
    tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
    if not tokenizer.is_fast:
        raise ValueError(f"{name_or_dir}: the checkpoint stores tokenizers as JSON, which needs a fast tokenizer")
    if model.config.decoder_start_token_id is None:
        raise ValueError(f"{name_or_dir}: the model config has no decoder_start_token_id")
    return model, tokenizer
