"""Speed and memory against a reference (llama.cpp, transformers, PyTorch ops): see benchmarks/README.md."""
