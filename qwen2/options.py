"""`LoadOptions`: how `qwen2.load` builds a model, checked once, before any weights are read.

One frozen dataclass for everything that builds a model: `qwen2.load(source, options)` (its
keywords build one: `LoadOptions.from_kwargs`), the `qwen2` command (`from_args`, and the flags
themselves: `add_load_args`, whose choices are the constants of the code that takes them), the
server (through the command) and the lm-eval adapter (`from_lm_eval`). A bad value is a one-line
`Qwen2Error` saying what is wrong and what to give instead, raised when the options are made.

What needs the checkpoint's config (expert_dtype on a model without experts, compiled decoding
with a config's own Dual Chunk Attention, a rope_scaling dict's fields) is checked by `load` once
the config is read, still before the weights are.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Collection

import torch

from . import long_context as lc
from .errors import Qwen2Error
from .quant import DEFAULT_GROUP_SIZE, GROUP_SIZES, MODES, check_group_size, check_mode
from .runtime.compile import check_compilable
from .runtime.executor import EXECUTORS, check_executor

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise Qwen2Error(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise Qwen2Error(f"unknown device {device!r}; use cpu, cuda, cuda:N or another torch device") from None


def _flag(name: str, value) -> bool:
    if value not in (True, False):  # 1 and 0 too, as they always were
        raise Qwen2Error(f"{name} must be True or False, not {value!r}")
    return bool(value)


@dataclass(frozen=True)
class LoadOptions:
    """How to build a model (see `qwen2.load` for what each does). Made, the values are checked and
    normal: `dtype` and `expert_dtype` torch dtypes, `device` a torch.device, `quantize` a mode of
    `quant.MODES` or None, `group_size` the int4 group size (None unless int4), `executor` one of
    `runtime.executor.EXECUTORS`."""
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    progress: bool = True
    quantize: str | None = None
    group_size: int | None = None
    quantize_lm_head: bool | None = None
    executor: str = "auto"
    rope_scaling: str | dict | None = None
    dca: bool | int | dict | None = None
    long_context: bool = False
    expert_dtype: torch.dtype | None = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("dtype", parse_dtype(self.dtype))
        put("device", _parse_device(self.device))
        put("progress", _flag("progress", self.progress))
        put("executor", check_executor(self.executor))
        mode = check_mode(self.quantize)
        put("quantize", mode)
        if self.expert_dtype is not None:
            from .model.moe import check_expert_dtype

            put("expert_dtype", check_expert_dtype(parse_dtype(self.expert_dtype)))
        int4 = (mode or "").startswith("int4")
        if self.group_size is not None and not int4:
            raise Qwen2Error("group_size applies to quantize='int4' (or 'int4-pure') only")
        if int4:
            group_size = DEFAULT_GROUP_SIZE if self.group_size is None else self.group_size
            check_group_size(group_size, {})
            put("group_size", group_size)
        if self.quantize_lm_head is not None:
            put("quantize_lm_head", _flag("quantize_lm_head", self.quantize_lm_head))
        if mode is not None and self.device.type != "cpu":
            raise Qwen2Error(f"quantize={mode!r} runs on the CPU only, not {self.device}")
        lc.check_rope_scaling(self.rope_scaling)
        lc.check_dca(self.dca)
        put("long_context", _flag("long_context", self.long_context))
        if self.executor == "compiled":  # a checkpoint's own DCA is checked by load, with its config
            check_compilable(self.dca not in (None, False) or (self.long_context and self.dca is None))

    def replace(self, **changes) -> "LoadOptions":
        """These options with `changes` (load's keywords, compile= included), checked again."""
        return LoadOptions.from_kwargs(self, **changes)

    # ---- the ways in ------------------------------------------------------------------------------

    @classmethod
    def from_kwargs(cls, options: "LoadOptions | None" = None, /, **kwargs) -> "LoadOptions":
        """`qwen2.load`'s keywords as options (over `options` when given): the fields, and compile=True,
        which is executor="compiled". An unknown keyword is a TypeError, as for any function."""
        unknown = sorted(set(kwargs) - LOAD_KEYWORDS)
        if unknown:
            raise TypeError(f"load() got an unexpected keyword argument {unknown[0]!r}")
        if options is not None and not isinstance(options, LoadOptions):
            raise Qwen2Error(f"options must be a qwen2.LoadOptions, not {type(options).__name__}; give dtype= and "
                             "the other options as keywords")
        if "compile" in kwargs:
            compile = kwargs.pop("compile")
            executor = kwargs.get("executor", "auto" if options is None else options.executor)
            kwargs["executor"] = _executor(compile, executor)
        if options is None:
            return cls(**kwargs)
        return dataclasses.replace(options, **kwargs) if kwargs else options

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LoadOptions":
        """The options of a `qwen2` command's parsed flags (`add_load_args`'s; those a command lacks
        keep their defaults)."""
        def get(name, default=None):
            value = getattr(args, name, default)
            return default if value is None else value

        return cls(dtype=get("dtype", "float32"), expert_dtype=get("expert_dtype"), quantize=get("quantize"),
                   group_size=get("group_size"), executor=_executor(get("compile", False), get("executor", "auto")),
                   rope_scaling=get("rope_scaling"), dca=get("dca"), long_context=get("long_context", False))

    @classmethod
    def from_lm_eval(cls, model_args: str | dict, own: Collection[str] = ()) -> "LoadOptions":
        """The options in lm-eval's model_args: the "key=value,..." string of `--model_args`, or the
        dict lm_eval makes of it (values already typed) plus its `device`. Keys are load's keywords;
        `own` names the caller's other keys (left to it). Any other key is an error: a misspelt option
        would otherwise evaluate a different model than the one asked for."""
        if isinstance(model_args, str):
            model_args = parse_arg_string(model_args)
        unknown = sorted(set(model_args) - LOAD_KEYWORDS - set(own))
        if unknown:
            raise Qwen2Error(f"unknown model_args {', '.join(map(repr, unknown))}; qwen2 takes "
                             f"{', '.join(sorted(LOAD_KEYWORDS | set(own)))}")
        kwargs = {k: v for k, v in model_args.items() if k in LOAD_KEYWORDS and v is not None}
        for key in ("quantize", "group_size"):  # quantize= or group_size= (empty, or false): the default
            if key in kwargs and not kwargs[key]:
                del kwargs[key]
        if isinstance(kwargs.get("group_size"), str) and kwargs["group_size"].strip().isdigit():
            kwargs["group_size"] = int(kwargs["group_size"])
        return cls.from_kwargs(**kwargs)


LOAD_KEYWORDS = frozenset(f.name for f in dataclasses.fields(LoadOptions)) | {"compile"}


def _executor(compile: bool, executor: str) -> str:
    """compile=True is executor="compiled"; with another executor named, the two disagree."""
    if compile not in (True, False):
        raise Qwen2Error(f"compile must be True or False, not {compile!r}")
    if compile and executor not in ("auto", "compiled"):
        raise Qwen2Error(f"compile=True means executor='compiled', not {executor!r}; drop one of them")
    return "compiled" if compile else executor


def _arg_value(text: str):
    """A model_args value as lm_eval reads it: true/false, none, an integer, a number, else the text."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    lower = text.lower()
    if lower in ("true", "false"):
        return lower == "true"
    if lower == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_arg_string(text: str) -> dict:
    """lm-eval's "key=value,key=value" model_args as a dict, its values typed as lm_eval types them."""
    args = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise Qwen2Error(f"model_args item {item!r} is not key=value; write them as key=value,key=value")
        args[key.strip()] = _arg_value(value)
    return args


# ---- the command line's flags ---------------------------------------------------------------------

def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", metavar="DTYPE",
                   help=f"weights and activations: {', '.join(DTYPES)} (default float32)")


def add_load_args(p: argparse.ArgumentParser) -> None:
    """The flags `LoadOptions.from_args` reads, their choices the constants of the code that takes them:
    --dtype (DTYPES), --expert-dtype, --quantize (quant.MODES), --group-size (quant.GROUP_SIZES),
    --compile, --executor (runtime.executor.EXECUTORS); the long-context ones are `add_long_context_args`."""
    add_dtype_arg(p)
    # --expert-dtype has no choices: its own check (float32 or bfloat16, on a MoE model) says what is wrong
    p.add_argument("--expert-dtype", default=None, metavar="DTYPE",
                   help="Qwen2-MoE: store and run the experts in bfloat16 (half their memory, faster on CPUs "
                        "with bf16 units) while the rest stays in --dtype")
    add_quantize_args(p)


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=MODES, default=None,
                   help="weight-only quantised linears (CPU): int8 (groups of 32), int4 group-wise "
                        "(v_proj/down_proj int8), int4-pure (all int4); lm_head int8 in the int4 modes")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None, metavar="N",
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
