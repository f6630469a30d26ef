"""The recipe: optimizer, learning-rate schedule, EMA, batch mixing, precision and the parallel wrapper."""
