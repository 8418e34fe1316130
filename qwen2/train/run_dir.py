"""A training run's output directory, read back: its per-step log and the options it was started
with. What the loop writes there (log.jsonl, train_config.json) is what an experiment, a plot or
a rerun reads, so the file names and their reading live in one place.

    output_dir/log.jsonl          one JSON record per logged step: step, loss, lr, tokens, ...
    output_dir/train_config.json  the run's options (every TrainConfig field)
"""
from __future__ import annotations

import json
import os

from ..errors import Qwen2Error
from .config import TrainConfig, from_dict, to_dict

LOG_FILE = "log.jsonl"
CONFIG_FILE = "train_config.json"


def read_log(output_dir: str) -> list[dict]:
    """The records of the run's log, oldest first; [] when it has logged nothing yet."""
    path = os.path.join(output_dir, LOG_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tokens_seen_by_step(log: list[dict]) -> list[int]:
    """Cumulative tokens read after each logged step (each record holds its own step's `tokens`):
    the x axis on which runs with other batch shapes compare."""
    total, out = 0, []
    for record in log:
        total += record["tokens"]
        out.append(total)
    return out


def mean_loss_up_to(log: list[dict], step: int, window: int) -> float | None:
    """Mean training loss of the `window` steps up to and including `step` (one step's loss is
    noisy); None when no step is in that range (step 0: nothing trained yet)."""
    losses = [r["loss"] for r in log if step - window < r["step"] <= step]
    return sum(losses) / len(losses) if losses else None


def check_same_run(output_dir: str, options: dict) -> None:
    """Refuse to resume the run in `output_dir` with other options than it was started with (all but
    `resume`): a resumed run must go on training the same thing. Nothing to check before it starts."""
    path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        before = json.load(f)
    # An option the saved config lacks (one added since the run was made) had its default then.
    default = to_dict(TrainConfig())
    before = {k: before.get(k, default[k]) for k in default}
    now = to_dict(from_dict(options))
    changed = sorted(k for k in now if k != "resume" and before[k] != now[k])
    if changed:
        what = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed)
        raise Qwen2Error(f"{output_dir} holds a run with other options ({what}); "
                         "rerun with the same options to resume, or choose another --out")
