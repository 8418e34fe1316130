"""The runner of generation benchmarks (math, bbh, ifeval, ...): build each item's prompt, generate
the reply, score it, append the record to the results file, and summarise.

A benchmark is a `GenerationBenchmark`: how to load its items (the offline pack, or `--data` in the
public dataset's layout), how to prompt for one, where replies stop, and how to score a reply. The
scoring functions take recorded replies, so they are tested against lm-eval's metric functions with
no model at all; the runner only adds generation, resuming and the summary.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from ..errors import Qwen2Error
from ..progress import progress_bar
from .datasets import first
from .results import ResultsFile, summarize_scores

# replier(prompts, max_new_tokens, stop) -> (prompt index, reply) for each prompt, in any order
Replier = Callable[[Sequence[str], int, Sequence[str]], Iterator[tuple[int, str]]]


@dataclass(frozen=True)
class GenerationBenchmark:
    name: str
    help: str
    load: Callable[[str | None], list[dict]]        # data path or None (the offline pack) -> items, each with "id"
    prompt: Callable[[dict, int, bool, object], str]  # (item, shots, chat, tokenizer) -> prompt text
    score: Callable[[dict, str], dict]               # (item, reply) -> {metric: value, None when it does not apply}
    metrics: tuple[str, ...]
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 256
    shots: int = 0                                   # default number of few-shot examples
    # the default on the offline pack, whose items are its exemplars: each item's shots are the
    # others, so one fewer than `shots` at most (None: `shots`)
    pack_shots: int | None = None
    group: str | None = None                         # item field scores are also reported by (subject, task)
    # records -> summary; default: each metric's mean with its 95 % interval (and per group)
    summarize: Callable[[list[dict]], dict] | None = field(default=None)


def model_replier(m, batch: int = 8) -> Replier:
    """Greedy replies of a loaded model, `batch` sequences decoding together."""
    from .replies import generate_replies

    def reply(prompts, max_new_tokens, stop):
        for i, texts in generate_replies(m, prompts, max_new_tokens=max_new_tokens, stop=stop, batch=batch):
            yield i, texts[0]

    return reply


def run(bench: GenerationBenchmark, replier: Replier, out: str | os.PathLike, *, tokenizer=None,
        model: str = "", data: str | None = None, limit: int | None = None, shots: int | None = None,
        chat: bool = True, max_new_tokens: int | None = None, progress: bool = True) -> dict:
    """Run `bench` on its items (the first `limit`), resuming from `out`; return the summary, also
    written beside `out`. Each record: id, the group field, prompt, reply, scores."""
    if shots is None:
        shots = bench.pack_shots if data is None and bench.pack_shots is not None else bench.shots
    if shots < 0:
        raise Qwen2Error(f"--shots must be 0 or more, got {shots}")
    max_new_tokens = max_new_tokens or bench.max_new_tokens
    items = first(bench.load(data), limit)
    settings = {"benchmark": bench.name, "model": model, "data": os.path.abspath(data) if data else None,
                "shots": shots, "chat": chat, "max_new_tokens": max_new_tokens}
    results = ResultsFile(out, settings, command=f"qwen2 eval {bench.name}")
    todo = [item for item in items if item["id"] not in results]
    prompts = [bench.prompt(item, shots, chat, tokenizer) for item in todo]
    with progress_bar(total=len(items), initial=len(items) - len(todo), desc=bench.name, unit="item",
                      disable=not progress) as bar:
        for i, reply in replier(prompts, max_new_tokens, bench.stop):
            item = todo[i]
            record = {"id": item["id"], **({bench.group: item[bench.group]} if bench.group else {}),
                      "prompt": prompts[i], "reply": reply, "scores": bench.score(item, reply)}
            results.append([record])
            bar.update(1)
    records = results.of([item["id"] for item in items])
    summary = (bench.summarize or (lambda rs: summarize_scores(rs, bench.metrics, bench.group)))(records)
    summary = {"benchmark": bench.name, "model": model, **summary}
    results.write_summary(summary)
    return summary


def describe(summary: dict) -> str:
    """One line per metric: mean and 95 % interval over the items."""
    lines = [f"{summary['benchmark']}: {summary['items']} items"]
    for metric, value in summary.items():
        if isinstance(value, dict) and "mean" in value:
            lines.append(f"  {metric}: {value['mean']:.4f} (95 % interval {value['low']:.4f}-{value['high']:.4f}, "
                         f"n={value['n']})")
    return "\n".join(lines)
