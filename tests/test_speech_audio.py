"""Audio I/O, features and decoding: soundfile round trips, resampling / stereo / level handling, errors that name
the file, log-mel and SpecAugment, the feature cache, CTC greedy and beam decoding, WER / CER."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from bp_apps.speech.audio import chunk_waveform, load_audio, normalise_level, read_audio, save_audio
from bp_apps.speech.decoding import (
    TOKENS,
    BeamSearchDecoder,
    cer,
    encode_text,
    greedy_decode,
    normalise_transcript,
    wer,
    write_lexicon,
)
from bp_apps.speech.features import FeatureCache, FeatureConfig, LogMel, SpecAugment, feature_lengths


def tone(seconds: float, rate: int, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_save_and_read_round_trip_is_exact_to_16_bits(tmp_path: Path) -> None:
    samples = tone(0.25, 8000)
    path = save_audio(tmp_path / "a.wav", samples, 8000)
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]  # no temporary file left behind
    waveform, rate = read_audio(path)
    assert rate == 8000 and waveform.shape == (1, 2000)
    assert np.abs(waveform[0].numpy() - samples).max() <= 1 / 32768 + 1e-6


def test_stereo_44k_is_downmixed_resampled_and_level_normalised(tmp_path: Path) -> None:
    left, right = tone(0.5, 44_100, 300, 0.8), tone(0.5, 44_100, 300, 0.2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], 1), 44_100)
    raw = load_audio(path, 16_000, normalise=False)
    assert raw.shape == (8000,)
    assert abs(float(raw.abs().max()) - 0.5) < 0.02  # the mean of the two channels
    level = load_audio(path, 16_000)
    rms_db = 20 * math.log10(float(level.pow(2).mean().sqrt()))
    assert abs(rms_db - (-20.0)) < 0.1 and float(level.abs().max()) < 1.0


def test_normalise_level_limits_the_peak_and_leaves_silence_alone() -> None:
    spiky = torch.zeros(1000)
    spiky[10] = 0.01
    out = normalise_level(spiky)
    assert float(out.abs().max()) == pytest.approx(0.99, rel=1e-3)  # the peak limit wins over the RMS target
    silence = torch.zeros(100)
    assert torch.equal(normalise_level(silence), silence)


def test_unusual_sample_rates_resample_to_the_right_length(tmp_path: Path) -> None:
    for rate in (8000, 11_025, 22_050, 48_000):
        path = save_audio(tmp_path / f"{rate}.wav", tone(0.3, rate), rate)
        assert load_audio(path, 16_000).shape[0] == pytest.approx(0.3 * 16_000, abs=1)


def test_bad_audio_errors_name_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    with pytest.raises(ValueError, match=r"cannot read audio .*corrupt\.wav"):
        load_audio(corrupt)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16_000)
    with pytest.raises(ValueError, match=r"empty\.wav is empty"):
        load_audio(empty)
    silent = save_audio(tmp_path / "silent.wav", np.zeros(1600, dtype=np.float32), 16_000)
    with pytest.raises(ValueError, match=r"silent\.wav is silent"):
        load_audio(silent)
    assert load_audio(silent, allow_silent=True).abs().max() == 0
    long = save_audio(tmp_path / "long.wav", tone(3.0, 8000), 8000)
    with pytest.raises(ValueError, match=r"long.wav is 3.0 s long, more than max_seconds=2"):
        load_audio(long, max_seconds=2)
    with pytest.raises(FileNotFoundError, match=r"missing\.wav"):
        load_audio(tmp_path / "missing.wav")


def test_chunking_covers_the_waveform() -> None:
    pieces = chunk_waveform(torch.arange(25.0), sample_rate=1, seconds=10)
    assert [len(p) for p in pieces] == [10, 10, 5] and torch.equal(torch.cat(pieces), torch.arange(25.0))


def test_a_short_last_piece_joins_the_one_before() -> None:
    pieces = chunk_waveform(torch.arange(21.0), sample_rate=1, seconds=10, min_tail_seconds=2)
    assert [len(p) for p in pieces] == [10, 11] and torch.equal(torch.cat(pieces), torch.arange(21.0))
    assert [len(p) for p in chunk_waveform(torch.arange(22.0), 1, 10, min_tail_seconds=2)] == [10, 10, 2]
    assert [len(p) for p in chunk_waveform(torch.arange(10.5), 1, 10, min_tail_seconds=2)] == [11]


def test_log_mel_shape_and_per_utterance_normalisation() -> None:
    config = FeatureConfig(sample_rate=16_000, n_mels=40)
    features = LogMel(config)(torch.from_numpy(tone(1.0, 16_000)) + 0.01 * torch.randn(16_000))
    assert features.shape == (feature_lengths(16_000, config), 40) == (101, 40)
    assert features.mean(0).abs().max() < 1e-4 and (features.std(0) - 1).abs().max() < 1e-2
    louder = LogMel(config)(3 * (torch.from_numpy(tone(1.0, 16_000)) + 0.01 * torch.randn(16_000)))
    assert louder.shape == features.shape  # level does not change the shape; normalisation removes the gain


def test_spec_augment_masks_only_in_training_and_inside_the_length() -> None:
    torch.manual_seed(0)
    augment = SpecAugment(freq_masks=2, freq_width=5, time_masks=2, time_width=10)
    batch = torch.ones(2, 50, 20)
    lengths = torch.tensor([50, 30])
    out = augment(batch, lengths)
    assert (out == 0).any() and torch.equal(out[1, 30:], batch[1, 30:])
    augment.eval()
    assert torch.equal(augment(batch, lengths), batch)


def test_feature_cache_is_atomic_and_reused(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    calls = []

    def build() -> list[torch.Tensor]:
        calls.append(1)
        return [torch.ones(3, 2)]

    key = FeatureCache.key(["a.wav"], FeatureConfig())
    assert torch.equal(cache.get_or_build("x", key, build)[0], torch.ones(3, 2))
    assert torch.equal(cache.get_or_build("x", key, build)[0], torch.ones(3, 2)) and len(calls) == 1

    def interrupted() -> list[torch.Tensor]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        FeatureCache(tmp_path).get_or_build("y", key, interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"x-{key}.pt"]  # nothing half-written
    (tmp_path / f"x-{key}.pt").write_bytes(b"garbage")  # a corrupt cache is rebuilt
    assert torch.equal(cache.get_or_build("x", key, build)[0], torch.ones(3, 2)) and len(calls) == 2


def test_transcript_normalisation_policy() -> None:
    assert normalise_transcript("Hello, World! It's 42°C — café-au-lait") == "hello world it's four two c cafe au lait"
    with pytest.raises(ValueError, match=r"x.jsonl:3: character '°'"):
        normalise_transcript("42°C", strict=True, source="x.jsonl:3")
    assert normalise_transcript("Hi, there.", strict=True) == "hi there"  # ordinary punctuation is fine
    with pytest.raises(ValueError, match="not in the vocabulary"):
        encode_text("Hi")
    assert encode_text("a b").tolist() == [TOKENS.index("a"), 1, TOKENS.index("b")]


def one_hot_path(path: list[int]) -> torch.Tensor:
    """Log-probabilities that put (almost) all mass on the given token per frame."""
    scores = torch.full((len(path), len(TOKENS)), -10.0)
    scores[torch.arange(len(path)), torch.tensor(path)] = 0.0
    return scores.log_softmax(-1).unsqueeze(0)


def idx(text: str) -> list[int]:
    return [TOKENS.index("|" if c == " " else c) for c in text]


def test_greedy_decoding_hand_checked_cases() -> None:
    blank = 0
    # "hello": the double l needs a blank between the two l's; repeats collapse
    path = [blank, *idx("hh"), *idx("e"), blank, *idx("ll"), blank, *idx("l"), *idx("oo"), blank]
    assert greedy_decode(one_hot_path(path)) == ["hello"]
    assert greedy_decode(one_hot_path([blank, *idx("a"), 1, 1, *idx("b"), 1])) == ["a b"]
    assert greedy_decode(one_hot_path([blank, blank])) == [""]
    # lengths cut the padded tail off
    assert greedy_decode(one_hot_path(idx("ab")), torch.tensor([1])) == ["a"]


def test_beam_search_with_lexicon_picks_a_word_of_the_lexicon(tmp_path: Path) -> None:
    # Frames spell "tw" then are torn between 'o' (0.55) and 'a' (0.45): lexicon-free the beam says "two",
    # and with a lexicon holding only "twa" it must say "twa".
    frames = [idx("t")[0], idx("w")[0], None, 0]
    scores = torch.full((len(frames), len(TOKENS)), 1e-4)
    for i, token in enumerate(frames):
        if token is None:
            scores[i, TOKENS.index("o")], scores[i, TOKENS.index("a")] = 0.55, 0.45
        else:
            scores[i, token] = 1.0
    emissions = (scores / scores.sum(-1, keepdim=True)).log().unsqueeze(0)
    assert BeamSearchDecoder(beam_size=8)(emissions) == ["two"] == greedy_decode(emissions)
    lexicon = write_lexicon(["twa", "one"], tmp_path / "lexicon.txt")
    assert lexicon.read_text().splitlines() == ["one o n e |", "twa t w a |"]
    assert BeamSearchDecoder(beam_size=8, lexicon=lexicon)(emissions) == ["twa"]


def test_wer_and_cer() -> None:
    assert wer(["one two three"], ["one two four"]) == pytest.approx(1 / 3)
    assert wer(["one two"], ["one two"]) == 0.0
    assert cer(["abcd"], ["abce"]) == pytest.approx(0.25)


def test_time_stretch_resamples_each_utterance_inside_its_length() -> None:
    from bp_apps.speech.features import TimeStretch

    torch.manual_seed(0)
    stretch = TimeStretch(0.2)
    ramp = torch.linspace(0, 1, 50)[:, None].expand(50, 4)
    batch = torch.zeros(3, 50, 4)
    batch[0], batch[1, :30], batch[2, :10] = ramp, ramp[::5][:10].repeat_interleave(3, 0)[:30], ramp[:10]
    lengths = torch.tensor([50, 30, 10])
    out, new = stretch(batch, lengths)
    assert ((new >= (lengths * 0.8).floor()) & (new <= (lengths * 1.2).ceil())).all() and not torch.equal(new, lengths)
    assert out.shape == (3, int(new.max()), 4)
    for i, n in enumerate(new.tolist()):
        assert torch.allclose(out[i, 0], batch[i, 0]) and torch.allclose(out[i, n - 1], batch[i, lengths[i] - 1])
        assert (out[i, n:] == 0).all()  # zero padding past the new length, as the collate functions pad
    assert (out[0, 1:int(new[0])] - out[0, :int(new[0]) - 1] >= -1e-6).all()  # a ramp stays a ramp
    stretch.eval()
    same, same_lengths = stretch(batch, lengths)
    assert same is batch and same_lengths is lengths
    with pytest.raises(ValueError, match="time-stretch amount"):
        TimeStretch(1.0)
