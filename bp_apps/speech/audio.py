"""Audio files in and out: read and write with ``soundfile``, then down-mix, resample and level-normalise with
torchaudio. Every problem with a file (unreadable, empty, silent, too long, non-finite samples) is a
``ValueError`` naming the file; a missing file is a ``FileNotFoundError``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch import Tensor

from bp_apps.core.io import atomic_write_bytes

__all__ = ["DEFAULT_SAMPLE_RATE", "SILENCE_PEAK", "chunk_waveform", "load_audio", "normalise_level", "read_audio",
           "save_audio", "to_mono", "trim_silence"]

DEFAULT_SAMPLE_RATE = 16_000
SILENCE_PEAK = 1e-4
"""A file whose absolute peak stays below this (about -80 dBFS) is treated as silent."""


def read_audio(path: str | Path) -> tuple[Tensor, int]:
    """The file's samples as float32 ``(channels, frames)`` in [-1, 1] and its sample rate, exactly as stored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    try:
        data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"cannot read audio {path}: {error}") from error
    if data.shape[0] == 0:
        raise ValueError(f"audio {path} is empty (0 samples)")
    if not np.isfinite(data).all():
        raise ValueError(f"audio {path} holds non-finite samples (NaN or Inf)")
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sample_rate)


def to_mono(waveform: Tensor) -> Tensor:
    """``(channels, frames)`` or ``(frames,)`` → ``(frames,)``, averaging the channels."""
    return waveform.mean(0) if waveform.ndim == 2 else waveform


def normalise_level(waveform: Tensor, target_dbfs: float = -20.0, max_peak: float = 0.99) -> Tensor:
    """Scale to ``target_dbfs`` RMS with torchaudio's gain, lowered where needed so the peak stays under
    ``max_peak``. Silence (peak < :data:`SILENCE_PEAK`) is returned unchanged rather than amplified noise."""
    peak = float(waveform.abs().max()) if waveform.numel() else 0.0
    if peak < SILENCE_PEAK:
        return waveform
    rms = float(waveform.pow(2).mean().sqrt())
    gain_db = target_dbfs - 20.0 * np.log10(max(rms, 1e-12))
    gain_db = min(gain_db, 20.0 * np.log10(max_peak / peak))
    return AF.gain(waveform, gain_db)


def trim_silence(waveform: Tensor, sample_rate: int, top_db: float, margin_ms: float = 30.0) -> Tensor:
    """``waveform (frames,)`` without its leading and trailing stretches quieter than the loudest 10-ms frame by more
    than ``top_db`` dB, keeping ``margin_ms`` on each side; unchanged when ``top_db`` is 0, when shorter than a frame,
    or when silent. Recordings differ most in how much silence surrounds the speech, and per-utterance feature
    normalisation then shifts with it."""
    if top_db <= 0:
        return waveform
    frame = max(1, round(sample_rate / 100))
    frames = waveform.shape[0] // frame
    if frames < 1:
        return waveform
    energy = waveform[: frames * frame].reshape(frames, frame).pow(2).mean(1)
    loudest = float(energy.max())
    if loudest <= SILENCE_PEAK ** 2:
        return waveform
    active = torch.nonzero(energy >= loudest * 10.0 ** (-top_db / 10.0)).squeeze(1)
    margin = round(sample_rate * margin_ms / 1000)
    start = max(0, int(active[0]) * frame - margin)
    end = min(waveform.shape[0], (int(active[-1]) + 1) * frame + margin)
    return waveform[start:end]


def load_audio(path: str | Path, sample_rate: int = DEFAULT_SAMPLE_RATE, *, normalise: bool = True,
               max_seconds: float | None = None, allow_silent: bool = False) -> Tensor:
    """Read any sample rate and channel count, down-mix to mono, resample to ``sample_rate`` and (by default)
    normalise the level. Returns float32 ``(frames,)``.

    Raises ValueError naming the file when it cannot be decoded, is empty, is longer than ``max_seconds``
    or is silent (unless ``allow_silent``: then it is returned as is)."""
    waveform, source_rate = read_audio(path)
    seconds = waveform.shape[1] / source_rate
    if max_seconds is not None and seconds > max_seconds:
        raise ValueError(f"audio {path} is {seconds:.1f} s long, more than max_seconds={max_seconds:g}; "
                         "split it (chunk_waveform) or raise the limit")
    mono = to_mono(waveform)
    if float(mono.abs().max()) < SILENCE_PEAK and not allow_silent:
        raise ValueError(f"audio {path} is silent (peak below {SILENCE_PEAK:g})")
    if source_rate != sample_rate:
        mono = AF.resample(mono, source_rate, sample_rate)
    if mono.numel() == 0:
        raise ValueError(f"audio {path} is too short to resample to {sample_rate} Hz")
    return normalise_level(mono) if normalise else mono


def save_audio(path: str | Path, waveform: Tensor | np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> Path:
    """Write a WAV file atomically (``atomic_write_bytes``: a temporary name in the same folder, then a rename).

    ``waveform`` is ``(frames,)`` or ``(channels, frames)`` in [-1, 1]."""
    path = Path(path)
    data = waveform.detach().cpu().numpy() if isinstance(waveform, Tensor) else np.asarray(waveform)
    data = data.T if data.ndim == 2 else data
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    sf.write(buffer, data, sample_rate, subtype=subtype, format="WAV")
    return atomic_write_bytes(path, buffer.getvalue())


def chunk_waveform(waveform: Tensor, sample_rate: int, seconds: float, overlap_seconds: float = 0.0,
                   min_tail_seconds: float = 0.0) -> list[Tensor]:
    """Split ``(frames,)`` into pieces of at most ``seconds`` (the last one shorter), so long recordings can be
    transcribed piece by piece. Pieces are stepped by ``seconds - overlap_seconds``. A last piece shorter than
    ``min_tail_seconds`` is joined to the one before (which is then that much longer than ``seconds``): a sliver
    of a few samples holds no word and is too short for a spectrogram."""
    size = int(seconds * sample_rate)
    step = size - int(overlap_seconds * sample_rate)
    if size <= 0 or step <= 0:
        raise ValueError(f"chunk length {seconds} s must be positive and longer than the overlap {overlap_seconds} s")
    if waveform.numel() <= size:
        return [waveform]
    starts = list(range(0, waveform.numel() - (size - step), step))
    if len(starts) > 1 and waveform.numel() - starts[-1] < min_tail_seconds * sample_rate:
        starts.pop()
    return [waveform[start:start + size] for start in starts[:-1]] + [waveform[starts[-1]:]]
