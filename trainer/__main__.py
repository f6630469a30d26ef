"""``python -m trainer CONFIG [key=value ...]``: the training entry point that torchrun and SLURM tasks start."""

import sys

from trainer.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
