"""Acoustic features: log-mel spectrograms with per-utterance normalisation, SpecAugment for training, and an
on-disk feature cache that is written atomically (an interrupted run leaves the old file or none, never half)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torchaudio.transforms as T
from torch import Tensor, nn

from bp_apps.core.io import atomic_write_bytes
from bp_apps.speech.audio import trim_silence

__all__ = ["FeatureCache", "FeatureConfig", "FrequencyWarp", "LogMel", "SpecAugment", "SpecAugmentConfig",
           "TimeStretch", "feature_lengths", "make_extractor"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureConfig:
    """What turns a waveform into a model input, passed whole to the data modules (``features:`` in a config) and
    saved as their checkpoint state: ``logmel`` (frames × ``n_mels``, ``win_ms`` windows every ``hop_ms``) or the
    raw ``waveform`` (for wav2vec 2.0), at ``sample_rate``. ``trim_db`` > 0 cuts the leading and trailing audio
    quieter than the loudest 10-ms frame by more than that many dB (:func:`~bp_apps.speech.audio.trim_silence`), from
    each recording of an utterance and from every waveform transcribed; 0 (the default) keeps all."""

    kind: Literal["logmel", "waveform"] = "logmel"
    sample_rate: int = 16_000
    n_mels: int = 64
    hop_ms: float = 10.0
    win_ms: float = 25.0
    trim_db: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("logmel", "waveform"):
            raise ValueError(f"features.kind must be 'logmel' or 'waveform', got {self.kind!r}")
        for name in ("sample_rate", "n_mels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"features.{name} must be a positive integer, got {value!r}")
        if not self.hop_ms > 0:
            raise ValueError(f"features.hop_ms must be positive, got {self.hop_ms}")
        if not self.win_ms >= self.hop_ms:
            raise ValueError(f"features.win_ms must be at least hop_ms ({self.hop_ms}), got {self.win_ms}")
        if isinstance(self.trim_db, bool) or not isinstance(self.trim_db, (int, float)) or not self.trim_db >= 0:
            raise ValueError(f"features.trim_db must be a number >= 0 (0: no trimming), got {self.trim_db!r}")

    @property
    def dim(self) -> int:
        """Feature size per frame (1 for waveforms)."""
        return self.n_mels if self.kind == "logmel" else 1

    def to_dict(self) -> dict:
        """The settings as plain data; ``trim_db`` only when on, so caches and checkpoints made before it existed
        keep their keys."""
        data = asdict(self)
        if not self.trim_db:
            del data["trim_db"]
        return data


@dataclass(frozen=True)
class SpecAugmentConfig:
    """SpecAugment's settings, checked together: ``freq_masks`` masks of up to ``freq_width`` feature bands and
    ``time_masks`` masks of up to ``time_width`` frames (at most ``max_time_fraction`` of the utterance) per
    training utterance. A task's ``augment: null`` turns it off."""

    freq_masks: int = 2
    freq_width: int = 10
    time_masks: int = 2
    time_width: int = 20
    max_time_fraction: float = 0.15

    def __post_init__(self) -> None:
        for name in ("freq_masks", "freq_width", "time_masks", "time_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"augment.{name} must be an integer >= 0, got {value!r}")
        if not 0.0 <= self.max_time_fraction <= 1.0:
            raise ValueError(f"augment.max_time_fraction must be in [0, 1], got {self.max_time_fraction}")

    def build(self) -> SpecAugment:
        """The :class:`SpecAugment` module of these settings."""
        return SpecAugment(self.freq_masks, self.freq_width, self.time_masks, self.time_width, self.max_time_fraction)


class LogMel(nn.Module):
    """Waveform ``(frames,)`` → normalised log-mel ``(time, n_mels)``: each mel band of the utterance is shifted
    to zero mean and scaled to unit variance, so level and channel differences between recordings vanish."""

    def __init__(self, config: FeatureConfig) -> None:
        super().__init__()
        self.config = config
        win = round(config.sample_rate * config.win_ms / 1000)
        self.hop = round(config.sample_rate * config.hop_ms / 1000)
        n_fft = 1 << (win - 1).bit_length()
        self.mel = T.MelSpectrogram(sample_rate=config.sample_rate, n_fft=n_fft, win_length=win, hop_length=self.hop,
                                    n_mels=config.n_mels, f_min=20.0, f_max=config.sample_rate / 2, power=2.0)

    @torch.no_grad()
    def forward(self, waveform: Tensor) -> Tensor:
        waveform = trim_silence(waveform, self.config.sample_rate, self.config.trim_db)
        features = (self.mel(waveform.float()) + 1e-6).log().transpose(-1, -2)
        mean = features.mean(-2, keepdim=True)
        std = features.std(-2, keepdim=True) if features.shape[-2] > 1 else torch.ones_like(mean)
        return (features - mean) / (std + 1e-5)


def feature_lengths(num_samples: int, config: FeatureConfig) -> int:
    """Frames :class:`LogMel` gives for ``num_samples`` samples (centred STFT: one frame per hop, plus one)."""
    if config.kind == "waveform":
        return num_samples
    return num_samples // round(config.sample_rate * config.hop_ms / 1000) + 1


def make_extractor(config: FeatureConfig) -> Callable[[Tensor], Tensor]:
    """Waveform ``(frames,)`` → model input: ``(time, n_mels)`` log-mel, or ``(frames, 1)`` waveform."""
    if config.kind == "logmel":
        return LogMel(config)
    return lambda waveform: trim_silence(waveform, config.sample_rate, config.trim_db).float().unsqueeze(-1)


class SpecAugment(nn.Module):
    """SpecAugment (frequency and time masks, torchaudio's) on a padded batch ``(B, time, features)`` in training
    mode; identity in eval mode. Masks are drawn per utterance and only inside its true length."""

    def __init__(self, freq_masks: int = 2, freq_width: int = 10, time_masks: int = 2, time_width: int = 20,
                 max_time_fraction: float = 0.15) -> None:
        super().__init__()
        self.freq_masks, self.time_masks = freq_masks, time_masks
        self.max_time_fraction = max_time_fraction
        self.freq = T.FrequencyMasking(freq_width) if freq_masks and freq_width else None
        self.time_width = time_width

    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        if not self.training or features.shape[-1] == 1:  # nothing to do at eval time, or on waveforms
            return features
        out = features.clone()
        for i, length in enumerate(lengths.tolist()):
            spec = out[i, :length].transpose(0, 1)  # (features, time) view for torchaudio's masks
            if self.freq is not None:
                for _ in range(self.freq_masks):
                    spec.copy_(self.freq(spec))
            width = min(self.time_width, int(self.max_time_fraction * length))
            if width > 0:
                masking = T.TimeMasking(width)
                for _ in range(self.time_masks):
                    spec.copy_(masking(spec))
        return out


class TimeStretch(nn.Module):
    """Speed perturbation on a padded feature batch ``(B, time, features)``: in training mode each utterance's
    true frames are resampled along time (linear interpolation) by its own factor, drawn uniformly from
    ``[1 - amount, 1 + amount]``, so a word is heard faster or slower while its spectrum stays where it is.
    Returns the new batch (zero-padded, as the collate functions pad) and the new lengths; identity in eval mode.
    """

    def __init__(self, amount: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= amount < 1.0:
            raise ValueError(f"time-stretch amount must be in [0, 1), got {amount}")
        self.amount = amount

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        if not self.training or self.amount == 0.0 or features.shape[-1] == 1:
            return features, lengths
        factors = 1.0 + (torch.rand(len(lengths)) * 2.0 - 1.0) * self.amount
        new_lengths = (lengths.cpu().double() * factors.double()).round().long().clamp(min=1)
        out = features.new_zeros(features.shape[0], int(new_lengths.max()), features.shape[2])
        for i, (old, new) in enumerate(zip(lengths.tolist(), new_lengths.tolist())):
            frames = features[i, :old].transpose(0, 1).unsqueeze(0)  # (1, features, time)
            out[i, :new] = nn.functional.interpolate(frames, size=new, mode="linear",
                                                     align_corners=True)[0].transpose(0, 1)
        return out, new_lengths.to(lengths.device)


class FrequencyWarp(nn.Module):
    """Vocal-tract-length perturbation in the mel domain, on a padded batch ``(B, time, mel bands)``: in training
    mode each utterance's spectrum is stretched along frequency by its own factor α, drawn uniformly from
    ``[1 - amount, 1 + amount]``, so band f of the result reads band f/α of the input (linear interpolation; a
    band read past the top keeps the top band's value). α > 1 moves formants up, as a shorter vocal tract does.
    The mel axis is close to logarithmic in frequency above 1 kHz, where a vocal-tract factor is nearly a shift;
    a stretch of the band index is the usual cheap stand-in (Jaitly & Hinton 2013 warp the filterbank itself).
    Identity in eval mode and on waveforms."""

    def __init__(self, amount: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= amount < 0.5:
            raise ValueError(f"frequency-warp amount must be in [0, 0.5), got {amount}")
        self.amount = amount

    def forward(self, features: Tensor) -> Tensor:
        if not self.training or self.amount == 0.0 or features.shape[-1] == 1:
            return features
        batch, bands = features.shape[0], features.shape[-1]
        alpha = 1.0 + (torch.rand(batch, device=features.device) * 2.0 - 1.0) * self.amount
        source = (torch.arange(bands, device=features.device, dtype=features.dtype)[None, :]
                  / alpha[:, None].to(features.dtype)).clamp(max=bands - 1)  # (B, bands): where each band reads
        low = source.floor().long().clamp(max=bands - 2) if bands > 1 else source.floor().long()
        high = (low + 1).clamp(max=bands - 1)
        weight = (source - low.to(features.dtype))[:, None, :]
        index_low = low[:, None, :].expand(-1, features.shape[1], -1)
        index_high = high[:, None, :].expand(-1, features.shape[1], -1)
        return torch.lerp(features.gather(-1, index_low), features.gather(-1, index_high), weight)


class FeatureCache:
    """Model inputs of a whole data split kept in one ``.pt`` file under ``root``, keyed by a digest of the
    utterance sources and the feature settings. Written to a temporary name and moved into place, so an
    interrupted run leaves no half-written cache; a corrupt file is ignored with a warning and rebuilt."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None

    @staticmethod
    def key(sources: Sequence[str], config: FeatureConfig, extra: str = "") -> str:
        digest = hashlib.sha256(json.dumps([list(sources), config.to_dict(), extra]).encode())
        return digest.hexdigest()[:24]

    def get_or_build(self, name: str, key: str, build: Callable[[], list[Tensor]]) -> list[Tensor]:
        if self.root is None:
            return build()
        path = self.root / f"{name}-{key}.pt"
        if path.is_file():
            try:
                items = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(items, list) and all(isinstance(t, Tensor) for t in items):
                    return items
                raise ValueError("not a list of tensors")
            except Exception as error:  # corrupt or foreign: rebuild rather than fail
                log.warning("ignoring unusable feature cache %s (%s); rebuilding it", path, error)
        items = build()
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(items, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        return items
