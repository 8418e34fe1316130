"""YaRN (Peng et al. 2023): RoPE's frequencies rescaled "by parts" for a context beyond the trained one.

Dimensions that turn many times over the trained length (high frequency, local order) keep their
frequency, dimensions that turn less than once (low frequency, absolute position) are divided by the
factor s, with a linear ramp in between; cos and sin are multiplied by the attention factor
0.1·ln(s) + 1, which sharpens attention back (the dot products scale by its square). Computed exactly
as transformers' `_compute_yarn_parameters`.
"""
from __future__ import annotations

import math

import torch

from .. import long_context
from ..config import Qwen2Config


def rope_frequencies(config: Qwen2Config, scaled: bool = True) -> tuple[torch.Tensor, float]:
    """(inv_freq (hs/2,), attention factor) of the config's RoPE; `scaled=False` gives plain RoPE."""
    hs = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.int64).float() / hs))
    if not scaled or long_context.rope_type(config.rope_scaling) != "yarn":
        return inv_freq, 1.0
    return yarn_frequencies(hs, config.rope_theta, config.rope_scaling, long_context.yarn_original_length(config))


def yarn_attention_factor(scaling: dict) -> float:
    """`attention_factor` if given, else 0.1·ln(s) + 1 (as a ratio of two such terms when the
    DeepSeek-style `mscale` and `mscale_all_dim` are both set)."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling["factor"]

    def temperature(mscale=1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0

    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return temperature(mscale) / temperature(mscale_all_dim)
    return temperature()


def yarn_frequencies(hs: int, theta: float, scaling: dict, original_length: int) -> tuple[torch.Tensor, float]:
    """YaRN's NTK-by-parts inv_freq (hs/2,) and attention factor."""
    factor = scaling["factor"]
    beta_fast = scaling.get("beta_fast") or 32  # rotations over the trained length above which a dim is kept
    beta_slow = scaling.get("beta_slow") or 1  # ... below which it is fully interpolated

    def dim_with_rotations(rotations: float) -> float:
        # The dimension index whose wavelength fits `rotations` times in the trained length.
        return hs * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_with_rotations(beta_fast), dim_with_rotations(beta_slow)
    if scaling.get("truncate", True):  # transformers' default: whole dimensions
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hs - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero
    # 0 for dims below `low` (kept), 1 above `high` (divided by the factor), linear in between
    ramp = ((torch.arange(hs // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    wavelength_base = theta ** (torch.arange(0, hs, 2, dtype=torch.int64).float() / hs)
    extrapolated, interpolated = 1.0 / wavelength_base, 1.0 / (factor * wavelength_base)
    keep = 1 - ramp
    return interpolated * (1 - keep) + extrapolated * keep, yarn_attention_factor(scaling)
