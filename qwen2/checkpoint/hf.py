"""Hugging Face model directories: config.json, (sharded) *.safetensors, tokenizer files,
generation_config.json. Safetensors only: no pickle is ever loaded."""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..config import Qwen2Config
from ..errors import Qwen2Error
from ..fileio import atomic_dir

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
MAX_SHARD_BYTES = 4 * 1024**3  # transformers' own default shard size is 5 GB; smaller shards load lazily


def is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory, from model.safetensors or the shards its index names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index_path = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
                shards = sorted(set(weight_map.values()))
                if not all(isinstance(s, str) for s in shards):
                    raise TypeError("weight_map values must be file names")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise Qwen2Error(f"{index_path} is not a valid safetensors index ({type(e).__name__}: {e})") from None
    elif os.path.isfile(os.path.join(path, SAFETENSORS_SINGLE)):
        shards = [SAFETENSORS_SINGLE]
    else:
        found = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found {', '.join(found)}: pickle files are not loaded; convert them to safetensors)" if found else ""
        raise Qwen2Error(f"no model.safetensors or {SAFETENSORS_INDEX} in {path}{hint}")
    state_dict = {}
    for shard in shards:
        shard_path = os.path.join(path, shard)
        if not os.path.isfile(shard_path):
            raise Qwen2Error(f"safetensors shard {shard} named in the index is missing from {path}")
        try:
            state_dict.update(load_file(shard_path))
        except (SafetensorError, OSError, ValueError) as e:
            raise Qwen2Error(f"{shard_path} is truncated or corrupt ({e}); download or convert it again") from None
    return state_dict


def read_generation_config(path: str) -> dict[str, Any]:
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise Qwen2Error(f"{file} is not valid JSON ({e})") from None


def load_hf_dir(path: str):
    """(config, state_dict, tokenizer or None, generation_config dict) from an HF directory."""
    from ..tokenizer import Tokenizer

    if not is_hf_dir(path):
        raise Qwen2Error(f"{path} is not a model directory (no config.json)")
    config = Qwen2Config.from_json_file(os.path.join(path, "config.json"))
    state_dict = read_state_dict(path)
    has_tokenizer = any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "vocab.json"))
    tokenizer = Tokenizer.from_dir(path) if has_tokenizer else None
    return config, state_dict, tokenizer, read_generation_config(path)


def _shards(state_dict: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, size = [{}], 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> str:
    """The absolute output path, or a Qwen2Error if writing there would clobber something."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise Qwen2Error(f"{path} already exists and is a file, not a directory; choose a new output directory")
    if os.path.isdir(path) and not overwrite and os.listdir(path):
        raise Qwen2Error(f"{path} already exists and is not empty; choose a new output directory or remove it "
                         "(or pass --force)")
    return path


def save_hf_dir(path: str, config: Qwen2Config, state_dict: dict[str, torch.Tensor], tokenizer=None,
                generation_config: dict | None = None, overwrite: bool = False,
                max_shard_bytes: int = MAX_SHARD_BYTES, extra_files: dict[str, dict] | None = None) -> None:
    """Write a directory transformers' `from_pretrained` loads. Atomic: everything goes to a
    temporary sibling directory that is renamed into place only once complete."""
    if not state_dict:
        raise Qwen2Error("no tensors to save: the state dict is empty")
    from .build import check_state_dict
    check_state_dict(config, state_dict)  # never write a directory that would not load
    # A tied output layer is the embedding itself; like HF, store it once.
    tensors = {k: v for k, v in state_dict.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    write_hf_dir(path, config.to_hf_dict(), tensors, tokenizer, generation_config, overwrite, max_shard_bytes,
                 extra_files)


def write_hf_dir(path: str, hf_config: dict, tensors: dict[str, torch.Tensor], tokenizer=None,
                 generation_config: dict | None = None, overwrite: bool = False,
                 max_shard_bytes: int = MAX_SHARD_BYTES, extra_files: dict[str, dict] | None = None) -> None:
    """config.json (`hf_config`, with the tensors' dtype), the tensors as safetensors (sharded past
    `max_shard_bytes`, with an index), the tokenizer and any other JSON files, all at once: written to
    a temporary sibling directory renamed into place when complete. The caller has checked that the
    tensors are what the config's architecture loads."""
    from safetensors.torch import save_file

    path = check_output_dir(path, overwrite)
    try:
        with atomic_dir(path) as tmp:
            dtype = next(iter(tensors.values())).dtype
            _write_json(os.path.join(tmp, "config.json"), hf_config | {"torch_dtype": str(dtype).removeprefix("torch.")})
            tensors = {k: v.contiguous() for k, v in tensors.items()}
            shards = _shards(tensors, max_shard_bytes)
            if len(shards) == 1:
                save_file(shards[0], os.path.join(tmp, SAFETENSORS_SINGLE), metadata={"format": "pt"})
            else:
                weight_map = {}
                for i, shard in enumerate(shards, 1):
                    name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                    save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                    weight_map.update(dict.fromkeys(shard, name))
                total = sum(t.numel() * t.element_size() for t in tensors.values())
                _write_json(os.path.join(tmp, SAFETENSORS_INDEX),
                            {"metadata": {"total_size": total}, "weight_map": weight_map})
            if generation_config:
                _write_json(os.path.join(tmp, "generation_config.json"), generation_config)
            if tokenizer is not None:
                tokenizer.save(tmp)
            for name, content in (extra_files or {}).items():
                _write_json(os.path.join(tmp, name), content)
    except OSError as e:  # disk full, permission denied, ...: one line, nothing left behind
        raise Qwen2Error(f"cannot write {path}: {e.strerror or e}") from None


def _write_json(file: str, obj) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
