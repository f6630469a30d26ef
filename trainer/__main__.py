"""``python -m trainer CONFIG [key=value ...]``: the training entry point that torchrun and SLURM tasks start."""

import sys

from trainer.cli import main

if __name__ == "__main__":  # not in the worker processes that DALI and DataLoader spawn, which import this module
    sys.exit(main(["train", *sys.argv[1:]]))
