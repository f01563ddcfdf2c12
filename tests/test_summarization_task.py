"""The summarization task: ROUGE, the seq2seq networks, the settings groups, learning a toy copy task,
checkpoints, ``hf_best``, the pretrained path (offline, from a local directory) and the prediction helpers' errors.

Batches are built here through the data module contract (a tokenizer file written in ``prepare_data`` and exposed
as ``tokenizer_file`` with ``max_source_tokens``; batches of ``input_ids``, ``attention_mask``, ``labels`` without
the leading [CLS] and padded with -100, ``sources``, ``references``, ``ids``) by a tiny in-test data module.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import random
import shutil
import tempfile
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import lightning as L
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from bp_apps.core.callbacks import task_callbacks
from bp_apps.core.task import OptimizerConfig
from bp_apps.text.summarization.data import load_tokenizer_file, save_tokenizer_file
from bp_apps.text.summarization.models import (
    BartNet,
    PretrainedNet,
    T5Net,
    build_seq2seq,
    load_pretrained_seq2seq,
)
from bp_apps.text.summarization.rouge import rouge_scores, split_sentences
from bp_apps.text.summarization.task import (
    DEFAULT_OPTIM,
    GenerationSettings,
    HFBestExport,
    Summarizer,
    export_pretrained,
    load_summarizer,
    summarize,
)
from bp_apps.text.tokenization import train_tokenizer

WORDS = ["red", "blue", "green", "cat", "dog", "bird", "runs", "jumps", "sleeps", "big", "small", "old", "new", "fast",
         "slow", "happy"]
TINY = {"d_model": 32, "layers": 1, "heads": 2, "ff": 64, "dropout": 0.0}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and busy cores make spinning ones very slow: use one here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- ROUGE


def test_rouge_identical_and_disjoint() -> None:
    assert rouge_scores(["the cat sat on the mat."], [["the cat sat on the mat."]]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0})
    scores = rouge_scores(["the cat sat", "a b c"], [["the cat sat"], ["x y z"]])
    assert scores == pytest.approx({"rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.5, "rougeLsum": 0.5})


def test_rouge_exact_overlap_and_stemming() -> None:
    # stems: [the, cat, sat] vs [the, cat, was, run]: 2 shared unigrams (P 2/3, R 2/4), 1 shared bigram (1/2, 1/3)
    scores = rouge_scores(["The cat sat"], [["the cat was running"]])
    assert scores["rouge1"] == pytest.approx(4 / 7)
    assert scores["rouge2"] == pytest.approx(2 / 5)
    assert scores["rougeL"] == pytest.approx(4 / 7)
    assert rouge_scores(["run"], [["running"]])["rouge1"] == pytest.approx(1.0)
    assert rouge_scores(["run"], [["running"]], use_stemmer=False)["rouge1"] == 0.0


def test_rouge_best_reference_and_sentence_level_lsum() -> None:
    assert rouge_scores(["the cat"], [["a dog", "the cat", "the"]])["rouge1"] == pytest.approx(1.0)
    # the mean over the references: F1 0, 1 and 2/3 ("the" matches one of the two predicted words)
    mean = rouge_scores(["the cat"], [["a dog", "the cat", "the"]], multi_reference="mean")
    assert mean["rouge1"] == pytest.approx((0 + 1 + 2 / 3) / 3)
    with pytest.raises(ValueError, match="multi_reference"):
        rouge_scores(["a"], [["a"]], multi_reference="max")
    # sentences swapped: the summary-level LCS (rougeL) finds 2 of 4 words, the per-sentence union (Lsum) all 4
    scores = rouge_scores(["a b. c d."], [["c d. a b."]])
    assert scores["rougeL"] == pytest.approx(0.5)
    assert scores["rougeLsum"] == pytest.approx(1.0)
    assert split_sentences(" One. Two!  Three?\nfour five ") == ["One.", "Two!", "Three?", "four five"]


def test_rouge_empty_and_mismatched() -> None:
    assert rouge_scores([], []) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        rouge_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="example 0"):
        rouge_scores(["a"], ["a"])


# ---------------------------------------------------------------- a toy copy task through the batch contract


def copy_pairs(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(id, source, target): 4-7 random words; the summary is the first three."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 7))]
        rows.append((f"{seed}-{i}", " ".join(words), " ".join(words[:3])))
    return rows


def make_batch(tokenizer: Any, rows: list[tuple[str, str, str]]) -> dict[str, Any]:
    encoded = tokenizer([source for _, source, _ in rows], padding=True, return_tensors="pt")
    targets = [ids[1:] for ids in tokenizer([target for *_, target in rows])["input_ids"]]  # drop [CLS]
    labels = torch.full((len(rows), max(map(len, targets))), -100, dtype=torch.long)
    for i, ids in enumerate(targets):
        labels[i, : len(ids)] = torch.tensor(ids)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels,
            "sources": [s for _, s, _ in rows], "references": [(t,) for *_, t in rows], "ids": [i for i, *_ in rows]}


TOKENIZERS = Path(tempfile.mkdtemp(prefix="bp_apps_copy_tokenizers_"))
atexit.register(shutil.rmtree, TOKENIZERS, ignore_errors=True)  # made at import (the data modules need a path)


class CopyData(L.LightningDataModule):
    """Copy-the-first-three-words pairs. ``prepare_data`` writes the tokenizer (trained on the training sources, or
    the ``pretrained`` directory's) to ``tokenizer_file``, a path known after ``__init__``; ``setup`` reads it."""

    max_source_tokens, max_target_tokens = 16, 8

    def __init__(self, n_train: int = 400, n_val: int = 48, vocab_size: int = 200, pretrained: str | None = None
                 ) -> None:
        super().__init__()
        self.tokenizer: Any = None
        self.train_rows, self.val_rows, self.vocab_size = copy_pairs(n_train, 0), copy_pairs(n_val, 1), vocab_size
        self.pretrained = pretrained
        digest = hashlib.sha256(str(pretrained).encode()).hexdigest()[:12]
        name = f"pretrained-{digest}" if pretrained else f"copy-{n_train}-{vocab_size}"
        self.tokenizer_file = str(TOKENIZERS / f"{name}.json")

    def prepare_data(self) -> None:
        """Write the tokenizer file once (training twice may give other ids: trainers break ties by hash order)."""
        if Path(self.tokenizer_file).is_file():
            return
        if self.pretrained:
            tokenizer = AutoTokenizer.from_pretrained(self.pretrained)
        else:
            tokenizer = train_tokenizer([s for _, s, _ in self.train_rows], vocab_size=self.vocab_size)
        save_tokenizer_file(self.tokenizer_file, tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer_file(self.tokenizer_file)

    def _loader(self, rows: list, shuffle: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(rows, batch_size=16 if shuffle else 48, shuffle=shuffle,
                                           collate_fn=lambda r: make_batch(self.tokenizer, r))

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.train_rows, True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.val_rows, False)

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.val_rows, False)


def summarizer(data: CopyData | None, net: Any = BartNet, lr: float = 0.005, **settings: Any) -> Summarizer:
    """A Summarizer for ``data`` (its tokenizer file and lengths, as bp-apps links them) with a TINY ``net``;
    ``settings`` are generation fields, or Summarizer arguments."""
    fields = set(GenerationSettings.__dataclass_fields__)
    generation = {k: v for k, v in settings.items() if k in fields}
    rest = {k: v for k, v in settings.items() if k not in fields}
    links = {} if data is None else {"tokenizer_file": data.tokenizer_file, "max_source_tokens": data.max_source_tokens,
                                     "max_target_tokens": data.max_target_tokens}
    if isinstance(net, type) and net is not PretrainedNet:
        net = partial(net, **TINY)
    return Summarizer(net=net, optim={"lr": lr, "warmup_fraction": 0.0}, generation=generation, **links, **rest)


def built(net: Any = BartNet, **settings: Any) -> Summarizer:
    """A Summarizer with its network built for a small trained tokenizer (no data module)."""
    model = summarizer(None, net, **settings)
    model.build(train_tokenizer([s for _, s, _ in copy_pairs(20, 0)], vocab_size=80))
    return model


def small_trainer(root: Path, epochs: int, **kwargs: Any) -> L.Trainer:
    kwargs.setdefault("logger", L.pytorch.loggers.CSVLogger(root))
    return L.Trainer(max_epochs=epochs, accelerator="cpu", default_root_dir=root, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def config_callbacks() -> list[L.Callback]:
    """The callbacks the summarization configs list: best (val_rouge1) and last checkpoints, metrics.json, hf_best."""
    return [*task_callbacks("val_rouge1", "max"), HFBestExport()]


def last_checkpoint(trainer: L.Trainer) -> Path:
    """The run's ``last.ckpt`` (next to the best checkpoint)."""
    return Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"


class Fitted(NamedTuple):
    model: Summarizer
    trainer: L.Trainer
    before: float  # val_rouge1 of the untrained weights
    after: float  # val_rouge1 after fitting


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    """A tiny BART fitted on the copy task."""
    root = tmp_path_factory.mktemp("fit")
    L.seed_everything(0, verbose=False)
    data = CopyData()
    model = summarizer(data, BartNet, num_beams=2, max_new_tokens=6)
    untrained = small_trainer(root / "untrained", 1, logger=False, enable_checkpointing=False)
    untrained.validate(model, datamodule=data, verbose=False)
    before = float(untrained.callback_metrics["val_rouge1"])
    trainer = small_trainer(root, 16, callbacks=config_callbacks())
    trainer.fit(model, datamodule=data)
    return Fitted(model, trainer, before, float(trainer.callback_metrics["val_rouge1"]))


def test_fit_learns_the_copy_task(trained: Fitted) -> None:
    trainer, before, after = trained.trainer, trained.before, trained.after
    assert before < 0.4 and after > 0.8 and after > before + 0.4
    logged = set(trainer.callback_metrics)
    assert {"val_rouge2", "val_rougeL", "val_rougeLsum", "val_loss", "train_loss_epoch"} <= logged
    metrics = json.loads((Path(trainer.log_dir) / "metrics.json").read_text())
    assert metrics["validation"]["val_rouge1"] == pytest.approx(after)
    assert Path(metrics["best_checkpoint"]).is_file() and metrics["best_val_rouge1"] >= after
    assert metrics["generation"]["num_beams"] == 2 and metrics["mbr"] == {"mbr_samples": 0, "mbr_epsilon": 0.02}
    samples = metrics["samples"]["val"]
    assert len(samples) == 3 and samples[0]["id"] == "1-0"
    assert samples[0]["references"] == [copy_pairs(1, 1)[0][2]] and samples[0]["prediction"]


def test_test_writes_predictions_and_metrics(trained: Fitted) -> None:
    model, trainer = trained.model, trained.trainer
    trainer.test(model, datamodule=trainer.datamodule, verbose=False)
    lines = (Path(trainer.log_dir) / "predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 48 and set(records[0]) == {"id", "source", "references", "prediction"}
    rows = copy_pairs(48, 1)
    assert [(r["id"], r["source"], r["references"]) for r in records] == [(i, s, [t]) for i, s, t in rows]
    correct = sum(r["prediction"] == r["references"][0] for r in records)
    assert correct >= 40
    metrics = json.loads((Path(trainer.log_dir) / "metrics.json").read_text())
    assert metrics["test"]["test_rouge1"] > 0.9 and "val_rouge1" in metrics["validation"]
    assert metrics["test"]["test_rouge1_refmean"] == metrics["test"]["test_rouge1"]  # one reference: same figure
    assert len(metrics["samples"]["test"]) == 3


def test_checkpoint_round_trip_gives_identical_summaries(trained: Fitted) -> None:
    model, trainer = trained.model, trained.trainer
    loaded = load_summarizer(last_checkpoint(trainer))  # the weights the model ends with
    assert not loaded.training and loaded.max_source_tokens == 16
    assert loaded.hparams.net == {"class_path": "bp_apps.text.summarization.models.BartNet", "init_args": TINY}
    assert loaded.generation == GenerationSettings(num_beams=2, max_new_tokens=6)
    assert loaded.optim == OptimizerConfig(**{**vars(DEFAULT_OPTIM), "lr": 0.005, "warmup_fraction": 0.0})
    texts = [source for _, source, _ in copy_pairs(12, 5)]
    expected = summarize(model, texts, batch_size=5)
    assert summarize(loaded, texts, batch_size=5) == expected
    assert sum(e == " ".join(t.split()[:3]) for e, t in zip(expected, texts)) >= 10
    short = summarize(loaded, texts[:4], num_beams=1, max_new_tokens=2)  # generation overrides reach generate
    assert short != expected[:4] and all(len(s.split()) <= 1 for s in short)


def test_loaded_model_validates_on_data_with_the_same_tokenizer_file(trained: Fitted, tmp_path: Path) -> None:
    """The loaded model needs no tokenizer file (the checkpoint carries the tokenizer); a fresh data module with the
    same settings encodes with the same tokenizer, so the scores do not change."""
    file = Path(CopyData().tokenizer_file)
    file.rename(file.with_suffix(".away"))
    try:
        loaded = load_summarizer(last_checkpoint(trained.trainer))  # the checkpoint alone is enough
    finally:
        file.with_suffix(".away").rename(file)
    assert loaded.hparams.tokenizer_file == str(file)
    data = CopyData()
    validator = small_trainer(tmp_path, 1, logger=False, enable_checkpointing=False)
    validator.validate(loaded, datamodule=data, verbose=False)
    assert data.tokenizer.get_vocab() == loaded.tokenizer.get_vocab()
    assert float(validator.callback_metrics["val_rouge1"]) == pytest.approx(trained.after)


def test_a_checkpoint_of_another_tokenizer_is_refused(trained: Fitted, tmp_path: Path) -> None:
    """Built from a data module's tokenizer file (as bp-apps does before ``--ckpt_path`` restores weights), the module
    refuses a checkpoint whose tokenizer differs: the data would encode with other ids."""
    data = CopyData(vocab_size=60)
    model = summarizer(data, BartNet, num_beams=1, max_new_tokens=4)
    validator = small_trainer(tmp_path, 1, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"checkpoint's tokenizer is not the data's \(.*copy-400-60\.json\)"):
        validator.validate(model, datamodule=data, ckpt_path=last_checkpoint(trained.trainer), verbose=False)


def test_setup_needs_a_tokenizer_file(tmp_path: Path) -> None:
    validator = small_trainer(tmp_path, 1, logger=False, enable_checkpointing=False)
    data = CopyData(n_train=32, n_val=8)
    with pytest.raises(ValueError, match="Summarizer needs tokenizer_file"):
        validator.validate(summarizer(None, BartNet), datamodule=data, verbose=False)


def test_hf_best_matches_the_best_checkpoint(trained: Fitted) -> None:
    best = Path(trained.trainer.checkpoint_callback.best_model_path)
    directory = best.parent / "hf_best"
    hf_model, hf_tokenizer = AutoModelForSeq2SeqLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    assert [p.name for p in best.parent.iterdir() if p.name.startswith(".")] == []  # no temporary folders left
    texts = [source for _, source, _ in copy_pairs(6, 7)]
    encoded = hf_tokenizer(texts, padding=True, return_tensors="pt")
    ids = hf_model.generate(**{k: encoded[k] for k in ("input_ids", "attention_mask")}, num_beams=1, max_new_tokens=6)
    from_hf = [t.strip() for t in hf_tokenizer.batch_decode(ids, skip_special_tokens=True)]
    from_best = load_summarizer(best)
    assert from_hf == summarize(from_best, texts, num_beams=1, max_new_tokens=6)
    best_weights = from_best.model.state_dict()
    assert all(torch.equal(value, best_weights[key]) for key, value in hf_model.state_dict().items())


def test_export_pretrained_replaces_an_older_export(tmp_path: Path) -> None:
    tokenizer = train_tokenizer([s for _, s, _ in copy_pairs(50, 0)], vocab_size=100)
    first = build_seq2seq("t5", len(tokenizer), 0, 3, 2, **TINY)
    second = build_seq2seq("t5", len(tokenizer), 0, 3, 2, **TINY)
    export_pretrained(first, tokenizer, tmp_path / "hf_best")
    (tmp_path / "hf_best" / "stale.txt").write_text("from the first export")
    export_pretrained(second, tokenizer, tmp_path / "hf_best")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_best"]
    assert not (tmp_path / "hf_best" / "stale.txt").exists()
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf_best")
    assert torch.equal(reloaded.shared.weight, second.shared.weight)


def test_hf_best_export_follows_new_best_scores_only(tmp_path: Path) -> None:
    """Exported when a save follows a new best score; not for a resumed fit's restored best path, a non-improving
    save, or at the end of a fit that has a scored best; at fit end when no best exists."""
    module = built(T5Net)
    checkpoints = SimpleNamespace(best_model_path=str(tmp_path / "a.ckpt"), best_model_score=torch.tensor(0.5),
                                  monitor="val_rouge1", dirpath=str(tmp_path))
    last = SimpleNamespace(best_model_path=str(tmp_path / "last.ckpt"), best_model_score=None, monitor=None,
                           dirpath=str(tmp_path))
    trainer = SimpleNamespace(checkpoint_callback=last, checkpoint_callbacks=[last, checkpoints], callback_metrics={},
                              is_global_zero=True, default_root_dir=str(tmp_path))
    export = HFBestExport()
    export.on_save_checkpoint(trainer, module, {})  # resumed: the restored best, no metric computed yet
    export.on_fit_end(trainer, module)
    trainer.callback_metrics = {"val_rouge1": torch.tensor(0.4)}
    export.on_save_checkpoint(trainer, module, {})  # a validation that did not improve
    assert not (tmp_path / "hf_best").exists() and export.exported is None
    checkpoints.best_model_path, checkpoints.best_model_score = str(tmp_path / "b.ckpt"), torch.tensor(0.6)
    trainer.callback_metrics = {"val_rouge1": torch.tensor(0.6)}
    export.on_save_checkpoint(trainer, module, {})
    assert (tmp_path / "hf_best" / "config.json").is_file() and export.exported == str(tmp_path / "b.ckpt")

    trainer.checkpoint_callbacks = [SimpleNamespace(best_model_path="", best_model_score=None, monitor="val_rouge1",
                                                    dirpath=str(tmp_path / "none"))]
    HFBestExport().on_fit_end(trainer, module)
    assert (tmp_path / "none" / "hf_best" / "config.json").is_file()


# ---------------------------------------------------------------- architectures, pretrained models, options


@pytest.mark.parametrize("net, arch", [(T5Net, "t5"), (BartNet, "bart")])
def test_both_archs_build_and_take_a_step(net: type, arch: str, tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    data = CopyData(n_train=32, n_val=8)
    model = summarizer(data, net, num_beams=2, max_new_tokens=4)
    trainer = small_trainer(tmp_path, 1, fast_dev_run=1)
    trainer.fit(model, datamodule=data)
    config, tokenizer = model.model.config, data.tokenizer
    assert config.model_type == arch and config.d_model == 32 and config.vocab_size == len(tokenizer)
    assert tokenizer.get_vocab() == model.tokenizer.get_vocab()  # both read the data module's tokenizer file
    assert (config.decoder_start_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    assert torch.isfinite(trainer.callback_metrics["train_loss"]) and "val_rouge1" in trainer.callback_metrics
    assert trainer.global_step == 1
    batch = make_batch(tokenizer, copy_pairs(2, 3))
    assert model(batch).shape == (2, batch["labels"].shape[1], len(tokenizer))


@pytest.mark.parametrize("net", [T5Net, BartNet])
def test_loss_without_smoothing_is_the_models_cross_entropy(net: type) -> None:
    """Logits and labels are aligned and padding (-100) is ignored: with no smoothing, the model's own loss; with
    smoothing e, the usual mixture with the mean over the vocabulary."""
    tokenizer = train_tokenizer([s for _, s, _ in copy_pairs(50, 0)], vocab_size=100)
    batch = make_batch(tokenizer, [*copy_pairs(5, 4), ("short", "red cat runs", "red")])
    assert (batch["labels"] == -100).sum() == 2
    model = summarizer(None, net, label_smoothing=0.0)
    model.build(tokenizer)
    model.eval()
    with torch.no_grad():
        expected = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               labels=batch["labels"]).loss
        assert float(model.loss(batch)) == pytest.approx(float(expected), rel=1e-5)
        model.hparams.label_smoothing = 0.1  # (1 - e) * NLL + e * mean over the vocabulary of -log p
        log_p = model(batch).log_softmax(-1)[batch["labels"] != -100]
        smoothed = 0.9 * expected - 0.1 * log_p.mean(-1).mean()
        assert float(model.loss(batch)) == pytest.approx(float(smoothed), rel=1e-5)


def test_build_seq2seq_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        build_seq2seq("t5", 100, 0, 3, 2, d_model=30, heads=4)
    with pytest.raises(ValueError, match="not divisible"):
        T5Net(100, 0, 2, 3, 64, d_model=30, heads=4)
    with pytest.raises(ValueError, match="arch must be"):
        build_seq2seq("gpt", 100, 0, 3, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a pad token, a start token"):
        BartNet(100, 0, None, 3, 64)  # type: ignore[arg-type]  # a tokenizer without [CLS] or BOS


@pytest.mark.parametrize("arguments, message", [
    ({"generation": {"min_new_tokens": 5, "max_new_tokens": 4}}, r"0 <= min_new_tokens <= max_new_tokens"),
    ({"generation": {"max_new_tokens": 0, "min_new_tokens": 0}}, "max_new_tokens >= 1"),
    ({"generation": {"num_beams": 0}}, "num_beams must be >= 1"),
    ({"generation": {"no_repeat_ngram_size": -1}}, "no_repeat_ngram_size must be >= 0"),
    ({"generation": {"length_penalty": float("nan")}}, "length_penalty must be a finite number"),
    ({"generation": {"beams": 4}}, r"generation: unknown setting\(s\) beams"),
    ({"optim": {"lr": 0.0}}, "lr must be positive"),
    ({"optim": {"warmup_fraction": 1.0}}, r"warmup_fraction must be in \[0, 1\)"),
    ({"optim": {"scheduler": "linear"}}, "scheduler must be 'constant' or 'cosine'"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
    ({"val_generate_limit": 0}, "val_generate_limit must be >= 1 or None"),
    ({"net": "bart"}, "net: expected a network class"),
    ({"net": {"class_path": "os.system"}}, "outside the modules a saved network may name"),
])
def test_bad_settings_name_the_field(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Summarizer(**arguments)


def test_settings_groups_keep_the_task_defaults() -> None:
    """A mapping changes only the fields it names; the hyperparameters are plain data."""
    model = Summarizer(optim={"lr": 0.003}, generation={"num_beams": 2})
    assert model.optim == OptimizerConfig(**{**vars(DEFAULT_OPTIM), "lr": 0.003})
    assert model.optim.no_decay_keys and model.optim.scheduler == "cosine" and model.optim.max_grad_norm == 1.0
    assert model.generation == GenerationSettings(num_beams=2)
    assert model.hparams.generation == {**vars(GenerationSettings()), "num_beams": 2}
    assert model.hparams.net == {"class_path": "bp_apps.text.summarization.models.T5Net", "init_args": {}}
    assert model.generation_kwargs(num_beams=1) == {k: v for k, v in model.generation_kwargs().items()
                                                    if k != "length_penalty"} | {"num_beams": 1}
    with pytest.raises(ValueError, match="mbr_samples must be >= 0"):
        model.generation_kwargs(mbr_samples=-1)  # an override is checked like the group


class NotSeq2Seq(torch.nn.Module):
    def __init__(self, *sizes: int) -> None:
        super().__init__()


def test_a_network_that_is_not_a_seq2seq_net_is_refused() -> None:
    model = Summarizer(net=NotSeq2Seq)
    with pytest.raises(ValueError, match="net: NotSeq2Seq is not a Seq2SeqNet"):
        model.build(train_tokenizer([s for _, s, _ in copy_pairs(20, 0)], vocab_size=80))


def save_tiny_pretrained(directory: Path) -> tuple[Any, Any]:
    tokenizer = train_tokenizer([s for _, s, _ in copy_pairs(100, 9)], vocab_size=120, kind="unigram")
    model = build_seq2seq("t5", len(tokenizer), tokenizer.pad_token_id, tokenizer.sep_token_id, tokenizer.cls_token_id,
                          d_model=16, layers=1, heads=2, ff=32, dropout=0.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def test_load_pretrained_seq2seq_from_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved, tokenizer = save_tiny_pretrained(tmp_path / "tiny")
    model, loaded_tokenizer = load_pretrained_seq2seq(str(tmp_path / "tiny"))
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))


def test_pretrained_net_with_the_data_modules_copy_of_its_tokenizer(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The model comes from the directory, the tokenizer from the data module's file of the same directory's
    tokenizer; the checkpoint then loads after both are gone."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, tokenizer = save_tiny_pretrained(tmp_path / "tiny")
    L.seed_everything(0, verbose=False)
    data = CopyData(n_train=64, n_val=8, pretrained=str(tmp_path / "tiny"))
    model = summarizer(data, partial(PretrainedNet, name_or_dir=str(tmp_path / "tiny")), num_beams=1,
                       max_new_tokens=4)
    trainer = small_trainer(tmp_path / "run", 1)
    trainer.fit(model, datamodule=data)
    assert data.tokenizer.get_vocab() == tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert model.model.config.d_model == 16
    assert model.hparams.net == {"class_path": "bp_apps.text.summarization.models.PretrainedNet",
                                 "init_args": {"name_or_dir": str(tmp_path / "tiny")}}
    Path(data.tokenizer_file).unlink()
    shutil.rmtree(tmp_path / "tiny")
    loaded = load_summarizer(trainer.checkpoint_callback.best_model_path)  # Lightning's default: the newest epoch
    texts = [source for _, source, _ in copy_pairs(4, 2)]
    assert summarize(loaded, texts, max_source_tokens=64) == summarize(model, texts, max_source_tokens=64)


def test_pretrained_net_refuses_a_tokenizer_that_does_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, tokenizer = save_tiny_pretrained(tmp_path / "tiny")
    name = str(tmp_path / "tiny")
    with pytest.raises(ValueError, match=r"does not fit the pretrained model .*10000 tokens.*tokenizer_name="):
        PretrainedNet(10_000, tokenizer.pad_token_id, None, tokenizer.sep_token_id, 512, name_or_dir=name)
    with pytest.raises(ValueError, match="pad id 7, the model's is 0"):
        PretrainedNet(len(tokenizer), 7, None, tokenizer.sep_token_id, 512, name_or_dir=name)


def test_val_generate_limit_caps_generation(tmp_path: Path) -> None:
    data = CopyData(n_train=32, n_val=20)
    model = summarizer(data, BartNet, num_beams=1, max_new_tokens=3, val_generate_limit=5, sample_generations=9)
    trainer = small_trainer(tmp_path, 1, logger=False, enable_checkpointing=False)
    trainer.validate(model, datamodule=data, verbose=False)
    assert [s["id"] for s in model.samples["val"]] == [f"1-{i}" for i in range(5)]
    assert "val_loss" in trainer.callback_metrics


def test_optimizer_groups_skip_decay_on_embeddings_norms_and_biases() -> None:
    model = Summarizer(net=partial(BartNet, **TINY), optim={"weight_decay": 0.1})
    model.build(train_tokenizer([s for _, s, _ in copy_pairs(20, 0)], vocab_size=80))
    groups = model.configure_optimizers()["optimizer"].param_groups
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    net = model.model.model
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.1, 0.0)
    assert id(net.encoder.layers[0].fc1.weight) in decay
    for p in (net.shared.weight, net.encoder.embed_positions.weight, net.encoder.layers[0].fc1.bias,
              net.encoder.layers[0].self_attn_layer_norm.weight):
        assert id(p) in no_decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


# ---------------------------------------------------------------- errors


def test_summarize_errors_and_truncation(trained: Fitted) -> None:
    model = trained.model
    with pytest.raises(ValueError, match="text 1 is empty"):
        summarize(model, ["red cat runs", "  \n "])
    with pytest.raises(ValueError, match="text 0 is empty"):
        summarize(model, [""])
    assert summarize(model, []) == []
    with pytest.warns(UserWarning, match="1 of 2 texts are longer than 5 tokens"):
        out = summarize(model, ["red cat runs", "red cat runs fast and big dogs sleep"], max_source_tokens=5)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    model.train()
    try:
        summarize(model, ["red cat runs"])
        assert model.training  # summarize generates in eval mode, then restores the module's mode
    finally:
        model.eval()


def test_load_summarizer_refuses_bad_files(tmp_path: Path, trained: Fitted) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        load_summarizer(tmp_path / "missing.ckpt")
    other = tmp_path / "other.ckpt"
    torch.save({"bp_apps_task": "text.TokenLabeler", "state_dict": {}}, other)
    with pytest.raises(ValueError, match=r"other\.ckpt: not a summarization checkpoint"):
        load_summarizer(other)
    ckpt = Path(trained.trainer.checkpoint_callback.best_model_path)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"truncated\.ckpt: not a loadable checkpoint"):
        load_summarizer(truncated)


def test_a_checkpoint_describing_a_huge_network_is_refused_before_building_it(trained: Fitted,
                                                                              tmp_path: Path) -> None:
    """The summarizer builds its network from the transformers configuration the checkpoint carries: the size check
    builds it on the meta device first, so a crafted width is refused before any memory is allocated."""
    checkpoint = torch.load(last_checkpoint(trained.trainer), weights_only=True)
    config = checkpoint["bp_apps_summarization"]["config"]
    checkpoint["bp_apps_summarization"]["config"] = {**config, "d_model": 64_000, "encoder_ffn_dim": 256_000,
                                                     "decoder_ffn_dim": 256_000}
    path = tmp_path / "huge.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"huge\.ckpt: its hyperparameters .*describe a model of [\d,]+ weights"):
        load_summarizer(path)
