"""The engine BiLSTM-CRF tagger: its sequence pieces' gradients, the autograd BiLSTMTagger's weights, emissions,
random draws and gradients, and the engine TokenLabeler trained side by side with its autograd twin and through
Lightning (checkpoint, reload, label_text)."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from engine_checks import AUTOGRAD_TOL, F64, FD_TOL, PROPERTY, randn
from hypothesis import given
from hypothesis import strategies as st

from bp_apps.core.callbacks import task_callbacks
from bp_apps.engine import LSTM
from bp_apps.engine.gradcheck import finite_difference_grad, relative_error
from bp_apps.engine.sequence import Concat, MaskedMax, PositionGather, RowGather
from bp_apps.experiments.compare_tasks import compare_task_modules
from bp_apps.text.labeling.data import LabelingVocab, collate_sentences
from bp_apps.text.labeling.engine_models import EngineBiLSTMTagger
from bp_apps.text.labeling.models import BiLSTMTagger
from bp_apps.text.labeling.records import make_sentence
from bp_apps.text.labeling.rnn import run_lstm
from bp_apps.text.labeling.task import TokenLabeler, label_text, load_labeler

WORDS = ["the", "a", "cat", "dog", "man", "saw", "took", "gave", "ball", "book", "park", "in", "quickly", "red"]


# --------------------------------------------------------------------------- the sequence pieces

def test_masked_max_splits_ties_and_gives_empty_words_zero() -> None:
    x = torch.tensor([[[1.0, 3.0, 3.0, 9.0], [0.5, -1.0, 0.5, 0.5]],
                      [[2.0, 2.0, 2.0, 2.0], [-4.0, -5.0, 7.0, 7.0]],
                      [[5.0, 6.0, 7.0, 8.0], [1.0, 1.0, 1.0, 1.0]]], dtype=F64)
    valid = torch.tensor([[True, True, True, False], [True, True, True, True], [False, False, False, False]])
    grad = randn(3, 2, seed=1)
    layer = MaskedMax()
    out = layer.forward(x, valid)
    dx = layer.backward(grad)
    reference = x.clone().requires_grad_(True)
    expected = torch.nan_to_num(reference.masked_fill(~valid[:, None], float("-inf")).amax(2), neginf=0.0)
    expected.backward(grad)
    assert torch.equal(out, expected.detach())
    assert relative_error(dx, reference.grad) <= AUTOGRAD_TOL
    assert torch.equal(out[2], torch.zeros(2)) and dx[2].abs().sum() == 0, "an all-padding word: 0, no gradient"
    assert dx[0, 0, 1] == dx[0, 0, 2] == grad[0, 0] / 2, "a tie shares the gradient evenly"


@PROPERTY
@given(n=st.integers(1, 4), c=st.integers(1, 3), k=st.integers(1, 5), seed=st.integers(0, 100))
def test_masked_max_property_and_finite_differences(n: int, c: int, k: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = randn(n, c, k, seed=seed)
    valid = torch.rand(n, k, generator=generator) < 0.7
    layer = MaskedMax()
    layer.forward(x, valid)
    grad = randn(n, c, seed=seed + 1)
    numeric = finite_difference_grad(lambda v: (layer.forward(v, valid) * grad).sum(), x)
    layer.forward(x, valid)
    assert relative_error(layer.backward(grad), numeric) <= FD_TOL


@PROPERTY
@given(b=st.integers(1, 4), t=st.integers(1, 5), sizes=st.lists(st.integers(1, 3), min_size=1, max_size=4),
       broadcast=st.lists(st.booleans(), min_size=4, max_size=4), seed=st.integers(0, 100))
def test_concat_matches_autograd(b: int, t: int, sizes: list[int], broadcast: list[bool], seed: int) -> None:
    broadcast[0] = False  # T is the longest part's
    parts = [randn(b, 1 if flag else t, size, seed=seed + i) for i, (size, flag) in enumerate(zip(sizes, broadcast))]
    layer = Concat()
    out = layer.forward(*parts)
    grad = randn(*out.shape, seed=seed + 9)
    references = [p.clone().requires_grad_(True) for p in parts]
    expected = torch.cat([p.expand(-1, t, -1) for p in references], -1)
    expected.backward(grad)
    assert torch.equal(out, expected.detach())
    for got, reference in zip(layer.backward(grad), references, strict=True):
        assert relative_error(got, reference.grad) <= AUTOGRAD_TOL


@PROPERTY
@given(rows=st.integers(1, 4), picks=st.lists(st.integers(0, 3), min_size=1, max_size=6), t=st.integers(1, 4),
       seed=st.integers(0, 100))
def test_row_and_position_gathers_match_autograd(rows: int, picks: list[int], t: int, seed: int) -> None:
    index = torch.tensor([p % rows for p in picks])
    x = randn(rows, t, 3, seed=seed)
    gather = RowGather()
    states = gather.forward(x, index)
    positions = torch.tensor([(seed + i) % t for i in range(len(index))])
    at = PositionGather()
    picked = at.forward(states, positions)
    grad_states, grad_picked = randn(*states.shape, seed=seed + 1), randn(*picked.shape, seed=seed + 2)

    reference = x.clone().requires_grad_(True)
    ref_states = reference[index]
    ref_picked = ref_states.gather(1, positions[:, None, None].expand(-1, 1, 3))[:, 0]
    ((ref_states * grad_states).sum() + (ref_picked * grad_picked).sum()).backward()
    assert torch.equal(picked, ref_picked.detach())
    dx = gather.backward(at.backward(grad_picked, into=grad_states.clone()))
    assert relative_error(dx, reference.grad) <= AUTOGRAD_TOL
    assert torch.equal(at.backward(grad_picked).sum(1), grad_picked), "into zeros without `into`"


def test_sequence_pieces_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="MaskedMax: x"):
        MaskedMax().forward(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="Concat: parts"):
        Concat().forward(torch.zeros(2, 3, 1), torch.zeros(2, 2, 1))
    with pytest.raises(IndexError, match=r"RowGather: index values must be in \[0, 2\)"):
        RowGather().forward(torch.zeros(2, 3), torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="PositionGather: the index must be an int64"):
        PositionGather().forward(torch.zeros(2, 3, 1), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"PositionGather: the index must have shape \(2,\)"):
        PositionGather().forward(torch.zeros(2, 3, 1), torch.tensor([0]))


@pytest.mark.parametrize("lengths", [[6, 3, 6, 1], [4, 4, 4, 4]])
def test_lstm_padded_dropout_draws_what_run_lstm_draws(lengths: list[int]) -> None:
    """``dropout_order='padded'``: from one random state the engine LSTM and ``run_lstm`` drop the same units,
    give the same output and gradients, and leave the RNG in the same state."""
    torch.manual_seed(2)
    layer = LSTM(3, 4, num_layers=3, bidirectional=True, dropout=0.4, dtype=F64, dropout_order="padded")
    twin = layer.torch_module()
    twin.load_state_dict(layer.state_dict())
    x, lengths_t = randn(4, 6, 3), torch.tensor(lengths)
    grad = randn(4, 6, 8, seed=3) * (torch.arange(6)[None] < lengths_t[:, None]).unsqueeze(-1)
    torch.manual_seed(9)
    out = layer.forward(x, lengths_t)
    dx = layer.backward(grad)
    after = torch.get_rng_state()
    torch.manual_seed(9)
    reference = x.clone().requires_grad_(True)
    expected = run_lstm(twin.train(), reference, lengths_t)
    expected.backward(grad)
    assert torch.equal(after, torch.get_rng_state())
    assert relative_error(out, expected) <= AUTOGRAD_TOL
    assert relative_error(dx, reference.grad) <= AUTOGRAD_TOL
    for name, _, g in layer.param_grads():
        assert relative_error(g, getattr(twin, name).grad) <= AUTOGRAD_TOL, name
    with pytest.raises(ValueError, match="LSTM: dropout_order"):
        LSTM(3, 4, dropout_order="sorted")


# --------------------------------------------------------------------------- the tagger

def srl_sentences(n: int, seed: int, broken: float = 0.0) -> list:
    """Sentences with two predicates each (so a batch repeats sentences): ARG0 before the predicate, ARG1 the two
    words after it; ``broken`` of them start with I-ARG1 (gold paths that break the BIO constraints)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(5, 10)
        tokens = [rng.choice(WORDS) for _ in range(k)]
        for p in rng.sample(range(1, k - 2), 2):
            tags = ["O"] * k
            tags[p - 1], tags[p], tags[p + 1], tags[p + 2] = "B-ARG0", "B-V", "B-ARG1", "I-ARG1"
            if rng.random() < broken:
                tags[0] = "I-ARG1"
            out.append(make_sentence(tokens, tags, predicate=p, predicate_pos=rng.choice(["VBD", "NN", "JJ"])))
    return out


SENTENCES = srl_sentences(24, 0, broken=0.1)
VOCAB = LabelingVocab.build(SENTENCES, min_word_freq=1)
TINY = {"word_dim": 6, "char_dim": 4, "char_channels": 5, "predicate_dim": 3, "hidden": 5, "dropout": 0.3,
        "word_dropout": 0.2, "predicate_pos_dropout": 0.3}
VARIANTS = {
    "shared": {"layers": 3, "shared_layers": 1, "predicate_pos_dim": 3},
    "shared_deep": {"layers": 4, "shared_layers": 2, "predicate_hidden": 4},
    "per_instance": {"layers": 2, "predicate_pos_dim": 3},
    "no_predicates": {"layers": 2, "predicates": False},
    "no_chars": {"layers": 1, "char_channels": 0},
}


def build_pair(variant: str, seed: int = 0, dtype: torch.dtype = F64) -> tuple[EngineBiLSTMTagger, BiLSTMTagger]:
    args = {**TINY, **VARIANTS[variant]}
    predicates = args.pop("predicates", True)
    sizes = (len(VOCAB.words), len(VOCAB.chars), len(VOCAB.labels), predicates)
    torch.manual_seed(seed)
    engine = EngineBiLSTMTagger(*sizes, **args).to(dtype)
    torch.manual_seed(seed)
    return engine, BiLSTMTagger(*sizes, **args).to(dtype)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tagger_has_the_autograd_taggers_weights_draws_and_gradients(variant: str) -> None:
    engine, twin = build_pair(variant)
    engine_state, twin_state = engine.state_dict(), twin.state_dict()
    assert list(engine_state) == list(twin_state)
    assert all(torch.equal(engine_state[k], twin_state[k]) for k in engine_state)
    twin.load_state_dict(engine_state)
    engine.load_state_dict(twin_state)  # strict, both ways
    assert all(torch.equal(a, b) for a, b in zip(engine.to_autograd().state_dict().values(), twin_state.values()))
    batch = collate_sentences(SENTENCES[:10], VOCAB)
    for training in (False, True):
        engine.train(training)
        twin.train(training)
        torch.manual_seed(5)
        out = engine.forward(batch)
        after = torch.get_rng_state()
        torch.manual_seed(5)
        expected = twin(batch)
        assert torch.equal(after, torch.get_rng_state()), "the same random draws"
        assert relative_error(out, expected) <= AUTOGRAD_TOL
    grad = randn(*out.shape, seed=4) * batch["mask"].unsqueeze(-1)
    engine.backward(grad)
    expected.backward(grad)
    reference = dict(twin.named_parameters())
    found = {name: relative_error(g, reference[name].grad) for name, _, g in engine.param_grads()}
    assert set(found) == set(reference)
    assert max(found.values()) <= AUTOGRAD_TOL, found


def test_tagger_refuses_the_mlp_head_and_checks_settings_as_the_twin() -> None:
    sizes = (len(VOCAB.words), len(VOCAB.chars), len(VOCAB.labels), True)
    with pytest.raises(ValueError, match="linear head only"):
        EngineBiLSTMTagger(*sizes, head="engine_mlp")
    with pytest.raises(ValueError, match="shared_layers needs"):
        EngineBiLSTMTagger(*sizes, layers=2, shared_layers=2)
    state = torch.get_rng_state()
    EngineBiLSTMTagger(*sizes, word_dim=4, hidden=3, char_channels=2)
    torch.manual_seed(0)
    BiLSTMTagger(*sizes, word_dim=4, hidden=3, char_channels=2)
    assert not torch.equal(state, torch.get_rng_state())


# --------------------------------------------------------------------------- the task

def labeler(crf: bool = True, **settings: object) -> TokenLabeler:
    args = {**TINY, **VARIANTS["shared"], **settings}
    module = TokenLabeler(net=partial(EngineBiLSTMTagger, **args), crf=crf, exclude_labels=["V"],
                          label_smoothing=0.0 if crf else 0.1, optim={"lr": 0.05, "max_grad_norm": 1.0})
    torch.manual_seed(0)
    module.build(VOCAB, True)
    return module


def batches(size: int = 8) -> list[dict]:
    return [collate_sentences(SENTENCES[i:i + size], VOCAB) for i in range(0, len(SENTENCES), size)]


@pytest.mark.parametrize("crf", [True, False])
def test_engine_labeler_trains_the_autograd_trajectory(crf: bool) -> None:
    """Same weights, batches and dropout masks: float32 losses within 1e-5 over every step (SGD, clipping), float64
    gradients of the tagger and the CRF within 1e-10."""
    module = labeler(crf)
    assert module.engine and not module.automatic_optimization
    assert set(module.engine_layers()) == ({"net", "crf"} if crf else {"net"})
    data = batches() * 2
    report = compare_task_modules(module, data, steps=len(data))
    assert report["steps"] == len(data) == 12
    assert report["max_grad_rel_error"] <= AUTOGRAD_TOL, report["grad_rel_error_per_parameter"]
    expected = {n for n, _ in module.net.to_autograd().named_parameters()} | ({"crf.transitions", "crf.start",
                                                                               "crf.end"} if crf else set())
    assert set(report["grad_rel_error_per_parameter"]) == expected
    assert report["max_loss_trajectory_diff"] <= 1e-5, report["loss_curves"]
    losses = report["loss_curves"]["engine"]
    assert len(set(losses)) == len(losses)


def test_autograd_copy_swaps_the_crf_with_its_weights() -> None:
    module = labeler()
    with torch.no_grad():
        module.crf.transitions.normal_()
    twin = module.autograd_copy()
    assert type(twin.net) is BiLSTMTagger and type(twin.crf).__module__ == "bp_apps.text.labeling.crf"
    assert torch.equal(twin.crf.transitions, module.crf.transitions) and twin.crf.transitions.requires_grad
    assert type(module.crf).__module__ == "bp_apps.engine.crf"


def test_engine_labeler_fits_reloads_and_labels_text(tmp_path: Path) -> None:
    module = labeler()
    loader = torch.utils.data.DataLoader(batches(), batch_size=None)
    trainer = L.Trainer(max_epochs=2, default_root_dir=tmp_path, accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False, logger=False, callbacks=task_callbacks("val_f1", "max"))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert trainer.global_step == 2 * len(batches())
    assert all(not torch.equal(before[k], v) for k, v in module.state_dict().items()), "every weight trains"
    assert "val_f1" in trainer.callback_metrics
    (checkpoint,) = tmp_path.rglob("best*.ckpt")
    loaded = load_labeler(checkpoint)
    assert type(loaded.net) is EngineBiLSTMTagger and type(loaded.crf) is type(module.crf)
    state = loaded.state_dict()
    assert {"crf.transitions", "crf.start", "crf.end"} <= set(state)
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert list(saved) == list(state) and all(torch.equal(v, state[k]) for k, v in saved.items())
    result = label_text(loaded, "the man saw a red ball in the park", predicate="saw", predicate_pos="VBD")
    assert result["tokens"][2] == "saw" and len(result["tags"]) == 9
    module.eval()
    batch = collate_sentences(SENTENCES[:6], VOCAB)
    with torch.no_grad():
        emissions = module(batch)
        twin = module.autograd_copy().eval()
        assert module.decode(emissions, batch["mask"]) == twin.decode(twin(batch), batch["mask"])


def test_compare_command_on_the_srl_engine_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bp-apps compare --task labeling` builds the labeler from the SRL engine config (vocabulary from the data,
    network in setup) and reports the digits comparison's keys."""
    import json

    from test_labeling_task import synthetic_srl, write_jsonl

    from bp_apps.cli import main

    monkeypatch.setenv("BP_APPS_CACHE", str(tmp_path / "cache"))
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_srl(40, 0))
    val = write_jsonl(tmp_path / "val.jsonl", synthetic_srl(16, 1))
    report_path = tmp_path / "report.json"
    code = main(["compare", "--task", "labeling", "--steps", "3", "--out", str(tmp_path / "report"),
                 "--json", str(report_path), "--set", f"data.train_file={train}", "--set", f"data.val_file={val}",
                 "--set", "data.batch_size=8", "--set", "model.net.init_args.hidden=8",
                 "--set", "model.net.init_args.word_dim=8", "--set", "model.net.init_args.char_channels=4"])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["config"]["network"] == "EngineBiLSTMTagger" and report["steps"] == 3
    assert report["max_grad_rel_error"] <= 1e-10 and report["max_loss_trajectory_diff"] <= 1e-5
    assert {"crf.transitions", "crf.start", "crf.end"} <= set(report["grad_rel_error_per_parameter"])
    assert set(report["backends"]["autograd"]) >= {"ms_per_step", "peak_memory_mb"}
