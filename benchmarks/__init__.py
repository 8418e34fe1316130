"""Benchmarks of this project against its references (`speed/`) and experiments that measure quality
(`experiments/`); shared code in `benchmarks.common`. See benchmarks/README.md."""
