"""Leave-one-speaker-out evaluation of an FSDD speech config: one `bp-apps fit` per held-out speaker, then a
per-speaker table and the mean over the folds (Markdown, and JSON with --json).

Usage: python scripts/speech_loso.py --config configs/speech/fsdd_digits.yaml --out runs/loso/digits
       [--speakers george jackson ...] [--jobs 2 --threads 1] [--json PATH] [-- --trainer.max_epochs=40 ...]
Everything after `--` is passed to every fold's `bp-apps fit`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bp_apps.core.io import atomic_write_text
from bp_apps.experiments.speech_loso import FSDD_SPEAKERS, format_loso_table, run_loso


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="an FSDD config (isolated or connected digits)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the folds' runs (OUT/SPEAKER)")
    parser.add_argument("--speakers", nargs="+", default=list(FSDD_SPEAKERS), help="held-out speakers (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="folds run at the same time (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per fold (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    try:
        report = run_loso(args.config, args.out, args.speakers, overrides, args.jobs, args.threads)
    except ValueError as error:
        print(f"speech_loso: error: {error}", file=sys.stderr)
        return 2
    print(format_loso_table(report))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0 if all(fold["status"] == 0 for fold in report["folds"]) else 1


if __name__ == "__main__":
    sys.exit(main())
