"""ROUGE of no-model baselines (the first N words of each source), and optionally of a run's predictions, under
the three ways of counting several references: the best one, the mean over them (ROUGE-1.5.5's default), and
the original target alone.

Usage:
  python scripts/summarization_baselines.py --data ../shared/data/summarization/aeslc/validation.jsonl \
      [--lead 5 8 12] [--predictions lightning_logs/version_0/predictions.jsonl] [--json PATH]

The data file needs ``source``, ``target`` and ``references`` fields (AESLC validation: the original subject
and the three annotator subjects); ``--predictions`` is the ``predictions.jsonl`` a test run writes, matched to
the data by ``id``. Prints a table and, with ``--json``, writes the figures there (atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bp_apps.core.io import atomic_write_text
from bp_apps.text.summarization.rouge import rouge_scores

PROTOCOLS = ("best of references", "mean over references", "original target")


def read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise SystemExit(f"{path}, line {number}: not JSON ({error.msg})") from None
    return records


def score(predictions: list[str], records: list[dict]) -> dict[str, dict[str, float]]:
    """ROUGE-1/2/L (percent) of ``predictions`` under each protocol."""
    references = [r["references"] for r in records]
    runs = {PROTOCOLS[0]: rouge_scores(predictions, references, multi_reference="best"),
            PROTOCOLS[1]: rouge_scores(predictions, references, multi_reference="mean"),
            PROTOCOLS[2]: rouge_scores(predictions, [[r["target"]] for r in records])}
    return {name: {k: round(100 * v[k], 4) for k in ("rouge1", "rouge2", "rougeL")} for name, v in runs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="JSONL with source, target and references")
    parser.add_argument("--lead", type=int, nargs="*", default=[5, 8, 12], help="lead-N-words baselines")
    parser.add_argument("--predictions", type=Path, help="a test run's predictions.jsonl (matched by id)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    records = read_jsonl(args.data)
    for number, record in enumerate(records, 1):
        missing = [f for f in ("id", "source", "target", "references") if f not in record]
        if missing:
            raise SystemExit(f"{args.data}, record {number}: missing field(s) {', '.join(missing)}")
    results: dict[str, dict] = {}
    for n in args.lead:
        if n < 1:
            raise SystemExit(f"--lead: N must be >= 1, got {n}")
        results[f"lead-{n} words"] = score([" ".join(r["source"].split()[:n]) for r in records], records)
    if args.predictions is not None:
        predicted = {p["id"]: p["prediction"] for p in read_jsonl(args.predictions)}
        matched = [r for r in records if r["id"] in predicted]
        if not matched:
            raise SystemExit(f"{args.predictions}: no prediction has an id of {args.data}")
        results[f"predictions ({len(matched)} of {len(records)})"] = score([predicted[r["id"]] for r in matched],
                                                                           matched)
    width = max(len(name) for name in results)
    print(f"{'system':<{width}}  " + "  ".join(f"{p:>22}" for p in PROTOCOLS))
    print(f"{'':<{width}}  " + "  ".join(f"{'R1 / R2 / RL':>22}" for _ in PROTOCOLS))
    for name, by_protocol in results.items():
        cells = [f"{v['rouge1']:.1f} / {v['rouge2']:.1f} / {v['rougeL']:.1f}" for v in by_protocol.values()]
        print(f"{name:<{width}}  " + "  ".join(f"{c:>22}" for c in cells))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps({"data": str(args.data), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
