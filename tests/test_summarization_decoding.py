"""scripts/summarization_decoding.py: every setting of the grid is decoded and scored exactly as
summarize() + the baselines' scoring would, the minimum length takes effect, and bad input gets a clear error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from test_summarization_task import CopyData, copy_pairs, small_trainer, summarizer

from bp_apps.text.summarization.models import BartNet
from bp_apps.text.summarization.task import Summarizer, load_summarizer, summarize

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny BART checkpoint after a few copy-task steps, and 12 AESLC-shaped records."""
    root = tmp_path_factory.mktemp("decoding")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        L.seed_everything(0, verbose=False)
        data = CopyData(n_train=80, n_val=16)
        model = summarizer(data, BartNet, num_beams=2, max_new_tokens=6)
        trainer = small_trainer(root, 1, limit_train_batches=5, limit_val_batches=1)
        trainer.fit(model, datamodule=data)
    finally:
        torch.set_num_threads(threads)
    ckpt = root / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    rows = [{"id": i, "source": source, "target": target, "references": [target, " ".join(source.split()[:2])]}
            for i, source, target in copy_pairs(12, 5)]
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return ckpt, data


def test_grid_scores_match_summarize_and_min_length_applies(setup: tuple[Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    ckpt, data = setup
    decoding, baselines = load_script("summarization_decoding"), load_script("summarization_baselines")
    out = tmp_path / "grid.json"
    assert decoding.main(["--ckpt", str(ckpt), "--data", str(data), "--start", "2", "--limit", "8",
                          "--num-beams", "1", "2", "--min-new-tokens", "1", "6", "--json", str(out)]) == 0
    assert "mean over references" in capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert figures["records"] == 8 and len(figures["results"]) == 4
    means = [row["scores"]["mean over references"]["rouge1"] for row in figures["results"]]
    assert means == sorted(means, reverse=True)  # best first

    records = [json.loads(line) for line in data.read_text().splitlines()][2:10]
    module = load_summarizer(ckpt)
    by_setting = {(r["num_beams"], r["min_new_tokens"]): r for r in figures["results"]}
    predictions = summarize(module, [r["source"] for r in records], num_beams=2, min_new_tokens=1)
    assert by_setting[2, 1]["scores"] == baselines.score(predictions, records)
    longest = summarize(module, [r["source"] for r in records], num_beams=2, min_new_tokens=6)
    assert min(len(module.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in longest) >= 5
    assert by_setting[2, 6]["mean_words"] == round(sum(len(p.split()) for p in longest) / len(longest), 3)


def test_bad_input_names_the_problem(setup: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, data = setup
    decoding = load_script("summarization_decoding")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"id": 1, "source": "a b c", "target": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"broken.jsonl, record 1: missing field\(s\) references"):
        decoding.main(["--ckpt", str(ckpt), "--data", str(broken)])
    with pytest.raises(SystemExit, match="exceeds the model's max_new_tokens 6"):
        decoding.main(["--ckpt", str(ckpt), "--data", str(data), "--min-new-tokens", "9"])
    not_a_ckpt = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, not_a_ckpt)
    with pytest.raises(SystemExit, match=r"x\.ckpt: .*not a summarization checkpoint"):
        decoding.main(["--ckpt", str(not_a_ckpt), "--data", str(data)])
    with pytest.raises(SystemExit, match="no records from 50"):
        decoding.main(["--ckpt", str(ckpt), "--data", str(data), "--start", "50"])


def test_repetition_settings_reach_generate(setup: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, data = setup
    decoding, baselines = load_script("summarization_decoding"), load_script("summarization_baselines")
    out = tmp_path / "grid.json"
    assert decoding.main(["--ckpt", str(ckpt), "--data", str(data), "--num-beams", "2", "--repetition-penalty", "1",
                          "3", "--no-repeat-ngram-size", "0", "1", "--json", str(out)]) == 0
    rows = {(r["repetition_penalty"], r["no_repeat_ngram_size"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {(1.0, 0), (1.0, 1), (3.0, 0), (3.0, 1)}
    records = [json.loads(line) for line in data.read_text().splitlines()]
    sources = [r["source"] for r in records]
    module = load_summarizer(ckpt)
    for (repetition, ngram), row in rows.items():
        predictions = summarize(module, sources, num_beams=2, repetition_penalty=repetition, no_repeat_ngram_size=ngram)
        assert row["scores"] == baselines.score(predictions, records)
        if ngram == 1:  # no token twice
            for text in predictions:
                ids = module.tokenizer(text, add_special_tokens=False)["input_ids"]
                assert len(ids) == len(set(ids)), text
    default = decoding.main(["--ckpt", str(ckpt), "--data", str(data), "--json", str(out)])
    assert default == 0 and json.loads(out.read_text())["results"][0]["no_repeat_ngram_size"] == 3
    with pytest.raises(SystemExit, match="--repetition-penalty must be > 0"):
        decoding.main(["--ckpt", str(ckpt), "--data", str(data), "--repetition-penalty", "0"])


def test_repetition_penalty_hyperparameter() -> None:
    assert Summarizer(generation={"repetition_penalty": 1.5}).generation_kwargs()["repetition_penalty"] == 1.5
    assert Summarizer().generation_kwargs()["repetition_penalty"] == 1.0
    with pytest.raises(ValueError, match="repetition_penalty must be positive"):
        Summarizer(generation={"repetition_penalty": 0.0})


def test_mbr_decoding_chooses_among_beams_and_seeded_samples(setup: tuple[Path, Path]) -> None:
    from bp_apps.text.summarization.mbr import mbr_select

    ckpt, data = setup
    module = load_summarizer(ckpt)
    sources = [json.loads(line)["source"] for line in data.read_text().splitlines()]
    encoded = module.tokenizer(sources, padding=True, return_tensors="pt")
    inputs = encoded["input_ids"], encoded["attention_mask"]
    state = torch.get_rng_state()
    candidates = module.generate_candidates(*inputs, mbr_samples=5)
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is left alone
    assert [len(c) for c in candidates] == [2 + 5] * len(sources)
    beams = summarize(module, sources, num_beams=2)
    assert [c[0] for c in candidates] == beams  # the best hypothesis first
    assert len({text for c in candidates for text in c[2:]}) > len(set(beams))  # samples vary
    assert module.generate_candidates(*inputs, mbr_samples=5) == candidates  # seeded: the same every time
    chosen = summarize(module, sources, mbr_samples=5)
    assert chosen == [c[mbr_select(c)] for c in candidates]
    # an epsilon near 1 keeps only each step's most probable token: every sample is the greedy summary
    greedy = summarize(module, sources, num_beams=1)
    near_one = module.generate_candidates(*inputs, mbr_samples=3, mbr_epsilon=0.99)
    assert [c[2:] for c in near_one] == [[text] * 3 for text in greedy]


def test_mbr_settings_in_the_sweep_and_hyperparameters(setup: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, data = setup
    decoding, baselines = load_script("summarization_decoding"), load_script("summarization_baselines")
    out = tmp_path / "grid.json"
    assert decoding.main(["--ckpt", str(ckpt), "--data", str(data), "--num-beams", "2", "--mbr-samples", "0", "4",
                          "--json", str(out)]) == 0
    rows = {r["mbr_samples"]: r for r in json.loads(out.read_text())["results"]}
    records = [json.loads(line) for line in data.read_text().splitlines()]
    module = load_summarizer(ckpt)
    for samples, row in rows.items():
        predictions = summarize(module, [r["source"] for r in records], mbr_samples=samples)
        assert row["scores"] == baselines.score(predictions, records) and row["mbr_epsilon"] == 0.02
    with pytest.raises(SystemExit, match="--mbr-samples must be >= 0"):
        decoding.main(["--ckpt", str(ckpt), "--data", str(data), "--mbr-samples", "-1"])
    with pytest.raises(SystemExit, match=r"--mbr-epsilon must be in \[0, 1\)"):
        decoding.main(["--ckpt", str(ckpt), "--data", str(data), "--mbr-epsilon", "1"])

    assert Summarizer(generation={"mbr_samples": 8}).mbr_settings() == {"mbr_samples": 8, "mbr_epsilon": 0.02}
    assert Summarizer().mbr_settings(mbr_epsilon=0.1) == {"mbr_samples": 0, "mbr_epsilon": 0.1}
    with pytest.raises(ValueError, match="mbr_samples must be >= 0"):
        Summarizer(generation={"mbr_samples": -1})
    with pytest.raises(ValueError, match=r"mbr_epsilon must be in \[0, 1\)"):
        Summarizer(generation={"mbr_epsilon": 1.0})
