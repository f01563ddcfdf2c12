"""Sequence-to-sequence networks for summarization, each a class a config names by ``class_path``:

- :class:`T5Net`, :class:`BartNet`: a T5 or BART built from sizes (fresh weights, any tokenizer's special ids);
- :class:`BartCopyNet`: the BART with the pointer-generator copy mechanism of :mod:`copy`;
- :class:`PretrainedNet`: a pretrained encoder-decoder by hub name or local ``save_pretrained`` directory.

Their first parameters are what the tokenizer (the data module's ``tokenizer_file``) gives, in this order:
``vocab_size``, ``pad_id``, ``bos_id`` (the decoder's start token), ``eos_id``, then ``max_positions`` (the longest
sequence the data and generation settings need); the Summarizer passes them. Each is a :class:`Seq2SeqNet`: a thin
module holding the transformers model as ``model`` (what ``generate``, ``save_pretrained`` and ``hf_best`` use).
A checkpoint rebuilds its network with :meth:`Seq2SeqNet.from_config` from the saved model config, so loading
never downloads, whichever class trained it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BartConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
)

from bp_apps.text.summarization.copy import BartCopyConfig  # also registers the copy model with the Auto API

__all__ = ["BartCopyNet", "BartNet", "PretrainedNet", "Seq2SeqNet", "T5Net", "build_seq2seq",
           "load_pretrained_seq2seq"]


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
    model = _pretrained_model(name_or_dir)
    tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
    if not tokenizer.is_fast:
        raise ValueError(f"{name_or_dir}: the checkpoint stores tokenizers as JSON, which needs a fast tokenizer")
    return model, tokenizer


def _pretrained_model(name_or_dir: str) -> PreTrainedModel:
    model = AutoModelForSeq2SeqLM.from_pretrained(name_or_dir)
    if model.config.decoder_start_token_id is None:
        raise ValueError(f"{name_or_dir}: the model config has no decoder_start_token_id")
    return model


class Seq2SeqNet(nn.Module):
    """A transformers encoder-decoder (``model``) as the Summarizer's network."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def from_config(config: Mapping[str, Any]) -> Seq2SeqNet:
        """The network a saved model config (``model.config.to_dict()``) describes, with fresh weights (a
        checkpoint's state dict then fills them): no download, whichever class built the original."""
        return Seq2SeqNet(AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(**config)))


def _special_ids(bos_id: int | None, eos_id: int | None, pad_id: int | None) -> tuple[int, int, int]:
    if None in (bos_id, eos_id, pad_id):
        raise ValueError("the tokenizer needs a pad token, a start token ([CLS] or BOS) and an end token "
                         "([SEP] or EOS)")
    return bos_id, eos_id, pad_id  # type: ignore[return-value]


class T5Net(Seq2SeqNet):
    """A T5 of ``layers`` encoder and decoder layers, fresh weights (positions are relative: ``max_positions``
    is not needed)."""

    def __init__(self, vocab_size: int, pad_id: int, bos_id: int, eos_id: int, max_positions: int = 512,
                 d_model: int = 256, layers: int = 3, heads: int = 4, ff: int = 1024, dropout: float = 0.1) -> None:
        bos_id, eos_id, pad_id = _special_ids(bos_id, eos_id, pad_id)
        super().__init__(build_seq2seq("t5", vocab_size, pad_id, eos_id, bos_id, d_model=d_model, layers=layers,
                                       heads=heads, ff=ff, dropout=dropout, max_positions=max_positions))


class BartNet(Seq2SeqNet):
    """A BART of ``layers`` encoder and decoder layers with ``max_positions`` learned positions, fresh weights."""

    copy = False

    def __init__(self, vocab_size: int, pad_id: int, bos_id: int, eos_id: int, max_positions: int = 512,
                 d_model: int = 256, layers: int = 3, heads: int = 4, ff: int = 1024, dropout: float = 0.1) -> None:
        bos_id, eos_id, pad_id = _special_ids(bos_id, eos_id, pad_id)
        super().__init__(build_seq2seq("bart", vocab_size, pad_id, eos_id, bos_id, d_model=d_model, layers=layers,
                                       heads=heads, ff=ff, dropout=dropout, max_positions=max_positions,
                                       copy=self.copy))


class BartCopyNet(BartNet):
    """:class:`BartNet` whose decoder can copy source tokens (a pointer-generator,
    :class:`~bp_apps.text.summarization.copy.BartCopyForConditionalGeneration`)."""

    copy = True


class PretrainedNet(Seq2SeqNet):
    """A pretrained encoder-decoder (``name_or_dir``: a hub name such as ``t5-small``, or a ``save_pretrained``
    directory). The data module's tokenizer must be the model's own (give it ``tokenizer_name`` = the same name):
    a tokenizer whose ids do not fit the model is refused. ``max_positions`` is not checked (the model keeps its
    own limit)."""

    def __init__(self, vocab_size: int, pad_id: int, bos_id: int | None, eos_id: int | None,
                 max_positions: int = 512, name_or_dir: str = "t5-small") -> None:
        model = _pretrained_model(name_or_dir)
        config = model.config
        embeddings = model.get_input_embeddings().num_embeddings
        problems = []
        if vocab_size > embeddings:
            problems.append(f"{vocab_size} tokens, the model embeds {embeddings}")
        if pad_id != config.pad_token_id:
            problems.append(f"pad id {pad_id}, the model's is {config.pad_token_id}")
        if eos_id is not None and config.eos_token_id is not None and eos_id != config.eos_token_id:
            problems.append(f"end id {eos_id}, the model's is {config.eos_token_id}")
        if problems:
            raise ValueError(f"the data's tokenizer does not fit the pretrained model {name_or_dir!r} "
                             f"({'; '.join(problems)}): give the data module tokenizer_name={name_or_dir!r}")
        super().__init__(model)
