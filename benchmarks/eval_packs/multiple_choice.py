"""The multiple-choice packs, from the task files lm-eval ships (read from the installed `lm_eval`, or
from an unpacked wheel: `pip download --no-deps lm-eval` and point --lm-eval-tasks at its tasks/):

  mmlu.jsonl          the 282 questions over 57 subjects of lm-eval's MMLU chain-of-thought few-shot
                      exemplars (tasks/mmlu/flan_cot_fewshot/*.yaml, `fewshot_config.samples`), parsed
                      back into the `cais/mmlu` layout: question, subject, choices, answer (an index).
                      One exemplar (college_chemistry, the EPR question) has five options, kept as five.
  mc_descriptions.jsonl  the per-subject description lines of lm-eval's mmlu, ceval-valid and cmmlu
                      tasks (C-Eval's and CMMLU's are Chinese and name the subject in Chinese), so that
                      `qwen2 eval mc --data` prompts as lm-eval does without lm-eval installed.
"""
from __future__ import annotations

import glob
import json
import os
import re

from qwen2.fileio import write_text_atomic

LETTERS = "ABCDEFGHIJ"


def lm_eval_tasks_dir() -> str:
    import lm_eval

    return os.path.join(os.path.dirname(lm_eval.__file__), "tasks")


def _yaml(path: str) -> dict:
    import yaml

    # lm-eval's task files use a `!function` tag that only its own loader knows; these keys need none
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=Loader)


def parse_exemplar(question: str, target: str) -> tuple[str, list[str], int]:
    """(question, choices, answer index) of one chain-of-thought exemplar: its question text ends in
    the options "(A) ... (B) ...", on one line or one per line, and its target ends "The answer is (X)."."""
    start = question.rfind("\n(A) ")
    if start < 0:
        raise ValueError(f"no '(A)' option in {question[:80]!r}")
    stem, rest = question[:start], question[start + 1:]
    marks = [0]
    for letter in LETTERS[1:]:
        found = re.search(rf"[ \n]\({letter}\) ", rest[marks[-1]:])
        if not found:
            break
        marks.append(marks[-1] + found.start() + 1)
    marks.append(len(rest))
    choices = [rest[a + 4:b].strip() for a, b in zip(marks, marks[1:])]
    answers = re.findall(r"answer is \(([A-J])\)", target)
    if not answers or LETTERS.index(answers[-1]) >= len(choices):
        raise ValueError(f"no answer among the options in {target[-80:]!r}")
    return stem.strip(), choices, LETTERS.index(answers[-1])


def mmlu_exemplars(tasks_dir: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(tasks_dir, "mmlu", "flan_cot_fewshot", "mmlu_*.yaml"))):
        task = _yaml(path)
        for sample in task["fewshot_config"]["samples"]:
            question, choices, answer = parse_exemplar(sample["question"], sample["target"])
            rows.append({"question": question, "subject": task["dataset_name"], "choices": choices, "answer": answer})
    return rows


def descriptions(tasks_dir: str) -> list[dict]:
    """{"task", "subject", "description"} of every subject task of lm-eval's mmlu, ceval-valid, cmmlu."""
    out = []
    for task, pattern in (("mmlu", "mmlu/default/mmlu_*.yaml"), ("ceval", "ceval/ceval-valid_*.yaml"),
                          ("cmmlu", "cmmlu/cmmlu_*.yaml")):
        for path in sorted(glob.glob(os.path.join(tasks_dir, pattern))):
            config = _yaml(path)
            out.append({"task": task, "subject": config["dataset_name"], "description": config["description"]})
    return out


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build(packs_dir: str, tasks_dir: str | None = None) -> list[str]:
    tasks_dir = tasks_dir or lm_eval_tasks_dir()
    rows = mmlu_exemplars(tasks_dir)
    subjects = {r["subject"] for r in rows}
    if len(rows) != 282 or len(subjects) != 57:
        raise RuntimeError(f"expected lm-eval's 282 MMLU exemplars over 57 subjects, found {len(rows)} over "
                           f"{len(subjects)} in {tasks_dir}")
    os.makedirs(packs_dir, exist_ok=True)
    written = []
    for name, records in (("mmlu", rows), ("mc_descriptions", descriptions(tasks_dir))):
        path = os.path.join(packs_dir, f"{name}.jsonl")
        write_text_atomic(path, _jsonl(records))
        written.append(path)
    return written


if __name__ == "__main__":
    import argparse

    from qwen2.eval.datasets import PACKS_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=PACKS_DIR)
    parser.add_argument("--lm-eval-tasks", default=None, help="lm_eval/tasks of an unpacked wheel (default: "
                        "the installed lm_eval's)")
    args = parser.parse_args()
    for written in build(args.out, args.lm_eval_tasks):
        print(f"wrote {written}")
