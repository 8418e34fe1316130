"""Per-item results files: a benchmark run appends one JSON line per finished item, so a killed run
started again with the same file and settings goes on from where it stopped.

Every record holds the `settings` it was made with (model, shots, prompting, ...); a resumed run
with other settings is refused instead of mixing two runs in one file. A cut last line (the run was
killed while writing it) is dropped. The summary goes beside the results, `NAME.summary.json`,
written atomically.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Sequence

from ..errors import Qwen2Error
from ..fileio import write_text_atomic


def summary_path(out_path: str | os.PathLike) -> str:
    root, _ = os.path.splitext(os.fspath(out_path))
    return root + ".summary.json"


def read_finished(path: str, settings: dict, key: str, command: str) -> list[dict]:
    """The records a previous run wrote to `path` (none when it is not there), after checking each
    has `key` and was made with `settings`; a cut last line (killed while writing) is dropped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise Qwen2Error(f"{path} line {number} is not JSON; it is not a results file of "
                                 f"`{command}`: give another --out") from None
            if not isinstance(record, dict) or key not in record:
                raise Qwen2Error(f"{path} line {number} has no {key!r}; it is not a results file of "
                                 f"`{command}`: give another --out")
            if record.get("settings") != settings:
                raise Qwen2Error(f"{path} holds results made with other settings ({record.get('settings')}); "
                                 "resume with the same options, or give another --out")
            records.append(record)
    return records


class ResultsFile:
    """The records of `path` made with `settings`, keyed by `key`; `append` adds finished items.

    Opening it reads what a previous run finished and rewrites the file without a cut last line."""

    def __init__(self, path: str | os.PathLike, settings: dict, key: str = "id", command: str = "qwen2 eval"):
        self.path, self.settings, self.key = os.fspath(path), dict(settings), key
        self.records: dict[str, dict] = {str(r[key]): r for r in read_finished(self.path, self.settings, key, command)}
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        write_text_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records.values()))

    def __contains__(self, item_id) -> bool:
        return str(item_id) in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, records: Iterable[dict]) -> None:
        """Add finished records (each gets the run's settings) and make them durable before returning."""
        lines = []
        for record in records:
            record = {**record, "settings": self.settings}
            self.records[str(record[self.key])] = record
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())

    def of(self, item_ids: Sequence) -> list[dict]:
        """The records of these items, in their order (items not finished are left out)."""
        return [self.records[str(i)] for i in item_ids if str(i) in self.records]

    def write_summary(self, summary: dict) -> str:
        path = summary_path(self.path)
        write_text_atomic(path, json.dumps({**summary, "settings": self.settings}, indent=2, ensure_ascii=False) + "\n")
        return path


# ---- scores -------------------------------------------------------------------------------------

Z95 = 1.959963984540054


def mean_interval(values: Sequence[float]) -> dict:
    """{"mean", "stderr", "low", "high", "n"}: the mean of per-item scores with a 95 % interval from
    the standard error of the mean (sample standard deviation / sqrt(n), lm-eval's `mean_stderr`),
    clipped to [0, 1] for 0/1 scores."""
    n = len(values)
    if n == 0:
        raise Qwen2Error("no scored items to summarise")
    mean = sum(values) / n
    stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0
    low, high = mean - Z95 * stderr, mean + Z95 * stderr
    if all(0.0 <= v <= 1.0 for v in values):
        low, high = max(0.0, low), min(1.0, high)
    return {"mean": mean, "stderr": stderr, "low": low, "high": high, "n": n}


def summarize_scores(records: Sequence[dict], metrics: Sequence[str], group: str | None = None) -> dict:
    """Per metric (each record's `scores[metric]`) the mean with its interval over all records, and,
    when `group` names a record field (subject, task), per group and the macro average over groups."""
    summary: dict = {"items": len(records)}
    for metric in metrics:
        values = [float(r["scores"][metric]) for r in records if r["scores"].get(metric) is not None]
        summary[metric] = mean_interval(values)
        if group:
            groups: dict[str, list[float]] = {}
            for r in records:
                if r["scores"].get(metric) is not None:
                    groups.setdefault(str(r[group]), []).append(float(r["scores"][metric]))
            summary[f"{metric}_by_{group}"] = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
            summary[f"{metric}_macro"] = sum(summary[f"{metric}_by_{group}"].values()) / len(groups)
    return summary
