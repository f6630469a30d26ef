"""Reports on finished runs: the paper's figures and tables from metrics, and published accuracies."""
