"""Grouped-query self-attention with RoPE and q/k/v biases, its attention chosen once at build:
`rotary_attention` (SDPA over the keys the mask allows; sliding windows are masks too) or, with a
dual_chunk_attention_config, Dual Chunk Attention (qwen2/model/dca.py)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Qwen2Config
from .rope import apply_rope


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q (B, nh, T, hs) over k, v (B, nkv, S, hs); mask None is plain causal. GQA: SDPA broadcasts
    each kv head over its nh/nkv query heads, nothing is copied."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                          enable_gqa=q.shape[1] != k.shape[1])  # (B, nh, T, hs)


def rotary_attention(q, k, v, cos, sin, mask, cache) -> torch.Tensor:
    """q (B, nh, T, hs) not yet rotated; k, v (B, nkv, S, hs): every key this forward sees, rotated."""
    return cache.attend(apply_rope(q, cos, sin), k, v, mask, scaled_dot_product)


class Attention(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.n_head, self.n_kv_head = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        C = config.hidden_size
        # Qwen2 keeps a bias on q, k and v (the report credits it with better length extrapolation)
        # but none on the output projection.
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=True)
        self.k_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=True)
        self.v_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        if config.dual_chunk_attention_config is not None:
            from .dca import dual_chunk_attention_layer
            self.attend = dual_chunk_attention_layer
        else:
            self.attend = rotary_attention

    def forward(self, x, cos, sin, mask, cache, layer: int):
        """x (B, T, C); cos, sin (B, T, hs) the keys' RoPE tables; mask what `attend` takes (see
        Transformer.forward); cache a qwen2/model/cache.py cache, `layer` this layer's index in it."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        k, v = cache.write(layer, apply_rope(k, cos, sin), v)  # (B, nkv, S, hs): cached + new
        y = self.attend(q, k, v, cos, sin, mask, cache)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
