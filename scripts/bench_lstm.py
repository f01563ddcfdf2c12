"""Time a bidirectional LSTM's training step (forward + backward) on CPU: ``nn.LSTM`` over a packed batch against
:func:`bp_apps.text.labeling.rnn.run_lstm` over the padded batch, with the same weights and inputs.

Usage:
  python scripts/bench_lstm.py [--lengths 20 40 80] [--batch 64] [--features 548] [--hidden 200]
                               [--repeats 7] [--threads 2] [--json PATH]

The defaults are the per-predicate layers of configs/text/srl_propbank_ewt.yaml. Sentence lengths in a batch vary
a little below each given length (as in a length-bucketed batch). Prints a table of median milliseconds per step,
the ratio packed / padded, and the largest difference between the two outputs; ``--json`` writes the same figures
(atomically).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bp_apps.core.io import atomic_write_text
from bp_apps.text.labeling.rnn import run_lstm


def packed_lstm(lstm: nn.LSTM, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    return nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=x.shape[1])[0]


def median_step_ms(fn, lstm: nn.LSTM, x: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor,
                   repeats: int) -> float:
    """Median milliseconds of forward + backward through ``fn(lstm, x, lengths)`` (after one warm-up step)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        (fn(lstm, x, lengths) * weights).sum().backward()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def bench(lengths: list[int], batch: int, features: int, hidden: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    lstm = nn.LSTM(features, hidden, bidirectional=True, batch_first=True)
    rows = []
    for length in lengths:
        sizes = torch.randint(max(1, length - length // 8), length + 1, (batch,))
        sizes[0] = length
        x = torch.randn(batch, length, features, requires_grad=True)
        weights = torch.randn(batch, length, 2 * hidden)
        difference = (packed_lstm(lstm, x, sizes) - run_lstm(lstm, x, sizes)).abs().max().item()
        figures = {}
        for name, fn in (("packed", packed_lstm), ("padded", run_lstm)):
            figures[name] = median_step_ms(fn, lstm, x, sizes, weights, repeats)
        rows.append({"length": length, "batch": batch, "packed_ms": figures["packed"], "padded_ms": figures["padded"],
                     "speedup": figures["packed"] / figures["padded"], "max_abs_difference": difference})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| length | packed nn.LSTM (ms) | run_lstm (ms) | speed-up | max difference |", "|---|---|---|---|---|"]
    lines += [f"| {r['length']} | {r['packed_ms']:.1f} | {r['padded_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['max_abs_difference']:.1e} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[20, 40, 80])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--features", type=int, default=548)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if min(args.lengths) < 1 or min(args.batch, args.features, args.hidden, args.repeats, args.threads) < 1:
        raise SystemExit("lengths, --batch, --features, --hidden, --repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    rows = bench(args.lengths, args.batch, args.features, args.hidden, args.repeats)
    report = {"device": "cpu", "threads": args.threads, "features": args.features, "hidden": args.hidden,
              "repeats": args.repeats, "rows": rows}
    print(format_table(rows))
    print(json.dumps(report, indent=2))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
