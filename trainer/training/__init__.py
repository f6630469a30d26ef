"""The training run: the loop and its parts, the step, metrics, checkpoints, the run directory and its log, faults."""
