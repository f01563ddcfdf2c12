"""Train the engine and autograd backends side by side on digits (same as `bp-apps compare`).

Usage: python scripts/compare.py [--epochs 20] [--width 128] [--depth 2] [--json PATH] ...
"""

import sys

from bp_apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
