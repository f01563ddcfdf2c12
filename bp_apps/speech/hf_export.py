"""A wav2vec 2.0 recognizer as a Hugging Face folder: ``Wav2Vec2ForCTC`` with the ``Wav2Vec2Processor`` that
turns audio into its input and its output ids into text as the suite does.

The suite reads waveforms at the data's sampling rate, level-normalised when the file is read, with no per-utterance
mean/variance normalisation; it decodes greedily (argmax per frame, repeats collapsed, blanks dropped) over its
character set: blank, word boundary ``|``, ``a``-``z`` and the apostrophe. The export writes

- the ``Wav2Vec2ForCTC`` model (``save_pretrained``);
- a feature extractor with that sampling rate, ``do_normalize=False`` and an attention mask (the suite passes one);
- a CTC tokenizer whose vocabulary is that character set in the suite's order, the blank as its pad token
  (``<pad>``, id 0) and ``|`` as the word delimiter, so ``processor.batch_decode(logits.argmax(-1))`` gives the
  suite's greedy transcript (with runs of spaces collapsed, as the suite does);
- a model card.

Other speech networks (the GRU and Conformer CTC models, the digit classifiers) are not transformers models and
are refused (export them as ONNX).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bp_apps.core.io import atomic_write_text, load_checkpoint_dict
from bp_apps.core.model_card import ModelCard, checkpoint_data, run_metrics, staged_export, write_model_card
from bp_apps.speech.decoding import BLANK, TOKENS, WORD_BOUNDARY
from bp_apps.speech.features import FeatureConfig
from bp_apps.speech.models import Wav2Vec2CTC

__all__ = ["PAD_TOKEN", "ctc_vocabulary", "export_hugging_face", "speech_processor", "write_recognizer_export"]

PAD_TOKEN = "<pad>"
"""The CTC blank's name in the exported tokenizer (its pad token, as transformers' CTC decoding expects)."""


def ctc_vocabulary() -> dict[str, int]:
    """The suite's characters (:data:`~bp_apps.speech.decoding.TOKENS`) by id, the blank named :data:`PAD_TOKEN`."""
    return {(PAD_TOKEN if token == BLANK else token): i for i, token in enumerate(TOKENS)}


def speech_processor(features: FeatureConfig, folder: Path) -> Any:
    """A ``Wav2Vec2Processor`` for waveforms at ``features.sample_rate`` and the suite's character set (its
    ``vocab.json`` is written into ``folder``, where the processor is then saved)."""
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    vocab = folder / "vocab.json"
    atomic_write_text(vocab, json.dumps(ctc_vocabulary(), ensure_ascii=False, indent=2) + "\n")
    tokenizer = Wav2Vec2CTCTokenizer(str(vocab), pad_token=PAD_TOKEN, unk_token="<unk>",
                                     word_delimiter_token=WORD_BOUNDARY, bos_token=None, eos_token=None,
                                     do_lower_case=False)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=features.sample_rate, padding_value=0.0,
                                         do_normalize=False, return_attention_mask=True)
    return Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)


def _wav2vec2(module: Any, checkpoint: Path | str) -> Wav2Vec2CTC:
    net = getattr(module, "net", None)
    if not isinstance(net, Wav2Vec2CTC):
        kind = type(net).__name__ if net is not None else type(module).__name__
        raise ValueError(f"{checkpoint}: the {kind} is not a transformers model and has no Hugging Face form "
                         "(only a Wav2Vec2CTC recognizer has): export it with --format onnx")
    return net


def _card(net: Wav2Vec2CTC, features: FeatureConfig, checkpoint: Path, data: tuple[list[str], str]) -> ModelCard:
    metrics, source = run_metrics(checkpoint)
    usage = ("from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor\n\n"
             "processor = Wav2Vec2Processor.from_pretrained(folder)\n"
             "model = Wav2Vec2ForCTC.from_pretrained(folder).eval()\n"
             f"inputs = processor(waveforms, sampling_rate={features.sample_rate}, padding=True, "
             "return_tensors=\"pt\")\n"
             "ids = model(**inputs).logits.argmax(-1)\n"
             "texts = [\" \".join(t.split()) for t in processor.batch_decode(ids)]")
    return ModelCard(
        title="bp-apps wav2vec 2.0 CTC recognizer",
        summary=(f"A wav2vec 2.0 model ({net.model.config.num_hidden_layers} transformer layers, hidden size "
                 f"{net.model.config.hidden_size}) with a character CTC head, trained with bp-apps on "
                 f"{features.sample_rate} Hz waveforms. Its characters: blank (`{PAD_TOKEN}`), word boundary `|`, "
                 "`a`-`z` and the apostrophe."),
        pipeline_tag="automatic-speech-recognition", tags=["automatic-speech-recognition", "wav2vec2", "ctc"],
        datasets=data[0], data=data[1], metrics=metrics, metrics_source=source,
        intended_use="Transcribing short English recordings like the training data, for research and teaching.",
        limitations=[f"Input: mono audio resampled to {features.sample_rate} Hz. bp-apps also scales each file's "
                     "level (normalise_level) before the model; the feature extractor does not "
                     "(`do_normalize=False`, as in training), so match the level for the same transcripts.",
                     "bp-apps cuts recordings over 20 s into pieces and gives silent files an empty transcript; "
                     "here the caller does that.",
                     "Greedy decoding, no language model; the suite's optional lexicon beam search is not part of "
                     "the export.",
                     "Digits and other symbols are spelled out or dropped in training transcripts: it writes words "
                     "in lower case without punctuation."],
        usage=usage)


def write_recognizer_export(module: Any, features: FeatureConfig, out: str | Path, *, checkpoint: str | Path,
                            raw_checkpoint: dict[str, Any] | None = None) -> Path:
    """Write the export of a wav2vec 2.0 SpeechRecognizer into ``out`` (staged and renamed; a non-empty ``out``
    that is not an earlier export is refused). Another network is refused with a ValueError."""
    from transformers.utils import logging as hf_logging

    net = _wav2vec2(module, checkpoint)
    if features.kind != "waveform":
        raise ValueError(f"{checkpoint}: a Wav2Vec2CTC model reads waveforms, but the checkpoint's features are "
                         f"{features.kind!r}")
    if net.model.config.vocab_size != len(TOKENS) or net.model.config.pad_token_id != 0:
        raise ValueError(f"{checkpoint}: the CTC layer has {net.model.config.vocab_size} outputs (pad id "
                         f"{net.model.config.pad_token_id}); the suite's character set has {len(TOKENS)}, blank 0")
    checkpoint = Path(checkpoint)
    marker = {"format": "hf", "task": module.task_name, "checkpoint": str(checkpoint), "remote_code": None}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with staged_export(out, marker) as folder:
            net.model.save_pretrained(folder)
            speech_processor(features, folder).save_pretrained(folder)
            write_model_card(folder, _card(net, features, checkpoint, checkpoint_data(raw_checkpoint)))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return Path(out)


def export_hugging_face(checkpoint: str | Path, out: str | Path) -> Path:
    """Export a speech checkpoint with a wav2vec 2.0 network (loaded safely,
    :func:`~bp_apps.speech.task.load_speech_model`) as a Hugging Face folder ``out``: ``Wav2Vec2ForCTC``, its
    ``Wav2Vec2Processor`` (sampling rate, character vocabulary, blank = pad) and a model card. Other speech
    networks are refused."""
    from bp_apps.speech.task import load_speech_model

    module, preprocessing = load_speech_model(checkpoint)
    _wav2vec2(module, checkpoint)
    features = FeatureConfig(**preprocessing["features"])
    return write_recognizer_export(module, features, out, checkpoint=checkpoint,
                                   raw_checkpoint=load_checkpoint_dict(checkpoint))
