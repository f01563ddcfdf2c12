"""The copy mechanism (pointer-generator BART): its mixed distribution, cached generation against teacher forcing,
save_pretrained / Auto round trips, and the Summarizer trained with it (checkpoint and ``hf_best``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from test_summarization_task import CopyData, config_callbacks, copy_pairs, small_trainer, summarizer
from transformers import AutoModelForSeq2SeqLM

from bp_apps.text.summarization.copy import BartCopyConfig, BartCopyForConditionalGeneration
from bp_apps.text.summarization.models import BartCopyNet, BartNet, build_seq2seq
from bp_apps.text.summarization.task import load_summarizer, summarize

VOCAB = 40


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_copy_model(seed: int = 0) -> BartCopyForConditionalGeneration:
    torch.manual_seed(seed)
    return build_seq2seq("bart", VOCAB, pad_id=0, eos_id=2, bos_id=1, d_model=16, layers=1, heads=2, ff=32,
                         dropout=0.0, max_positions=32, copy=True).eval()


def source_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 6), generator=generator)
    mask = torch.ones_like(ids)
    ids[2, 4:], mask[2, 4:] = 0, 0  # a padded source
    return ids, mask


def test_build_gives_the_registered_copy_model_and_refuses_t5() -> None:
    model = tiny_copy_model()
    assert isinstance(model, BartCopyForConditionalGeneration) and isinstance(model.config, BartCopyConfig)
    with pytest.raises(ValueError, match="copy mechanism is built on BART"):
        build_seq2seq("t5", VOCAB, 0, 2, 1, d_model=16, layers=1, heads=2, ff=32, copy=True)
    net = BartCopyNet(VOCAB, 0, 1, 2, 32, d_model=16, layers=1, heads=2, ff=32)
    assert isinstance(net.model, BartCopyForConditionalGeneration) and net.model.config.max_position_embeddings == 32
    assert type(BartNet(VOCAB, 0, 1, 2, 32, d_model=16, layers=1, heads=2, ff=32).model).__name__ == (
        "BartForConditionalGeneration")


def test_mixed_distribution_is_normalised_and_a_closed_gate_copies_only_source_tokens() -> None:
    model = tiny_copy_model()
    ids, mask = source_batch()
    labels = torch.randint(3, VOCAB, (3, 4))
    probs = model(input_ids=ids, attention_mask=mask, labels=labels).logits.exp()
    assert torch.allclose(probs.sum(-1), torch.ones(3, 4), atol=1e-5)
    with torch.no_grad():
        model.copy_gate.bias.fill_(-40.0)  # p_gen ~ 0: everything comes from the copy attention
    probs = model(input_ids=ids, attention_mask=mask, labels=labels).logits.exp()
    for row in range(3):
        allowed = set(ids[row][mask[row].bool()].tolist())
        outside = [t for t in range(VOCAB) if t not in allowed]
        assert probs[row][:, outside].max() < 1e-6  # padding (id 0) of row 2 is not copyable either
        assert torch.allclose(probs[row][:, sorted(allowed)].sum(-1), torch.ones(4), atol=1e-5)
    with torch.no_grad():
        model.copy_gate.bias.fill_(40.0)  # p_gen ~ 1: the plain vocabulary softmax
    hidden = model.model(input_ids=ids, attention_mask=mask, labels=None,
                         decoder_input_ids=torch.ones(3, 1, dtype=torch.long)).last_hidden_state
    plain = (model.lm_head(hidden) + model.final_logits_bias).log_softmax(-1)
    mixed = model(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.ones(3, 1, dtype=torch.long)).logits
    assert torch.allclose(mixed, plain, atol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_generation_scores_match_teacher_forcing(num_beams: int) -> None:
    """The copy source ids reach every cached decoding step (expanded with the beams): the scores generate reports
    equal the teacher-forced log-probabilities of the sequences it returns."""
    model = tiny_copy_model(seed=3)
    ids, mask = source_batch()
    # EOS is held back (min_new_tokens) and never forced, so all 5 steps are the model's own log-probabilities
    out = model.generate(input_ids=ids, attention_mask=mask, num_beams=num_beams, max_new_tokens=5, min_new_tokens=5,
                         forced_eos_token_id=None, length_penalty=1.0, do_sample=False, output_logits=True,
                         output_scores=True, return_dict_in_generate=True)
    sequences = out.sequences  # [3, 1 + 5]: the start token, then 5 generated tokens
    log_probs = model(input_ids=ids, attention_mask=mask, decoder_input_ids=sequences[:, :-1]).logits
    chosen = log_probs.gather(-1, sequences[:, 1:].unsqueeze(-1)).squeeze(-1)  # [3, 5]
    if num_beams == 1:
        stepwise = torch.stack(out.logits, dim=1)  # [3, 5, V]: the raw outputs of each cached step
        assert torch.allclose(stepwise, log_probs, atol=1e-4)
    else:
        assert torch.allclose(out.sequences_scores, chosen.sum(-1) / 5, atol=1e-4)
    assert chosen.isfinite().all()


def test_save_pretrained_round_trip_through_the_auto_api(tmp_path: Path) -> None:
    model = tiny_copy_model(seed=5)
    ids, mask = source_batch()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is BartCopyForConditionalGeneration
    decoder = torch.ones(3, 2, dtype=torch.long)
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits,
                       model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits)


def test_summarizer_with_copy_learns_and_round_trips(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    data = CopyData()
    model = summarizer(data, BartCopyNet, num_beams=2, max_new_tokens=6)
    trainer = small_trainer(tmp_path, 8, callbacks=config_callbacks())
    trainer.fit(model, datamodule=data)
    assert float(trainer.callback_metrics["val_rouge1"]) > 0.8
    texts = [source for _, source, _ in copy_pairs(8, 5)]
    best = Path(trainer.checkpoint_callback.best_model_path)
    loaded = load_summarizer(best)
    assert isinstance(loaded.model, BartCopyForConditionalGeneration)
    assert loaded.hparams.net["class_path"] == "bp_apps.text.summarization.models.BartCopyNet"
    expected = summarize(loaded, texts, num_beams=1, max_new_tokens=6)
    assert sum(e == " ".join(t.split()[:3]) for e, t in zip(expected, texts)) >= 6
    hf = AutoModelForSeq2SeqLM.from_pretrained(best.parent / "hf_best").eval()
    assert type(hf) is BartCopyForConditionalGeneration
    weights = loaded.model.state_dict()
    assert all(torch.equal(value, weights[key]) for key, value in hf.state_dict().items())


def test_missing_source_ids_is_an_error() -> None:
    model = tiny_copy_model()
    ids, mask = source_batch()
    encoder_outputs = model.get_encoder()(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="needs the source ids"):
        model(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=torch.ones(3, 1).long())
