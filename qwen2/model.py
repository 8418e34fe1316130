"""The Qwen2 dense decoder, computed exactly as the reference (HF transformers) computes it.

    tokens -> embed -> [RMSNorm -> attention(GQA, RoPE, q/k/v bias) -> +residual
                        RMSNorm -> SwiGLU MLP -> +residual] x L -> RMSNorm -> lm_head -> logits

Shapes in comments: B batch, T new tokens, S keys (cached + new), nh query heads,
nkv key/value heads, hs head size, C hidden size, V vocabulary.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import kernels, long_context
from .config import Qwen2Config


def aten_when_compiled(name: str, fake):
    """Decorator: the function runs as written in eager mode, and, traced by torch.compile for inference,
    as one opaque op `qwen2::<name>` that runs these very ATen kernels, not the code inductor would
    generate for them (`fake` gives its output shapes). Why: the compiled decode step must compute the
    eager step's logits bit for bit (qwen2/compile.py), and inductor's fused cos/sin (SLEEF; ATen's are
    MKL's, a third of them 1 ulp apart) and RMSNorm (its own order of summing the squares) differ from
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


@aten_when_compiled("cos_sin", lambda angles: (torch.empty_like(angles), torch.empty_like(angles)))
def cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return angles.cos(), angles.sin()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """RoPE in the "rotate half" layout: dimension i is paired with i + hs/2 (not interleaved)."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        # Plain RoPE, or YaRN's rescaled frequencies and attention factor (qwen2/long_context.py).
        inv_freq, self.attention_factor = long_context.rope_frequencies(config)
        # Not a persistent buffer: derived from the config, never stored in checkpoints.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # Dynamic YaRN: plain RoPE for sequences that fit the trained length (see `forward`'s span).
        self.dynamic_from = None
        if long_context.is_dynamic(config):
            self.dynamic_from = long_context.yarn_original_length(config)
            self.register_buffer("plain_inv_freq", long_context.rope_frequencies(config, scaled=False)[0],
                                 persistent=False)

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


class KVCache:
    """Static, preallocated key/value cache shared by all layers of one batch.

    Slots are filled left to right, the same slot index for every row of the batch; a row's
    left padding occupies slots that `valid` marks False so no query ever attends to them.
    `positions` counts each row's real tokens, so RoPE positions skip padding (as HF generate does).
    """

    def __init__(self, config: Qwen2Config, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, nkv, max_len, hs)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, max_len)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) next RoPE position
        self.length = 0  # slots used
        self.max_len = max_len
        # Attend for each new token exactly as a one-token step would (same kernel, same key count):
        # speculative verification sets it, so that quantised models, whose activation rounding turns
        # last-bit differences into visible ones, verify with the very numbers plain decoding uses.
        self.exact_rows = False
        self._first_slots: tuple[int, torch.Tensor | None] = (-1, None)  # (length, its slots tensor)

    def __len__(self) -> int:
        return self.length

    def first_slots(self) -> torch.Tensor:
        """(B,) `length` for every row: where the next forward's first token goes (made once per length)."""
        if self._first_slots[0] != self.length:
            self._first_slots = (self.length, torch.full((self.valid.shape[0],), self.length, dtype=torch.long))
        return self._first_slots[1]

    def rewind(self, n_slots: int) -> None:
        """Forget the last `n_slots` slots, as if they had never been fed (speculative decoding
        rolls back rejected draft tokens this way). `length`, `valid` and each row's RoPE
        `positions` go back together; the stale keys/values stay in place and are overwritten by
        the next forward. Exact for any batch whose rewound slots are real tokens (speculation
        uses batch size 1); a rewound padding slot does not count towards `positions`."""
        if not 0 <= n_slots <= self.length:
            raise ValueError(f"cannot rewind {n_slots} slots of a KV cache holding {self.length}")
        start = self.length - n_slots
        with torch.inference_mode(self.valid.is_inference()):  # a cache made under inference_mode stays usable
            self.positions -= self.valid[:, start:self.length].sum(-1)
            self.valid[:, start:self.length] = False
        self.length = start


class StaticKV(NamedTuple):
    """A KV cache seen with static shapes, for the compiled decode step: the new key/value go to
    slot `slot` (a 1-element long tensor, not a Python int, so one compiled graph serves every
    step) and attention runs over all max_len slots, masked by `valid`. A (B,) `slot` gives each
    row its own slot: rows of different lengths decode together (the server's continuous batching)."""
    k: torch.Tensor  # (L, B, nkv, max_len, hs)
    v: torch.Tensor
    slot: torch.Tensor  # (1,) the same slot for every row, or (B,) one per row
    # Set (eager only): row b attends over its first row_lengths[b] slots, unmasked, exactly as its
    # one-row decode would; a batched row's tokens then equal the row's alone (quantised models too).
    row_lengths: list[int] | None = None


def native_decode_ops(x: torch.Tensor, mask, cache, head_dim: int) -> object | None:
    """`torch.ops.qwen2_kernels` when the native decode ops (qwen2/kernels/decode_*.cpp) take this
    call, else None; x (B, T, ...) is the layer's input or its queries. They run queries that each
    attend like a one-token step: T == 1, or speculative verification's `exact_rows`. Inference only
    (no autograd), fp32 on the CPU, head_dim a multiple of 16, not Dual Chunk Attention. The compiled
    decode step takes them too (opaque ops to inductor): it then computes eager's numbers bit for bit,
    where its own fused attention over every masked slot would not (qwen2/compile.py)."""
    if cache is None or isinstance(mask, long_context.DualChunkContext):
        return None
    if x.shape[1] > 1 and not (isinstance(cache, KVCache) and cache.exact_rows):
        return None  # prefill: compute-bound, SDPA's flash kernel does it better
    if (x.device.type != "cpu" or x.dtype != torch.float32 or cache.k.dtype != torch.float32 or head_dim % 16
            or x.requires_grad):
        return None
    return kernels.ops()


def decode_key_mask(mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """The (B, 1 or T, S) boolean attention mask as the native decode attention takes it: (B, T, S)."""
    return None if mask is None else mask.expand(B, 1, T, mask.shape[-1])[:, 0]


def cache_slots(cache, batch_size: int) -> torch.Tensor:
    """(B,) the cache slot of each row's first new token."""
    if isinstance(cache, StaticKV):
        return cache.slot.expand(batch_size)
    return cache.first_slots()


class Attention(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        C = config.hidden_size
        # Qwen2 keeps a bias on q, k and v (the report credits it with better length extrapolation)
        # but none on the output projection.
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=True)
        self.k_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=True)
        self.v_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | StaticKV | None, layer: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, nkv, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, nkv, hs)
        ops = native_decode_ops(q, mask, cache, self.head_dim)
        if ops is not None:  # decode: RoPE, cache write and attention in one native call
            y = ops.decode_attention(q, k, v, *self.native_args(cos, sin, mask, cache, B, T, layer))
        else:
            y = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cos, sin, mask, cache, layer)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # y (B, nh, T, hs)

    def native_args(self, cos, sin, mask, cache, B: int, T: int, layer: int | None) -> tuple:
        """The arguments the native decode ops (`decode_attention`, `decode_block`, `decode_layers`)
        take after their inputs: RoPE tables, this layer's cache (every layer's with `layer` None),
        the rows' first slots, the key mask, the scale."""
        k, v = (cache.k, cache.v) if layer is None else (cache.k[layer], cache.v[layer])
        return (cos.expand(B, T, -1), sin.expand(B, T, -1), k, v, cache_slots(cache, B), decode_key_mask(mask, B, T),
                self.head_dim ** -0.5)

    def _attend(self, q, k, v, cos, sin, mask, cache, layer: int) -> torch.Tensor:
        """RoPE, the cache write and attention in PyTorch ops: q (B, nh, T, hs), k, v (B, nkv, T, hs)."""
        B, T = q.shape[0], q.shape[2]
        q_unrotated = q  # DCA rotates queries its own three ways
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(cache, StaticKV):
            if cache.slot.numel() == 1:
                cache.k[layer].index_copy_(2, cache.slot, k)
                cache.v[layer].index_copy_(2, cache.slot, v)
            else:  # row b's one new key/value into its own slot[b]
                rows = torch.arange(B, device=k.device)
                cache.k[layer][rows, :, cache.slot] = k[:, :, 0]  # (B, nkv, hs)
                cache.v[layer][rows, :, cache.slot] = v[:, :, 0]
            k, v = cache.k[layer], cache.v[layer]  # (B, nkv, max_len, hs), unused slots masked out
        elif cache is not None:
            # Write the new keys into their slots, then attend over every slot used so far.
            start = cache.length
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k, v = cache.k[layer, :, :, :start + T], cache.v[layer, :, :, :start + T]  # (B, nkv, S, hs)
        if isinstance(mask, long_context.DualChunkContext):  # keys were rotated at p mod L (see Transformer)
            y = mask.attend(q_unrotated, k, v)  # (B, nh, T, hs)
        elif isinstance(cache, KVCache) and cache.exact_rows and T > 1:
            y = self._rows_as_steps(q, k, v, mask, cache.length)  # (B, nh, T, hs)
        elif isinstance(cache, StaticKV) and cache.row_lengths is not None:
            y = torch.cat([F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                                          enable_gqa=self.n_head != self.n_kv_head)
                           for b, n in enumerate(cache.row_lengths)])  # (B, nh, 1, hs)
        else:
            # GQA: SDPA broadcasts each kv head over its nh/nkv query heads, nothing is copied.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=self.n_head != self.n_kv_head)  # (B, nh, T, hs)
        return y

    def _rows_as_steps(self, q, k, v, mask, start: int) -> torch.Tensor:
        """Attention of each of the T new queries as its own one-token step: query t sees slots
        0..start+t, with no mask when they are all real (what a one-token forward passes)."""
        rows = []
        for t in range(q.shape[2]):
            S = start + t + 1
            row_mask = None if mask is None else mask[:, :, t:t + 1, :S]
            if row_mask is not None and bool(row_mask.all()):
                row_mask = None
            rows.append(F.scaled_dot_product_attention(q[:, :, t:t + 1], k[:, :, :S], v[:, :, :S], attn_mask=row_mask,
                                                       enable_gqa=self.n_head != self.n_kv_head))
        return torch.cat(rows, dim=2)  # (B, nh, T, hs)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases. The dense MLP, and each MoE expert at its width."""

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.up_proj = nn.Linear(hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: Qwen2Config, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer):  # Qwen2-MoE: a sparse expert block (qwen2/moe.py builds on this module)
            from .moe import SparseMoeBlock

            self.mlp = SparseMoeBlock(config)
        else:
            self.mlp = FeedForward(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask, cache, layer):
        native = self._native_args(x, mask, cache)
        if native is not None:  # a decode step: these very ops in one native call, no Python between them
            ops, tensors, meta = native
            return ops.decode_block(x, tensors, meta, self.input_layernorm.eps,
                                    *self.self_attn.native_args(cos, sin, mask, cache, x.shape[0], x.shape[1], layer))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _native_args(self, x, mask, cache):
        """(ops, tensors, meta) for `decode_block` (qwen2/kernels/decode_block.cpp) when it computes
        this forward (a decode step, see native_decode_ops, and `native_weights`), else None."""
        ops = native_decode_ops(x, mask, cache, self.self_attn.head_dim)
        weights = None if ops is None or not x.is_contiguous() else self.native_weights(x.shape[0] * x.shape[1])
        return None if weights is None else (ops, *weights)

    def native_weights(self, rows: int) -> tuple[list, list] | None:
        """(tensors, meta): this block's weights as `decode_block` takes them for `rows` rows of x,
        or None unless the block is dense, with one norm eps, and its seven linears are nn.Linear or
        quantised linears on their native kernels."""
        attn, mlp = self.self_attn, self.mlp
        if not isinstance(mlp, FeedForward) or self.input_layernorm.eps != self.post_attention_layernorm.eps:
            return None
        from .quantize import native_linear

        tensors, meta = [self.input_layernorm.weight, self.post_attention_layernorm.weight], \
            [attn.n_head, attn.n_kv_head, attn.head_dim]
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            spec = native_linear(linear, rows)
            if spec is None:
                return None
            meta += spec[:3]
            tensors += spec[3]
        return tensors, meta


class Transformer(nn.Module):
    """Qwen2ForCausalLM. Parameter names match HF checkpoints (`model.layers.0.self_attn.q_proj.weight`, ...)."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = nn.Module()  # namespace only, so state_dict keys read `model.*` like HF's
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(config)
        self.sliding_layers = long_context.sliding_layers(config)  # layers whose attention slides
        self.compiled_step = None  # set by qwen2.compile.compile_decode: decode steps then run through it

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or (B, 1, V) with `last_only`.

        attention_mask (B, T): 1 for real tokens, 0 for (left) padding of these new tokens.
        position_ids default to each row's count of real tokens so far, so a left-padded row gets
        the same positions, hence the same logits, as the row alone.
        With `cache`, the new tokens attend to everything cached and are appended to it.
        """
        B, T = input_ids.shape
        if self.compiled_step is not None and cache is not None and T == 1 and attention_mask is None \
                and position_ids is None and self.config.dual_chunk_attention_config is None:
            return self.compiled_step(input_ids, cache)
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {start} cached + {T} new do not fit")
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if position_ids is not None and self.config.dual_chunk_attention_config is not None:
            raise ValueError("position_ids cannot be given with Dual Chunk Attention: "
                             "it numbers each row's real tokens itself")
        if position_ids is None:
            offset = cache.positions[:, None] if cache is not None else 0
            position_ids = (offset + real.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        if cache is not None:
            cache.valid[:, start:start + T] = real
            key_real = cache.valid[:, :start + T]  # (B, S)
        else:
            key_real = real

        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        span = cache.max_len if cache is not None else T  # the length this sequence may reach (dynamic YaRN)
        if self.config.dual_chunk_attention_config is not None:
            cos, sin, mask = self._dual_chunk_inputs(position_ids, real, key_real, span, x.dtype)
        else:
            cos, sin = self.rope(position_ids, x.dtype, span)
            mask = self._attention_mask(key_real, start, T)
        window_mask = None
        if self.sliding_layers:  # layers >= max_window_layers see only the last sliding_window slots
            window_mask = long_context.sliding_window_mask(mask, start, T, key_real.shape[1],
                                                           self.config.sliding_window, x.device)
        x = self.layers_forward(x, cos, sin, mask, window_mask, cache)
        if cache is not None:
            cache.length += T
            cache.positions += real.sum(-1)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))  # (B, T, V)

    def static_decode(self, input_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                      positions: torch.Tensor, slot: torch.Tensor, exact_rows: bool = False) -> torch.Tensor:
        """One new token per row, input_ids (B, 1), written to cache slot `slot` (B rows at once), with
        every shape fixed by the cache: what torch.compile traces (see qwen2/compile.py). `valid`
        (B, max_len) must already mark the slot; positions (B,) are the new tokens' RoPE positions.
        Equal to forward(input_ids, cache=...) bit for bit where the native decode ops take the step
        (they skip the masked-out slots), else up to those slots, which SDPA also reads.
        exact_rows (eager, a (B,) slot of rows filled from slot 0, no sliding window): each row attends
        over its slots 0..slot[b] alone, unmasked, so its logits are bit for bit its one-row decode's."""
        x = self.model.embed_tokens(input_ids)  # (B, 1, C)
        cos, sin = self.rope(positions[:, None], x.dtype, span=k.shape[3])
        mask = valid[:, None, None, :]  # (B, 1, 1, max_len)
        window_mask = long_context.static_sliding_mask(mask, slot, self.config.sliding_window) \
            if self.sliding_layers else None
        kv = StaticKV(k, v, slot, (slot + 1).tolist() if exact_rows else None)
        x = self.layers_forward(x, cos, sin, mask, window_mask, kv)
        return self.lm_head(self.model.norm(x))  # (B, 1, V)

    def layers_forward(self, x, cos, sin, mask, window_mask, cache, checkpointing: bool = False) -> torch.Tensor:
        """x (B, T, C) through every block: sliding-window layers (>= max_window_layers) take
        `window_mask`, the others `mask`. With `checkpointing` (training), each block keeps only its
        input and recomputes its inside during backward."""
        native = None if checkpointing or self.sliding_layers else self._native_layers(x, mask, cache)
        if native is not None:  # a decode step: every block in one native call, no Python between them
            ops, tensors, meta, eps = native
            return ops.decode_layers(x, tensors, meta, eps, *self.model.layers[0].self_attn.native_args(
                cos, sin, mask, cache, x.shape[0], x.shape[1], None))
        for i, block in enumerate(self.model.layers):
            layer_mask = window_mask if i in self.sliding_layers else mask
            if checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, layer_mask, cache, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, layer_mask, cache, i)
        return x  # (B, T, C)

    def _native_layers(self, x, mask, cache):
        """(ops, tensors, meta, eps) for `decode_layers` (qwen2/kernels/decode_block.cpp) when it
        computes every block of this forward: a decode step where each block's `decode_block` would
        (see Block._native_args), all with one norm eps; else None."""
        ops = native_decode_ops(x, mask, cache, self.config.head_dim)
        if ops is None or not x.is_contiguous():
            return None
        rows, tensors, meta = x.shape[0] * x.shape[1], [], []
        for block in self.model.layers:
            weights = block.native_weights(rows)
            if weights is None or block.input_layernorm.eps != self.config.rms_norm_eps:
                return None
            tensors += weights[0]
            meta += weights[1]
        return ops, tensors, meta, self.config.rms_norm_eps

    def _dual_chunk_inputs(self, positions, real, key_real, span: int, dtype):
        """DCA's key rotation (cos, sin at p mod L: keys are cached rotated so) and the context its
        attention takes in place of a mask (qwen2/long_context.py)."""
        dca = self.config.dual_chunk_attention_config

        def rope(p, dt):
            return self.rope(p, dt, span)

        cos, sin = rope(positions % long_context.dca_chunk_len(self.config), dtype)
        context = long_context.DualChunkContext(positions, real, key_real, rope, dca["chunk_size"], dca["local_size"])
        return cos, sin, context

    @staticmethod
    def _attention_mask(key_real: torch.Tensor, start: int, T: int) -> torch.Tensor | None:
        """Boolean (B, 1, T, S) mask, True where query t may attend to key s. None when there is
        no padding and the mask would be plain causal (SDPA's faster `is_causal`) or all True
        (a single new token seeing every cached one)."""
        if (T == 1 or start == 0) and bool(key_real.all()):
            return None
        S = key_real.shape[1]
        q_slot = torch.arange(start, start + T, device=key_real.device)[:, None]  # (T, 1)
        k_slot = torch.arange(S, device=key_real.device)[None, :]  # (1, S)
        mask = (k_slot <= q_slot)[None] & key_real[:, None, :]  # (B, T, S)
        # A padding query would see no key at all and SDPA would return NaN; let it see itself.
        # Its output is never used.
        mask |= k_slot == q_slot
        return mask[:, None]

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device  # not the embedding's: a quantised model may read it from the head

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def aux_loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Qwen2-MoE's load-balancing loss for the last forward (its router logits; pass the same
        attention_mask), unweighted like transformers' `aux_loss`. Train on
        lm_loss + config.router_aux_loss_coef * aux_loss. 0 for a dense model. See qwen2/moe.py."""
        from .moe import load_balancing_loss

        return load_balancing_loss(self, attention_mask)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch_size, max_len or self.config.max_position_embeddings,
                       dtype=self.dtype, device=self.device)
