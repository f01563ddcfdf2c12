"""Median ms of forward + backward for each engine layer (conv2d, conv1d, maxpool2d, batchnorm2d, gru, lstm, ctc)
at the tasks' shapes, and of each engine task config's training step, against torch.autograd in the same run
(same as `bp-apps bench layers`).

Usage: python scripts/bench_layers.py [--device cuda] [--repeats N] [--configs CONFIG ...] [--json PATH]
"""

import sys

from bp_apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "layers", *sys.argv[1:]]))
