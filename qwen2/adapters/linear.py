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

    The base matmul runs once for all rows. The adapters' weights are stacked, zero-padded to one
    rank r (an adapter that does not adapt this linear is all zeros): A (N, r, in) and
    Bt (N, r, out) = (s B)^T, the scale folded in. A batch's update is then two matmuls whatever
    its mix of adapters: x times the active adapters' A side by side gives (rows, T, G r), masked
    to each row's own r columns (`RowChoice.mask`), times their Bt stacked gives (rows, T, out).
    Reading each active adapter's weights once per forward, as the base weight is read once, rather
    than once per row (as gathering each row's A and B would)."""

    def __init__(self, base: nn.Module, rows: RowAdapters):
        super().__init__()
        self.base, self.rows = base, rows
        self.in_features, self.out_features = base.in_features, base.out_features
        # not persistent: the base's state dict stays the base's
        self.register_buffer("A", torch.zeros(0, 0, self.in_features), persistent=False)
        self.register_buffer("Bt", torch.zeros(0, 0, self.out_features), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        choice = self.rows.choice
        if choice is None:
            return y
        if x.dim() != 3 or x.shape[0] != choice.rows:
            raise Qwen2Error(f"adapters were chosen for {choice.rows} rows, but this forward has input of shape "
                             f"{tuple(x.shape)}; choose them for its batch (AdapterSet.select)")
        A, Bt = (self.A, self.Bt) if choice.every_adapter else (self.A[choice.active], self.Bt[choice.active])
        h = torch.matmul(x, A.reshape(-1, self.in_features).T) * choice.mask[:, None, :]  # (rows, T, G r)
        return torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]),
                           Bt.reshape(-1, self.out_features)).view(y.shape)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.A.shape[0]}, " \
               f"rank={self.A.shape[1]}"
