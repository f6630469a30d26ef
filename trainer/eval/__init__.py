"""Evaluation: the paper's protocols over a validation set (``evaluate``), the weights a checkpoint or state dict
holds (``weights``), and ``residual eval`` of saved weights (``evaluate_checkpoint``)."""
