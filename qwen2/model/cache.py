"""Key/value caches, and what one forward sees of its keys: every cache has one interface.

    frame(real)          the new tokens' default RoPE positions, the key slots they see, their mask
    write(layer, k, v)   store the new keys/values; returns every key/value to attend over
    attend(q, k, v, mask, sdpa)   attention as the cache's rows require (see `exact_rows`)
    commit(frame)        after the forward: the new tokens count as cached
    first_slots(B)       each row's slot for its first new token (the native decode ops write there)

`NoCache` is a forward without one (training, scoring), `KVCache` the growing cache of generation,
`StaticKV` (qwen2/model/static_cache.py) a cache seen with fixed shapes (the compiled decode step, the
server's rows of different lengths).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import Qwen2Config
from .masks import document_mask, document_positions, padded_causal_mask, sliding_window_mask


@dataclass
class Frame:
    """One forward's view of its keys. real (B, T): False for left padding of the new tokens;
    positions (B, T): their RoPE positions unless the caller gives others; key_real (B, S): the key
    slots that hold real tokens; span: the length the sequence may reach (dynamic YaRN).
    `mask` (B, 1, T, S) or None (plain causal) and `window_mask(window)` (restricted to a sliding
    window) are made when first asked: attention that takes no mask (DCA) never builds one."""
    real: torch.Tensor
    positions: torch.Tensor
    key_real: torch.Tensor
    span: int
    make_mask: Callable[[], torch.Tensor | None]
    restrict_to_window: Callable[[torch.Tensor | None, int], torch.Tensor]
    # the mask, once made (not a functools.cached_property: torch.compile cannot trace its lock)
    made: list = field(default_factory=list)

    @property
    def mask(self) -> torch.Tensor | None:
        if not self.made:
            self.made.append(self.make_mask())
        return self.made[0]

    def window_mask(self, window: int) -> torch.Tensor:
        return self.restrict_to_window(self.mask, window)


def count_positions(real: torch.Tensor, offset=0) -> torch.Tensor:
    """Each row's count of real tokens so far, from `offset`: a left-padded row gets the positions,
    hence the logits, of the row alone (as HF generate does)."""
    return (offset + real.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


class NoCache:
    """A forward without a cache: every key is one of the T new tokens. With `document_ids` (B, T)
    (packed training rows), attention and RoPE positions are confined to each document."""

    exact_rows = False

    def __init__(self, document_ids: torch.Tensor | None = None):
        self.document_ids = document_ids

    def frame(self, real: torch.Tensor) -> Frame:
        T, docs = real.shape[1], self.document_ids
        if docs is None:
            positions = count_positions(real)

            def mask():
                return padded_causal_mask(real, 0, T)
        else:
            positions = document_positions(docs)

            def mask():  # one unpadded document per row is plain causal attention: SDPA's faster is_causal path
                return None if bool((docs == docs[:, :1]).all()) else document_mask(docs)
        return Frame(real, positions, real, T, mask,
                     lambda mask, window: sliding_window_mask(mask, 0, T, T, window, real.device))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v

    def attend(self, q, k, v, mask, sdpa):
        return sdpa(q, k, v, mask)

    def commit(self, frame: Frame) -> None:
        pass


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

    def frame(self, real: torch.Tensor) -> Frame:
        start, T = self.length, real.shape[1]
        if start + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {start} cached + {T} new do not fit")
        positions = count_positions(real, self.positions[:, None])
        self.valid[:, start:start + T] = real
        key_real = self.valid[:, :start + T]  # (B, S)
        return Frame(real, positions, key_real, self.max_len, lambda: padded_causal_mask(key_real, start, T),
                     lambda mask, window: sliding_window_mask(mask, start, T, start + T, window, real.device))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the new keys into their slots; attention then runs over every slot used so far
        start, T = self.length, k.shape[2]
        self.k[layer, :, :, start:start + T] = k
        self.v[layer, :, :, start:start + T] = v
        return self.k[layer, :, :, :start + T], self.v[layer, :, :, :start + T]  # (B, nkv, S, hs)

    def attend(self, q, k, v, mask, sdpa):
        if self.exact_rows and q.shape[2] > 1:
            return _rows_as_steps(q, k, v, mask, self.length, sdpa)
        return sdpa(q, k, v, mask)

    def commit(self, frame: Frame) -> None:
        self.length += frame.real.shape[1]
        self.positions += frame.real.sum(-1)

    def first_slots(self, batch_size: int) -> torch.Tensor:
        """(B,) `length` for every row: where the next forward's first token goes (made once per length)."""
        if self._first_slots[0] != self.length:
            self._first_slots = (self.length, torch.full((batch_size,), self.length, dtype=torch.long))
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


def _rows_as_steps(q, k, v, mask, start: int, sdpa) -> torch.Tensor:
    """Attention of each of the T new queries as its own one-token step: query t sees slots
    0..start+t, with no mask when they are all real (what a one-token forward passes)."""
    rows = []
    for t in range(q.shape[2]):
        S = start + t + 1
        row_mask = None if mask is None else mask[:, :, t:t + 1, :S]
        if row_mask is not None and bool(row_mask.all()):
            row_mask = None
        rows.append(sdpa(q[:, :, t:t + 1], k[:, :, :S], v[:, :, :S], row_mask))
    return torch.cat(rows, dim=2)  # (B, nh, T, hs)
