"""A model from a config and a state dict, and checking that the two match."""
from __future__ import annotations

import torch

from ..config import Qwen2Config
from ..errors import Qwen2Error
from ..model import RotaryEmbedding, Transformer
from ..model.moe import is_expert_weight


def build_model(config: Qwen2Config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", expert_dtype: torch.dtype | None = None) -> Transformer:
    """A Transformer holding exactly these weights (no random init: built on the meta device).
    expert_dtype: the MoE experts' weights in that dtype instead (see qwen2.moe.set_expert_dtype),
    converted one by one, so a bf16 checkpoint's experts are never held in fp32 on the way."""
    state_dict = dict(state_dict)
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(config)
    _check_against(model, config, state_dict)
    state_dict = {k: v.to(device=device, dtype=expert_dtype if expert_dtype and is_expert_weight(k) else dtype)
                  for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope = RotaryEmbedding(config).to(device)  # its buffer was only a meta placeholder
    return model.eval()


def check_state_dict(config: Qwen2Config, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise Qwen2Error unless `state_dict` holds exactly the tensors `config` describes, in their
    shapes (a tied model's lm_head.weight may be there or not). Costs nothing: no weights are made."""
    with torch.device("meta"):
        model = Transformer(config)
    state_dict = {k: v for k, v in state_dict.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    _check_against(model, config, state_dict)


def _check_against(model: Transformer, config: Qwen2Config, state_dict: dict[str, torch.Tensor]) -> None:
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise Qwen2Error(f"checkpoint does not match its config: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for name, tensor in model.state_dict().items():
        if name in state_dict and state_dict[name].shape != tensor.shape:
            raise Qwen2Error(f"checkpoint tensor {name} has shape {tuple(state_dict[name].shape)}, "
                             f"config expects {tuple(tensor.shape)}")
