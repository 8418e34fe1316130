"""LoRA adapter directories read into one form, `LoRAAdapter`: for each adapted linear (by its module
name in our `Transformer`, which is transformers' Qwen2ForCausalLM's) its A (r, in), B (out, r) and
scale. Two layouts:

    ours     what `qwen2 train ... lora=true` writes (qwen2/train/lora.py): adapter_config.json
             {"r", "alpha", "modules"} and adapter.safetensors holding `<module>.lora_A` and
             `<module>.lora_B`; scale = alpha / r
    HF PEFT  what a LoRA `PeftModel.save_pretrained` writes: adapter_config.json {"peft_type": "LORA",
             "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", ...}
             and adapter_model.safetensors holding `base_model.model.<module>.lora_A.weight` and
             `.lora_B.weight`; scale = alpha / r, or alpha / sqrt(r) with use_rslora, per module as
             rank_pattern and alpha_pattern say

Safetensors only: a pickled adapter_model.bin is refused, since unpickling runs code from the file.
What the files alone can tell is checked here (each tensor an A or a B, in pairs, of the rank the
config says); `AdapterSet.add` checks the rest against the base model. Every problem is a one-line
Qwen2Error naming the adapter and, where there is one, the tensor.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch

from ..errors import Qwen2Error

ADAPTER_FILE = "adapter.safetensors"  # our layout: what qwen2.train.lora.save_adapters writes
ADAPTER_CONFIG = "adapter_config.json"  # both layouts' config file
PEFT_FILE = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# PEFT options that change what the saved tensors mean beyond plain LoRA: refused rather than misread
PEFT_UNSUPPORTED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (GPT-2's Conv1D layers)",
                    "modules_to_save": "modules_to_save (whole modules replaced)",
                    "layer_replication": "layer_replication", "trainable_token_indices": "trainable_token_indices"}


@dataclass(frozen=True)
class LoRAWeights:
    """One adapted linear: y += scale * x A^T B^T. `key` names A's tensor in the file, for errors."""
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float
    key: str

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class LoRAAdapter:
    """A named adapter: its adapted linears by module name, and the config's target modules (PEFT's
    `target_modules`, a list of names or a regex; our trainer's exact module names), which must
    name linears the base model has."""
    name: str
    path: str
    layers: dict[str, LoRAWeights]
    target_modules: list[str] | str | None


def read_adapter(name: str, path: str | os.PathLike) -> LoRAAdapter:
    """The adapter in directory `path` (either layout), to be served as `name`."""
    if not isinstance(name, str) or not name.strip():
        raise Qwen2Error(f"an adapter needs a non-empty name, got {name!r}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise Qwen2Error(f"adapter {name!r}: {path} is not a directory (give the directory holding "
                         f"{ADAPTER_CONFIG} and its safetensors file)")
    config = _read_config(name, path)
    if os.path.exists(os.path.join(path, ADAPTER_FILE)):
        return _ours(name, path, config)
    if os.path.exists(os.path.join(path, PEFT_FILE)):
        return _peft(name, path, config)
    if os.path.exists(os.path.join(path, PEFT_PICKLE)):
        raise Qwen2Error(f"adapter {name!r}: {path} holds {PEFT_PICKLE}, a pickle, which is never loaded (it can run "
                         f"code); convert it to {PEFT_FILE} (PeftModel.save_pretrained(..., safe_serialization=True))")
    raise Qwen2Error(f"adapter {name!r}: {path} holds no adapter weights ({ADAPTER_FILE} or {PEFT_FILE})")


def _read_config(name: str, path: str) -> dict:
    try:
        with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise Qwen2Error(f"adapter {name!r}: {path} has no {ADAPTER_CONFIG}") from None
    except (OSError, ValueError) as e:
        raise Qwen2Error(f"adapter {name!r}: cannot read {ADAPTER_CONFIG} in {path}: {e}") from None
    if not isinstance(config, dict):
        raise Qwen2Error(f"adapter {name!r}: {ADAPTER_CONFIG} in {path} is not a JSON object")
    return config


def _read_tensors(name: str, file: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise Qwen2Error(f"adapter {name!r}: cannot read {file}: {e}") from None


def _number(name: str, config: dict, key: str, integer: bool = False):
    value = config.get(key)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not ok or value <= 0:
        raise Qwen2Error(f"adapter {name!r}: {ADAPTER_CONFIG} needs {key} as a positive "
                         f"{'integer' if integer else 'number'}, got {value!r}")
    return value


def _ours(name: str, path: str, config: dict) -> LoRAAdapter:
    r, alpha = _number(name, config, "r", integer=True), _number(name, config, "alpha")
    modules = config.get("modules")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise Qwen2Error(f"adapter {name!r}: {ADAPTER_CONFIG} needs \"modules\", the list of adapted module names")
    tensors = _read_tensors(name, os.path.join(path, ADAPTER_FILE))
    pairs = _pairs(name, tensors, lambda key: re.fullmatch(r"(.+)\.lora_([AB])", key))
    if sorted(pairs) != sorted(modules):
        missing = sorted(set(modules) ^ set(pairs))[0]
        raise Qwen2Error(f"adapter {name!r}: {ADAPTER_CONFIG} and {ADAPTER_FILE} disagree on module {missing!r}")
    return LoRAAdapter(name, path, {m: _weights(name, keys, tensors, r, alpha / r) for m, keys in pairs.items()},
                       list(modules))


def _peft(name: str, path: str, config: dict) -> LoRAAdapter:
    if config.get("peft_type", "LORA") != "LORA":
        raise Qwen2Error(f"adapter {name!r}: peft_type {config['peft_type']!r} is not LoRA; only LoRA adapters "
                         "are served")
    for key, what in PEFT_UNSUPPORTED.items():
        if config.get(key):
            raise Qwen2Error(f"adapter {name!r}: {what} is not supported; serve a plain LoRA adapter")
    if config.get("bias", "none") not in ("none", None):
        raise Qwen2Error(f"adapter {name!r}: bias={config['bias']!r} is not supported; train with bias='none'")
    r, alpha = _number(name, config, "r", integer=True), _number(name, config, "lora_alpha")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    tensors = _read_tensors(name, os.path.join(path, PEFT_FILE))
    key_pattern = rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])\.weight"
    pairs = _pairs(name, tensors, lambda key: re.fullmatch(key_pattern, key))
    layers = {}
    for module, keys in pairs.items():
        # PEFT's own rule (peft.utils.other.get_pattern_key): a pattern matches the name's tail
        module_r = _pattern_value(rank_pattern, module, r)
        module_alpha = _pattern_value(alpha_pattern, module, alpha)
        layers[module] = _weights(name, keys, tensors, module_r,
                                  module_alpha / (math.sqrt(module_r) if rslora else module_r))
    return LoRAAdapter(name, path, layers, config.get("target_modules"))


def _pattern_value(patterns: dict, module: str, default):
    key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
    return default if key is None else patterns[key]


def _pairs(name: str, tensors: dict, parse) -> dict[str, dict[str, str]]:
    """{module: {"A": key, "B": key}} from the file's keys; a key that is neither, or a lone A or B, is an error."""
    if not tensors:
        raise Qwen2Error(f"adapter {name!r}: its safetensors file holds no tensors")
    pairs: dict[str, dict[str, str]] = {}
    for key in tensors:
        match = parse(key)
        if match is None:
            raise Qwen2Error(f"adapter {name!r}: tensor {key!r} is not a LoRA A or B weight (DoRA magnitudes, "
                             "embedding LoRA, biases and saved whole modules are not supported)")
        pairs.setdefault(match[1], {})[match[2]] = key
    for module, keys in pairs.items():
        if len(keys) != 2:
            raise Qwen2Error(f"adapter {name!r}: tensor {next(iter(keys.values()))!r} has no lora_"
                             f"{'B' if 'A' in keys else 'A'} beside it")
    return pairs


def _weights(name: str, keys: dict, tensors: dict, r: int, scale: float) -> LoRAWeights:
    A, B = tensors[keys["A"]], tensors[keys["B"]]
    for key, tensor, rank_dim in ((keys["A"], A, 0), (keys["B"], B, 1)):
        if tensor.dim() != 2:
            raise Qwen2Error(f"adapter {name!r}: tensor {key!r} has shape {tuple(tensor.shape)}, not a matrix")
        if tensor.shape[rank_dim] != r:
            raise Qwen2Error(f"adapter {name!r}: tensor {key!r} has shape {tuple(tensor.shape)}, of rank "
                             f"{tensor.shape[rank_dim]}, but {ADAPTER_CONFIG} says r={r}")
    return LoRAWeights(A, B, float(scale), keys["A"])
