"""Digits accuracy of the hand-written MLP over seeds, and its speed against scikit-learn's
MLPClassifier to the same accuracy (same as `bp-apps bench digits`).

Usage: python scripts/bench_digits.py [--seeds 3] [--json PATH]
"""

import sys

from bp_apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "digits", *sys.argv[1:]]))
