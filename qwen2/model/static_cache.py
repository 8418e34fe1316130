"""A KV cache seen with static shapes (see `StaticKV`): what the compiled decode step traces, and how
the server decodes rows of different lengths together. Same interface as qwen2/model/cache.py's."""
from __future__ import annotations

import torch

from .cache import Frame
from .masks import static_sliding_mask


class StaticKV:
    """A KV cache seen with static shapes, one new token per row: the new key/value go to slot
    `slot` (a 1-element long tensor, not a Python int, so one compiled graph serves every step) and
    attention runs over all max_len slots, masked by `valid` (B, max_len), which must already mark
    the slot; `positions` (B,) are the new tokens' RoPE positions. A (B,) `slot` gives each row its
    own slot: rows of different lengths decode together (the server's continuous batching).
    exact_rows (eager, a (B,) slot of rows filled from slot 0, no sliding window): each row attends
    over its slots 0..slot[b] alone, unmasked, so its logits are bit for bit its one-row decode's."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
                 slot: torch.Tensor, exact_rows: bool = False):
        self.k, self.v = k, v  # (L, B, nkv, max_len, hs)
        self.valid, self.positions, self.slot = valid, positions, slot
        self.exact_rows = exact_rows
        self.row_lengths = (slot + 1).tolist() if exact_rows else None

    def frame(self, real: torch.Tensor) -> Frame:
        return Frame(real, self.positions[:, None], self.valid, self.k.shape[3],
                     lambda: self.valid[:, None, None, :],  # (B, 1, 1, max_len)
                     lambda mask, window: static_sliding_mask(mask, self.slot, window))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slot.numel() == 1:
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
        else:  # row b's one new key/value into its own slot[b]
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[layer][rows, :, self.slot] = k[:, :, 0]  # (B, nkv, hs)
            self.v[layer][rows, :, self.slot] = v[:, :, 0]
        return self.k[layer], self.v[layer]  # (B, nkv, max_len, hs), unused slots masked out

    def attend(self, q, k, v, mask, sdpa):
        if self.row_lengths is None:
            return sdpa(q, k, v, mask)
        return torch.cat([sdpa(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], None)
                          for b, n in enumerate(self.row_lengths)])  # (B, nh, 1, hs)

    def commit(self, frame: Frame) -> None:
        pass  # the caller owns `valid` and the slots

    def first_slots(self, batch_size: int) -> torch.Tensor:
        return self.slot.expand(batch_size)
