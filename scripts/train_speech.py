"""Train a speech model (CTC recognizer or spoken-digit classifier) from a config, then test its best checkpoint.

Same as `bp-apps fit`. Usage:
    python scripts/train_speech.py --config configs/speech/fsdd_digits.yaml [--trainer.max_epochs=2 ...]
"""

import sys

from bp_apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["fit", *sys.argv[1:]]))
