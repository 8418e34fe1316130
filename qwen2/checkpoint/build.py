"""A model from a config and a state dict, and checking that the two match."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..config import Qwen2Config
from ..errors import Qwen2Error
from ..model import RotaryEmbedding, Transformer
from ..model.moe import is_expert_weight


def build_model(config: Qwen2Config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", expert_dtype: torch.dtype | None = None,
                modules: Mapping[str, nn.Module] | None = None) -> Transformer:
    """A Transformer holding exactly these weights (no random init: built on the meta device).
    expert_dtype: the MoE experts' weights in that dtype instead (see qwen2.model.moe.set_expert_dtype),
    converted one by one, so a bf16 checkpoint's experts are never held in fp32 on the way.
    modules: module name -> a module made elsewhere that takes that place (a quantised linear built
    from a GGUF's blocks, a `QuantEmbedding`); the tensors of the module it replaces are then not in
    `state_dict`, and a tied head replaced is no longer tied."""
    modules = dict(modules or {})
    state_dict = dict(state_dict)
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    model = skeleton(config)
    _check_against(model, config, state_dict, replaced=modules)
    state_dict = {k: v.to(device=device, dtype=expert_dtype if expert_dtype and is_expert_weight(k) else dtype)
                  for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=False, assign=True)
    for name, module in modules.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)
    if config.tie_word_embeddings and "lm_head" not in modules:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope = RotaryEmbedding(config).to(device)  # its buffer was only a meta placeholder
    return model.eval()


def check_state_dict(config: Qwen2Config, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise Qwen2Error unless `state_dict` holds exactly the tensors `config` describes, in their
    shapes (a tied model's lm_head.weight may be there or not). Costs nothing: no weights are made."""
    model = skeleton(config)
    state_dict = {k: v for k, v in state_dict.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    _check_against(model, config, state_dict)


def skeleton(config: Qwen2Config) -> Transformer:
    """A Transformer of `config` whose parameters are meta tensors (no memory, no initialisation), for
    weights to be assigned into. Not `with torch.device("meta")`: there every op of the constructor runs
    on meta tensors, and some (an embedding's normal_, the RoPE tables' arithmetic) only through
    PyTorch's Python reference implementations, whose first use imports torch._dynamo: ~1 s of every
    load (1.0-1.3 s here, against 3 s for the whole of a warm int4 load of the 0.5B model). Here
    `torch.empty`, what nn.Linear and nn.Embedding make their parameters with, makes meta tensors, the
    initialisers that would fill them are skipped, and the rest (RoPE tables) runs on the CPU."""
    with _MetaParameters():
        return Transformer(config)


class _MetaParameters(TorchFunctionMode):
    _INITIALISERS = {"normal_", "uniform_", "zero_", "fill_", "copy_", "bernoulli_", "exponential_", "random_",
                     "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs = dict(kwargs, device="meta")
        elif getattr(func, "__name__", "") in self._INITIALISERS:
            tensor = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor  # filling a tensor that holds no data
        return func(*args, **kwargs)


def _check_against(model: Transformer, config: Qwen2Config, state_dict: dict[str, torch.Tensor],
                   replaced: Mapping[str, nn.Module] = {}) -> None:
    prefixes = tuple(f"{name}." for name in replaced)
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")
                and not k.startswith(prefixes)}
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise Qwen2Error(f"checkpoint does not match its config: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for name, tensor in model.state_dict().items():
        if name in state_dict and state_dict[name].shape != tensor.shape:
            raise Qwen2Error(f"checkpoint tensor {name} has shape {tuple(state_dict[name].shape)}, "
                             f"config expects {tuple(tensor.shape)}")
