"""Dual Chunk Attention (An et al. 2024): every relative position the model sees stays below `chunk_size`.

With L = chunk_size - local_size, keys are rotated once at p mod L. A query at position p, in chunk
n = p // L, attends to
  its own chunk (causal)        as position p mod L                      (exact distances < L)
  the previous chunk n-1        as position min(L + p mod L, chunk_size) (exact up to chunk_size)
  every earlier chunk (< n-1)   as position chunk_size                   (distances in (local_size, chunk_size])
and one softmax spans all three: their partial results are merged by their log-sum-exp in fp32.
Queries are processed in blocks that never cross a chunk, keys in tiles, so memory stays linear in
the sequence length (no T×T matrix or position table is ever built).

The model takes it as two strategies chosen at build: `DualChunkInputs` (keys' RoPE at p mod L, and
the context each layer's attention takes in place of a mask) and `dual_chunk_attention_layer`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .. import long_context
from ..config import Qwen2Config
from .rope import apply_rope

# Query block of the DCA loop (its parts' outputs are nh × block × hs); key tile of the tiled
# attention used off the CPU (bounds its fp32 score tile at nh × block × tile).
DCA_QUERY_BLOCK = 2048
DCA_KEY_TILE = 1024


class DualChunkInputs:
    """The model's per-forward attention inputs under DCA: cos, sin at p mod L (the keys are cached
    rotated so) and, for every layer, the `DualChunkContext` its attention takes in place of a mask."""

    def __init__(self, config: Qwen2Config):
        dca = config.dual_chunk_attention_config
        self.chunk_len = long_context.dca_chunk_len(config)
        self.chunk_size, self.local_size = dca["chunk_size"], dca["local_size"]
        self.n_layers = config.num_hidden_layers

    def positions(self, frame, position_ids):
        if position_ids is not None:
            raise ValueError("position_ids cannot be given with Dual Chunk Attention: "
                             "it numbers each row's real tokens itself")
        return frame.positions

    def __call__(self, rope, frame, positions: torch.Tensor, dtype: torch.dtype):
        def rope_at(p, dt):
            return rope(p, dt, frame.span)

        cos, sin = rope_at(positions % self.chunk_len, dtype)
        context = DualChunkContext(positions, frame.real, frame.key_real, rope_at, self.chunk_size, self.local_size)
        return cos, sin, [context] * self.n_layers


def dual_chunk_attention_layer(q, k, v, cos, sin, context: "DualChunkContext", cache) -> torch.Tensor:
    """An attention layer's `attend` under DCA: q (B, nh, T, hs) not rotated (DCA rotates it its own
    three ways), k rotated at p mod L."""
    return context.attend(q, k, v)


@dataclass
class DualChunkContext:
    """What one forward's attention layers need for DCA (the model passes it instead of a mask)."""
    positions: torch.Tensor  # (B, T) positions of the new queries
    query_real: torch.Tensor  # (B, T) False for padding queries (their output is not computed)
    key_real: torch.Tensor  # (B, S) True for real keys (cached + new), False for padding
    rope: Callable[[torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor]]  # positions -> cos, sin
    chunk_size: int
    local_size: int

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dual_chunk_attention(q, k, v, self.positions, self.key_real, self.rope, self.chunk_size,
                                    self.local_size, query_real=self.query_real)


def dual_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         key_real: torch.Tensor, rope, chunk_size: int, local_size: int,
                         query_real: torch.Tensor | None = None, query_block: int = DCA_QUERY_BLOCK,
                         key_tile: int = DCA_KEY_TILE) -> torch.Tensor:
    """Dual Chunk Attention of T new queries over S key slots -> (B, nh, T, hs).

    q (B, nh, T, hs) not rotated; k (B, nkv, S, hs) rotated at (key position mod L); v (B, nkv, S, hs).
    positions (B, T): the queries' positions. key_real (B, S): which slots hold real keys; a row's
    real keys in slot order have positions 0, 1, 2, ... (as the model assigns them). `rope`
    (positions, dtype) -> cos, sin. query_real (B, T), optional: False marks padding queries, whose
    outputs are left zero.
    """
    B, nh, T, hs = q.shape
    L = chunk_size - local_size
    # The three rotations of every query (cheap: the size of q).
    cos, sin = rope(positions % L, q.dtype)
    q_intra = apply_rope(q, cos, sin)
    cos, sin = rope((L + positions % L).clamp(max=chunk_size), q.dtype)
    q_succ = apply_rope(q, cos, sin)
    cos, sin = rope(torch.full_like(positions, chunk_size), q.dtype)
    q_inter = apply_rope(q, cos, sin)
    y = q.new_zeros(B, nh, T, hs)
    for b in range(B):
        keys, values = _real_keys(k[b], v[b], key_real[b])  # (nkv, n, hs): key j has position j
        n_keys = keys.shape[1]
        p = positions[b].tolist()
        real = [True] * T if query_real is None else query_real[b].tolist()
        t = 0
        while t < T:
            if not real[t]:
                t += 1
                continue
            if p[t] >= n_keys:
                raise ValueError(f"query position {p[t]} has no key: only {n_keys} real keys")
            # A block of consecutive queries in one chunk (positions rise by one across a block).
            chunk = p[t] // L
            end = t + 1
            while end < T and end - t < query_block and p[end] == p[end - 1] + 1 and p[end] // L == chunk \
                    and real[end] and p[end] < n_keys:
                end += 1
            first = p[t]
            y[b, :, t:end] = _dca_block(q_intra[b, :, t:end], q_succ[b, :, t:end], q_inter[b, :, t:end],
                                        keys, values, first, chunk, L, key_tile).to(y.dtype)
            t = end
    return y


def _real_keys(k: torch.Tensor, v: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's real keys/values (nkv, n, hs): a view when they are one run of slots (left padding),
    a gathered copy otherwise."""
    n = int(real.sum())
    first = int(real.float().argmax()) if n else 0
    if n and bool(real[first:first + n].all()):
        return k[:, first:first + n], v[:, first:first + n]
    index = real.nonzero().squeeze(-1)
    return k[:, index], v[:, index]


def _dca_block(q_intra, q_succ, q_inter, keys, values, first: int, chunk: int, L: int, key_tile: int):
    """Queries at positions first .. first+Tq-1, all in chunk `chunk`: (nh, Tq, hs) each rotation.
    Attends to keys [0, first + Tq) as DCA prescribes: one softmax over all of them, built from the
    parts' own softmaxes merged by their log-sum-exp in fp32."""
    nh, Tq, hs = q_intra.shape
    nkv = keys.shape[0]
    group = nh // nkv  # GQA: query heads per kv head
    chunk_start = chunk * L
    last = first + Tq  # keys [0, last) are visible to some query of the block
    # (query rotation, key range, causal?). The block's own keys [first, last) are the causal part:
    # a square, so "key <= query" is the kernels' top-left diagonal; keys before it in the chunk
    # are all visible, as are those of the previous chunk and of every earlier one.
    parts = [(q_intra, first, last, True), (q_intra, chunk_start, first, False),
             (q_succ, max(chunk_start - L, 0), chunk_start, False), (q_inter, 0, max(chunk_start - L, 0), False)]
    outs, lses = [], []
    for qr, lo, hi, causal in parts:
        if hi > lo:
            out, lse = attention_with_lse(qr.reshape(nkv, group, Tq, hs), keys[:, lo:hi], values[:, lo:hi],
                                          causal, key_tile)
            outs.append(out.float())
            lses.append(lse)
    # Merge: part i weighs exp(lse_i - lse) with lse the log-sum-exp over all keys, never exp of a raw lse.
    lse = torch.stack(lses).logsumexp(0)  # (nkv, g, Tq, 1)
    merged = sum(out * (part_lse - lse).exp() for out, part_lse in zip(outs, lses))
    return merged.reshape(nh, Tq, hs)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       key_tile: int = DCA_KEY_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(hs)) v and each query's log-sum-exp of those scores, in fp32:
    q (nkv, g, Tq, hs), the g query heads sharing each kv head; k, v (nkv, n, hs); causal: query t
    sees keys 0..t (Tq == n). -> out (nkv, g, Tq, hs), lse (nkv, g, Tq, 1) fp32; out in q's dtype
    from the flash kernel, fp32 from the loop (the caller merges in fp32: no rounding in between).
    On the CPU, PyTorch's flash kernel (memory linear in n, ~7x the tiled loop's speed at 4K
    tokens); elsewhere the loop over key tiles below."""
    nkv, g, Tq, hs = q.shape
    if q.device.type == "cpu":
        # GQA without copying: each kv head broadcast over its g query heads (stride 0).
        k4, v4 = (t[:, None].expand(nkv, g, t.shape[1], hs) for t in (k, v))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k4, v4, 0.0, causal)
        return out, lse[..., None]
    return _tiled_attention_with_lse(q, k, v, causal, key_tile)


def _tiled_attention_with_lse(q, k, v, causal: bool, key_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_with_lse by PyTorch ops, a tile of keys at a time (any device): each tile's
    partial softmax merged into the running one by their log-sum-exp in fp32."""
    nkv, g, Tq, hs = q.shape
    qf = q.float() * hs ** -0.5
    lse = torch.full((nkv, g, Tq, 1), -math.inf, device=q.device)  # running log-sum-exp
    out = torch.zeros(nkv, g, Tq, hs, device=q.device)
    query_pos = torch.arange(Tq, device=q.device)[:, None]  # (Tq, 1)
    for s0 in range(0, k.shape[1], key_tile):
        s1 = min(s0 + key_tile, k.shape[1])
        scores = qf @ k[:, None, s0:s1].float().transpose(-1, -2)  # (nkv, g, Tq, n)
        if causal:
            scores = scores.masked_fill(torch.arange(s0, s1, device=q.device)[None, :] > query_pos, -math.inf)
        tile_lse = scores.logsumexp(-1, keepdim=True)  # (nkv, g, Tq, 1); -inf where all masked
        probs = (scores - tile_lse.clamp(min=torch.finfo(torch.float32).min)).exp()
        tile_out = probs @ v[:, None, s0:s1].float()  # (nkv, g, Tq, hs)
        merged = torch.logaddexp(lse, tile_lse)
        out = out * (lse - merged).exp() + tile_out * (tile_lse - merged).exp()
        lse = merged
    return out, lse
