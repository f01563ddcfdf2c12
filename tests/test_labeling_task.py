"""The token-labeling task: taggers, training on a learnable synthetic SRL task, checkpoints, the CLI."""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from bp_apps.cli import main
from bp_apps.core.callbacks import task_callbacks
from bp_apps.text.labeling import models
from bp_apps.text.labeling.data import LabelingDataModule, LabelingVocab, collate_sentences
from bp_apps.text.labeling.formats import read_jsonl
from bp_apps.text.labeling.models import BiLSTMTagger, PretrainedTagger, TransformerTagger
from bp_apps.text.labeling.records import make_sentence
from bp_apps.text.labeling.rnn import run_lstm
from bp_apps.text.labeling.task import (
    TokenLabeler,
    label_sentences,
    label_text,
    load_labeler,
    resolve_predicate,
    spans_of,
    tokenize_text,
)

WORDS = ["the", "a", "cat", "dog", "man", "woman", "saw", "took", "gave", "ball", "book", "park", "in", "on",
         "quickly", "later", "big", "red"]


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory):
    """The vocabulary files the data modules build go to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BP_APPS_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def synthetic_srl(n: int, seed: int) -> list[dict]:
    """Random sentences with a marked predicate: the word before it is ARG0, the two after it ARG1,
    a following 'in X' is ARGM-LOC. Learnable only by a predicate-aware tagger."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        length = rng.randint(5, 11)
        tokens = [rng.choice(WORDS) for _ in range(length)]
        p = rng.randint(1, length - 3)
        tags = ["O"] * length
        tags[p - 1], tags[p], tags[p + 1], tags[p + 2] = "B-ARG0", "B-V", "B-ARG1", "I-ARG1"
        if p + 4 < length:
            tokens[p + 3] = "in"
            tags[p + 3], tags[p + 4] = "B-ARGM-LOC", "I-ARGM-LOC"
        records.append({"tokens": tokens, "tags": tags, "predicate": p, "id": f"s{len(records)}"})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def srl_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("srl")
    return (write_jsonl(root / "train.jsonl", synthetic_srl(400, 0)),
            write_jsonl(root / "val.jsonl", synthetic_srl(80, 1)))


def small_trainer(root: Path, epochs: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", default_root_dir=root, enable_progress_bar=False,
                     enable_model_summary=False, logger=L.pytorch.loggers.CSVLogger(root),
                     callbacks=task_callbacks("val_f1", "max"), **kwargs)


def last_checkpoint(trainer: L.Trainer) -> Path:
    """The run's ``last.ckpt``: the weights the model ends with."""
    return Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"


SMALL_BILSTM = {"word_dim": 16, "char_channels": 8, "char_dim": 8, "predicate_dim": 8, "hidden": 32, "layers": 1,
                "dropout": 0.0}


def fit_small(root: Path, files: tuple[Path, Path], epochs: int = 12, net: type = BiLSTMTagger,
              data_args: dict | None = None, **settings) -> tuple[TokenLabeler, L.Trainer]:
    """Fit a small tagger by hand (no CLI links): the model gets the data module's files itself. ``settings`` are
    the network's (over :data:`SMALL_BILSTM` for the BiLSTM), ``crf``, or ``optim`` fields."""
    L.seed_everything(0, verbose=False)
    data = LabelingDataModule(str(files[0]), str(files[1]), batch_size=16, min_word_freq=1, **(data_args or {}))
    optim = {"lr": 0.01, "warmup_fraction": 0.0, **settings.pop("optim", {})}
    crf = settings.pop("crf", True)
    net_args = {**(SMALL_BILSTM if net is BiLSTMTagger else {}), **settings}
    model = TokenLabeler(net=partial(net, **net_args), crf=crf, optim=optim, exclude_labels=["V"],
                         vocab_file=data.vocab_file, tokenizer_file=data.tokenizer_file)
    trainer = small_trainer(root, epochs)
    trainer.fit(model, datamodule=data)
    return model, trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, srl_files: tuple[Path, Path]) -> tuple[TokenLabeler, L.Trainer]:
    return fit_small(tmp_path_factory.mktemp("fit"), srl_files)


def test_bilstm_learns_predicate_relative_roles(trained: tuple[TokenLabeler, L.Trainer]) -> None:
    trainer = trained[1]
    assert trainer.callback_metrics["val_f1"] > 0.95
    metrics = json.loads((Path(trainer.log_dir) / "metrics.json").read_text())
    assert metrics["validation"]["val_f1"] > 0.95 and "B-ARG0" in metrics["labels"]
    assert Path(metrics["best_checkpoint"]).is_file()


@pytest.mark.parametrize("crf", [True, False])
def test_decoding_is_always_valid_bio(trained: tuple[TokenLabeler, L.Trainer], crf: bool) -> None:
    model = trained[0]
    if not crf:  # same network, softmax decoding
        model.crf, saved = None, model.crf
    try:
        sentences = [make_sentence(r["tokens"], predicate=r["predicate"]) for r in synthetic_srl(30, 7)]
        torch.manual_seed(0)
        for p in model.net.head.parameters():  # noisy head: raw argmax would break BIO
            p.data.add_(torch.randn_like(p) * 0.5)
        for tags in label_sentences(model.eval(), sentences):
            for previous, tag in zip(["O", *tags], tags):
                if tag.startswith("I-"):
                    assert previous[2:] == tag[2:] and previous != "O"
    finally:
        if not crf:
            model.crf = saved


def test_checkpoint_round_trip_and_label_command(tmp_path: Path, srl_files: tuple[Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    model, trainer = fit_small(tmp_path, srl_files, epochs=12, crf=True)
    ckpt = str(last_checkpoint(trainer))
    loaded = load_labeler(ckpt)
    sentences = [make_sentence(r["tokens"], predicate=r["predicate"]) for r in synthetic_srl(20, 3)]
    assert label_sentences(loaded, sentences) == label_sentences(model.eval(), sentences)

    capsys.readouterr()  # drop what training printed
    assert main(["label", "The man took the ball in park", "--ckpt", ckpt, "--predicate", "took", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["predicate"] == 2
    assert result["tags"] == ["O", "B-ARG0", "B-V", "B-ARG1", "I-ARG1", "B-ARGM-LOC", "I-ARGM-LOC"]
    assert {"label": "ARG1", "start": 3, "end": 5, "text": "the ball"} in result["spans"]
    assert main(["label", "the man took the red ball", "--ckpt", ckpt, "--predicate", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "took\tB-V" and "ARG0: man" in out

    inputs = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "tokens": ["a", "dog", "saw", "the", "cat"],
                                                  "predicate": 2}, {"tokens": ["man", "gave", "a", "book"],
                                                                    "predicate": 1}])
    out_file = tmp_path / "out" / "tags.jsonl"
    assert main(["label", "--ckpt", ckpt, "--file", str(inputs), "--out", str(out_file)]) == 0
    records = read_jsonl(out_file)
    assert [r.id for r in records] == ["a", None]
    assert records[0].tags == ("O", "B-ARG0", "B-V", "B-ARG1", "I-ARG1")
    assert records[1].tags == ("B-ARG0", "B-V", "B-ARG1", "I-ARG1")


def test_label_text_errors(trained: tuple[TokenLabeler, L.Trainer]) -> None:
    model = trained[0].eval()
    with pytest.raises(ValueError, match="empty"):
        label_text(model, "   ")
    with pytest.raises(ValueError, match="give the predicate"):
        label_text(model, "the man saw the dog")
    with pytest.raises(ValueError, match="out of range"):
        label_text(model, "the man saw the dog", "9")
    with pytest.raises(ValueError, match="'ran' is not among"):
        label_text(model, "the man saw the dog", "ran")


def test_load_labeler_refuses_bad_files(tmp_path: Path, trained: tuple[TokenLabeler, L.Trainer]) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        load_labeler(tmp_path / "missing.ckpt")
    other = tmp_path / "other.ckpt"
    torch.save({"bp_apps_task": "vision.ImageClassifier", "state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a token-labeling checkpoint"):
        load_labeler(other)
    ckpt = Path(trained[1].checkpoint_callback.best_model_path)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated\.ckpt: not a loadable checkpoint"):
        load_labeler(truncated)


def test_engine_mlp_head_passes_gradients_to_the_lstm() -> None:
    torch.manual_seed(0)
    sentences = [make_sentence(r["tokens"], r["tags"], r["predicate"]) for r in synthetic_srl(8, 0)]
    vocab = LabelingVocab.build(sentences, min_word_freq=1)
    net = BiLSTMTagger(len(vocab.words), len(vocab.chars), len(vocab.labels), True, word_dim=8, char_channels=4,
                       predicate_dim=4, hidden=8, layers=1, head="engine_mlp", head_hidden=16)
    batch = collate_sentences(sentences, vocab)
    scores = net(batch)
    assert scores.shape == (8, batch["mask"].shape[1], len(vocab.labels))
    loss = torch.nn.functional.cross_entropy(scores.flatten(0, 1), batch["tags"].flatten(), ignore_index=-100)
    loss.backward()
    assert net.lstm.weight_ih_l0.grad is not None and net.lstm.weight_ih_l0.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.head.parameters())


def test_shared_layers_read_each_sentence_once_and_match_per_instance_scores(monkeypatch: pytest.MonkeyPatch
                                                                             ) -> None:
    torch.manual_seed(0)
    records = synthetic_srl(6, 3)
    # three predicates of sentence 0, two of sentence 1, one of sentence 2 (different lengths: padding too)
    picks = [(0, 1), (0, 2), (1, 1), (0, 3), (1, 2), (2, 1)]
    sentences = [make_sentence(records[k]["tokens"], None, p) for k, p in picks]
    vocab = LabelingVocab.build([make_sentence(r["tokens"], r["tags"], r["predicate"]) for r in records],
                                min_word_freq=1)
    net = BiLSTMTagger(len(vocab.words), len(vocab.chars), len(vocab.labels), True, word_dim=8, char_channels=4,
                       predicate_dim=4, hidden=8, layers=3, shared_layers=2, predicate_hidden=6, dropout=0.0).eval()
    seen: list[int] = []

    def counting_run_lstm(lstm, x, lengths):
        if lstm is net.shared_lstm:
            seen.append(x.shape[0])
        return run_lstm(lstm, x, lengths)

    monkeypatch.setattr(models, "run_lstm", counting_run_lstm)
    batch = collate_sentences(sentences, vocab)
    scores = net(batch)
    assert seen == [3]  # three distinct sentences, not six instances
    for i, sentence in enumerate(sentences):  # the same scores as each instance alone
        alone = net(collate_sentences([sentence], vocab))[0]
        n = len(sentence.tokens)
        torch.testing.assert_close(scores[i, :n], alone[:n], atol=1e-5, rtol=1e-5)
    scores.sum().backward()
    assert net.shared_lstm.weight_ih_l0.grad.abs().sum() > 0 and net.lstm.weight_ih_l0.grad.abs().sum() > 0
    assert net.word_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("layers", "shared", "predicate_dim"), [(2, 2, 4), (2, -1, 4), (2, 1, 0)])
def test_shared_layers_validation(layers: int, shared: int, predicate_dim: int) -> None:
    with pytest.raises(ValueError, match="shared_layers needs"):
        BiLSTMTagger(10, 10, 3, True, predicate_dim=predicate_dim, layers=layers, shared_layers=shared)


def test_without_predicates_the_predicate_settings_are_not_used() -> None:
    net = BiLSTMTagger(10, 10, 3, False, predicate_dim=8, predicate_pos_dim=4, layers=2, shared_layers=1)
    assert net.predicate_embed is None and net.predicate_pos_embed is None and net.shared_layers == 0
    assert net.lstm.input_size == 100 + 50  # words and characters only


@pytest.mark.parametrize(("kwargs", "message"), [({"hidden": 0}, "hidden must be >= 1, got 0"),
                                                 ({"dropout": 1.5}, r"dropout must be in \[0, 1\], got 1.5"),
                                                 ({"head": "mlp"}, "head must be 'linear' or 'engine_mlp'"),
                                                 ({"predicate_pos_dim": -1}, "predicate_pos_dim must be >= 0")])
def test_bilstm_settings_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BiLSTMTagger(10, 10, 3, True, **kwargs)


def test_shared_layers_train_in_the_task_and_reload(tmp_path: Path, srl_files: tuple[Path, Path]) -> None:
    trainer = fit_small(tmp_path, srl_files, epochs=12, layers=2, shared_layers=1, predicate_hidden=24)[1]
    assert trainer.callback_metrics["val_f1"] > 0.9
    reloaded = load_labeler(trainer.checkpoint_callback.best_model_path)
    assert reloaded.net.shared_layers == 1 and reloaded.net.lstm.hidden_size == 24
    tags = label_sentences(reloaded, [make_sentence(["the", "man", "saw", "a", "dog"], None, 2)])[0]
    assert tags[1:4] == ["B-ARG0", "B-V", "B-ARG1"]


def test_engine_mlp_head_trains_in_the_task(tmp_path: Path, srl_files: tuple[Path, Path]) -> None:
    trainer = fit_small(tmp_path, srl_files, epochs=10, head="engine_mlp", head_hidden=32, crf=False)[1]
    assert trainer.callback_metrics["val_f1"] > 0.9


def test_transformer_from_config_trains_and_reloads(tmp_path: Path, srl_files: tuple[Path, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BP_APPS_CACHE", str(tmp_path / "cache"))
    model, trainer = fit_small(tmp_path, srl_files, epochs=8, net=TransformerTagger, hidden=32, layers=1, heads=2,
                               optim={"lr": 0.003}, data_args={"tokenizer_vocab_size": 200})
    assert trainer.callback_metrics["val_f1"] > 0.5
    tokenizer_file = Path(trainer.datamodule.tokenizer_file)
    assert tokenizer_file.parent == tmp_path / "cache" / "labeling" and tokenizer_file.is_file()
    assert model.hparams.tokenizer_file == str(tokenizer_file)
    tokenizer_file.unlink()  # the checkpoint carries the tokenizer
    loaded = load_labeler(last_checkpoint(trainer))
    sentences = [make_sentence(r["tokens"], predicate=r["predicate"]) for r in synthetic_srl(10, 5)]
    assert label_sentences(loaded, sentences) == label_sentences(model.eval(), sentences)
    long = make_sentence(["the"] * 30, predicate=3)
    with pytest.warns(UserWarning, match="windows of 10"):
        assert len(label_sentences(loaded, [long], max_window=10)[0]) == 30


def test_pretrained_encoder_from_a_local_directory(tmp_path: Path, srl_files: tuple[Path, Path]) -> None:
    """model='pretrained' loads save_pretrained files (as a hub name would be); the checkpoint is
    then self-contained: it loads after the directory is gone."""
    import shutil

    from transformers import BertConfig, BertForTokenClassification

    from bp_apps.text.tokenization import train_tokenizer

    records = synthetic_srl(50, 9)
    tokenizer = train_tokenizer((" ".join(r["tokens"]) for r in records), vocab_size=120)
    encoder = BertForTokenClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=3))
    directory = tmp_path / "tiny-bert"
    encoder.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    model, trainer = fit_small(tmp_path / "run", srl_files, epochs=1, net=PretrainedTagger, name=str(directory))
    assert model.net.model.config.num_labels == len(model.vocab.labels)
    shutil.rmtree(directory)
    loaded = load_labeler(last_checkpoint(trainer))
    sentences = [make_sentence(r["tokens"], predicate=r["predicate"]) for r in records[:5]]
    assert label_sentences(loaded, sentences) == label_sentences(model.eval(), sentences)


def test_taggers_say_what_they_need() -> None:
    with pytest.raises(ValueError, match="PretrainedTagger needs name"):
        PretrainedTagger(10, 10, 3, False)
    with pytest.raises(ValueError, match=r"needs the sub-word tokenizer.*tokenizer_vocab_size"):
        TransformerTagger(10, 10, 3, False)
    with pytest.raises(TypeError, match="head"):  # the engine MLP head is a BiLSTM setting
        TransformerTagger(10, 10, 3, False, head="engine_mlp")


def test_labeler_settings_are_checked_and_the_network_is_built_from_the_vocabulary_file(
        tmp_path: Path, srl_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BP_APPS_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="lr must be positive"):
        TokenLabeler(optim={"lr": -1.0})
    with pytest.raises(ValueError, match="optim: unknown setting"):
        TokenLabeler(optim={"learning_rate": 0.1})
    with pytest.raises(ValueError, match="label_smoothing applies to the per-token cross-entropy"):
        TokenLabeler(label_smoothing=0.1)
    defaults = TokenLabeler(optim={"lr": 0.01}).optim  # a mapping overrides the labeler's defaults field by field
    assert (defaults.lr, defaults.scheduler, defaults.warmup_fraction, defaults.max_grad_norm) == (0.01, "cosine",
                                                                                                  0.05, 5.0)
    with pytest.raises(ValueError, match="needs vocab_file"):
        TokenLabeler().setup("fit")

    data = LabelingDataModule(str(srl_files[0]), str(srl_files[1]), min_word_freq=1)
    assert data.tokenizer_file is None and not Path(data.vocab_file).exists()  # nothing is read in __init__
    data.prepare_data()
    content = json.loads(Path(data.vocab_file).read_text())
    assert content["has_predicates"] is True and "B-ARG0" in content["labels"]
    model = TokenLabeler(net=partial(BiLSTMTagger, hidden=8, layers=1), vocab_file=data.vocab_file)
    model.setup("fit")
    assert model.net.word_embed.num_embeddings == len(content["words"]) and model.net.predicate_embed is not None
    assert list(model.crf.labels) == content["labels"]
    with pytest.raises(ValueError, match="takes no tokenizer"):
        TokenLabeler(vocab_file=data.vocab_file, tokenizer_file=str(srl_files[0])).setup("fit")


def test_the_data_refuses_a_model_of_another_vocabulary(tmp_path: Path, srl_files: tuple[Path, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    monkeypatch.setenv("BP_APPS_CACHE", str(tmp_path))
    data = LabelingDataModule(str(srl_files[0]), str(srl_files[1]), min_word_freq=1)
    other = LabelingDataModule(str(srl_files[0]), str(srl_files[1]), min_word_freq=1, max_words=5)
    other.prepare_data()
    model = TokenLabeler(vocab_file=other.vocab_file)
    data.trainer = SimpleNamespace(lightning_module=model)
    with pytest.raises(ValueError, match=r"built for another vocabulary.*vocab_file="):
        data.setup("fit")
    model.setup("fit")  # built: its vocabulary is compared
    with pytest.raises(ValueError, match="built for another vocabulary"):
        data.setup("fit")
    data.trainer = SimpleNamespace(lightning_module=TokenLabeler(vocab_file=data.vocab_file))
    data.setup("fit")


def test_spans_tokenizer_and_predicate_lookup() -> None:
    tokens = ["I", "saw", "the", "big", "dog", "."]
    tags = ["B-ARG0", "B-V", "B-ARG1", "I-ARG1", "I-ARG1", "O"]
    assert spans_of(tokens, tags) == [{"label": "ARG0", "start": 0, "end": 1, "text": "I"},
                                      {"label": "V", "start": 1, "end": 2, "text": "saw"},
                                      {"label": "ARG1", "start": 2, "end": 5, "text": "the big dog"}]
    assert spans_of(["a", "b"], ["I-X", "I-Y"]) == [{"label": "X", "start": 0, "end": 1, "text": "a"},
                                                   {"label": "Y", "start": 1, "end": 2, "text": "b"}]
    assert tokenize_text("Don't stop, e.g. at 3.14 -- ok?") == ["Don't", "stop", ",", "e.g", ".", "at", "3.14",
                                                                   "-", "-", "ok", "?"]
    assert resolve_predicate(tokens, "SAW") == 1 and resolve_predicate(tokens, "4") == 4


def test_a_checkpoint_describing_a_huge_network_is_refused_before_building_it(
        trained: tuple[TokenLabeler, L.Trainer], tmp_path: Path) -> None:
    """The labeler builds its network from the checkpoint's vocabulary at load: the size check builds it on the
    meta device first, so a crafted width is refused before any memory is allocated."""
    _, trainer = trained
    path = tmp_path / "huge.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert TokenLabeler.load(path) is not None  # as saved, it loads
    net = checkpoint["hyper_parameters"]["net"]
    checkpoint["hyper_parameters"]["net"] = {**net, "init_args": {**net["init_args"], "hidden": 300_000}}
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"huge\.ckpt: its hyperparameters .*describe a model of [\d,]+ weights"):
        TokenLabeler.load(path)
