"""Evaluation: what it counts (``counts``), the paper's protocols over a validation set (``evaluate``), the weights a
checkpoint or state dict holds (``weights``), ``residual eval`` of saved weights (``evaluate_checkpoint``) and its
report page (``eval_report``)."""
