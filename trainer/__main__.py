"""``python -m trainer CONFIG [key=value ...]``: the training entry point that torchrun and Ray trials start."""

import sys

from trainer.entry import run

if __name__ == "__main__":  # not in the worker processes that DALI and DataLoader spawn, which import this module
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m trainer CONFIG [key=value ...]")
    sys.exit(run(sys.argv[1], sys.argv[2:]))
