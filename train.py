"""`python train.py CONFIG.yaml [--set key=value ...] [--resume]`: the same as `pesc train`.

Also the script to hand to `accelerate launch` or `torchrun` (see docs/training.md).
"""

import sys

from pesc.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
