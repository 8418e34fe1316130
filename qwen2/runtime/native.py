"""The native decode executor: decode steps through the native CPU ops (qwen2/kernels/decode_*.cpp),
bit for bit the eager model's numbers, without Python between a step's ops.

A decode step is one new token per row, or speculative verification's rows that each attend as a
one-token step (`KVCache.exact_rows`). Each block runs as
    decode_layers   every block in one call, when all are dense blocks of native linears with one mask
    decode_block    a block in one call (RMSNorm, q/k/v, RoPE + cache write + attention, o, SwiGLU)
    decode_attention  only the attention natively, the block's own modules around it (an MoE block,
                    a linear the ops cannot read: a layer on its "reference" backend)
A linear serving LoRA adapters per row (`low_rank_update`) runs as its base linear plus that update, in
the block's call.
Everything else (prefill, a cacheless forward, autograd) is the model's own forward.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import kernels
from ..model.layers import FeedForward
from ..quant.kinds import KIND_CODES, NO_TENSOR, bias_or_empty
from ..quant.linear import QuantLinear
from .decoder import EagerDecoder


def unavailable_reason(model) -> str | None:
    """Why the native ops cannot run `model`'s decode steps, or None when they can."""
    config = model.config
    if model.device.type != "cpu" or model.dtype != torch.float32:
        dtype = str(model.dtype).removeprefix("torch.")
        return f"it runs fp32 models on the CPU, this one is {dtype} on {model.device}"
    if config.head_dim % 16:
        return f"head_dim {config.head_dim} is not a multiple of 16"
    if config.dual_chunk_attention_config is not None:
        return "Dual Chunk Attention runs eager"
    if kernels.ops() is None:
        return f"the native kernels are unavailable ({kernels.status()})"
    return None


def native_linear(module: nn.Module, rows: int) -> tuple | None:
    """How the native decode ops compute `module` for `rows` rows of x as its forward would:
    (kind, group_size, digits, [three layout tensors, bias]), unused ones empty; None when the
    forward would take another path (a quantised linear's dense or reference backend) or the module
    is neither nn.Linear nor one of our quantised linears."""
    if type(module) is nn.Linear:
        if module.weight.dtype != torch.float32:
            return None
        return KIND_CODES["dense"], 0, 0, [module.weight, NO_TENSOR, NO_TENSOR, bias_or_empty(module)]
    return module.native_layout(rows) if isinstance(module, QuantLinear) else None


def split_update(module: nn.Module) -> tuple[nn.Module, tuple | None]:
    """(linear, update): a module that adds a low-rank update to a linear's output (LoRA adapters
    served per row, `qwen2.adapters.MultiLoRALinear.low_rank_update`) is its base and this forward's
    update, (A, Bt, mask) or None while every row runs the base; any other module is itself, None."""
    low_rank_update = getattr(module, "low_rank_update", None)
    return (module, None) if low_rank_update is None else (module.base, low_rank_update())


NO_UPDATE = [NO_TENSOR] * 3  # a linear without a low-rank update, among others' updates


def block_weights(block: nn.Module, rows: int) -> tuple[list, list, list] | None:
    """(tensors, meta, updates): a block's weights as `decode_block` takes them for `rows` rows of x,
    updates [] unless some linear has a low-rank update; None unless the block is dense, with one
    norm eps, and its seven linears are native (`native_linear`) beneath any update."""
    attn, mlp = block.self_attn, block.mlp
    if not isinstance(mlp, FeedForward) or block.input_layernorm.eps != block.post_attention_layernorm.eps:
        return None
    tensors, meta, updates, updated = [block.input_layernorm.weight, block.post_attention_layernorm.weight], \
        [attn.n_head, attn.n_kv_head, attn.head_dim], [], False
    for module in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        linear, update = split_update(module)
        spec = native_linear(linear, rows)
        if spec is None:
            return None
        meta += spec[:3]
        tensors += spec[3]
        updates += NO_UPDATE if update is None else update
        updated = updated or update is not None
    return tensors, meta, updates if updated else []


def decode_key_mask(mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """The (B, 1 or T, S) boolean attention mask as the native decode ops take it: (B, T, S)."""
    return None if mask is None else mask.expand(B, 1, T, mask.shape[-1])[:, 0]


class NativeDecoder(EagerDecoder):
    """Decode steps of an fp32 CPU model (see `unavailable_reason`) through the native ops."""

    name = "native"

    def __init__(self, model):
        super().__init__(model)
        self.ops = kernels.ops()

    def takes(self, input_ids: torch.Tensor, cache) -> bool:
        """Whether this forward is a decode step the native ops compute (inference only: no backward)."""
        return cache is not None and (input_ids.shape[1] == 1 or cache.exact_rows) \
            and not torch.is_grad_enabled() and cache.k.dtype == torch.float32

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, last_only=False):
        if not self.takes(input_ids, cache):
            return super().__call__(input_ids, attention_mask, position_ids, cache, last_only)
        inputs = self.model.prepare(input_ids, attention_mask, position_ids, cache)
        return self.model.finish(self.blocks(inputs), inputs, last_only)

    def blocks(self, inputs) -> torch.Tensor:
        """Every block of a decode step, x (B, T, C) -> (B, T, C)."""
        x, cache, masks, layers = inputs.x, inputs.cache, inputs.masks, self.model.model.layers
        B, T = x.shape[:2]
        hs = self.model.config.head_dim
        rope = (inputs.cos.expand(B, T, -1), inputs.sin.expand(B, T, -1))
        slots, scale = cache.first_slots(B), hs ** -0.5
        weights = [block_weights(block, B * T) for block in layers]
        if self.one_call(x, weights, masks):
            tensors, meta = [t for w in weights for t in w[0]], [m for w in weights for m in w[1]]
            updates = [u for w in weights for u in w[2] or NO_UPDATE * 7] if any(w[2] for w in weights) else []
            return self.ops.decode_layers(x, tensors, meta, updates, layers[0].input_layernorm.eps, *rope, cache.k,
                                          cache.v, slots, decode_key_mask(masks[0], B, T), scale)
        for i, (block, w) in enumerate(zip(layers, weights)):
            attention = (*rope, cache.k[i], cache.v[i], slots, decode_key_mask(masks[i], B, T), scale)
            if w is not None and x.is_contiguous():
                x = self.ops.decode_block(x, *w, block.input_layernorm.eps, *attention)
            else:
                x = self._block_around_native_attention(block, x, attention)
        return x

    def one_call(self, x: torch.Tensor, weights: list, masks: list) -> bool:
        """Whether `decode_layers` takes every block at once: all native, one norm eps, one mask."""
        return x.is_contiguous() and all(w is not None for w in weights) and all(m is masks[0] for m in masks) \
            and len({block.input_layernorm.eps for block in self.model.model.layers}) == 1

    def _block_around_native_attention(self, block, x: torch.Tensor, attention: tuple) -> torch.Tensor:
        """The block's own modules, its attention's RoPE, cache write and attention in one native call."""
        attn, (B, T, _) = block.self_attn, x.shape
        h = block.input_layernorm(x)
        q = attn.q_proj(h).view(B, T, attn.n_head, attn.head_dim)  # (B, T, nh, hs)
        k = attn.k_proj(h).view(B, T, attn.n_kv_head, attn.head_dim)  # (B, T, nkv, hs)
        v = attn.v_proj(h).view(B, T, attn.n_kv_head, attn.head_dim)
        y = self.ops.decode_attention(q, k, v, *attention)  # (B, nh, T, hs)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(B, T, attn.n_head * attn.head_dim))
        return x + block.mlp(block.post_attention_layernorm(x))
