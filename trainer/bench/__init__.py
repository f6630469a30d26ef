"""Benchmarks: tools that print figures and ratios (docs/benchmarks.md keeps them), not timed tests. One module
per ``residual bench`` command: train (and --end-to-end, and recipes), optim, eval, imagenet_size, gpu; the
loaders' own benchmarks are data_pipeline.bench."""
