"""The decoder's leaf modules: RMSNorm and the SwiGLU feed-forward."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .compiled_ops import aten_when_compiled


@aten_when_compiled("rms_norm", lambda x, weight, eps: torch.empty(
    x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device))
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 whatever the model dtype (bf16 sums of squares lose precision), cast
    # back, then scale: this order is the reference's and matters for bit-level parity in bf16.
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases. The dense MLP, and each MoE expert at its width."""

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.up_proj = nn.Linear(hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
