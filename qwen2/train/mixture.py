"""A data mixture: rows drawn from several sources so that each source's share of the training
tokens follows its weight, as the Qwen2 report tunes its data distribution on small models.

The sources take turns by deficit: the next row comes from the source furthest below its weight's
share of the tokens read so far (ties: the first such source). Each source's realised share then
stays within one row of its weight at every step, where drawing each row at random by weight
would wander by sqrt(rows) (2-3 % after a few hundred steps). Within a source, rows are read in a
fresh seeded random order each epoch (`ExampleOrder`). The whole sequence is a pure function of
the row's index in the run, so a resumed run reads exactly what the uninterrupted one did.

One file is a mixture of one source: the rows it reads are the `ExampleOrder` of that file.
"""
from __future__ import annotations

from array import array
from typing import Sequence

import torch

from .config import DataSource
from .data import PAD_DOCUMENT, ExampleOrder, Row, collate
from .forward import forward, lm_loss_sum


def row_tokens(row: Row) -> int:
    """Tokens of real documents in the row (padding excluded): what a source's share counts."""
    return sum(d != PAD_DOCUMENT for d in row.doc_ids)


class Mixture:
    def __init__(self, sources: Sequence[DataSource], rows: Sequence[Sequence[Row]], seed: int):
        total = sum(s.weight for s in sources)
        self.names = [s.name for s in sources]
        self.weights = [s.weight / total for s in sources]
        self.rows = rows
        self._row_tokens = [[row_tokens(r) for r in source_rows] for source_rows in rows]
        # Source s reads its rows in an order of its own; source 0's is that of a single-file run.
        self.orders = [ExampleOrder(len(r), 1, seed + 7919 * s) for s, r in enumerate(rows)]
        self._source = array("l")  # the source of each row read so far, in order
        self._row = array("l")  # its index among the source's rows
        self._tokens = array("q", [0] * len(rows))  # tokens per source before each row: len(rows) per row
        self._reads = [0] * len(rows)  # rows read from each source so far

    def _extend(self, through: int) -> None:
        """Decide rows up to index `through`."""
        S = len(self.rows)
        while len(self._source) <= through:
            seen = self._tokens[-S:]
            total = sum(seen)
            source = max(range(S), key=lambda s: (self.weights[s] * total - seen[s], -s))
            row = self.orders[source].at(self._reads[source])
            self._reads[source] += 1
            self._source.append(source)
            self._row.append(row)
            seen[source] += self._row_tokens[source][row]
            self._tokens.extend(seen)

    def row(self, i: int) -> Row:
        """The i-th row of the run."""
        self._extend(i)
        return self.rows[self._source[i]][self._row[i]]

    def source_of(self, i: int) -> str:
        self._extend(i)
        return self.names[self._source[i]]

    def shares(self, rows_read: int) -> dict[str, float]:
        """Each source's share of the tokens of the run's first `rows_read` rows."""
        S = len(self.rows)
        self._extend(rows_read - 1)
        seen = self._tokens[rows_read * S:(rows_read + 1) * S]
        total = sum(seen) or 1
        return {name: n / total for name, n in zip(self.names, seen)}


class MixtureReport:
    """What a mixture run adds to its log: each source's realised token share so far, and the mean
    per-token loss on each source's held-out rows at every `every`-th step and the last (None in
    between, so every record has the same columns)."""

    def __init__(self, mixture: Mixture, heldout: dict[str, list[Row]], rows_per_step: int, every: int,
                 last_step: int, batch_size: int, pad_id: int, device):
        self.mixture, self.heldout = mixture, heldout
        self.rows_per_step, self.every, self.last_step = rows_per_step, every, last_step
        self.batch_size, self.pad_id, self.device = batch_size, pad_id, device

    def due(self, step: int) -> bool:
        """Whether `step` evaluates the held-out rows (and so must be logged)."""
        return bool(self.heldout) and ((self.every and step % self.every == 0) or step == self.last_step)

    def __call__(self, model, step: int) -> dict[str, float | None]:
        record = {f"share/{k}": v for k, v in self.mixture.shares(step * self.rows_per_step).items()}
        due = self.due(step)
        for name, rows in self.heldout.items():
            record[f"heldout_loss/{name}"] = self.loss(model, rows) if due else None
        return record

    @torch.no_grad()
    def loss(self, model, rows: list[Row]) -> float:
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for start in range(0, len(rows), self.batch_size):
            batch = collate(rows[start:start + self.batch_size], self.pad_id).to(self.device)
            total += float(lm_loss_sum(forward(model, batch.input_ids, batch.doc_ids), batch.labels))
            count += batch.num_targets
        model.train(was_training)
        return total / max(count, 1)
