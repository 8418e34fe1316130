"""The decoder's leaf modules: RMSNorm and the SwiGLU feed-forward."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


def aten_when_compiled(name: str, fake):
    """Decorator: the function runs as written in eager mode, and, traced by torch.compile for inference,
    as one opaque op `qwen2::<name>` that runs these very ATen kernels, not the code inductor would
    generate for them (`fake` gives its output shapes). Why: the compiled decode step must compute the
    eager step's logits bit for bit (qwen2/runtime/compile.py), and inductor's fused cos/sin (SLEEF; ATen's
    are MKL's, a third of them 1 ulp apart) and RMSNorm (its own order of summing the squares) differ from
    ATen's in the last bit; the int4 model's int8 activations turn such bits into visible logit
    differences (0.3-0.6 on the 0.5B model)."""
    def wrap(fn):
        op = torch.library.custom_op(f"qwen2::{name}", fn, mutates_args=())
        op.register_fake(fake)

        @functools.wraps(fn)
        def call(*args):
            # inference only: the op has no backward (a compiled training step keeps inductor's code)
            return op(*args) if torch.compiler.is_compiling() and not torch.is_grad_enabled() else fn(*args)
        return call
    return wrap


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
