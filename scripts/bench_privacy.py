"""Median ms of one DP-SGD step for the DP MNIST MLP and CNN at batch 256 and 64: the engine's plain step, its
private step (per-example norms, clipping, noise) and Opacus's PrivacyEngine on the torch twin, in one run
(same as `bp-apps bench privacy`).

Usage: python scripts/bench_privacy.py [--batches 256,64] [--repeats N] [--threads 2] [--json PATH]
"""

import sys

from bp_apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "privacy", *sys.argv[1:]]))
