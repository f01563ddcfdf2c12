"""Choose a summarizer's generation settings on a slice of the validation data: every combination of the beam
sizes, length penalties, minimum lengths, repetition settings and MBR sample counts given is decoded and scored
(ROUGE-1/2/L F1, percent) under the three ways of counting references of scripts/summarization_baselines.py,
with the predictions' mean length.

Usage:
  python scripts/summarization_decoding.py --ckpt best.ckpt \
      --data ../shared/data/summarization/aeslc/validation.jsonl --limit 400 \
      [--num-beams 4] [--length-penalty 1 2] [--min-new-tokens 1 4 6] [--repetition-penalty 1 1.5]
      [--no-repeat-ngram-size 3] [--mbr-samples 0 16 32] [--mbr-epsilon 0.02] [--json PATH]

Records ``start`` to ``start + limit`` are used, so the rest of the file can stay untouched for the report. The
data file needs ``id``, ``source``, ``target`` and ``references`` fields (as AESLC validation has). Prints a
table (best mean-over-references ROUGE-1 first) and, with ``--json``, writes the figures there (atomically).
The chosen setting belongs in the config's ``model.init_args.generation`` group (``length_penalty``,
``min_new_tokens``, ``mbr_samples`` ...). A setting not given keeps the checkpoint's own value; ``--mbr-samples 0``
is beam search alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from summarization_baselines import PROTOCOLS, read_jsonl, score

from bp_apps.core.io import atomic_write_text

GRID = ("num_beams", "length_penalty", "min_new_tokens", "repetition_penalty", "no_repeat_ngram_size", "mbr_samples",
        "mbr_epsilon")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a Summarizer checkpoint")
    parser.add_argument("--data", type=Path, required=True, help="JSONL with id, source, target and references")
    parser.add_argument("--start", type=int, default=0, help="first record used (0-based)")
    parser.add_argument("--limit", type=int, default=400, help="how many records are used")
    parser.add_argument("--num-beams", type=int, nargs="+")
    parser.add_argument("--length-penalty", type=float, nargs="+")
    parser.add_argument("--min-new-tokens", type=int, nargs="+")
    parser.add_argument("--repetition-penalty", type=float, nargs="+")
    parser.add_argument("--no-repeat-ngram-size", type=int, nargs="+")
    parser.add_argument("--mbr-samples", type=int, nargs="+", help="MBR decoding samples (0: beam search alone)")
    parser.add_argument("--mbr-epsilon", type=float, nargs="+", help="MBR sampling's epsilon cutoff")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.start < 0 or args.limit < 1:
        raise SystemExit(f"need --start >= 0 and --limit >= 1, got {args.start} and {args.limit}")
    checks = {"num_beams": (lambda v: v >= 1, ">= 1"), "min_new_tokens": (lambda v: v >= 0, ">= 0"),
              "repetition_penalty": (lambda v: v > 0, "> 0"),
              "no_repeat_ngram_size": (lambda v: v >= 0, ">= 0 (0: off)"),
              "mbr_samples": (lambda v: v >= 0, ">= 0 (0: beam search alone)"),
              "mbr_epsilon": (lambda v: 0.0 <= v < 1.0, "in [0, 1)")}
    for name, (valid, rule) in checks.items():
        if not all(valid(v) for v in getattr(args, name) or []):
            raise SystemExit(f"--{name.replace('_', '-')} must be {rule}")
    records = read_jsonl(args.data)[args.start:args.start + args.limit]
    if not records:
        raise SystemExit(f"{args.data}: no records from {args.start}")
    for number, record in enumerate(records, args.start + 1):
        missing = [f for f in ("id", "source", "target", "references") if f not in record]
        if missing:
            raise SystemExit(f"{args.data}, record {number}: missing field(s) {', '.join(missing)}")

    from bp_apps.text.summarization.task import load_summarizer, summarize

    try:
        module = load_summarizer(args.ckpt)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"{args.ckpt}: {error}") from None
    sources = [r["source"] for r in records]
    grid = [getattr(args, name) or [getattr(module.generation, name)] for name in GRID]  # unset: the checkpoint's
    rows = []
    for values in itertools.product(*grid):
        setting = dict(zip(GRID, values, strict=True))
        if setting["min_new_tokens"] > module.generation.max_new_tokens:
            raise SystemExit(f"--min-new-tokens {setting['min_new_tokens']} exceeds the model's max_new_tokens "
                             f"{module.generation.max_new_tokens}")
        predictions = summarize(module, sources, batch_size=args.batch_size, **setting)
        words = sum(len(p.split()) for p in predictions) / len(predictions)
        rows.append({**setting, "mean_words": round(words, 3), "scores": score(predictions, records)})
    rows.sort(key=lambda row: -row["scores"][PROTOCOLS[1]]["rouge1"])

    print(f"{len(records)} records of {args.data} from {args.start}; ROUGE-1 / 2 / L F1")
    print(f"{'beams':>5} {'len pen':>7} {'min tok':>7} {'rep pen':>7} {'no-rep':>6} {'mbr':>4} {'eps':>5} "
          f"{'words':>5}  "
          + "  ".join(f"{p:>22}" for p in PROTOCOLS))
    for row in rows:
        cells = [f"{v['rouge1']:.1f} / {v['rouge2']:.1f} / {v['rougeL']:.1f}" for v in row["scores"].values()]
        setting = (f"{row['num_beams']:>5} {row['length_penalty']:>7g} {row['min_new_tokens']:>7} "
                   f"{row['repetition_penalty']:>7g} {row['no_repeat_ngram_size']:>6} {row['mbr_samples']:>4} "
                   f"{row['mbr_epsilon']:>5g}")
        print(f"{setting} {row['mean_words']:>5.1f}  " + "  ".join(f"{c:>22}" for c in cells))
    if args.json is not None:
        figures = {"ckpt": str(args.ckpt), "data": str(args.data), "start": args.start, "records": len(records),
                   "results": rows}
        atomic_write_text(args.json, json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
