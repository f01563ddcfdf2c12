"""Synthesized speech with espeak-ng (the ``espeakng-loader`` package ships the library and its data, called here
through ``ctypes``): digit strings and short sentences in many voice variants, rates and pitches, optionally
with background noise, cached to disk as WAV files plus a JSONL manifest, every file written atomically.

Nothing is downloaded: this is the speech task's embedded default corpus.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bp_apps.core.io import atomic_write_text
from bp_apps.speech.audio import save_audio
from bp_apps.speech.decoding import DIGIT_WORDS

__all__ = ["ENGLISH_ACCENTS", "SENTENCE_WORDS", "SYNTH_SAMPLE_RATE", "VOICE_VARIANTS", "Espeak", "SynthUtterance",
           "espeak_available", "make_texts", "synthesize_corpus"]

SYNTH_SAMPLE_RATE = 22_050
ENGLISH_ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc")
VOICE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
                  "klatt3", "croak", "whisper", "Alex", "Andy", "Annie", "Denis", "Gene", "Lee", "Mike", "Storm",
                  "adam", "anika", "aunty", "belinda", "boris", "caleb", "david", "ed", "edward", "iven", "john",
                  "linda", "max", "michel", "norbert", "pablo", "quincy", "rob", "robert", "steph", "travis", "zac")
"""espeak-ng voice variants (files of ``espeak-ng-data/voices/!v``) combined with an English accent."""

SENTENCE_WORDS = {
    "subject": ("the cat", "a dog", "my friend", "the old man", "her brother", "the teacher", "a small bird",
                "the doctor", "our neighbour", "the children", "this machine", "the farmer"),
    "verb": ("sees", "likes", "finds", "opens", "moves", "brings", "takes", "holds", "wants", "makes", "paints",
             "reads"),
    "object": ("the red box", "a green apple", "the door", "a long letter", "the blue car", "some bread",
               "the window", "a new book", "the black hat", "a cup of tea", "the heavy stone", "a yellow flower"),
    "place": ("at home", "in the garden", "near the river", "on the table", "after dinner", "every morning",
              "in the city", "by the sea", "under the tree", "at night"),
}
_MAX_TEXT_BYTES = 2000

_LOCK = threading.Lock()
_CALLBACK_TYPE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def espeak_available() -> bool:
    """Whether the ``espeakng-loader`` package (libespeak-ng and its data) is installed."""
    try:
        import espeakng_loader  # noqa: F401
    except ImportError:
        return False
    return True


class Espeak:
    """libespeak-ng in synchronous mode: ``synthesize(text, voice, rate, pitch)`` → int16 samples at 22.05 kHz.

    One library instance per process (espeak-ng is not re-entrant); calls are serialised by a lock."""

    _instance: Espeak | None = None

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as error:
            raise ImportError("synthesized speech needs the espeakng-loader package: pip install espeakng-loader"
                              ) from error
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        synchronous = 2  # AUDIO_OUTPUT_SYNCHRONOUS: audio comes back through the callback
        rate = lib.espeak_Initialize(synchronous, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {rate})")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []

        def collect(wav: ctypes._Pointer, count: int, events: ctypes.c_void_p) -> int:
            if count > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
            return 0

        self._callback = _CALLBACK_TYPE(collect)  # kept referenced: the library calls it later
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib

    @classmethod
    def get(cls) -> Espeak:
        with _LOCK:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def synthesize(self, text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> np.ndarray:
        """Speak ``text`` with ``voice`` (e.g. ``en-us+m3``), ``rate`` in words per minute (80-450) and
        ``pitch`` 0-100; returns int16 samples at :attr:`sample_rate`."""
        data = text.encode("utf-8")
        if not data.strip() or len(data) > _MAX_TEXT_BYTES:
            raise ValueError(f"text to synthesize must be 1-{_MAX_TEXT_BYTES} bytes, got {len(data)}")
        with _LOCK:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r} (use ACCENT+VARIANT, e.g. 'en-us+m3')")
            self.lib.espeak_SetParameter(1, int(np.clip(rate, 80, 450)), 0)  # espeakRATE
            self.lib.espeak_SetParameter(3, int(np.clip(pitch, 0, 100)), 0)  # espeakPITCH
            self._chunks.clear()
            status = self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None)  # POS_CHARACTER, UTF-8
            self.lib.espeak_Synchronize()
            chunks, self._chunks = self._chunks, []
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed with status {status} for {text!r}")
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)


def make_texts(count: int, seed: int, digit_fraction: float = 0.5, max_digits: int = 7) -> list[str]:
    """``count`` transcripts, deterministic by ``seed``: digit strings ("three one four", 1-``max_digits``
    digits) and short template sentences ("the cat finds a green apple in the garden")."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        if rng.random() < digit_fraction:
            n = int(rng.integers(1, max_digits + 1))
            texts.append(" ".join(DIGIT_WORDS[int(d)] for d in rng.integers(0, 10, size=n)))
        else:
            words = [str(rng.choice(SENTENCE_WORDS[k])) for k in ("subject", "verb", "object")]
            if rng.random() < 0.5:
                words.append(str(rng.choice(SENTENCE_WORDS["place"])))
            texts.append(" ".join(words))
    return texts


@dataclass(frozen=True)
class SynthUtterance:
    """One synthesized utterance: its WAV file, transcript and how it was spoken."""

    audio: str
    text: str
    voice: str
    rate: int
    pitch: int
    snr_db: float | None

    def to_json(self) -> dict:
        return {"audio": self.audio, "text": self.text, "voice": self.voice, "rate": self.rate, "pitch": self.pitch,
                "snr_db": self.snr_db}


def add_noise(samples: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Mix coloured (brown-ish plus white) noise into float ``samples`` at ``snr_db``."""
    white = rng.standard_normal(samples.shape[0])
    brown = np.cumsum(rng.standard_normal(samples.shape[0]))
    brown -= np.convolve(brown, np.ones(101) / 101, mode="same")  # high-pass the drift away
    noise = white / (white.std() + 1e-9) + brown / (brown.std() + 1e-9)
    power = float(np.mean(samples**2)) or 1e-12
    noise *= np.sqrt(power / 10 ** (snr_db / 10) / float(np.mean(noise**2)))
    return samples + noise


def synthesize_corpus(texts: Sequence[str], voices: Sequence[str], cache_dir: str | Path, seed: int = 0,
                      rate_range: tuple[int, int] = (130, 210), pitch_range: tuple[int, int] = (30, 70),
                      noise_prob: float = 0.0, snr_range: tuple[float, float] = (10.0, 30.0)) -> list[SynthUtterance]:
    """Speak each text in a voice drawn from ``voices`` (deterministic by ``seed``) at a random rate and pitch,
    with background noise on a ``noise_prob`` share; WAVs and ``manifest.jsonl`` go under ``cache_dir`` (a
    folder named by a digest of all the settings). An existing complete corpus is reused as is."""
    if not texts or not voices:
        raise ValueError("synthesize_corpus needs at least one text and one voice")
    settings = json.dumps([list(texts), list(voices), seed, rate_range, pitch_range, noise_prob, snr_range])
    folder = Path(cache_dir) / f"synth-{hashlib.sha256(settings.encode()).hexdigest()[:20]}"
    manifest = folder / "manifest.jsonl"
    if manifest.is_file():
        items = [SynthUtterance(**json.loads(line)) for line in manifest.read_text().splitlines() if line.strip()]
        if len(items) == len(texts) and all((folder / u.audio).is_file() for u in items):
            return [SynthUtterance(**{**u.to_json(), "audio": str(folder / u.audio)}) for u in items]
    engine = Espeak.get()
    rng = np.random.default_rng(seed)
    items = []
    from tqdm.auto import tqdm

    progress = tqdm(texts, desc=f"synthesizing {folder.name}", unit="utt", disable=None, leave=False)
    for i, text in enumerate(progress):
        voice = str(voices[int(rng.integers(len(voices)))])
        rate = int(rng.integers(rate_range[0], rate_range[1] + 1))
        pitch = int(rng.integers(pitch_range[0], pitch_range[1] + 1))
        snr = float(rng.uniform(*snr_range)) if rng.random() < noise_prob else None
        samples = engine.synthesize(text, voice, rate, pitch).astype(np.float32) / 32768.0
        if samples.size == 0:
            raise RuntimeError(f"espeak-ng produced no audio for {text!r} with voice {voice}")
        if snr is not None:
            samples = add_noise(samples, snr, rng)
        samples *= 0.9 / max(float(np.abs(samples).max()), 1e-6)
        name = f"{i:06d}.wav"
        save_audio(folder / name, samples, engine.sample_rate)
        items.append(SynthUtterance(name, text, voice, rate, pitch, snr))
    # The manifest is written last: its presence means every WAV before it is complete.
    atomic_write_text(manifest, "".join(json.dumps(u.to_json()) + "\n" for u in items))
    return [SynthUtterance(**{**u.to_json(), "audio": str(folder / u.audio)}) for u in items]
