"""Train an image classifier from a config, then test its best checkpoint (same as `bp-apps fit`).

Usage: python scripts/train_vision.py --config configs/vision/mnist_cnn.yaml [--trainer.max_epochs=2 ...]
"""

import sys

from bp_apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["fit", *sys.argv[1:]]))
