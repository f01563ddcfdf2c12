"""The speech tasks end to end on tiny settings: every config parses into a network class and settings groups,
`bp-apps fit` of a CTC model writes metrics.json and a checkpoint that loads with weights_only and transcribes
(stereo 44.1 kHz too), each CTC network class fits a few steps, bad settings are refused naming the field, and the
digit classifier learns FSDD digits well above chance through scripts/train_speech.py."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from bp_apps.cli import main
from bp_apps.core.callbacks import task_callbacks
from bp_apps.speech.audio import save_audio
from bp_apps.speech.data import ConnectedDigitsDataModule, FSDDDigitsDataModule, ManifestDataModule
from bp_apps.speech.decoding import DecodingConfig
from bp_apps.speech.features import FeatureConfig, SpecAugmentConfig
from bp_apps.speech.models import ConformerCTC, ConvGRUCTC, DigitCNNNet, DigitGRUNet, Wav2Vec2CTC
from bp_apps.speech.task import SpeechRecognizer, SpokenDigitClassifier, load_speech_model, transcribe

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "speech"
FSDD = ROOT.parent / "shared" / "data" / "fsdd"
WORDS = {"ab": 300.0, "ba": 700.0, "abba": 500.0}


pytestmark = pytest.mark.usefixtures("session_cache")


@pytest.mark.parametrize("config", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_speech_config_parses(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / f"{config}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "bp_apps.speech." in printed and "class_path" in printed
    assert "class_path: bp_apps.speech.models." in printed  # the network is given as a class
    assert "optim:" in printed and "features:" in printed and "n_mels:" in printed


def _printed_config(config: str, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    import yaml

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / f"{config}.yaml"), *extra, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_the_configs_keep_their_tuned_settings(capsys: pytest.CaptureFixture[str]) -> None:
    """The settings the committed figures were measured with, now as a network class and groups (the groups'
    other fields are the task's defaults)."""
    ctc = _printed_config("fsdd_connected_ctc", capsys)
    model, data = ctc["model"]["init_args"], ctc["data"]["init_args"]
    assert model["net"]["class_path"] == "bp_apps.speech.models.ConvGRUCTC"
    assert {k: model["net"]["init_args"][k] for k in ("conv_channels", "subsample", "hidden", "layers", "dropout")} \
        == {"conv_channels": 32, "subsample": 4, "hidden": 128, "layers": 2, "dropout": 0.15}
    assert model["augment"] == {"freq_masks": 2, "freq_width": 6, "time_masks": 2, "time_width": 15,
                                "max_time_fraction": 0.15}
    optim = model["optim"]
    assert (optim["name"], optim["lr"], optim["weight_decay"], optim["scheduler"], optim["warmup_fraction"],
            optim["max_grad_norm"]) == ("adamw", 0.004, 0.01, "cosine", 0.05, 5.0)
    assert "bias" in optim["no_decay_keys"] and model["decoding"] == {"beam_size": 8, "lexicon": True}
    assert data["features"] == {"kind": "logmel", "sample_rate": 8000, "n_mels": 40, "hop_ms": 10.0, "win_ms": 25.0,
                                "trim_db": 0.0}
    digits = _printed_config("fsdd_digits", capsys)["model"]["init_args"]
    assert digits["net"] == {"class_path": "bp_apps.speech.models.DigitCNNNet",
                             "init_args": {"conv_channels": 16, "hidden": 128, "head_hidden": [64], "dropout": 0.3}}
    optim = digits["optim"]
    assert (optim["lr"], optim["weight_decay"], optim["no_decay_keys"]) == (0.003, 0.01, [])
    assert digits["augment"]["time_width"] == 12 and digits["augment"]["freq_width"] == 6
    assert digits["label_smoothing"] == 0.05
    switched = _printed_config("fsdd_digits", capsys, "--model.net=bp_apps.speech.models.DigitGRUNet",
                               "--model.augment=null")["model"]["init_args"]
    assert switched["net"]["class_path"].endswith("DigitGRUNet") and switched["net"]["init_args"]["hidden"] == 128
    assert switched["augment"] is None


def test_speech_configs_are_the_four_of_the_issue() -> None:
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == ["fsdd_connected_ctc", "fsdd_connected_ctc_engine",
                                                             "fsdd_digits", "fsdd_digits_engine", "manifest_ctc",
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
            "--data.val_fraction=0.25", "--data.batch_size=4", "--data.features.n_mels=32",
            "--model.net.init_args.hidden=16", "--model.net.init_args.layers=1",
            "--model.net.init_args.conv_channels=4", "--model.decoding.beam_size=4",
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
    hparams = checkpoint["hyper_parameters"]
    assert hparams["input_dim"] == 32  # linked from the data's features.n_mels
    assert "lexicon_words" not in hparams  # the data's state carries them
    assert hparams["net"]["class_path"] == "bp_apps.speech.models.ConvGRUCTC"  # plain data: loads weights_only
    assert hparams["net"]["init_args"]["hidden"] == 16 and hparams["optim"]["lr"] == 0.0015
    assert hparams["decoding"]["beam_size"] == 4
    assert checkpoint["ManifestDataModule"]["features"]["n_mels"] == 32
    assert sorted(checkpoint["ManifestDataModule"]["words"]) == sorted(WORDS)
    model, preprocessing = load_speech_model(path)
    assert isinstance(model, SpeechRecognizer) and not model.training and preprocessing["features"]["n_mels"] == 32
    assert isinstance(model.net, ConvGRUCTC) and model.net.gru.hidden_size == 16 and model.optim.lr == 0.0015
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


def test_checkpoints_of_earlier_constructors_are_refused_naming_the_file(ctc_run: dict, tmp_path: Path) -> None:
    """Before networks were given as classes the recognizer took ``model="conv_gru"``, ``hidden``, ``lr``, ...;
    earlier still, ``monitor``. Such a checkpoint is refused, naming the file and the arguments, rather than built
    into another model than the one saved."""
    checkpoint = torch.load(ctc_run["metrics"]["best_checkpoint"], map_location="cpu", weights_only=True)
    older = tmp_path / "older.ckpt"
    torch.save({**checkpoint, "hyper_parameters": {**checkpoint["hyper_parameters"], "monitor": "val_wer"}}, older)
    with pytest.raises(ValueError, match=r"older\.ckpt: .*no longer takes \(monitor\).*earlier bp_apps"):
        load_speech_model(older)
    flat = tmp_path / "flat.ckpt"
    torch.save({**checkpoint, "hyper_parameters": {"model": "conv_gru", "hidden": 16, "layers": 1, "lr": 0.0015,
                                                   "input_dim": 32}}, flat)
    with pytest.raises(ValueError, match=r"flat\.ckpt: .*no longer takes \(hidden, layers, lr, model\)"):
        load_speech_model(flat)


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


@pytest.mark.parametrize("seconds", [20.01, 20.016, 0.004, 0.015])
def test_audio_of_any_length_transcribes(ctc_run: dict, tmp_path: Path, seconds: float) -> None:
    """A 20.01 s file (cut at 20 s, leaving 80 samples) and files shorter than one STFT window (16 ms at 8 kHz)."""
    rate = 8000
    t = np.arange(int(seconds * rate)) / rate
    path = tmp_path / "odd.wav"
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)
    (result,) = transcribe([path], ctc_run["metrics"]["best_checkpoint"])
    assert result["path"] == str(path) and isinstance(result["text"], str)


SMALL_NETS = {
    "conv_gru": partial(ConvGRUCTC, hidden=32, layers=1, conv_channels=4),
    "conformer": partial(ConformerCTC, d_model=32, layers=1, heads=2, ffn_dim=32, conv_channels=4, kernel_size=3),
    "wav2vec2": partial(Wav2Vec2CTC, hidden=32, layers=1, heads=2, ffn_dim=32, conv_dim=8),
}


@pytest.mark.parametrize("model", sorted(SMALL_NETS))
def test_each_ctc_model_fits_a_few_steps(model: str, tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus", count=8)
    waveform = model == "wav2vec2"
    features = FeatureConfig(kind="waveform" if waveform else "logmel", n_mels=16)
    data = ManifestDataModule(str(corpus / "train.jsonl"), test_manifest=str(corpus / "test.jsonl"),
                              val_fraction=0.2, batch_size=4, features=features, cache=False)
    module = SpeechRecognizer(net=SMALL_NETS[model], input_dim=data.input_dim)
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
    for name, value in module.state_dict().items():  # the best is the last here (3 steps, validation each epoch)
        assert value.shape == model_back.state_dict()[name].shape
    if waveform:  # saved with its transformers configuration in place of 'pretrained': loading never downloads
        saved = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)["hyper_parameters"]
        assert saved["net"]["init_args"]["pretrained"] is None
        assert saved["net"]["init_args"]["hf_config"]["hidden_size"] == 32
        assert module.hparams["net"]["init_args"].get("hf_config") is None  # the module's own are left alone


def test_the_same_seed_gives_the_same_network_whatever_the_global_random_state() -> None:
    torch.manual_seed(1)
    first = SpeechRecognizer(net=SMALL_NETS["conv_gru"], input_dim=16, seed=7)
    state = torch.random.get_rng_state()
    torch.manual_seed(2)
    second = SpeechRecognizer(net=SMALL_NETS["conv_gru"], input_dim=16, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    third = SpeechRecognizer(net=SMALL_NETS["conv_gru"], input_dim=16, seed=8)
    assert not torch.equal(first.net.out.weight, third.net.out.weight)
    torch.manual_seed(1)
    SpeechRecognizer(net=SMALL_NETS["conv_gru"], input_dim=16, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # building draws nothing from the global generator
    digits = [SpokenDigitClassifier(net=partial(DigitCNNNet, conv_channels=2, hidden=8), input_dim=16, num_classes=3,
                                    seed=4) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(digits[0].state_dict().values(), digits[1].state_dict().values()))


def test_settings_groups_are_checked_and_merged_over_the_task_defaults() -> None:
    model = SpeechRecognizer(net=SMALL_NETS["conv_gru"], input_dim=16, optim={"lr": 0.01},
                             augment={"time_width": 5}, decoding={"beam_size": 3})
    assert model.optim.lr == 0.01 and model.optim.weight_decay == 0.01 and model.optim.scheduler == "cosine"
    assert model.augment_config == SpecAugmentConfig(time_width=5) and model.augment.time_width == 5
    assert model.decoding == DecodingConfig(beam_size=3, lexicon=True)
    assert SpeechRecognizer(net=SMALL_NETS["conv_gru"], input_dim=16, augment=None).augment is None
    digits = SpokenDigitClassifier(net=partial(DigitGRUNet, conv_channels=2, hidden=8), input_dim=16,
                                   augment={"time_width": 3})
    assert digits.augment_config == SpecAugmentConfig(freq_width=6, time_width=3)  # the classifier's defaults
    assert digits.optim.lr == 0.003 and digits.optim.no_decay_keys == ()
    for bad, match in (({"augment": {"freq_width": -1}}, r"augment\.freq_width must be an integer >= 0"),
                       ({"augment": {"time_masks": 1.5}}, r"augment\.time_masks must be an integer"),
                       ({"augment": {"width": 3}}, r"augment: unknown setting\(s\) width"),
                       ({"decoding": {"beam_size": -2}}, r"decoding\.beam_size must be an integer >= 0"),
                       ({"optim": {"lr": 0.0}}, r"lr must be positive"),
                       ({"net": "ConvGRUCTC"}, r"net: expected a network class")):
        with pytest.raises(ValueError, match=match):
            SpeechRecognizer(**{"input_dim": 16, "net": SMALL_NETS["conv_gru"], **bad})
    with pytest.raises(ValueError, match=r"reads waveforms \(input_dim 1\), got input_dim=40.*features\.kind"):
        SpeechRecognizer(net=SMALL_NETS["wav2vec2"], input_dim=40)


def test_data_modules_take_the_feature_settings_whole() -> None:
    fsdd = FSDDDigitsDataModule(features={"n_mels": 24}, cache=False)  # over FSDD's own defaults (8 kHz)
    assert fsdd.features == FeatureConfig(sample_rate=8000, n_mels=24) and fsdd.input_dim == 24
    assert ConnectedDigitsDataModule(cache=False).features == FeatureConfig(sample_rate=8000, n_mels=40)
    waveform = ManifestDataModule(features=FeatureConfig(kind="waveform"), cache=False)
    assert waveform.input_dim == 1 and waveform.preprocessing()["features"]["kind"] == "waveform"
    for bad, match in (({"kind": "mfcc"}, r"features\.kind must be 'logmel' or 'waveform'"),
                       ({"n_mels": 0}, r"features\.n_mels must be a positive integer"),
                       ({"sample_rate": 8000.5}, r"features\.sample_rate must be a positive integer"),
                       ({"win_ms": 5.0}, r"features\.win_ms must be at least hop_ms"),
                       ({"n_fft": 512}, r"features: unknown setting\(s\) n_fft")):
        with pytest.raises(ValueError, match=match):
            ManifestDataModule(features=bad, cache=False)


def test_feature_size_mismatch_is_refused(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus", count=6)
    data = ManifestDataModule(str(corpus / "train.jsonl"), val_fraction=0.2, features={"n_mels": 16}, cache=False)
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, enable_progress_bar=False, logger=False)
    with pytest.raises(ValueError, match=r"gives input_dim=16 but the model was built for input_dim=64"):
        trainer.fit(SpeechRecognizer(net=partial(ConvGRUCTC, hidden=8, layers=1), input_dim=64), datamodule=data)


def test_wav2vec2_from_a_local_pretrained_folder(tmp_path: Path) -> None:
    small = Wav2Vec2CTC(hidden=32, layers=1, heads=2, ffn_dim=32, conv_dim=8)
    small.model.save_pretrained(tmp_path / "w2v")
    loaded = Wav2Vec2CTC(pretrained=str(tmp_path / "w2v"))
    assert loaded.model.config.hidden_size == 32
    rebuilt = Wav2Vec2CTC(1, hf_config=loaded.model.config.to_dict())  # what a checkpoint rebuilds, no download
    assert rebuilt.model.config.hidden_size == 32 and rebuilt.state_dict().keys() == loaded.state_dict().keys()
    with pytest.raises(ValueError, match="pretrained or hf_config, not both"):
        Wav2Vec2CTC(pretrained=str(tmp_path / "w2v"), hf_config=loaded.model.config.to_dict())
    log_probs, lengths = loaded(torch.randn(2, 4000, 1), torch.tensor([4000, 3000]))
    assert log_probs.shape[0] == 2 and lengths.tolist()[0] == log_probs.shape[1] > lengths.tolist()[1]


@pytest.mark.skipif(not FSDD.is_dir(), reason="needs ../shared/data/fsdd (the real FSDD recordings)")
def test_digit_classifier_learns_fsdd_through_the_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"BP_APPS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_speech.py"), "--config", str(CONFIGS / "fsdd_digits.yaml"),
         f"--data.data_root={FSDD}", "--data.limit_per_split=600", "--trainer.max_epochs=10",
         "--model.optim.lr=0.006", "--model.net.init_args.hidden=96", "--model.net.init_args.conv_channels=16",
         "--model.net.init_args.dropout=0.2",  # the quick size
         f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert metrics["test"]["test_acc"] > 0.35  # chance is 0.1 (200 test recordings: sd about 0.02)
    ckpt = metrics["best_checkpoint"]
    saved = torch.load(ckpt, weights_only=True)
    assert saved["bp_apps_task"] == "speech.SpokenDigitClassifier"
    assert saved["hyper_parameters"]["net"]["class_path"] == "bp_apps.speech.models.DigitCNNNet"
    assert saved["FSDDDigitsDataModule"]["features"]["sample_rate"] == 8000
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


def test_digit_classifier_networks_train_through_the_engine_head() -> None:
    from bp_apps.engine.bridge import EngineMLPHead

    torch.manual_seed(0)
    features, lengths = torch.randn(8, 30, 16), torch.tensor([30, 25, 20, 18, 12, 9, 5, 2])
    labels = torch.arange(8) % 3
    for encoder in (DigitGRUNet, DigitCNNNet):
        net = encoder(16, num_classes=3, conv_channels=4, hidden=12, head_hidden=(8,), dropout=0.0)
        assert isinstance(net.head, EngineMLPHead)
        optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
        losses = []
        for _ in range(30):
            loss = torch.nn.functional.cross_entropy(net((features, lengths)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0], (encoder, losses[0], losses[-1])
