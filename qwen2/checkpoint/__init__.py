"""Where weights come from: registry names, HF directories, GGUF files."""
from __future__ import annotations

import os

from ..errors import Qwen2Error
from ..model import Transformer
from .build import build_model, check_state_dict
from .quantized import build_quantized
from .registry import DEFAULT_MODEL, KNOWN_MODELS


def resolve(source: str | os.PathLike, progress: bool = True) -> str:
    """A registry name becomes its cached HF directory; paths are checked and returned."""
    from .registry import hf_dir

    source = os.fspath(source)
    if source.lower() in KNOWN_MODELS:
        return hf_dir(source, progress=progress)
    if os.path.exists(source):
        return source
    if os.sep in source or source.endswith((".gguf", ".json", ".safetensors")):
        raise Qwen2Error(f"no such file or directory: {source}")
    raise Qwen2Error(f"unknown model {source!r}: not a registry name ({', '.join(KNOWN_MODELS)}), "
                     "an HF model directory or a .gguf file")


def load_checkpoint(source: str | os.PathLike, progress: bool = True, quantize: str | None = None,
                    group_size: int | None = None, lm_head: bool | None = None, dtype=None):
    """(config, state_dict, tokenizer or None, generation_config) from any supported source.

    With `quantize` (a mode, with the `group_size`, `lm_head` and `dtype` the model is to be built
    with: see `qwen2.quant.quantize_model`), a GGUF source (a .gguf file, or a registry name's
    assembled GGUF: never converted to the fp32 cache) gives a `GGUFPlan` in place of the state dict:
    `build_quantized` takes the blocks from it. Its weights are read and converted in the background
    from here on, while the tokenizer is built."""
    from .gguf import load_gguf
    from .hf import is_hf_dir, load_hf_dir
    from .registry import generation_config_for

    if quantize is not None:
        gguf = gguf_source(source, progress)
        if gguf is not None:
            import torch

            from ..quant import DEFAULT_GROUP_SIZE
            from ..quant.memory import return_freed_memory
            from ..tokenizer import Tokenizer
            from .gguf import read_gguf_header
            from .quantized import GGUFPlan

            reader, meta, config = read_gguf_header(gguf)
            plan = GGUFPlan(reader, config, quantize, DEFAULT_GROUP_SIZE if group_size is None else group_size,
                            lm_head, torch.float32 if dtype is None else dtype)
            plan.start(progress)  # the weights are read and converted while the tokenizer is built
            try:
                tokenizer = Tokenizer.from_gguf_metadata(meta)
            except BaseException:
                plan.cancel()
                raise
            # The vocabulary's 300,000 strings are the tokenizer's now: freed, and their pages handed
            # back, before the weights being filled reach the load's peak memory (50 MB of the 0.5B's).
            del meta
            reader.forget_vocabulary()
            return_freed_memory()
            return config, plan, tokenizer, generation_config_for(tokenizer)
    path = resolve(source, progress)
    if os.path.isdir(path):
        if not is_hf_dir(path):
            pickles = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth")))
            hint = f" (found {', '.join(pickles)}: pickle files are not loaded; use safetensors)" if pickles else ""
            raise Qwen2Error(f"{path} is not a model directory: it has no config.json{hint}")
        return load_hf_dir(path)
    if path.endswith(".gguf") or _has_gguf_magic(path):
        config, state_dict, tokenizer = load_gguf(path, progress=progress)
        return config, state_dict, tokenizer, generation_config_for(tokenizer)
    raise Qwen2Error(f"{path} is neither a model directory nor a .gguf file")


def gguf_source(source: str | os.PathLike, progress: bool = True) -> str | None:
    """The GGUF file the weights of `source` come from (a registry model's cached GGUF, or the file
    itself); None for an HF directory, or when a registry model's GGUF cannot be had any more."""
    from .registry import gguf_path

    source = os.fspath(source)
    if source.lower() in KNOWN_MODELS:
        try:
            return gguf_path(source, progress=progress)
        except Qwen2Error:  # parts uninstalled since the conversion: its HF directory still loads
            return None
    return source if os.path.isfile(source) and _has_gguf_magic(source) else None


def convert_gguf_exact(model: Transformer, source: str | os.PathLike, progress: bool = True) -> Transformer:
    """After `quantize_model`: when the weights come from a GGUF, swap in the exact quantised layer
    for each tensor whose blocks map losslessly onto ours (Q4_K -> int4 in int4 modes at group size
    32, Q8_0/Q5_0 -> int8; see `qwen2.quant.gguf_blocks`), counted by block type in
    `model.quantization["gguf_exact"]`. Unquantised models and HF-directory sources are left as they are.
    Loading no longer takes this way (it builds those layers from the blocks directly: `build_quantized`);
    the composition fp32 model -> `quantize_model` -> this gives the same model and stays for comparison."""
    from ..quant.gguf_blocks import convert_exact_linears, exact_block_types
    from .gguf import block_tensors, hf_tensor_name, open_gguf

    quantization = getattr(model, "quantization", None)
    if not quantization:
        return model
    path = gguf_source(source, progress)
    if path is not None:
        reader = open_gguf(path)
        tensors = block_tensors(reader, exact_block_types(model))
        tensors.update((hf_tensor_name(t.name), t) for t in reader.tensors if t.name == "token_embd.weight")
        counts = convert_exact_linears(model, tensors, reader.release, path, progress)
        if counts:
            quantization["gguf_exact"] = counts
    return model


def _has_gguf_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


__all__ = ["DEFAULT_MODEL", "KNOWN_MODELS", "build_model", "build_quantized", "check_state_dict", "convert_gguf_exact",
           "gguf_source", "load_checkpoint", "resolve"]
