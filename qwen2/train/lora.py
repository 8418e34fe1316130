"""LoRA (Hu et al., arXiv 2106.09685): a frozen linear W plus a trained low-rank update,

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,    A (r, in), B (out, r)

B starts at zero, so the adapted model starts as the base model exactly. Adapted layers are
chosen by module-name patterns; `merge_lora` folds the update into W (the model is then a plain
Transformer that saves as an HF checkpoint); the adapters alone save and load as safetensors.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters.formats import ADAPTER_CONFIG, ADAPTER_FILE  # one layout, which serving reads (qwen2.adapters)
from ..errors import Qwen2Error
from ..fileio import atomic_file, write_text_atomic


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight`/`bias` names, so the base state dict keys do not change) with
    `lora_A` and `lora_B` beside it."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # adopt base's tensors instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + (alpha/r) B A."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.delta_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def _matches(name: str, patterns: list[str]) -> str | None:
    """The first pattern matching the module's full name or its last part (`q_proj`,
    `model.layers.*.mlp.*`, `*.self_attn.[qv]_proj`)."""
    short = name.rsplit(".", 1)[-1]
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(short, p)), None)


def apply_lora(model: nn.Module, targets: list[str], r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               seed: int | None = None) -> list[str]:
    """Replace each nn.Linear whose name matches a pattern in `targets` by a LoRALinear and freeze
    every other parameter. Returns the adapted module names. `seed` makes A's initialisation
    reproducible."""
    if getattr(model.config, "tie_word_embeddings", False) and _matches("lm_head", targets):
        raise Qwen2Error("lm_head is tied to the embedding: merging LoRA into it would change the embedding too; "
                         "leave lm_head out of lora_targets")
    chosen = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and _matches(name, targets)]
    unused = [p for p in targets if not any(_matches(name, [p]) for name, _ in chosen)]
    if unused:
        raise Qwen2Error(f"lora_targets pattern(s) {', '.join(map(repr, unused))} match no linear layer; "
                         "use names such as q_proj, v_proj, gate_proj or model.layers.0.mlp.*")
    for p in model.parameters():
        p.requires_grad_(False)
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for name, linear in chosen:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, LoRALinear(linear, r, alpha, dropout))
    finally:
        if seed is not None:
            torch.random.set_rng_state(gen_state)
    return [name for name, _ in chosen]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; the model is a plain one afterwards."""
    for name, layer in lora_layers(model).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer.merged())
    return model


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """The base model, adapters bypassed (DPO's reference model without a second copy of the weights)."""
    layers = lora_layers(model).values()
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: `<module>.lora_A`, `<module>.lora_B`."""
    return {f"{name}.{part}": getattr(layer, part).detach()
            for name, layer in lora_layers(model).items() for part in ("lora_A", "lora_B")}


def adapter_config(model: nn.Module) -> dict:
    layers = lora_layers(model)
    first = next(iter(layers.values()), None)
    if first is None:
        raise Qwen2Error("the model has no LoRA adapters to save")
    return {"r": first.r, "alpha": first.alpha, "dropout": getattr(first.dropout, "p", 0.0),
            "modules": sorted(layers)}


def save_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """adapter.safetensors + adapter_config.json into directory `path`, each written atomically."""
    from safetensors.torch import save

    os.makedirs(path, exist_ok=True)
    config = adapter_config(model)
    tensors = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
    with atomic_file(os.path.join(path, ADAPTER_FILE), "wb") as f:
        f.write(save(tensors, metadata={"format": "qwen2-lora"}))
    write_text_atomic(os.path.join(path, ADAPTER_CONFIG), json.dumps(config, indent=2))


def load_adapters(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Add the adapters saved in directory `path` to `model` (a base model without adapters, or one
    with the same adapters, whose values are replaced)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    try:
        with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
            config = json.load(f)
        tensors = load_file(os.path.join(path, ADAPTER_FILE))
    except FileNotFoundError as e:
        raise Qwen2Error(f"{path} holds no LoRA adapters ({os.path.basename(e.filename)} is missing)") from None
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise Qwen2Error(f"cannot read LoRA adapters from {path}: {e}") from None
    if not lora_layers(model):
        # Exact names, escaped for fnmatch: the saved modules and no others.
        apply_lora(model, [glob_escape(m) for m in config["modules"]], config["r"], config["alpha"], config["dropout"])
    expected = set(adapter_state_dict(model))
    if set(tensors) != expected:
        raise Qwen2Error(f"the adapters in {path} do not fit this model: they adapt "
                         f"{len(tensors) // 2} layers, the model has {len(expected) // 2} adapted layers")
    layers = lora_layers(model)
    with torch.no_grad():
        for key, value in tensors.items():
            module, _, part = key.rpartition(".")
            target = getattr(layers[module], part)
            if target.shape != value.shape:
                raise Qwen2Error(f"adapter {key} in {path} has shape {tuple(value.shape)}, the model's is "
                                 f"{tuple(target.shape)}; was it trained with another lora_r or model?")
            target.copy_(value)
    return sorted(layers)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
