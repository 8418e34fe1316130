"""Which keys each query may see: boolean masks (B, 1, T, S), True where query t attends to key s.

causal + padding (`padded_causal_mask`), the sliding window of transformers' Qwen2 (layers with index
>= max_window_layers see only the `sliding_window` slots ending at their own: key slot > query slot -
window; the KV cache still keeps every key), and packed documents for training (`document_mask`).
None stands for plain causal attention, which SDPA runs faster as `is_causal`.
"""
from __future__ import annotations

import torch


def padded_causal_mask(key_real: torch.Tensor, start: int, T: int) -> torch.Tensor | None:
    """T new queries at slots start.. over the S = key_real.shape[1] slots, key_real (B, S) False for
    padding. None when there is no padding and the mask would be plain causal (SDPA's faster
    `is_causal`) or all True (a single new token seeing every cached one)."""
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


def sliding_window_mask(mask: torch.Tensor | None, start: int, T: int, S: int, window: int,
                        device=None) -> torch.Tensor:
    """`mask` (B, 1, T, S) boolean, or None for plain causal, restricted to the window: query slot q
    sees key slot k only if q - window < k <= q."""
    q_slot = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
    near = k_slot > q_slot - window  # (T, S)
    if mask is None:
        return (near & (k_slot <= q_slot))[None, None]  # (1, 1, T, S)
    return mask & near


def static_sliding_mask(mask: torch.Tensor, slot: torch.Tensor, window: int) -> torch.Tensor:
    """A static cache's (B, 1, 1, max_len) mask restricted to the window ending at `slot`
    ((1,) or (B,), one new token per row)."""
    k_slot = torch.arange(mask.shape[-1], device=mask.device)
    return mask & (k_slot > slot.view(-1, 1, 1, 1) - window)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) boolean mask: query t sees key s <= t of its own document.
    Padding is a document of its own, so every query sees at least itself (SDPA gives NaN otherwise)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (causal & same_doc)[:, None]


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """RoPE positions counted from each document's first token: a packed document gets the
    positions, hence the logits, it would have alone."""
    B, T = doc_ids.shape
    index = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, T) start of own doc
    return index - first
