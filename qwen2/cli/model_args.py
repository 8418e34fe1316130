"""The options every model-loading command shares (--model, and `qwen2.options`' flags: --dtype,
quantisation, executor, long context), and loading the model they name."""
from __future__ import annotations

import argparse

from ..checkpoint.registry import DEFAULT_MODEL
from ..options import LoadOptions, add_dtype_arg, add_load_args, add_long_context_args, add_quantize_args
from .adapter_args import lora_adapters

__all__ = ["add_dtype_arg", "add_long_context_args", "add_model_args", "add_quantize_args", "load_model"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"registry name, HF model directory or .gguf file (default: {DEFAULT_MODEL})")
    add_load_args(p)


def load_model(args):
    """The model `args.model` names, built as the parsed flags say (`LoadOptions.from_args`), with
    the LoRA adapters of a command that takes --lora (`adapter_args`) served beside it."""
    from ..api import load

    options = LoadOptions.from_args(args)
    return load(args.model, options=options, adapters=lora_adapters(args))
