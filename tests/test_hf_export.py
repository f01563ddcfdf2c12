"""Hugging Face exports that behave as trained: each is loaded in a fresh Python process where bp_apps cannot be
imported, and must give the suite's own output (summaries, tags, transcripts) on sample inputs. Also the model
cards and the export folder's staging."""

from __future__ import annotations

import ast
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import lightning as L
import pytest
import torch
import yaml

from bp_apps.core.model_card import EXPORT_MARKER, ModelCard, model_card, run_metrics, staged_export
from bp_apps.speech.audio import load_audio, save_audio
from bp_apps.speech.decoding import TOKENS
from bp_apps.speech.features import FeatureConfig
from bp_apps.speech.hf_export import export_hugging_face as export_speech
from bp_apps.speech.models import ConvGRUCTC, Wav2Vec2CTC
from bp_apps.speech.task import SpeechRecognizer, transcribe
from bp_apps.text.labeling.data import LabelingVocab, collate_sentences
from bp_apps.text.labeling.hf_export import DECODING_KEY
from bp_apps.text.labeling.hf_export import export_hugging_face as export_labeler
from bp_apps.text.labeling.models import BiLSTMTagger, TransformerTagger
from bp_apps.text.labeling.records import make_sentence
from bp_apps.text.labeling.task import TokenLabeler, label_sentences
from bp_apps.text.summarization.hf_export import REMOTE_MODULE
from bp_apps.text.summarization.hf_export import export_hugging_face as export_summarizer
from bp_apps.text.summarization.models import BartCopyNet, BartNet
from bp_apps.text.summarization.task import HFBestExport, Summarizer, load_summarizer, summarize
from bp_apps.text.tokenization import tokenizer_to_json, train_tokenizer

WORDS = ["the", "a", "cat", "dog", "man", "woman", "saw", "took", "gave", "ball", "book", "park", "in", "on",
         "quickly", "later", "big", "red"]
REPO = Path(__file__).resolve().parents[1]
GENERATION = {"num_beams": 3, "no_repeat_ngram_size": 2, "max_new_tokens": 8, "min_new_tokens": 2,
              "length_penalty": 1.3, "repetition_penalty": 1.2, "mbr_samples": 2}

# Run first in every fresh process: any import of bp_apps fails, and the repository is off the path.
BLOCK_BP_APPS = textwrap.dedent("""
    import importlib.abc, importlib.util, json, sys
    class _NoBpApps(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "bp_apps" or name.startswith("bp_apps."):
                raise ImportError("bp_apps is not importable here")
            return None
    sys.meta_path.insert(0, _NoBpApps())
    sys.path = [p for p in sys.path if p not in ("", ".") and not p.startswith({repo!r})]
    try:
        importlib.util.find_spec("bp_apps")
    except ImportError:
        pass
    else:
        raise SystemExit("bp_apps is still importable")
""").format(repo=str(REPO))


FRESH_JOBS = """
def summarize(job):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    remote = job["remote"]
    tokenizer = AutoTokenizer.from_pretrained(job["folder"], trust_remote_code=remote)
    model = AutoModelForSeq2SeqLM.from_pretrained(job["folder"], trust_remote_code=remote).eval()
    inputs = tokenizer(job["texts"], truncation=True, padding=True, return_tensors="pt")
    ids = model.generate(**inputs)
    return {"class": type(model).__module__ + "." + type(model).__name__,
            "output": [s.strip() for s in tokenizer.batch_decode(ids, skip_special_tokens=True)]}


def tag(job):
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(job["folder"])
    model = AutoModelForTokenClassification.from_pretrained(job["folder"], trust_remote_code=True).eval()
    plain = AutoModelForTokenClassification.from_pretrained(job["folder"]).eval()
    return {"output": model.tag_words(tokenizer, job["sentences"], job["predicates"]),
            "class": type(plain).__name__, "labels": plain.config.id2label}


def transcribe(job):
    import torch
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor
    processor = Wav2Vec2Processor.from_pretrained(job["folder"])
    model = Wav2Vec2ForCTC.from_pretrained(job["folder"]).eval()
    one = []
    with torch.no_grad():
        for waveform in job["waveforms"]:
            inputs = processor(waveform, sampling_rate=job["rate"], return_tensors="pt")
            one.append(" ".join(processor.batch_decode(model(**inputs).logits.argmax(-1))[0].split()))
        inputs = processor(job["waveforms"], sampling_rate=job["rate"], padding=True, return_tensors="pt")
        ids = model(**inputs).logits.argmax(-1)
        lengths = model._get_feat_extract_output_lengths(inputs["attention_mask"].sum(-1))
    batched = [" ".join(processor.decode(row[:n]).split()) for row, n in zip(ids, lengths.tolist())]
    return {"output": one, "batched": batched, "blank": processor.tokenizer.pad_token_id}


jobs = json.loads(open(sys.argv[1], encoding="utf-8").read())
print(json.dumps({name: globals()[job["kind"]](job) for name, job in jobs.items()}))
"""


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def without_bp_apps(jobs: dict[str, dict[str, Any]], work: Path) -> dict[str, Any]:
    """Run the ``jobs`` (``kind``: summarize, tag or transcribe, with their inputs) in one fresh interpreter that
    cannot import bp_apps (offline, its remote-code cache under ``work``): each job's outputs by name."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(work / "hf_modules"),
               TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    (work / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    result = subprocess.run([sys.executable, "-c", BLOCK_BP_APPS + FRESH_JOBS, str(work / "jobs.json")], cwd=work,
                            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def save_checkpoint(module: L.LightningModule, path: Path) -> Path:
    """``module`` saved as a Lightning checkpoint (as a fit would, without fitting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def sources(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(n)]


def tiny_summarizer(net: type, seed: int = 0) -> Summarizer:
    """A tiny summarizer whose random weights are large enough for its summaries to depend on the source."""
    torch.manual_seed(seed)
    module = Summarizer(net=partial(net, d_model=16, layers=1, heads=2, ff=32, dropout=0.0), generation=GENERATION,
                        max_source_tokens=12)
    module.build(train_tokenizer(sources(60, 0), vocab_size=70))
    with torch.no_grad():
        for weight in module.model.parameters():
            if weight.dim() > 1:
                weight.normal_(0.0, 0.5)
    return module.eval()


LABELS = ["O", "B-ARG0", "I-ARG0", "B-V", "B-ARG1", "I-ARG1"]


def tiny_labeler(crf: bool, net: Any = None) -> TokenLabeler:
    torch.manual_seed(0)
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(40)]
    vocab = LabelingVocab(["<pad>", "<unk>", *WORDS], ["<pad>", "<unk>", *sorted(set("".join(WORDS)))], LABELS)
    module = TokenLabeler(net=net or partial(TransformerTagger, hidden=16, layers=1, heads=2, max_subwords=16),
                          crf=crf)
    state = {} if net is not None else {"tokenizer": tokenizer_to_json(train_tokenizer(sentences, vocab_size=60))}
    module.build(vocab, True, state)
    if module.crf is not None:  # strong transitions: the CRF's tags are not the per-word argmax
        with torch.no_grad():
            for table in (module.crf.transitions, module.crf.start, module.crf.end):
                table.normal_(0.0, 2.0)
    return module.eval()


RATE = 8000


def speech_checkpoint(net: Any, path: Path, kind: str = "waveform") -> Path:
    """A recognizer checkpoint carrying a data module's feature settings (what ``transcribe`` reads)."""
    torch.manual_seed(0)
    module = SpeechRecognizer(net=net, input_dim=1 if kind == "waveform" else 16, augment=None)
    if isinstance(module.net, Wav2Vec2CTC):
        with torch.no_grad():  # large output weights: the untrained model writes letters, not only blanks
            module.net.model.lm_head.weight.normal_(0.0, 3.0)
    save_checkpoint(module, path)
    checkpoint = torch.load(path, weights_only=True)
    features = FeatureConfig(kind=kind, sample_rate=RATE, n_mels=16).to_dict()
    checkpoint["ManifestDataModule"] = {"features": features, "words": ["ab"], "datamodule": "ManifestDataModule"}
    torch.save(checkpoint, path)
    return path


class Exported(NamedTuple):
    folders: dict[str, Path]
    expected: dict[str, Any]  # the suite's own outputs
    fresh: dict[str, Any]  # the exports' outputs in a process without bp_apps
    extra: dict[str, Any]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Every exportable model, exported, run by the suite and by the export in one fresh process."""
    root = tmp_path_factory.mktemp("exports")
    folders, expected, jobs, extra = {}, {}, {}, {}
    texts = [*sources(5, 3), " ".join(sources(4, 9))]  # the last is longer than max_source_tokens: truncated
    for net in (BartCopyNet, BartNet):
        name = net.__name__
        checkpoint = save_checkpoint(tiny_summarizer(net), root / name / "best.ckpt")
        folders[name] = export_summarizer(checkpoint, root / name / "export")
        with pytest.warns(UserWarning, match="truncated"):
            expected[name] = summarize(load_summarizer(checkpoint), texts, mbr_samples=0)
        jobs[name] = {"kind": "summarize", "folder": str(folders[name]), "texts": texts, "remote": net is BartCopyNet}

    rng = random.Random(5)
    samples = [[rng.choice(WORDS) for _ in range(rng.randint(2, 9))] for _ in range(6)]
    samples.append([rng.choice(WORDS) for _ in range(20)])  # over max_subwords // 2 words: tagged in windows
    predicates = [rng.randrange(len(s)) for s in samples[:-1]] + [9]
    sentences = [make_sentence(s, predicate=p) for s, p in zip(samples, predicates)]
    for crf in (True, False):
        name = f"tagger-crf={crf}"
        checkpoint = save_checkpoint(tiny_labeler(crf), root / name / "checkpoints" / "best.ckpt")
        (root / name / "metrics.json").write_text(json.dumps({"test": {"test_f1": 0.625},
                                                              "validation": {"val_f1": 0.5}}))
        folders[name] = export_labeler(checkpoint, root / name / "export")
        module = TokenLabeler.load(checkpoint)
        with pytest.warns(UserWarning, match="windows of 8"):
            expected[name] = label_sentences(module, sentences)
        with torch.no_grad():
            argmax = module(collate_sentences(sentences, module.vocab)).argmax(-1).tolist()
        extra[name] = [[LABELS[i] for i in row[:len(s)]] for row, s in zip(argmax, samples)]
        jobs[name] = {"kind": "tag", "folder": str(folders[name]), "sentences": samples, "predicates": predicates}

    net = partial(Wav2Vec2CTC, hidden=16, layers=1, heads=2, ffn_dim=32, conv_dim=8)
    checkpoint = speech_checkpoint(net, root / "wav2vec2" / "w2v.ckpt")
    folders["wav2vec2"] = export_speech(checkpoint, root / "wav2vec2" / "export")
    generator = torch.Generator().manual_seed(1)
    paths = []
    for i, seconds in enumerate((0.5, 0.8, 0.3)):
        t = torch.arange(int(RATE * seconds)) / RATE
        wave = 0.3 * torch.sin(2 * math.pi * (200 + 150 * i) * t) + 0.05 * torch.randn(t.shape, generator=generator)
        paths.append(save_audio(root / "wav2vec2" / f"{i}.wav", wave, RATE))
    expected["wav2vec2"] = [r["text"] for r in transcribe(paths, checkpoint)]
    waveforms = [load_audio(p, RATE).tolist() for p in paths]  # what transcribe reads: resampled, level-normalised
    jobs["wav2vec2"] = {"kind": "transcribe", "folder": str(folders["wav2vec2"]), "waveforms": waveforms,
                        "rate": RATE}
    return Exported(folders, expected, without_bp_apps(jobs, root), extra)


# -- summarization -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", ["BartCopyNet", "BartNet"])
def test_a_summarizer_export_generates_what_summarize_gives_without_bp_apps(net: str, exported: Exported) -> None:
    expected, folder, copying = exported.expected[net], exported.folders[net], net == "BartCopyNet"
    assert any(expected) and len(set(expected)) > 1
    assert exported.fresh[net]["output"] == expected
    assert exported.fresh[net]["class"].endswith(f"{REMOTE_MODULE}.BartCopyForConditionalGeneration" if copying
                                                 else "modeling_bart.BartForConditionalGeneration")
    generation = json.loads((folder / "generation_config.json").read_text())
    beam = {k: v for k, v in GENERATION.items() if k != "mbr_samples"}
    assert {k: generation[k] for k in beam} == beam
    assert generation["decoder_start_token_id"] == generation["bos_token_id"] and generation["forced_eos_token_id"]
    assert "mbr_samples" not in generation and not generation.get("_from_model_config")
    config = json.loads((folder / "config.json").read_text())
    assert ("auto_map" in config) == copying == (folder / f"{REMOTE_MODULE}.py").is_file()
    if copying:
        tree = ast.parse((folder / f"{REMOTE_MODULE}.py").read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert imported == {"__future__", "math", "typing", "torch", "transformers"}
    card = (folder / "README.md").read_text()
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "summarization" and meta["license"] == "mit" and "bp-apps" in meta["tags"]
    assert "MBR decoding is a bp-apps setting, not part of generation_config" in card and "mbr_samples=2" in card
    assert json.loads((folder / EXPORT_MARKER).read_text())["task"] == "text.Summarizer"
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_hf_best_is_a_full_export_that_replaces_itself(tmp_path: Path) -> None:
    module = tiny_summarizer(BartCopyNet)
    callback = SimpleNamespace(best_model_path="", best_model_score=None, monitor="val_rouge1",
                               dirpath=str(tmp_path / "checkpoints"))
    trainer = SimpleNamespace(is_global_zero=True, checkpoint_callbacks=[callback], checkpoint_callback=callback,
                              default_root_dir=str(tmp_path))
    saved = {"datamodule_hyper_parameters": {"name": "aeslc"}}  # the checkpoint being saved names the data
    export = HFBestExport()
    export._export(trainer, module, "", saved)
    folder = tmp_path / "checkpoints" / "hf_best"
    (folder / "stale.txt").write_text("from the first export")
    with torch.no_grad():
        module.model.copy_gate.bias.fill_(3.0)
    export._export(trainer, module, "", saved)
    assert not (folder / "stale.txt").exists()
    assert json.loads((folder / "generation_config.json").read_text())["num_beams"] == 3
    assert (folder / f"{REMOTE_MODULE}.py").is_file() and "auto_map" in json.loads((folder / "config.json").read_text())
    assert front_matter((folder / "README.md").read_text())["datasets"] == ["aeslc"]
    from safetensors.torch import load_file

    assert float(load_file(folder / "model.safetensors")["copy_gate.bias"]) == 3.0


# -- labeling ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crf", [True, False])
def test_a_transformer_tagger_export_tags_as_the_suite_without_bp_apps(crf: bool, exported: Exported) -> None:
    name = f"tagger-crf={crf}"
    expected, fresh, folder = exported.expected[name], exported.fresh[name], exported.folders[name]
    assert fresh["output"] == expected
    assert fresh["class"] == "BertForTokenClassification"  # without remote code: the standard class
    assert fresh["labels"] == {str(i): label for i, label in enumerate(LABELS)}
    if crf:  # the decoding that travels in the config matters: per-word argmax gives other tags
        assert exported.extra[name] != expected
    config = json.loads((folder / "config.json").read_text())
    assert config[DECODING_KEY]["scores"] == ("emissions" if crf else "log_softmax")
    assert config["label2id"] == {label: i for i, label in enumerate(LABELS)}
    meta = front_matter((folder / "README.md").read_text())
    assert meta["pipeline_tag"] == "token-classification" and meta["metrics"] == ["test_f1", "val_f1"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.625


def test_the_bilstm_tagger_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    module = tiny_labeler(True, net=partial(BiLSTMTagger, word_dim=8, char_channels=0, hidden=8, layers=1,
                                            predicate_dim=2))
    checkpoint = save_checkpoint(module, tmp_path / "bilstm.ckpt")
    with pytest.raises(ValueError, match=r"BiLSTMTagger is not a transformers model.*--format onnx"):
        export_labeler(checkpoint, tmp_path / "export")
    assert not (tmp_path / "export").exists()


# -- speech ------------------------------------------------------------------------------------------------


def test_a_wav2vec2_export_transcribes_as_the_suite_without_bp_apps(exported: Exported) -> None:
    expected, fresh, folder = exported.expected["wav2vec2"], exported.fresh["wav2vec2"], exported.folders["wav2vec2"]
    assert all(expected) and len(set(expected)) == 3
    assert fresh["output"] == expected and fresh["batched"] == expected and fresh["blank"] == 0
    vocab = json.loads((folder / "vocab.json").read_text())
    assert vocab == {("<pad>" if token == "-" else token): i for i, token in enumerate(TOKENS)}  # the suite's ids
    assert vocab["<pad>"] == 0 and vocab["|"] == 1 and vocab["a"] == 2 and vocab["'"] == 28
    extractor = json.loads((folder / "processor_config.json").read_text())["feature_extractor"]
    assert extractor["sampling_rate"] == RATE and extractor["do_normalize"] is False
    assert front_matter((folder / "README.md").read_text())["pipeline_tag"] == "automatic-speech-recognition"


def test_other_speech_networks_are_refused(tmp_path: Path) -> None:
    checkpoint = speech_checkpoint(partial(ConvGRUCTC, hidden=8, layers=1, conv_channels=4), tmp_path / "gru.ckpt",
                                   kind="logmel")
    with pytest.raises(ValueError, match=r"ConvGRUCTC is not a transformers model.*--format onnx"):
        export_speech(checkpoint, tmp_path / "export")


# -- cards and staging -------------------------------------------------------------------------------------


def test_staged_export_refuses_foreign_folders_and_replaces_earlier_exports(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no earlier export"), staged_export(out, {}) as folder:
        pytest.fail(f"nothing may be staged in {folder}")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"), staged_export(tmp_path / "file", {}):
        pass
    with staged_export(tmp_path / "new", {"task": "t"}) as folder:
        (folder / "a.txt").write_text("first")
    with pytest.raises(RuntimeError, match="boom"), staged_export(tmp_path / "new", {"task": "t"}) as folder:
        (folder / "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert (tmp_path / "new" / "a.txt").read_text() == "first"  # a failed export leaves the earlier one
    with staged_export(tmp_path / "new", {"task": "t"}) as folder:
        (folder / "b.txt").write_text("second")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted([EXPORT_MARKER, "b.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "new", "out"]


def test_run_metrics_and_the_card_front_matter(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    checkpoint = tmp_path / "checkpoints" / "best.ckpt"
    assert run_metrics(checkpoint) == ({}, "")
    (tmp_path / "metrics.json").write_text(json.dumps({"test": {"test_wer": 0.25, "test_nan": float("nan")},
                                                       "validation": {"val_wer": 0.5}, "best_val_wer": 0.5,
                                                       "epochs_completed": 3}))
    metrics, source = run_metrics(checkpoint)
    assert metrics == {"test_wer": 0.25, "val_wer": 0.5, "best_val_wer": 0.5} and source == "../metrics.json"
    card = model_card(ModelCard(title='A "quoted": title', summary="s", pipeline_tag="automatic-speech-recognition",
                                datasets=["fsdd"], metrics=metrics, limitations=["short clips"]))
    meta = front_matter(card)
    assert meta["model-index"][0]["name"] == 'A "quoted": title' and meta["datasets"] == ["fsdd"]
    assert [m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]] == [0.25, 0.5, 0.5]
    assert "| test_wer | 0.2500 |" in card and "- short clips" in card
