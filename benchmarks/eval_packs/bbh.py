"""The BIG-Bench Hard packs, from the task files lm-eval ships (the installed `lm_eval`, or an unpacked
wheel's tasks/ folder given as `tasks_dir`):

  bbh.jsonl        the 81 chain-of-thought exemplars of `bbh_cot_fewshot` (3 per task, the tasks'
                   `fewshot_config.samples`): task, input, target (the worked answer), answer (what
                   it states, read with the task's own "get-answer" filter).
  bbh_tasks.jsonl  one row per task: its description line, and its two scorings: `bbh_cot_fewshot`'s
                   get-answer filter with its exact_match options, and `bbh_cot_zeroshot`'s
                   flexible-extract filters (a task's own filter class by its dotted path in lm-eval)
                   with that task's options.

The layout of qwen2.eval.bbh (question template, delimiter, stop strings, reply length, task list)
is checked against the YAMLs here, so a change in lm-eval stops the build.
"""
from __future__ import annotations

import json
import os

from qwen2.eval import bbh
from qwen2.eval.answer_filters import INVALID, extract
from qwen2.fileio import write_text_atomic

from .lm_eval_yaml import read_task, scorings, tasks_dir as default_tasks_dir


def _check(what: str, ours, theirs) -> None:
    if ours != theirs:
        raise SystemExit(f"lm-eval's {what} is now {theirs!r}, qwen2.eval.bbh has {ours!r}: update it")


def read(tasks: str) -> tuple[list[dict], list[dict]]:
    """(exemplar rows, task rows)."""
    fewshot_dir, zeroshot_dir = os.path.join(tasks, "bbh", "cot_fewshot"), os.path.join(tasks, "bbh", "cot_zeroshot")
    group = read_task(os.path.join(fewshot_dir, "_bbh_cot_fewshot.yaml"))
    _check("bbh_cot_fewshot task list", list(bbh.TASKS), [t.removeprefix("bbh_cot_fewshot_") for t in group["task"]])
    exemplar_rows, task_rows = [], []
    for task in bbh.TASKS:
        config = read_task(os.path.join(fewshot_dir, f"{task}.yaml"))
        _check(f"{task} doc_to_text", bbh.QUESTION.replace("{input}", "{{input}}"), config["doc_to_text"])
        _check(f"{task} target_delimiter", bbh.TARGET_DELIMITER, config["target_delimiter"])
        _check(f"{task} stop strings", list(bbh.STOP), config["generation_kwargs"]["until"])
        _check(f"{task} reply length", bbh.MAX_NEW_TOKENS, config["generation_kwargs"]["max_gen_toks"])
        strict = scorings(config, {"get-answer": "exact_match"})
        zeroshot = read_task(os.path.join(zeroshot_dir, f"{task}.yaml"))
        flexible = scorings(zeroshot, {"flexible-extract": "flexible_extract", "strict-match": "strict_match"})
        task_rows.append({"task": task, "description": config["description"],
                          "scoring": {**strict, "flexible_extract": flexible["flexible_extract"]}})
        for i, sample in enumerate(config["fewshot_config"]["samples"]):
            answer = extract(sample["target"], sample, strict["exact_match"]["filters"])
            if answer == INVALID:
                raise SystemExit(f"bbh {task} exemplar {i} states no answer: {sample['target'][-80:]!r}")
            exemplar_rows.append({"id": f"{task}-{i}", "task": task, "input": sample["input"],
                                  "target": sample["target"], "answer": answer})
    return exemplar_rows, task_rows


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build(packs_dir: str, tasks_dir: str | None = None) -> list[str]:
    exemplar_rows, task_rows = read(default_tasks_dir(tasks_dir))
    os.makedirs(packs_dir, exist_ok=True)
    written = []
    for name, rows in (("bbh", exemplar_rows), ("bbh_tasks", task_rows)):
        path = os.path.join(packs_dir, f"{name}.jsonl")
        write_text_atomic(path, _jsonl(rows))
        written.append(path)
    return written
