"""The speech tasks end to end on tiny settings: every config parses, `bp-apps fit` of a CTC model writes
metrics.json and a checkpoint that loads with weights_only and transcribes (stereo 44.1 kHz too), each CTC model
fits a few steps, and the digit classifier learns FSDD digits well above chance through scripts/train_speech.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from bp_apps.cli import main
from bp_apps.core.callbacks import task_callbacks
from bp_apps.speech.audio import save_audio
from bp_apps.speech.data import ManifestDataModule
from bp_apps.speech.task import SpeechRecognizer, load_speech_model, transcribe

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "speech"
FSDD = ROOT.parent / "shared" / "data" / "fsdd"
WORDS = {"ab": 300.0, "ba": 700.0, "abba": 500.0}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BP_APPS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.mark.parametrize("config", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_speech_config_parses(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / f"{config}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "bp_apps.speech." in printed and "class_path" in printed


def test_speech_configs_are_the_four_of_the_issue() -> None:
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == ["fsdd_connected_ctc", "fsdd_digits", "manifest_ctc",
                                                             "synth_ctc"]


def make_corpus(folder: Path, count: int = 12) -> Path:
    """A manifest of chirp-like tone sequences at 16 kHz whose 'transcripts' are a few fake words."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        text = str(rng.choice(list(WORDS)))
        t = np.arange(int(0.25 * 16_000 * len(text) / 2)) / 16_000
        samples = 0.4 * np.sin(2 * np.pi * WORDS[text] * t) + 0.01 * rng.standard_normal(t.size)
        save_audio(folder / f"{i}.wav", samples, 16_000)
        lines.append(json.dumps({"audio": f"{i}.wav", "text": text}))
    (folder / "train.jsonl").write_text("\n".join(lines[:-3]) + "\n")
    (folder / "test.jsonl").write_text("\n".join(lines[-3:]) + "\n")
    return folder


@pytest.fixture(scope="module")
def ctc_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    corpus = make_corpus(tmp_path_factory.mktemp("corpus"))
    root = tmp_path_factory.mktemp("ctc_run")
    argv = ["fit", "--config", str(CONFIGS / "manifest_ctc.yaml"), f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false", "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1",
            f"--data.train_manifest={corpus / 'train.jsonl'}", f"--data.test_manifest={corpus / 'test.jsonl'}",
            "--data.val_fraction=0.25", "--data.batch_size=4", "--data.n_mels=32",
            "--model.hidden=16", "--model.layers=1", "--model.conv_channels=4", "--model.beam_size=4",
            f"--data.cache_dir={root / 'cache'}"]
    assert main(argv) == 0
    (metrics,) = root.rglob("metrics.json")
    return {"metrics": json.loads(metrics.read_text()), "root": root, "corpus": corpus}


def test_ctc_fit_writes_metrics_and_an_atomic_cache(ctc_run: dict) -> None:
    metrics = ctc_run["metrics"]
    assert {"test_wer", "test_cer", "test_beam_wer", "test_beam_cer", "test_loss"} <= set(metrics["test"])
    assert {"val_wer", "val_cer", "val_loss"} <= set(metrics["validation"])
    assert metrics["features"]["n_mels"] == 32 and metrics["epochs_completed"] == 2
    assert len(metrics["test_examples"]) == 3 and {"reference", "prediction"} == set(metrics["test_examples"][0])
    assert (Path(metrics["best_checkpoint"]).parent.parent / "lexicon.txt").read_text().split("\n")[0] == "ab a b |"
    cache = list((ctc_run["root"] / "cache").iterdir())
    assert cache and all(p.suffix == ".pt" and not p.name.startswith(".") for p in cache)


def test_checkpoint_round_trip_with_weights_only(ctc_run: dict, tmp_path: Path) -> None:
    path = ctc_run["metrics"]["best_checkpoint"]
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["bp_apps_task"] == "speech.SpeechRecognizer"
    assert checkpoint["hyper_parameters"]["input_dim"] == 32  # linked from the data's n_mels
    assert "lexicon_words" not in checkpoint["hyper_parameters"]  # the data's state carries them
    assert checkpoint["ManifestDataModule"]["features"]["n_mels"] == 32
    assert sorted(checkpoint["ManifestDataModule"]["words"]) == sorted(WORDS)
    model, preprocessing = load_speech_model(path)
    assert isinstance(model, SpeechRecognizer) and not model.training and preprocessing["features"]["n_mels"] == 32
    for name, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][name])

    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(Path(path).read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"broken\.ckpt: not a loadable checkpoint"):
        load_speech_model(broken)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"bp_apps_task": "vision.ImageClassifier", "state_dict": {}}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.ckpt: not a speech checkpoint .*vision\.ImageClassifier"):
        load_speech_model(foreign)


def test_a_checkpoint_with_settings_since_dropped_still_loads(ctc_run: dict, tmp_path: Path) -> None:
    """Checkpoints written while the model chose its own callbacks hold ``monitor`` and ``early_stopping_patience``."""
    checkpoint = torch.load(ctc_run["metrics"]["best_checkpoint"], map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"].update(monitor="val_wer", early_stopping_patience=3)
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)
    model, _ = load_speech_model(older)
    assert "monitor" not in model.hparams and isinstance(model, SpeechRecognizer)


def test_checkpoints_with_the_preprocessing_of_earlier_versions_still_load(ctc_run: dict, tmp_path: Path) -> None:
    """Before the data module's state carried them, the model stored the feature settings and words under
    ``bp_apps_preprocessing``; without either, the error names the file."""
    checkpoint = torch.load(ctc_run["metrics"]["best_checkpoint"], map_location="cpu", weights_only=True)
    state = checkpoint.pop("ManifestDataModule")
    older = tmp_path / "older.ckpt"
    torch.save({**checkpoint, "bp_apps_preprocessing": state}, older)
    assert load_speech_model(older)[1] == state
    bare = tmp_path / "bare.ckpt"
    torch.save(checkpoint, bare)
    with pytest.raises(ValueError, match=r"bare\.ckpt carries no feature settings"):
        load_speech_model(bare)


def test_transcribe_command_end_to_end(ctc_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = ctc_run["metrics"]["best_checkpoint"]
    mono = ctc_run["corpus"] / "0.wav"
    samples, _ = sf.read(mono)
    stereo = tmp_path / "stereo44k.wav"  # the same sound as 44.1 kHz stereo: any rate, any channel count
    resampled = np.interp(np.arange(0, samples.size, 16_000 / 44_100), np.arange(samples.size), samples)
    sf.write(stereo, np.stack([resampled, 0.5 * resampled], 1), 44_100)
    silent = save_audio(tmp_path / "silent.wav", np.zeros(8000), 16_000)
    capsys.readouterr()
    assert main(["transcribe", str(mono), str(stereo), str(silent), "--ckpt", ckpt]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(mono), str(stereo), str(silent)]
    assert all(line.count("\t") == 1 for line in lines) and lines[2] == f"{silent}\t"  # silence: empty transcript
    assert main(["transcribe", str(stereo), "--ckpt", ckpt, "--beam", "4", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["path"] == str(stereo) and set(result["text"].split()) <= set(WORDS)  # lexicon words only
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF....WAVEjunk")
    assert main(["transcribe", str(corrupt), "--ckpt", ckpt]) == 2
    assert "corrupt.wav" in capsys.readouterr().err
    assert main(["transcribe", str(mono), "--ckpt", str(tmp_path / "none.ckpt")]) == 2
    assert "none.ckpt" in capsys.readouterr().err


def test_long_audio_is_transcribed_in_chunks(ctc_run: dict, tmp_path: Path) -> None:
    samples, rate = sf.read(ctc_run["corpus"] / "0.wav")
    long = tmp_path / "long.wav"
    sf.write(long, np.tile(samples, 8), rate)
    (result,) = transcribe([long], ctc_run["metrics"]["best_checkpoint"], chunk_seconds=0.5)
    assert isinstance(result["text"], str)


@pytest.mark.parametrize("model", ["conv_gru", "conformer", "wav2vec2"])
def test_each_ctc_model_fits_a_few_steps(model: str, tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus", count=8)
    waveform = model == "wav2vec2"
    data = ManifestDataModule(str(corpus / "train.jsonl"), test_manifest=str(corpus / "test.jsonl"),
                              val_fraction=0.2, batch_size=4, n_mels=16, features="waveform" if waveform else "logmel",
                              cache=False)
    small = {"hidden": 32, "layers": 1, "heads": 2, "ffn_dim": 32, "conv_channels": 4, "kernel_size": 3}
    module = SpeechRecognizer(model=model, input_dim=1 if waveform else 16, **small)
    trainer = L.Trainer(max_steps=3, default_root_dir=tmp_path, accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, callbacks=task_callbacks("val_cer", "min"))
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, datamodule=data)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    trainer.test(module, datamodule=data, ckpt_path="best")
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert "test_cer" in metrics["test"] and np.isfinite(metrics["test"]["test_loss"])
    model_back, _ = load_speech_model(metrics["best_checkpoint"])
    assert type(model_back.net) is type(module.net)


def test_feature_size_mismatch_is_refused(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus", count=6)
    data = ManifestDataModule(str(corpus / "train.jsonl"), val_fraction=0.2, n_mels=16, cache=False)
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, enable_progress_bar=False, logger=False)
    with pytest.raises(ValueError, match=r"gives input_dim=16 but the model was built for input_dim=64"):
        trainer.fit(SpeechRecognizer(input_dim=64, hidden=8, layers=1), datamodule=data)


def test_wav2vec2_from_a_local_pretrained_folder(tmp_path: Path) -> None:
    from bp_apps.speech.models import Wav2Vec2CTC

    small = Wav2Vec2CTC(hidden=32, layers=1, heads=2, ffn_dim=32, conv_dim=8)
    small.model.save_pretrained(tmp_path / "w2v")
    loaded = Wav2Vec2CTC(pretrained=str(tmp_path / "w2v"))
    assert loaded.model.config.hidden_size == 32
    log_probs, lengths = loaded(torch.randn(2, 4000, 1), torch.tensor([4000, 3000]))
    assert log_probs.shape[0] == 2 and lengths.tolist()[0] == log_probs.shape[1] > lengths.tolist()[1]


@pytest.mark.skipif(not FSDD.is_dir(), reason="needs ../shared/data/fsdd (the real FSDD recordings)")
def test_digit_classifier_learns_fsdd_through_the_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"BP_APPS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_speech.py"), "--config", str(CONFIGS / "fsdd_digits.yaml"),
         f"--data.data_root={FSDD}", "--data.limit_per_split=600", "--trainer.max_epochs=10",
         "--model.lr=0.006", "--model.hidden=96", "--model.conv_channels=16", "--model.dropout=0.2",  # the quick size
         f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert metrics["test"]["test_acc"] > 0.35  # chance is 0.1 (200 test recordings: sd about 0.02)
    ckpt = metrics["best_checkpoint"]
    assert torch.load(ckpt, weights_only=True)["bp_apps_task"] == "speech.SpokenDigitClassifier"
    recordings = [FSDD / "recordings" / f"{d}_jackson_0.wav" for d in range(10)]
    words = [r["text"] for r in transcribe(recordings, ckpt)]
    assert all(w in {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"} for w in words)
    capsys.readouterr()


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_subsampling_lengths_match_the_convolution_output(factor: int) -> None:
    from bp_apps.speech.models import ConvSubsampling

    layer = ConvSubsampling(40, 8, channels=2, factor=factor)
    for frames in (1, 7, 8, 33, 100):
        out, lengths = layer(torch.zeros(1, frames, 40), torch.tensor([frames]))
        assert out.shape[1] == int(lengths[0]) and out.shape[2] == 8
    assert int(layer.output_lengths(torch.tensor(100))) == -(-100 // factor)


def test_cnn_encoder_lengths_match_its_pooled_output() -> None:
    from bp_apps.speech.models import ConvBlocksEncoder

    encoder = ConvBlocksEncoder(40, 8, channels=2)
    for frames in (1, 7, 8, 9, 33, 100):
        out, lengths = encoder(torch.zeros(1, frames, 40), torch.tensor([frames]))
        assert out.shape == (1, -(-frames // 8), 8) and int(lengths[0]) == out.shape[1]
    padded, lengths = encoder(torch.zeros(3, 100, 40), torch.tensor([100, 33, 1]))
    assert lengths.tolist() == [13, 5, 1] and padded.shape[1] == 13


def test_digit_classifier_encoders_train_through_the_engine_head() -> None:
    from bp_apps.speech.models import DigitClassifierNet

    torch.manual_seed(0)
    features, lengths = torch.randn(8, 30, 16), torch.tensor([30, 25, 20, 18, 12, 9, 5, 2])
    labels = torch.arange(8) % 3
    for encoder in ("gru", "cnn"):
        net = DigitClassifierNet(16, num_classes=3, conv_channels=4, hidden=12, head_hidden=(8,), dropout=0.0,
                                 encoder=encoder)
        optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
        losses = []
        for _ in range(30):
            loss = torch.nn.functional.cross_entropy(net((features, lengths)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0], (encoder, losses[0], losses[-1])
    with pytest.raises(ValueError, match="encoder must be"):
        DigitClassifierNet(16, encoder="lstm")
