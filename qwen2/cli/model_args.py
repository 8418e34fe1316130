"""The options every model-loading command shares (--model, --dtype, quantisation, executor, long
context), and loading the model they name."""
from __future__ import annotations

import argparse

from ..checkpoint.registry import DEFAULT_MODEL
from ..quant import DEFAULT_GROUP_SIZE, GROUP_SIZES, MODES
from ..runtime.executor import EXECUTORS


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"registry name, HF model directory or .gguf file (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--expert-dtype", default=None, metavar="DTYPE",
                   help="Qwen2-MoE: store and run the experts in bfloat16 (half their memory, faster on CPUs "
                        "with bf16 units) while the rest stays in --dtype")
    add_quantize_args(p)


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=MODES, default=None,
                   help="weight-only quantised linears (CPU): int8 (groups of 32), int4 group-wise "
                        "(v_proj/down_proj int8), int4-pure (all int4); lm_head int8 in the int4 modes")
    p.add_argument("--group-size", type=int, default=None,
                   help=f"int4 group size: {', '.join(map(str, GROUP_SIZES))} (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (compiles on first use); "
                   "the same as --executor compiled")
    p.add_argument("--executor", choices=EXECUTORS, default="auto",
                   help="how forwards run: native CPU decode ops, eager PyTorch, or compiled (default auto: the "
                        "fastest that applies)")


def add_long_context_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("long context (YaRN, Dual Chunk Attention; the usable context grows with them)")
    g.add_argument("--rope-scaling", default=None, metavar="SPEC",
                   help="yarn:FACTOR (e.g. yarn:4), dynamic-yarn:FACTOR (plain RoPE until a sequence outgrows "
                        "the trained length), yarn:FACTOR:ORIGINAL_LENGTH, or none")
    g.add_argument("--dca", nargs="?", type=int, const=True, default=None, metavar="CHUNK_SIZE",
                   help="Dual Chunk Attention (chunk size default: the trained length, local size chunk/32)")
    g.add_argument("--long-context", action="store_true",
                   help="the Qwen2.5 model cards' setting: YaRN factor 4 plus DCA (e.g. 32K -> 128K)")


def load_model(args):
    from ..api import load

    return load(args.model, dtype=args.dtype, quantize=getattr(args, "quantize", None),
                group_size=getattr(args, "group_size", None), compile=getattr(args, "compile", False),
                executor=getattr(args, "executor", "auto"),
                rope_scaling=getattr(args, "rope_scaling", None), dca=getattr(args, "dca", None),
                long_context=getattr(args, "long_context", False), expert_dtype=getattr(args, "expert_dtype", None))
