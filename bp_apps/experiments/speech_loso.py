"""Leave-one-speaker-out evaluation of an FSDD speech config: train on all speakers but one, test on every
recording of that one (connected-digit strings built only from its recordings), once per speaker.

Each fold is an ordinary ``bp-apps fit`` of the config with ``--data.init_args.speaker_holdout=SPEAKER``, in its
own process and folder (``OUT/SPEAKER``): the best checkpoint is chosen on validation recordings of the training
speakers, then tested on the held-out speaker, and its ``metrics.json`` holds the test figures. The report lists
each fold's test metrics and their mean over the folds; a fold that fails is reported with its exit status and
left out of the mean (the mean then says over how many folds it is).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["FSDD_SPEAKERS", "HEADLINE_METRICS", "fold_command", "format_loso_table", "read_fold_metrics",
           "run_loso", "summarize_folds"]

FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas")
"""The speakers of the FSDD recordings the suite pins (its download is checked against their digest)."""
HEADLINE_METRICS = ("test_acc", "test_wer", "test_cer", "test_beam_wer", "test_beam_cer")
"""Test metrics a fold reports when its task logs them: the classifier's accuracy, the recognizer's greedy and
lexicon-beam error rates."""


def fold_command(config: str | Path, speaker: str, out: str | Path, overrides: Sequence[str] = ()) -> list[str]:
    """The ``bp-apps fit`` command line of one fold (the current Python's ``bp_apps.cli``)."""
    return [sys.executable, "-m", "bp_apps.cli", "fit", "--config", str(config),
            f"--data.init_args.speaker_holdout={speaker}", f"--trainer.default_root_dir={Path(out) / speaker}",
            *overrides]


def read_fold_metrics(folder: str | Path) -> dict[str, Any]:
    """The newest ``metrics.json`` below a fold's folder; ValueError naming the folder when there is none."""
    found = sorted(Path(folder).rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ValueError(f"{folder}: no metrics.json below it (did the fold's fit finish its test?)")
    return json.loads(found[-1].read_text(encoding="utf-8"))


def summarize_folds(folds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean (and min/max) of each headline test metric over the folds that have it."""
    summary: dict[str, Any] = {}
    for name in HEADLINE_METRICS:
        values = [fold["test"][name] for fold in folds if name in fold.get("test", {})]
        if values:
            summary[name] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                             "folds": len(values)}
    return summary


def _run_fold(config: Path, speaker: str, out: Path, overrides: Sequence[str], threads: int | None) -> dict[str, Any]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    (out / speaker).mkdir(parents=True, exist_ok=True)
    log = out / speaker / "fit.log"
    with log.open("w", encoding="utf-8") as handle:
        status = subprocess.run(fold_command(config, speaker, out, overrides), stdout=handle,
                                stderr=subprocess.STDOUT, env=env, check=False).returncode
    fold: dict[str, Any] = {"speaker": speaker, "status": status, "log": str(log)}
    if status == 0:
        metrics = read_fold_metrics(out / speaker)
        fold["test"] = {k: v for k, v in metrics.get("test", {}).items() if k in HEADLINE_METRICS}
        fold["best_checkpoint"] = metrics.get("best_checkpoint")
        fold["epochs_completed"] = metrics.get("epochs_completed")
    return fold


def run_loso(config: str | Path, out: str | Path, speakers: Sequence[str] = FSDD_SPEAKERS,
             overrides: Sequence[str] = (), jobs: int = 1, threads: int | None = None) -> dict[str, Any]:
    """Run one fold per speaker (``jobs`` at a time, each limited to ``threads`` CPU threads) and return the
    report: ``{"config", "folds": [{speaker, status, test: {...}}], "mean": {metric: {mean, min, max, folds}}}``."""
    config, out = Path(config), Path(out)
    if not config.is_file():
        raise ValueError(f"{config}: no such config file")
    unknown = sorted(set(speakers) - set(FSDD_SPEAKERS))
    if unknown:
        raise ValueError(f"unknown FSDD speaker(s) {', '.join(unknown)}; the speakers are {', '.join(FSDD_SPEAKERS)}")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        folds = list(pool.map(lambda s: _run_fold(config, s, out, overrides, threads), speakers))
    return {"config": str(config), "overrides": list(overrides), "folds": folds,
            "mean": summarize_folds([f for f in folds if f["status"] == 0])}


def format_loso_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table: one row per held-out speaker, then the mean over the folds (percentages)."""
    names = [n for n in HEADLINE_METRICS if n in report["mean"]]
    lines = [f"leave-one-speaker-out: {report['config']}", "",
             "| held-out speaker | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for fold in report["folds"]:
        if fold["status"] != 0:
            lines.append(f"| {fold['speaker']} | failed (exit {fold['status']}, see {fold['log']}) |")
            continue
        cells = [f"{100 * fold['test'][n]:.2f} %" if n in fold["test"] else "" for n in names]
        lines.append(f"| {fold['speaker']} | " + " | ".join(cells) + " |")
    means = [f"**{100 * report['mean'][n]['mean']:.2f} %** ({report['mean'][n]['folds']} folds)" for n in names]
    lines.append("| mean | " + " | ".join(means) + " |")
    return "\n".join(lines)
