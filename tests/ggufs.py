"""Test helpers: tiny random Qwen2 models, and GGUF files written the way llama.cpp writes them.

A GGUF here is written with `gguf.GGUFWriter` (arch "qwen2", llama.cpp tensor names, F32 / F16 /
Q8_0 tensors) so that both our loader and transformers' GGUF loader can read it. Weights are given
in PyTorch layout (out_features, in_features); GGUFWriter stores the dims innermost first itself.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping

import numpy as np
import torch

from qwen2.checkpoint.gguf import _GLOBAL_TENSORS, _LAYER_TENSORS, open_gguf, read_metadata
from qwen2.config import Qwen2Config
from qwen2.model import Transformer

# HF name -> llama.cpp name
_TO_GGUF_GLOBAL = {hf: g for g, hf in _GLOBAL_TENSORS.items()}
_TO_GGUF_LAYER = {hf: g for g, hf in _LAYER_TENSORS.items()}


def gguf_tensor_name(hf_name: str) -> str:
    if hf_name in _TO_GGUF_GLOBAL:
        return _TO_GGUF_GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.rest
    return f"blk.{layer}.{_TO_GGUF_LAYER[rest]}"


def tiny_config(**overrides) -> Qwen2Config:
    """Small but not degenerate: 2 layers, GQA (4 query heads sharing 2 kv heads), head_dim 8,
    non-default rope_theta and rms_norm_eps (so a dropped field shows in the logits)."""
    kw: dict[str, Any] = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                              rope_theta=10_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                              bos_token_id=151643, eos_token_id=151645, torch_dtype="float32")
    kw.update(overrides)
    return Qwen2Config(**kw)


def random_model(config: Qwen2Config, seed: int = 0) -> Transformer:
    """A Transformer with every parameter random, norms included (all-ones norms would hide a
    swapped or dropped norm weight)."""
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is listed once, as the embedding
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def state_dict_of(model: Transformer) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def save_random_model_dir(path: str | os.PathLike, tokenizer, config: Qwen2Config | None = None) -> str:
    """An HF directory holding a random model (default: `tiny_config`, tied, at the tokenizer's vocabulary)
    with `tokenizer` and its generation_config: what `qwen2.load`, the CLI and training take."""
    from qwen2.checkpoint.hf import save_hf_dir
    from qwen2.checkpoint.registry import generation_config_for

    if config is None:
        config = tiny_config(vocab_size=len(tokenizer), tie_word_embeddings=True)
    save_hf_dir(str(path), config, state_dict_of(random_model(config)), tokenizer, generation_config_for(tokenizer))
    return str(path)


# ---- tokenizer metadata ---------------------------------------------------------------------------

def _bytes_to_unicode() -> list[str]:
    """GPT-2's 256 printable stand-ins for bytes, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def small_tokenizer_metadata() -> dict[str, Any]:
    """A byte-level BPE tokenizer of 264 tokens in llama.cpp's keys: the 256 byte tokens, a few
    merges and Qwen2's three control tokens. Fast to write and to parse, for files whose
    tokenizer is not what is tested."""
    tokens = _bytes_to_unicode()
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens += ["Ġt", "he", "Ġthe", "in", "Ġa"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * len(tokens) + [3] * len(specials)
    tokens += specials
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
        "tokenizer.ggml.padding_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.add_bos_token": False,
    }


@functools.lru_cache(maxsize=None)
def _real_metadata(path: str) -> tuple[tuple[str, Any], ...]:
    meta = read_metadata(open_gguf(path))  # ~10 s: the reader parses 450k array items one by one
    return tuple((k, v) for k, v in meta.items() if k.startswith("tokenizer."))


def real_tokenizer_metadata(path: str) -> dict[str, Any]:
    """tokenizer.ggml.* and tokenizer.chat_template of a real GGUF (read once per process)."""
    return dict(_real_metadata(os.fspath(path)))


# ---- writing --------------------------------------------------------------------------------------

def _add_value(writer, key: str, value: Any) -> None:
    from gguf import GGUFValueType

    if isinstance(value, tuple) and value and isinstance(value[0], GGUFValueType):  # (type, value[, item type])
        writer.add_key_value(key, value[1], value[0], sub_type=value[2] if len(value) > 2 else None)
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, int):  # llama.cpp writes counts and token ids as uint32
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, (list, tuple)):
        sub = GGUFValueType.STRING if value and isinstance(value[0], str) else GGUFValueType.INT32
        writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=sub)
    else:
        raise TypeError(f"{key}: {type(value)}")


def default_qtype(gguf_name: str, ndim: int) -> str:
    """Like a llama.cpp Q8_0 file, with more variety: 1-D tensors F32; layer 0 and the
    embedding/output Q8_0; layer 1 F32, except its attn_output in F16."""
    if ndim == 1:
        return "F32"
    if gguf_name.startswith("blk.1."):
        return "F16" if gguf_name == "blk.1.attn_output.weight" else "F32"
    return "Q8_0"


def write_gguf(path: str | os.PathLike, config: Qwen2Config, state_dict: Mapping[str, torch.Tensor],
               tokenizer_metadata: Mapping[str, Any], arch: str = "qwen2",
               qtype: Callable[[str, int], str] = default_qtype, extra_tensors: Mapping[str, np.ndarray] = (),
               metadata: Mapping[str, Any] = (), alignment: int | None = None) -> str:
    """A GGUF of `state_dict` (HF names; a tied model has no lm_head.weight -> no output.weight).
    `metadata` adds or replaces keys (None removes one); `extra_tensors` are written as given."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    path = os.fspath(path)
    writer = GGUFWriter(path, arch)
    writer.add_name("tiny test model")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    meta = {
        f"{arch}.block_count": config.num_hidden_layers,
        f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.attention.head_count": config.num_attention_heads,
        f"{arch}.attention.head_count_kv": config.num_key_value_heads,
        f"{arch}.rope.freq_base": float(config.rope_theta),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "general.file_type": 7,  # mostly Q8_0
    }
    meta.update(tokenizer_metadata)
    meta.update(metadata)  # a None value leaves the key out
    for key, value in meta.items():
        if value is not None:
            _add_value(writer, key, value)
    for hf_name, tensor in state_dict.items():
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue
        name = gguf_tensor_name(hf_name)
        array = tensor.detach().float().numpy()
        kind = qtype(name, array.ndim)
        if kind == "F32":
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        elif kind == "F16":
            writer.add_tensor(name, array.astype(np.float16))
        else:
            t = GGMLQuantizationType[kind]
            writer.add_tensor(name, quants.quantize(array, t), raw_dtype=t)
    for name, array in dict(extra_tensors).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
