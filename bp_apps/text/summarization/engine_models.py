"""The summarization BARTs of :mod:`models` built of engine layers: trained by the hand-written backward, with the
parameter layout of their Hugging Face twins, so one ``state_dict`` loads into either.

- :class:`EngineBartNet`: :class:`~bp_apps.text.summarization.models.BartNet` as an
  :class:`~bp_apps.engine.transformer.EngineBart`;
- :class:`EngineBartCopyNet`: :class:`~bp_apps.text.summarization.models.BartCopyNet`, the pointer-generator BART.

Built from sizes, a network first builds the Hugging Face model exactly as its autograd twin does (the same random
draws) and takes its weights, so one seed gives both backends the same start. With ``pretrained`` (a hub name or a
``save_pretrained`` folder) it takes a pretrained BART's weights instead: the engine then fine-tunes that model by
hand-written backprop. Decoding reuses Hugging Face's ``generate`` on a twin that is handed the engine's weights
(:meth:`EngineBartNet.generation_model`): the layout is shared, so nothing is converted.
"""

from __future__ import annotations

import copy as copy_module
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForSeq2SeqLM, BartForConditionalGeneration, PreTrainedModel
from transformers.models.bart.modeling_bart import shift_tokens_right

from bp_apps.engine.layers import Layer
from bp_apps.engine.models import twin_with_weights
from bp_apps.engine.transformer import EngineBart
from bp_apps.text.summarization.copy import BartCopyForConditionalGeneration
from bp_apps.text.summarization.models import Seq2SeqNet, _special_ids, build_seq2seq

__all__ = ["EngineBartCopyNet", "EngineBartNet", "engine_net_from_config", "engine_net_from_hf"]


class EngineBartNet(Layer):
    """A BART of ``layers`` encoder and decoder layers with ``max_positions`` learned positions, built of engine
    layers (fresh weights: those :class:`~bp_apps.text.summarization.models.BartNet` draws for the same seed), or
    the pretrained BART ``pretrained`` (a hub name or a ``save_pretrained`` folder; the sizes are then the model's,
    and the data's tokenizer must be its own). ``model`` is the :class:`~bp_apps.engine.transformer.EngineBart`."""

    copy = False
    hf_class: type[BartForConditionalGeneration] = BartForConditionalGeneration

    def __init__(self, vocab_size: int, pad_id: int, bos_id: int, eos_id: int, max_positions: int = 512,
                 d_model: int = 256, layers: int = 3, heads: int = 4, ff: int = 1024, dropout: float = 0.1,
                 pretrained: str | None = None) -> None:
        bos_id, eos_id, pad_id = _special_ids(bos_id, eos_id, pad_id)
        if pretrained:
            hf_model = self._load_pretrained(pretrained, vocab_size, pad_id, eos_id)
        else:
            hf_model = build_seq2seq("bart", vocab_size, pad_id, eos_id, bos_id, d_model=d_model, layers=layers,
                                     heads=heads, ff=ff, dropout=dropout, max_positions=max_positions,
                                     copy=self.copy)
        super().__init__()
        self._adopt(hf_model)

    @classmethod
    def _load_pretrained(cls, name_or_dir: str, vocab_size: int, pad_id: int, eos_id: int) -> PreTrainedModel:
        """The pretrained BART (a copy head the checkpoint lacks starts fresh), refused when the data's tokenizer
        does not fit it."""
        model = cls.hf_class.from_pretrained(name_or_dir)
        config = model.config
        problems = []
        if config.decoder_start_token_id is None:
            problems.append("the model config has no decoder_start_token_id")
        if vocab_size > config.vocab_size:
            problems.append(f"{vocab_size} tokens, the model embeds {config.vocab_size}")
        if pad_id != config.pad_token_id:
            problems.append(f"pad id {pad_id}, the model's is {config.pad_token_id}")
        if config.eos_token_id is not None and eos_id != config.eos_token_id:
            problems.append(f"end id {eos_id}, the model's is {config.eos_token_id}")
        if problems:
            raise ValueError(f"{cls.__name__}: the pretrained model {name_or_dir!r} does not fit the data's tokenizer "
                             f"({'; '.join(problems)}): give the data module tokenizer_name={name_or_dir!r}")
        return model

    def _adopt(self, hf_model: PreTrainedModel) -> None:
        """Build the engine BART of ``hf_model``'s config with its weights, and keep ``hf_model`` as the twin that
        generates. The engine layers' own initial draws are made on a forked RNG (they are overwritten), so
        building leaves the random state where the autograd network leaves it."""
        with torch.random.fork_rng(devices=[]):
            model = EngineBart(hf_model.config, copy=self.copy)
        model.load_state_dict(hf_model.state_dict())
        self.model = model
        self.__dict__["_twin"] = hf_model  # not a submodule: the state dict holds the engine's weights once
        self.__dict__["_twin_stamp"] = self._weights_stamp()

    @classmethod
    def from_hf(cls, hf_model: PreTrainedModel) -> EngineBartNet:
        """The engine network of an existing Hugging Face BART of this class's kind (its config and weights)."""
        if type(hf_model) is not cls.hf_class:
            raise TypeError(f"{cls.__name__} wraps a {cls.hf_class.__name__}, got {type(hf_model).__name__}")
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        net._adopt(hf_model)
        return net

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V) for ``labels`` (padding -100): log-probabilities with the copy head."""
        config = self.model.config
        decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
        return self.model.forward(input_ids, attention_mask, decoder_input_ids)

    def backward(self, grad_logits: Tensor) -> None:
        """Write every parameter's gradient from dL/dlogits."""
        self.model.backward(grad_logits)

    def _weights_stamp(self) -> tuple[tuple[int, int], ...]:
        """Where each weight lives and how often it was written in place: changes whenever a weight does."""
        return tuple((t.data_ptr(), t._version) for t in self.model.state_dict().values())

    def generation_model(self) -> PreTrainedModel:
        """The Hugging Face twin holding these weights (copied only when they changed since the last call), in the
        engine's device and dtype and in eval mode: what ``generate``, ``save_pretrained`` and exports use."""
        twin = self.__dict__["_twin"]
        weight = self.model.model.shared.weight
        if next(twin.parameters()).dtype != weight.dtype or twin.device != weight.device:
            twin.to(device=weight.device, dtype=weight.dtype)
            self.__dict__["_twin_stamp"] = None
        stamp = self._weights_stamp()
        if stamp != self.__dict__["_twin_stamp"]:
            twin.load_state_dict(self.model.state_dict())
            self.__dict__["_twin_stamp"] = stamp
        return twin.eval()

    def to_autograd(self) -> Seq2SeqNet:
        """The autograd twin (:class:`~bp_apps.text.summarization.models.Seq2SeqNet` holding the Hugging Face model of
        this config, the class BartNet / BartCopyNet hold) with copies of these weights, dtype, device and mode.
        With attention dropout it runs Hugging Face's eager attention, whose dropout draws the engine's masks."""
        config = copy_module.deepcopy(self.model.config)
        implementation = "eager" if config.attention_dropout else None
        return twin_with_weights(self, lambda: Seq2SeqNet(AutoModelForSeq2SeqLM.from_config(
            config, attn_implementation=implementation)))


class EngineBartCopyNet(EngineBartNet):
    """:class:`EngineBartNet` whose decoder can copy source tokens: the engine twin of
    :class:`~bp_apps.text.summarization.models.BartCopyNet` (a pretrained plain BART gets a fresh copy head)."""

    copy = True
    hf_class = BartCopyForConditionalGeneration


def engine_net_from_hf(hf_model: PreTrainedModel) -> EngineBartNet:
    """:class:`EngineBartCopyNet` for a copy BART, :class:`EngineBartNet` for a plain one (config and weights)."""
    if isinstance(hf_model, BartCopyForConditionalGeneration):
        return EngineBartCopyNet.from_hf(hf_model)
    return EngineBartNet.from_hf(hf_model)


def engine_net_from_config(config: Mapping[str, Any]) -> EngineBartNet:
    """The engine network a saved model config (``model.config.to_dict()``) describes, with fresh weights (a
    checkpoint's state dict then fills them): no download."""
    return engine_net_from_hf(AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(**config)))
