"""Train a text model (labeling or summarization) from a config, then test its best checkpoint.

Same as `bp-apps fit`. Usage:
    python scripts/train_text.py --config configs/text/label_punct_embedded.yaml [--trainer.max_epochs=2 ...]
"""

import sys

from bp_apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["fit", *sys.argv[1:]]))
