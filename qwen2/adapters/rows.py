"""Which adapter each row of the next forward takes: the one place that whoever runs a forward (the
generation loop, the serving engine) writes before it, and every adapted linear (`MultiLoRALinear`)
reads during it. A plain object, not part of the model: the model code knows nothing of it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class RowChoice:
    """The adapters of one batch's rows, as the adapted linears use them.

    active (G,)             the indices of the loaded adapters some row uses, ascending
    mask (rows, G * rank)   1 on the rank columns of the row's own adapter among the active ones, 0
                            elsewhere: all 0 for a row on the base model
    every_adapter           `active` is every loaded adapter in order: the stacked weights serve as
                            they are, without gathering the active ones
    """
    active: torch.Tensor
    mask: torch.Tensor
    every_adapter: bool

    @property
    def rows(self) -> int:
        return self.mask.shape[0]


class RowAdapters:
    """`choice`: the current batch's `RowChoice`, or None when every row runs the base model (the
    adapted linears then add nothing)."""

    def __init__(self):
        self.choice: RowChoice | None = None

    def choose(self, per_row: Sequence[int | None] | None, loaded: int, rank: int, dtype: torch.dtype,
               device: torch.device) -> None:
        """Set the choice for rows taking adapters `per_row` (indices among the `loaded` ones, all
        padded to `rank`; None: the base model). per_row None: every row the base model."""
        used = sorted({i for i in per_row or () if i is not None})
        if not used:
            self.choice = None
            return
        position = {adapter: g for g, adapter in enumerate(used)}
        mask = torch.zeros(len(per_row), len(used), rank, dtype=dtype)
        for row, adapter in enumerate(per_row):
            if adapter is not None:
                mask[row, position[adapter]] = 1
        self.choice = RowChoice(torch.tensor(used, device=device), mask.view(len(per_row), -1).to(device),
                                used == list(range(loaded)))
