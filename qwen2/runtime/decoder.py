"""The executor interface (see qwen2/runtime/executor.py), and its plainest form: the model's own forward."""
from __future__ import annotations

import torch


class EagerDecoder:
    """The model's own forward."""

    name = "eager"

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None, cache=None,
                 last_only: bool = False) -> torch.Tensor:
        return self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                          last_only=last_only)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def new_cache(self, batch_size: int, max_len: int | None = None):
        return self.model.new_cache(batch_size, max_len)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"
