"""Evaluation: retrieval, negation and zero-shot tasks on the evaluation sets, metrics, the standard
benchmarks read from local files, what the prompts learned, aspect reweighting, plots and the run summary."""
