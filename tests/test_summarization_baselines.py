"""scripts/summarization_baselines.py: lead-N-words ROUGE under the three reference protocols, a run's
predictions matched by id, the JSON output, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "summarization_baselines.py"
RECORDS = [
    {"id": "a", "source": "budget meeting moved to friday at noon please confirm",
     "target": "meeting", "references": ["budget meeting moved", "friday meeting", "meeting time change"]},
    {"id": "b", "source": "the gas contract for march is attached for your review",
     "target": "contract", "references": ["march gas contract", "gas contract review", "contract attached"]},
]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_lead_baselines_and_predictions_under_each_protocol(tmp_path: Path) -> None:
    data = write(tmp_path / "val.jsonl", RECORDS)
    predictions = write(tmp_path / "predictions.jsonl", [{"id": "b", "prediction": "gas contract review"}])
    out = tmp_path / "figures.json"
    result = run("--data", str(data), "--lead", "3", "--predictions", str(predictions), "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "lead-3 words" in result.stdout and "mean over references" in result.stdout
    figures = json.loads(out.read_text())["results"]
    lead = figures["lead-3 words"]
    # "budget meeting moved" is reference 1 of a; "the gas contract" shares 2 of 3 words with "march gas contract"
    # and "gas contract review": unigram F1 2/3
    assert lead["best of references"]["rouge1"] == pytest.approx(100 * (1 + 2 / 3) / 2, abs=0.01)
    mean_a = (1 + 2 * (1 / 3) / (3 / 3 + 2 / 3) + 2 * (1 / 3 * 1 / 3) / (1 / 3 + 1 / 3)) / 3  # 1, 0.4, 1/3
    mean_b = (2 / 3 + 2 / 3 + 2 * (1 / 3 * 1 / 2) / (1 / 3 + 1 / 2)) / 3
    assert lead["mean over references"]["rouge1"] == pytest.approx(100 * (mean_a + mean_b) / 2, abs=0.01)
    assert lead["original target"]["rouge1"] == pytest.approx(50.0)  # one word of three, both times
    model = figures["predictions (1 of 2)"]
    assert model["best of references"]["rouge1"] == pytest.approx(100.0)
    assert model["original target"]["rouge1"] == pytest.approx(50.0)


def test_bad_input_names_the_file_and_record(tmp_path: Path) -> None:
    data = write(tmp_path / "val.jsonl", [RECORDS[0], {"id": "c", "source": "x", "target": "y"}])
    result = run("--data", str(data))
    assert result.returncode != 0 and "val.jsonl, record 2: missing field(s) references" in result.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(RECORDS[0]) + "\n{not json\n", encoding="utf-8")
    result = run("--data", str(broken))
    assert result.returncode != 0 and "broken.jsonl, line 2: not JSON" in result.stderr
    unmatched = write(tmp_path / "predictions.jsonl", [{"id": "zzz", "prediction": "p"}])
    result = run("--data", str(write(tmp_path / "ok.jsonl", RECORDS)), "--predictions", str(unmatched))
    assert result.returncode != 0 and "no prediction has an id" in result.stderr
