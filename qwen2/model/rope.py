"""Rotary position embedding (RoPE), plain or YaRN-scaled (qwen2/model/yarn.py), in the "rotate half" layout.

Dynamic YaRN (ours, opt-in with `"dynamic": true` in rope_scaling): plain RoPE when the sequence fits
in the trained length, YaRN when it does not. Keys are cached already rotated, so the choice is made
once per sequence, from the length it may reach (`span`: the KV cache's `max_len`, i.e. prompt +
max_new_tokens in `generate`; the number of tokens in a cacheless forward): every key and query of a
sequence then uses one set of frequencies.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import long_context
from ..config import Qwen2Config
from .compiled_ops import aten_when_compiled
from .yarn import rope_frequencies


@aten_when_compiled("cos_sin", lambda angles: (torch.empty_like(angles), torch.empty_like(angles)))
def cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return angles.cos(), angles.sin()


class RotaryEmbedding(nn.Module):
    """RoPE in the "rotate half" layout: dimension i is paired with i + hs/2 (not interleaved)."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        # Plain RoPE, or YaRN's rescaled frequencies and attention factor.
        inv_freq, self.attention_factor = rope_frequencies(config)
        # Not a persistent buffer: derived from the config, never stored in checkpoints.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # Dynamic YaRN: plain RoPE for sequences that fit the trained length (see `forward`'s span).
        self.dynamic_from = None
        if long_context.is_dynamic(config):
            self.dynamic_from = long_context.yarn_original_length(config)
            self.register_buffer("plain_inv_freq", rope_frequencies(config, scaled=False)[0], persistent=False)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype,
                span: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # positions (B, T) -> cos, sin (B, T, hs), angles computed in fp32 as the reference does.
        # span: the length the sequence may reach (dynamic YaRN scales only beyond the trained length).
        inv_freq, factor = self.inv_freq, self.attention_factor
        if self.dynamic_from is not None and span is not None and span <= self.dynamic_from:
            inv_freq, factor = self.plain_inv_freq, 1.0
        angles = positions[..., None].float() * inv_freq  # (B, T, hs/2)
        cos, sin = cos_sin(torch.cat((angles, angles), dim=-1))  # (B, T, hs)
        if factor == 1.0:
            return cos.to(dtype), sin.to(dtype)
        return (cos * factor).to(dtype), (sin * factor).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, nh, T, hs); cos/sin (B, T, hs) broadcast over heads
    return x * cos[:, None] + rotate_half(x) * sin[:, None]
