"""Experiments that measure quality (extrapolation, retrieval, training, HumanEval): see benchmarks/README.md."""
