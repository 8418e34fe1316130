"""A pre-training (or SFT) run in stages, one after the other: each its own steps, row length, data
(one file or a mixture) and position encoding, as the Qwen2 report pre-trains at 4,096 tokens and
then at 32,768 with the RoPE base raised from 10,000 to 1,000,000.

Micro-batch m belongs to the stage whose steps hold it; the rows it reads are that stage's mixture's,
counted from the stage's start, so the run's data is a pure function of m (exact resume). When a
stage's first micro-batch is drawn the model takes its position encoding (each stage's position
fields hold on in the later ones), a change no weight depends on (`Transformer.encode_positions_as`).
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import Sequence

from .config import Stage
from .data import Batch, collate
from .mixture import Mixture


class StagedRows:
    def __init__(self, stages: Sequence[Stage], mixtures: Sequence[Mixture], model, grad_accum: int,
                 rows_per_micro_batch: int, rank_rows: slice, pad_id: int, device):
        self.mixtures, self.model = mixtures, model
        self.rows_per_micro_batch, self.rank_rows, self.pad_id, self.device = rows_per_micro_batch, rank_rows, pad_id, device
        self.first = [0]  # the first micro-batch of each stage
        for stage in stages[:-1]:
            self.first.append(self.first[-1] + stage.steps * grad_accum)
        self.configs, config = [], model.config
        for stage in stages:
            config = dataclasses.replace(config, **stage.positions)
            self.configs.append(config)

    def stage_of(self, m: int) -> int:
        """The stage (0-based) micro-batch m belongs to."""
        return bisect.bisect_right(self.first, m) - 1

    def __call__(self, m: int) -> Batch:
        stage = self.stage_of(m)
        if self.model.config != self.configs[stage]:
            self.model.encode_positions_as(self.configs[stage])
        first = (m - self.first[stage]) * self.rows_per_micro_batch
        rows = [self.mixtures[stage].row(i) for i in range(first, first + self.rows_per_micro_batch)]
        return collate(rows[self.rank_rows], self.pad_id).to(self.device)


class StageReport:
    """Each log record of a staged run says its stage (1-based), row length and RoPE base."""

    def __init__(self, staged: StagedRows, stages: Sequence[Stage], grad_accum: int):
        self.staged, self.stages, self.grad_accum = staged, stages, grad_accum

    def due(self, step: int) -> bool:
        return False

    def __call__(self, model, step: int) -> dict:
        stage = self.staged.stage_of((step - 1) * self.grad_accum)
        return {"stage": stage + 1, "seq_len": self.stages[stage].seq_len,
                "rope_theta": self.staged.configs[stage].rope_theta}
