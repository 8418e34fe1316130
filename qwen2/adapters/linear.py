"""A linear serving several LoRA adapters at once, each row of a batch taking its own or none,
without merging any into the base weight (S-LoRA, arXiv 2311.03285; Punica, arXiv 2310.18547)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import Qwen2Error
from .rows import RowAdapters


class MultiLoRALinear(nn.Module):
    """`base` (an nn.Linear or one of our quantised linears) plus every loaded adapter's update of it:
    a row on adapter j gets y = base(x) + s_j (x A_j^T) B_j^T, a row on none gets base(x).

    The base matmul runs once for all rows. The adapters' weights are stacked, each in its own rank
    slots (`AdapterSet`: r_j rows for adapter j, zero where it adapts this linear with a lower rank or
    not at all): A (R, in) and Bt (R, out) = (s B)^T, the scale folded in. A batch's update is then
    two matmuls whatever its mix of adapters: x times the active adapters' A gives (rows, T, R'),
    masked to each row's own slots (`RowChoice.mask`), times their Bt gives (rows, T, out). Reading
    each active adapter's weights once per forward, as the base weight is read once, rather than once
    per row (as gathering each row's A and B would)."""

    def __init__(self, base: nn.Module, rows: RowAdapters):
        super().__init__()
        self.base, self.rows = base, rows
        self.in_features, self.out_features = base.in_features, base.out_features
        # not persistent: the base's state dict stays the base's
        self.register_buffer("A", torch.zeros(0, self.in_features), persistent=False)
        self.register_buffer("Bt", torch.zeros(0, self.out_features), persistent=False)

    def low_rank_update(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """What this forward adds to the base's output: A (R, in) and Bt (R, out), the active adapters'
        slots, and each row's mask (rows, R); None while every row runs the base model. The native
        decode block (qwen2/kernels/decode_block.cpp) adds it in the same ops as `forward`."""
        choice = self.rows.choice
        if choice is None:
            return None
        if choice.columns is None:
            return self.A, self.Bt, choice.mask
        return self.A[choice.columns], self.Bt[choice.columns], choice.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        update = self.low_rank_update()
        if update is None:
            return y
        A, Bt, mask = update
        if x.dim() != 3 or x.shape[0] != mask.shape[0]:
            raise Qwen2Error(f"adapters were chosen for {mask.shape[0]} rows, but this forward has input of shape "
                             f"{tuple(x.shape)}; choose them for its batch (AdapterSet.select)")
        h = torch.matmul(x, A.T) * mask[:, None, :]  # (rows, T, R)
        return torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), Bt).view(y.shape)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, slots={self.A.shape[0]}"
