"""BIG-Bench Hard as lm-eval's `bbh_cot_fewshot` runs it: each of the 27 tasks' description, then 3
chain-of-thought exemplars "Q: ...\\nA: Let's think step by step.\\n<reasoning> So the answer is X.",
then the question; the reply stops at "Q", a blank line or the end of the turn.

Two scores per reply, both lm-eval's own filters and exact_match:

    exact_match        `bbh_cot_fewshot`'s "get-answer": what follows "the answer is " up to the
                       reply's last character on that line, compared exactly ("(B)" is not "B").
    flexible_extract   `bbh_cot_zeroshot`'s "flexible-extract" for the task (the last "(X)" or an
                       option's text for multiple choice, the last True/False, Yes/No, valid/invalid or
                       number, the sorted words...), compared with that task's looser options
                       (case, trailing ".", ",", quotes and backslashes ignored).

Items: without `--data`, the 81 exemplars lm-eval ships (3 per task), each asked with its task's
OTHER exemplars as shots (so 2 at most), its target the answer its worked solution states. With
`--data`, a task's test rows in `lukaemon/bbh`'s layout (input, target); for `--task all` each row
also needs a `task` column naming its task.
"""
from __future__ import annotations

import functools

from ..errors import Qwen2Error
from .answer_filters import Scoring, score
from .datasets import read_pack, read_rows
from .prompts import first_shots, render
from .runner import GenerationBenchmark

TASKS = ("boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
         "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
         "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
         "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
         "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
         "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
         "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
         "word_sorting")
QUESTION = "Q: {input}\nA: Let's think step by step.\n"
TARGET_DELIMITER = ""  # the worked answer follows the question's own newline
STOP = ("</s>", "Q", "\n\n")
MAX_NEW_TOKENS = 1024
METRICS = ("exact_match", "flexible_extract")


@functools.lru_cache(maxsize=None)
def task_specs() -> dict[str, dict]:
    """{task: its row of the bbh_tasks pack (description, scoring)}."""
    return {row["task"]: row for row in read_pack("bbh_tasks")}


@functools.lru_cache(maxsize=None)
def exemplars() -> dict[str, list[dict]]:
    """{task: its 3 exemplars (input, target: the worked answer, answer: what it states)}."""
    by_task: dict[str, list[dict]] = {task: [] for task in TASKS}
    for row in read_pack("bbh"):
        by_task[row["task"]].append(row)
    return by_task


@functools.lru_cache(maxsize=None)
def scorings(task: str) -> dict[str, Scoring]:
    return {name: Scoring.from_dict(s) for name, s in task_specs()[task]["scoring"].items()}


def load_items(tasks: tuple[str, ...], data: str | None) -> list[dict]:
    if data is None:
        return [{"id": e["id"], "task": task, "input": e["input"], "target": e["answer"], "leave_out": i}
                for task in tasks for i, e in enumerate(exemplars()[task])]
    rows = read_rows(data, ("input", "target"), layout="lukaemon/bbh")
    if len(tasks) == 1:
        return [{"id": str(i), "task": tasks[0], "input": r["input"], "target": str(r["target"])}
                for i, r in enumerate(rows)]
    items = []
    for number, r in enumerate(rows, 1):
        if r.get("task") not in TASKS:
            raise Qwen2Error(f"{data} row {number}: --task all needs a 'task' column naming one of the 27 BBH tasks "
                             f"(got {r.get('task')!r}); lukaemon/bbh's files hold one task each: give --task NAME")
        items.append({"id": f"{r['task']}-{number - 1}", "task": r["task"], "input": r["input"],
                      "target": str(r["target"])})
    return items


def prompt(item: dict, shots: int, chat: bool, tokenizer) -> str:
    task = item["task"]
    pool = [(QUESTION.format(input=e["input"]), TARGET_DELIMITER + e["target"]) for e in exemplars()[task]]
    chosen = first_shots(pool, shots, leave_out=item.get("leave_out"), name=f"{task} exemplars")
    return render(tokenizer, QUESTION.format(input=item["input"]), chosen, chat=chat,
                  description=task_specs()[task]["description"])


def score_reply(item: dict, reply: str) -> dict:
    return score(reply, item, item["target"], scorings(item["task"]))


def _benchmark(name: str, tasks: tuple[str, ...], help: str) -> GenerationBenchmark:
    return GenerationBenchmark(name=name, help=help, load=functools.partial(load_items, tasks), prompt=prompt,
                               score=score_reply, metrics=METRICS, stop=STOP, max_new_tokens=MAX_NEW_TOKENS,
                               shots=3, pack_shots=2, group="task")


BENCHMARKS: dict[str, GenerationBenchmark] = {
    "all": _benchmark("bbh", TASKS, "all 27 BBH tasks, 3-shot chain of thought (lm-eval's bbh_cot_fewshot)"),
    **{task: _benchmark(f"bbh-{task}", (task,), f"BBH {task}, 3-shot chain of thought") for task in TASKS},
}
