"""A BART whose output distribution can copy source tokens (a pointer-generator, See et al. 2017).

At each target position the decoder's final state ``h`` attends over the encoder's final states (one
head, its own query and key projections), giving a copy distribution over the source positions; the
attention weights are summed onto the source tokens' vocabulary ids. A gate ``p_gen = sigmoid(w·[h; c])``
(``c`` the attended encoder state) mixes the two::

    P(token) = p_gen · softmax(lm_head(h))[token] + (1 - p_gen) · Σ_{i: source_i = token} attention_i

``logits`` returned by the model are ``log P``: softmax leaves them unchanged, so ``generate`` (beam
search, length penalty, no-repeat n-grams) and a cross-entropy on them work as for any seq2seq model.
Copying by vocabulary id lets a small model trained from scratch reuse the source's words (names, dates,
topics) long before its own vocabulary distribution has learned them.

The classes are registered with the transformers Auto API (``model_type`` ``bp_bart_copy``), so
``AutoModelForSeq2SeqLM.from_pretrained(directory)`` loads a saved model once this module is imported
(importing :mod:`bp_apps.text.summarization` does it). Everything above :data:`REMOTE_CODE_END` imports only torch
and transformers: :mod:`~bp_apps.text.summarization.hf_export` writes that text into an export as its remote code,
so ``trust_remote_code=True`` loads the model where bp_apps is not installed, with the very code that trained it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForSeq2SeqLM, BartConfig, BartForConditionalGeneration
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.models.bart.modeling_bart import shift_tokens_right

__all__ = ["COPY_SOURCE_KEY", "BartCopyConfig", "BartCopyForConditionalGeneration"]

COPY_SOURCE_KEY = "decoder_copy_source_ids"  # "decoder_" keeps generate() from handing it to the encoder
TINY = 1e-10  # floor for probabilities before the log


def _widened(t: Tensor) -> Tensor:
    """``t`` in float32 at least: half-precision scores are mixed in float32, float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class BartCopyConfig(BartConfig):
    """A :class:`BartConfig` for :class:`BartCopyForConditionalGeneration`."""

    model_type = "bp_bart_copy"


class BartCopyForConditionalGeneration(BartForConditionalGeneration):
    """BART with a copy gate and copy attention on top of the decoder; ``logits`` are log-probabilities of the
    mixed distribution. The source ids to copy from are ``input_ids`` (training) or ``decoder_copy_source_ids``
    (generation, filled in by :meth:`generate` from ``input_ids``)."""

    config_class = BartCopyConfig

    def __init__(self, config: BartCopyConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        d = config.d_model
        self.copy_query = nn.Linear(d, d, bias=False)
        self.copy_key = nn.Linear(d, d, bias=False)
        self.copy_gate = nn.Linear(2 * d, 1)
        self.post_init()

    def copy_mix(self, hidden: Tensor, memory: Tensor, memory_mask: Tensor | None, source_ids: Tensor,
                 vocab_logits: Tensor) -> tuple[Tensor, Tensor]:
        """log P of the mixed distribution [B, T, V] and the generation gate p_gen [B, T]."""
        scores = self.copy_query(hidden) @ self.copy_key(memory).transpose(1, 2) / math.sqrt(hidden.shape[-1])
        if memory_mask is not None:
            scores = scores.masked_fill(~memory_mask.bool().unsqueeze(1), float("-inf"))
        attention = _widened(scores).softmax(-1)  # [B, T, S]
        context = attention.to(memory.dtype) @ memory
        gate = torch.sigmoid(_widened(self.copy_gate(torch.cat([hidden, context], dim=-1))))  # [B, T, 1]
        probs = gate * _widened(vocab_logits).softmax(-1)
        index = source_ids.unsqueeze(1).expand(-1, hidden.shape[1], -1)
        probs = probs.scatter_add(-1, index, (1.0 - gate) * attention)
        return probs.clamp_min(TINY).log(), gate.squeeze(-1)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                encoder_outputs: Any = None, cache: Any = None, inputs_embeds: Tensor | None = None,
                decoder_inputs_embeds: Tensor | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, decoder_copy_source_ids: Tensor | None = None,
                **kwargs: Any) -> Seq2SeqLMOutput:
        source_ids = decoder_copy_source_ids if decoder_copy_source_ids is not None else input_ids
        if source_ids is None:
            raise ValueError(f"the copy mechanism needs the source ids: pass input_ids or {COPY_SOURCE_KEY}")
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id,
                                                       self.config.decoder_start_token_id)
        outputs = self.model(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                             encoder_outputs=encoder_outputs, decoder_attention_mask=decoder_attention_mask,
                             cache=cache, inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds,
                             use_cache=use_cache, **kwargs)
        hidden, memory = outputs.last_hidden_state, outputs.encoder_last_hidden_state
        vocab_logits = self.lm_head(hidden) + self.final_logits_bias.to(hidden.device)
        log_probs, _ = self.copy_mix(hidden, memory, attention_mask, source_ids, vocab_logits)
        loss = None
        if labels is not None:
            loss = F.nll_loss(log_probs.flatten(0, 1), labels.to(log_probs.device).flatten(), ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=log_probs, cache=outputs.cache,
                               decoder_hidden_states=outputs.decoder_hidden_states,
                               decoder_attentions=outputs.decoder_attentions,
                               cross_attentions=outputs.cross_attentions,
                               encoder_last_hidden_state=memory, encoder_hidden_states=outputs.encoder_hidden_states,
                               encoder_attentions=outputs.encoder_attentions)

    @torch.no_grad()
    def generate(self, input_ids: Tensor | None = None, **kwargs: Any) -> Any:
        """``generate`` with the source ids passed on to every decoding step (expanded with the beams)."""
        if input_ids is not None and kwargs.get(COPY_SOURCE_KEY) is None:
            kwargs[COPY_SOURCE_KEY] = input_ids
        return super().generate(input_ids=input_ids, **kwargs)


# -- REMOTE_CODE_END: the export's remote code is the text above (registering would change a user's Auto mapping) --
REMOTE_CODE_END = "# -- REMOTE_CODE_END"

AutoConfig.register(BartCopyConfig.model_type, BartCopyConfig, exist_ok=True)
AutoModelForSeq2SeqLM.register(BartCopyConfig, BartCopyForConditionalGeneration, exist_ok=True)
