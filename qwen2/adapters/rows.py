"""Which adapter each row of the next forward takes: the one place that whoever runs a forward (the
generation loop, the serving engine) writes before it, and every adapted linear (`MultiLoRALinear`)
reads during it. A plain object, not part of the model: the model code knows nothing of it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class RowChoice:
    """The adapters of one batch's rows, as the adapted linears use them. The linears stack every
    loaded adapter's rank slots one after another (adapter j's r_j rows of A and Bt); a batch uses
    those of its active adapters.

    columns (R,)   the stacked slots of the adapters some row uses, in order; None when that is every
                   loaded adapter, so the stacked weights serve as they are, without a gather
    mask (rows, R) 1 on the slots of the row's own adapter among those, 0 elsewhere: all 0 for a row
                   on the base model
    """
    columns: torch.Tensor | None
    mask: torch.Tensor

    @property
    def rows(self) -> int:
        return self.mask.shape[0]


def rank_slots(ranks: Sequence[int]) -> list[range]:
    """Each adapter's rows in the stacked weights, adapters of `ranks` one after another."""
    starts = [sum(ranks[:j]) for j in range(len(ranks))]
    return [range(start, start + rank) for start, rank in zip(starts, ranks)]


class RowAdapters:
    """`choice`: the current batch's `RowChoice`, or None when every row runs the base model (the
    adapted linears then add nothing)."""

    def __init__(self):
        self.choice: RowChoice | None = None

    def choose(self, per_row: Sequence[int | None] | None, ranks: Sequence[int], dtype: torch.dtype,
               device: torch.device) -> None:
        """Set the choice for rows taking adapters `per_row` (indices among the loaded ones, whose
        slots are `ranks` wide; None: the base model). per_row None: every row the base model."""
        used = sorted({i for i in per_row or () if i is not None})
        if not used:
            self.choice = None
            return
        slots = rank_slots(ranks)
        columns = [c for j in used for c in slots[j]]
        position = {c: i for i, c in enumerate(columns)}  # a stacked slot's place among the active ones
        mask = torch.zeros(len(per_row), len(columns), dtype=dtype)
        for row, adapter in enumerate(per_row):
            if adapter is not None:
                mask[row, [position[c] for c in slots[adapter]]] = 1
        every = len(used) == len(ranks)
        self.choice = RowChoice(None if every else torch.tensor(columns, device=device), mask.to(device))
