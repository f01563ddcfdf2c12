"""Median ms per MLP training step, hand-written engine vs torch.autograd (same as `bp-apps bench core`).

Usage: python scripts/bench_core.py [--device cuda] [--repeats N] [--json PATH]
"""

import sys

from bp_apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "core", *sys.argv[1:]]))
