"""The summarization BARTs of engine layers: Hugging Face's layout and initial weights, logits within 1e-5 (float32)
and gradients within 1e-10 (float64) for the plain and the copy BART, the pretrained path (a tiny save_pretrained
model), the same float32 loss trajectory as autograd with dropout on, and a fit through Lightning with checkpoint
reload, generation and the hf_best export."""

from __future__ import annotations

import math
import random
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from engine_checks import AUTOGRAD_TOL
from torch import Tensor
from transformers import AutoModelForSeq2SeqLM
from transformers.models.bart.modeling_bart import shift_tokens_right

from bp_apps.core.callbacks import task_callbacks
from bp_apps.engine import SoftmaxCrossEntropy
from bp_apps.engine.transformer import EngineBart
from bp_apps.experiments.compare_tasks import compare_task_modules
from bp_apps.text.summarization.copy import BartCopyForConditionalGeneration
from bp_apps.text.summarization.engine_models import EngineBartCopyNet, EngineBartNet
from bp_apps.text.summarization.models import BartCopyNet, BartNet, build_seq2seq
from bp_apps.text.summarization.task import HFBestExport, Summarizer, summarize
from bp_apps.text.tokenization import train_tokenizer

WORDS = ["red", "blue", "green", "cat", "dog", "bird", "runs", "jumps", "sleeps", "big", "small", "old", "new", "fast",
         "slow", "happy"]
TINY = {"d_model": 16, "layers": 2, "heads": 4, "ff": 32, "dropout": 0.2}
NETS = {"plain": (EngineBartNet, BartNet), "copy": (EngineBartCopyNet, BartCopyNet)}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """(source, summary): 4-7 random words, the summary is the first three."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 7))]
        rows.append((" ".join(words), " ".join(words[:3])))
    return rows


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_tokenizer([s for s, _ in pairs(100, 0)], vocab_size=80)


def make_batch(tokenizer: Any, rows: list[tuple[str, str]]) -> dict[str, Any]:
    """The data module's batch: padded sources, labels without [CLS] padded with -100, texts and ids."""
    encoded = tokenizer([s for s, _ in rows], padding=True, return_tensors="pt")
    targets = [ids[1:] for ids in tokenizer([t for _, t in rows])["input_ids"]]
    labels = torch.full((len(rows), max(map(len, targets))), -100, dtype=torch.long)
    for i, ids in enumerate(targets):
        labels[i, : len(ids)] = torch.tensor(ids)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels,
            "sources": [s for s, _ in rows], "references": [(t,) for _, t in rows], "ids": [str(i) for i in
                                                                                           range(len(rows))]}


def summarizer(tokenizer: Any, net: type, **kwargs: Any) -> Summarizer:
    module = Summarizer(net=partial(net, **TINY), optim={"lr": 0.003, "max_grad_norm": 1.0, "warmup_fraction": 0.0},
                        **kwargs)
    module.build(tokenizer)
    return module


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for name, value in state_a.items():
        assert torch.equal(value, state_b[name]), name


# ------------------------------------------------------------------ layout, weights, Hugging Face parity


@pytest.mark.parametrize("kind", NETS)
def test_engine_nets_have_the_autograd_nets_layout_and_initial_weights(kind: str) -> None:
    engine_cls, torch_cls = NETS[kind]
    torch.manual_seed(3)
    engine = engine_cls(50, 0, 1, 2, 24, **TINY)
    after_engine = torch.rand(1)
    torch.manual_seed(3)
    twin = torch_cls(50, 0, 1, 2, 24, **TINY)
    assert torch.equal(after_engine, torch.rand(1)), "building draws from the RNG as the autograd net does"
    same_state(engine, twin)
    same_state(engine, engine.to_autograd())
    engine.load_state_dict(twin.state_dict(), strict=True)
    twin.load_state_dict(engine.state_dict(), strict=True)
    assert [n for n, _ in engine.named_parameters()] == [n for n, _ in twin.named_parameters()]
    assert [n for n, _, _ in engine.param_grads()] == [n for n, _ in twin.named_parameters()]
    assert engine.backend == "engine" and all(not p.requires_grad for p in engine.parameters())
    assert engine.model.lm_head.weight is engine.model.model.shared.weight


def bart_batch(vocab: int = 40) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 9), generator=generator)
    ids[0, :3] = ids[0, 3]  # a repeated source id: the copy head adds its attention weights
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:], mask[2, 3:] = 0, 0
    ids[mask == 0] = 0
    labels = torch.randint(3, vocab, (3, 6), generator=generator)
    labels[0, 4:] = -100
    return ids, mask, labels, shift_tokens_right(labels, 0, 1)


@pytest.mark.parametrize("kind", NETS)
def test_engine_bart_logits_and_gradients_match_hugging_face(kind: str) -> None:
    """Logits within 1e-5 in float32; in float64 every gradient of the label-smoothed loss within 1e-10, with
    dropout drawing the same masks on both sides."""
    torch.manual_seed(0)
    hf_model = build_seq2seq("bart", 40, 0, 2, 1, d_model=16, layers=2, heads=4, ff=32, dropout=0.2,
                             max_positions=20, copy=kind == "copy").eval()
    engine = EngineBart(hf_model.config, copy=kind == "copy").eval()
    engine.load_state_dict(hf_model.state_dict(), strict=True)
    ids, mask, labels, decoder_ids = bart_batch()
    expected = hf_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(engine.forward(ids, mask, decoder_ids), expected, rtol=0, atol=1e-5)

    hf_model, engine = hf_model.double().train(), engine.double().train()
    state = torch.random.get_rng_state()
    logits = hf_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=0.1).backward()
    torch.random.set_rng_state(state)
    loss = SoftmaxCrossEntropy(label_smoothing=0.1)
    engine_logits = engine.forward(ids, mask, decoder_ids)
    loss.forward(engine_logits, labels)
    engine.backward(loss.backward())
    assert (engine_logits - logits).abs().max() <= 1e-12
    reference = {name: p.grad for name, p in hf_model.named_parameters()}
    floor = 1e-3 * max(float(g.abs().max()) for g in reference.values())  # the key biases' gradients are ~0
    errors = {name: float((g - reference[name]).abs().max()) / max(float(reference[name].abs().max()), floor)
              for name, _, g in engine.param_grads()}
    assert set(errors) == set(reference)
    assert max(errors.values()) <= AUTOGRAD_TOL, errors
    pad_row = engine.model.shared.weight_grad[0]
    torch.testing.assert_close(pad_row, reference["model.shared.weight"][0], rtol=0, atol=1e-12)
    assert torch.count_nonzero(pad_row), "the padding row's gradient is the output layer's alone"


def test_copy_gradient_is_zero_where_the_floor_clamps() -> None:
    torch.manual_seed(0)
    hf_model = build_seq2seq("bart", 40, 0, 2, 1, d_model=8, layers=1, heads=2, ff=16, dropout=0.0,
                             max_positions=20, copy=True)
    engine = EngineBart(hf_model.config, copy=True).double()
    engine.load_state_dict(hf_model.state_dict())
    with torch.no_grad():
        engine.final_logits_bias[0, 5:] = -80.0  # tokens 5.. are below the floor unless copied
    ids, mask, _, decoder_ids = bart_batch()
    log_probs = engine.forward(ids, mask, decoder_ids)
    clamped = log_probs <= math.log(1e-10)
    assert clamped.any()
    vocab_logits_grad = engine._copy_backward(torch.ones_like(log_probs), engine.saved[3])[0]
    # a clamped token's own probability gets no gradient, so its logit moves only through the softmax's sum
    grad = torch.ones_like(log_probs).masked_fill(clamped, 0.0)
    engine.forward(ids, mask, decoder_ids)
    torch.testing.assert_close(engine._copy_backward(grad, engine.saved[3])[0], vocab_logits_grad, rtol=0,
                               atol=1e-12)


def test_engine_bart_refuses_what_it_does_not_compute() -> None:
    config = build_seq2seq("bart", 30, 0, 2, 1, d_model=8, layers=1, heads=2, ff=16).config
    config.tie_word_embeddings = False
    with pytest.raises(ValueError, match="tie_word_embeddings=False is not supported"):
        EngineBart(config)
    config.tie_word_embeddings, config.encoder_layerdrop = True, 0.1
    with pytest.raises(ValueError, match="encoder_layerdrop > 0 is not supported"):
        EngineBart(config)
    config.encoder_layerdrop = 0.0
    engine = EngineBart(config, copy=True)
    ids, mask, _, decoder_ids = bart_batch(30)
    with pytest.raises(ValueError, match="source_ids must be"):
        engine.forward(ids, mask, decoder_ids, source_ids=ids[:, :4])
    with pytest.raises(ValueError, match="decoder_input_ids must be"):
        engine.forward(ids, mask, decoder_ids[0])
    engine.forward(ids, mask, decoder_ids)
    with pytest.raises(ValueError, match="EngineBart: grad_output must be"):
        engine.backward(torch.zeros(3, 2, 30))


# ------------------------------------------------------------------ the pretrained path


def test_pretrained_bart_fine_tunes_in_the_engine(tmp_path: Path) -> None:
    torch.manual_seed(1)
    pretrained = build_seq2seq("bart", 60, 0, 2, 1, d_model=16, layers=1, heads=2, ff=32, max_positions=40)
    pretrained.save_pretrained(tmp_path / "bart")
    net = EngineBartNet(60, 0, 1, 2, pretrained=str(tmp_path / "bart"))
    same_state(net.model, pretrained)
    with_copy = EngineBartCopyNet(50, 0, 1, 2, pretrained=str(tmp_path / "bart"))  # a fresh copy head
    state = with_copy.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in pretrained.state_dict().items())
    assert {"copy_query.weight", "copy_key.weight", "copy_gate.weight", "copy_gate.bias"} <= set(state)
    ids, mask, labels, _ = bart_batch(50)
    logits = net.eval().forward(ids, mask, labels)
    torch.testing.assert_close(logits, pretrained.eval()(input_ids=ids, attention_mask=mask, labels=labels).logits,
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"pad id 3, the model's is 0.*tokenizer_name"):
        EngineBartNet(60, 3, 1, 2, pretrained=str(tmp_path / "bart"))
    with pytest.raises(ValueError, match="70 tokens, the model embeds 60"):
        EngineBartNet(70, 0, 1, 2, pretrained=str(tmp_path / "bart"))


def test_generation_model_holds_the_current_weights(tokenizer: Any) -> None:
    module = summarizer(tokenizer, EngineBartCopyNet)
    twin = module.model
    assert not twin.training and "net._twin" not in module.state_dict()
    same_state(module.net.model, twin)
    with torch.no_grad():
        module.net.model.model.shared.weight.mul_(2.0)
    assert module.model is twin
    same_state(module.net.model, twin)
    module.double()
    assert next(module.model.parameters()).dtype == torch.float64
    same_state(module.net.model, module.model)


# ------------------------------------------------------------------ training: parity and Lightning


@pytest.mark.parametrize("optimizer", ["sgd", "task"])
@pytest.mark.parametrize("kind", NETS)
def test_engine_and_autograd_train_the_same_trajectory(kind: str, optimizer: str, tokenizer: Any) -> None:
    """Same weights and batches, dropout on (the same masks): float32 losses within 1e-5 over every step (SGD, or
    the task's AdamW with clipping), float64 gradients within 1e-10."""
    module = summarizer(tokenizer, NETS[kind][0], label_smoothing=0.1)
    rows = pairs(48, 1)
    batches = [make_batch(tokenizer, rows[i:i + 8]) for i in range(0, 48, 8)]
    report = compare_task_modules(module, batches, steps=len(batches), optimizer=optimizer)
    assert report["max_grad_rel_error"] <= AUTOGRAD_TOL, report["grad_rel_error_per_parameter"]
    assert report["max_loss_trajectory_diff"] <= 1e-5, report["loss_curves"]
    losses = report["loss_curves"]["engine"]
    assert len(set(losses)) == len(losses)


def test_engine_summarizer_fits_reloads_generates_and_exports(tokenizer: Any, tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    module = summarizer(tokenizer, EngineBartCopyNet, generation={"num_beams": 2, "max_new_tokens": 5})
    train = [make_batch(tokenizer, pairs(64, 2)[i:i + 16]) for i in range(0, 64, 16)]
    val = [make_batch(tokenizer, pairs(8, 3))]
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, logger=False,
                        callbacks=[*task_callbacks("val_rouge1", "max"), HFBestExport()])
    before = [p.clone() for p in module.parameters()]
    assert not module.automatic_optimization
    loader = partial(torch.utils.data.DataLoader, batch_size=None)
    trainer.fit(module, train_dataloaders=loader(train), val_dataloaders=loader(val))
    assert trainer.global_step == 8
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters())), "every weight trains"
    assert {"val_loss", "val_rouge1", "train_loss_epoch"} <= set(trainer.callback_metrics)

    best = Path(trainer.checkpoint_callback.best_model_path)
    loaded = Summarizer.load(best)
    assert type(loaded.net) is EngineBartCopyNet and loaded.engine
    texts = [s for s, _ in pairs(5, 4)]
    module.load_state_dict(loaded.state_dict())  # the best weights, which hf_best holds too
    summaries = summarize(module, texts, num_beams=2, max_new_tokens=5)
    assert summarize(loaded, texts, num_beams=2, max_new_tokens=5) == summaries
    exported = AutoModelForSeq2SeqLM.from_pretrained(best.parent / "hf_best")
    assert isinstance(exported, BartCopyForConditionalGeneration)
    same_state(exported, loaded.net.model)


def test_compare_command_on_the_aeslc_engine_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bp-apps compare --task summarization` builds the copy BART from the AESLC engine config (tokenizer trained on
    the data in setup) and reports the digits comparison's keys."""
    import json

    from bp_apps.cli import main

    monkeypatch.setenv("BP_APPS_CACHE", str(tmp_path / "cache"))
    for name, seed in (("train", 0), ("val", 1)):
        rows = [{"source": s, "target": t, "references": [t, t]} for s, t in pairs(48, seed)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report_path = tmp_path / "report.json"
    sizes = {"d_model": 16, "layers": 1, "heads": 2, "ff": 32}
    code = main(["compare", "--task", "summarization", "--steps", "3", "--out", str(tmp_path / "report"),
                 "--json", str(report_path), "--set", f"data.train_file={tmp_path / 'train.jsonl'}",
                 "--set", f"data.val_file={tmp_path / 'val.jsonl'}", "--set", "data.tokenizer_vocab_size=120",
                 "--set", "data.batch_size=8",
                 *[arg for key, value in sizes.items() for arg in ("--set", f"model.net.init_args.{key}={value}")]])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["config"]["network"] == "EngineBartCopyNet" and report["steps"] == 3
    assert report["max_grad_rel_error"] <= 1e-10 and report["max_loss_trajectory_diff"] <= 1e-5
    assert "model.copy_gate.weight" in report["grad_rel_error_per_parameter"]
