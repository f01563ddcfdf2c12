"""Frequency warping (VTLP in the mel domain): where each band reads from, identity when off or in eval mode,
padding and waveforms untouched, a clear error for an out-of-range amount."""

from __future__ import annotations

import pytest
import torch

from bp_apps.speech.features import FrequencyWarp


def test_each_band_reads_band_over_alpha() -> None:
    torch.manual_seed(0)
    warp = FrequencyWarp(0.2).train()
    bands = torch.arange(40.0).expand(4, 7, 40).clone()
    out = warp(bands)
    alpha = 1.0 / out[:, 0, 1]  # band 1 reads band 1/α, and band values are their own index
    assert ((alpha >= 0.8 - 1e-6) & (alpha <= 1.2 + 1e-6)).all() and alpha.std() > 0  # one factor per utterance
    expected = (torch.arange(40.0)[None, :] / alpha[:, None]).clamp(max=39.0)
    torch.testing.assert_close(out[:, 3, :], expected)
    assert torch.equal(out[:, 0, :], out[:, 6, :])  # the same warp on every frame of an utterance


def test_warp_is_linear_interpolation_between_bands() -> None:
    warp = FrequencyWarp(0.1).train()
    x = torch.randn(2, 5, 16)
    torch.manual_seed(1)
    out = warp(x)
    torch.manual_seed(1)
    alpha = 1.0 + (torch.rand(2) * 2.0 - 1.0) * 0.1
    source = (torch.arange(16.0)[None, :] / alpha[:, None]).clamp(max=15)
    low = source.floor().long().clamp(max=14)
    frac = source - low
    for b in range(2):
        ref = x[b][:, low[b]] * (1 - frac[b]) + x[b][:, low[b] + 1] * frac[b]
        torch.testing.assert_close(out[b], ref)


def test_identity_when_off_in_eval_and_on_waveforms() -> None:
    x = torch.randn(3, 10, 40)
    assert torch.equal(FrequencyWarp(0.0).train()(x), x)
    assert torch.equal(FrequencyWarp(0.1).eval()(x), x)
    wave = torch.randn(3, 100, 1)
    assert torch.equal(FrequencyWarp(0.1).train()(wave), wave)
    padded = torch.zeros(2, 6, 40)
    assert torch.equal(FrequencyWarp(0.1).train()(padded), padded)  # zero padding stays zero


@pytest.mark.parametrize("amount", [-0.1, 0.5, 1.0])
def test_bad_amount_is_named(amount: float) -> None:
    with pytest.raises(ValueError, match="frequency-warp amount must be in"):
        FrequencyWarp(amount)


def test_digit_recognizers_decode_with_the_lexicon_beam_by_default() -> None:
    from bp_apps.speech.decoding import DIGIT_WORDS
    from bp_apps.speech.models import ConvGRUCTC
    from bp_apps.speech.task import DIGIT_BEAM, SpeechRecognizer, SpokenDigitClassifier, default_decoder

    recognizer = SpeechRecognizer(net=ConvGRUCTC, input_dim=16)
    digits = {"words": list(DIGIT_WORDS)}
    decoder = default_decoder(recognizer, digits)
    assert decoder is not None and decoder.lexicon and decoder.beam_size == DIGIT_BEAM
    assert default_decoder(recognizer, digits, beam_size=0) is None  # asked for greedy
    assert default_decoder(recognizer, digits, beam_size=1) is None
    assert default_decoder(recognizer, {"words": ["the", "cat", *DIGIT_WORDS]}) is None  # not a digit model: greedy
    assert default_decoder(recognizer, {}) is None
    explicit = default_decoder(recognizer, {"words": ["the", "cat"]}, beam_size=3)
    assert explicit is not None and explicit.lexicon and explicit.beam_size == 3
    assert default_decoder(SpokenDigitClassifier(input_dim=16), digits) is None  # a classifier has no decoding
    features = torch.randn(2, 40, 16)
    log_probs, lengths = recognizer.eval()(features, torch.tensor([40, 30]))
    assert all(set(text.split()) <= set(DIGIT_WORDS) for text in decoder(log_probs, lengths))  # lexicon words only


def test_trim_silence_cuts_only_the_quiet_ends() -> None:
    from bp_apps.speech.audio import trim_silence

    rate = 8000
    tone = torch.sin(torch.arange(rate // 2) * 0.3)  # 0.5 s of signal
    quiet = 1e-3 * torch.ones(rate // 4)  # -50 dB against the tone: silence
    wave = torch.cat([quiet, tone, quiet])
    trimmed = trim_silence(wave, rate, top_db=30.0, margin_ms=0.0)
    assert abs(trimmed.shape[0] - tone.shape[0]) <= rate // 100  # within one 10-ms frame
    with_margin = trim_silence(wave, rate, top_db=30.0, margin_ms=30.0)
    assert with_margin.shape[0] - trimmed.shape[0] == 2 * round(rate * 0.03)
    assert torch.equal(trim_silence(wave, rate, top_db=0.0), wave)  # off
    assert torch.equal(trim_silence(torch.zeros(rate), rate, top_db=30.0), torch.zeros(rate))  # silent: kept
    assert trim_silence(wave, rate, top_db=80.0).shape[0] == wave.shape[0]  # the quiet ends are within 80 dB


def test_trim_db_is_a_feature_setting_used_by_the_extractor() -> None:
    from bp_apps.speech.features import FeatureConfig, make_extractor

    assert "trim_db" not in FeatureConfig().to_dict()  # old caches and checkpoints keep their keys
    config = FeatureConfig(sample_rate=8000, n_mels=20, trim_db=30.0)
    assert FeatureConfig(**config.to_dict()) == config
    wave = torch.cat([1e-3 * torch.ones(4000), torch.sin(torch.arange(4000) * 0.3), 1e-3 * torch.ones(4000)])
    frames_kept = make_extractor(config)(wave).shape[0]
    frames_all = make_extractor(FeatureConfig(sample_rate=8000, n_mels=20))(wave).shape[0]
    assert frames_kept < 0.5 * frames_all
    with pytest.raises(ValueError, match=r"features\.trim_db"):
        FeatureConfig(trim_db=-1.0)
