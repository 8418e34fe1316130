"""The multiple-choice formats: how lm-eval's task files turn a row of each public dataset into a
question text, the choices scored after it and the gold choice (their doc_to_text, doc_to_choice,
doc_to_target, process_docs), for rows in the hub copy's own columns.

    mmlu       cais/mmlu: question, subject, choices, answer (index). "Q\\nA. ..\\nB. ..\\nAnswer:", " A"
    mmlu-pro   TIGER-Lab/MMLU-Pro: question, options, answer_index, category. lm-eval runs it as a
               chain-of-thought generation; scored here by log-likelihood of the letter after
               "Answer:" in its question layout ("Question:\\n..\\nOptions:\\nA. ..\\nAnswer:"), with its
               description minus the "Think step by step" instruction
    ceval      ceval/ceval-exam: question, A, B, C, D, answer (letter). "..\\n答案：", " A"
    cmmlu      haonan-li/cmmlu: Question, A, B, C, D, Answer (letter)
    arc        allenai/ai2_arc: question, choices {text, label}, answerKey. "Question: ..\\nAnswer:", " text"
    hellaswag  Rowan/hellaswag: activity_label, ctx_a, ctx_b, endings, label. lm-eval's preprocessing
               (ctx_b capitalised, "[title]" artefacts removed), endings as continuations
    gpqa       Idavidrein/gpqa: Question, Correct Answer, Incorrect Answer 1-3; lm-eval's n-shot layout,
               the four answers shuffled by one random.Random(42) over the rows in file order

Every item is {"id", "subject", "text", "choices", "gold"}. C-Eval's and CMMLU's hub files carry no
subject column (the subject is the dataset config); it comes from a `subject` column when present,
else from the file's name or folder (`accountant_val.csv` -> accountant, `accountant/val-...parquet`).
An answer that names no choice is a one-line error naming the row, raised before any scoring.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from ..errors import Qwen2Error
from .datasets import read_pack, read_rows

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class McFormat:
    name: str
    layout: str                                  # the hub dataset whose columns --data files have
    columns: tuple[str, ...]
    docs: Callable[[list[dict], str], list[dict]]  # (rows, file path) -> items without ids
    description: Callable[[str], str]            # subject -> the task description opening each prompt
    shots: int                                   # default shots (the Qwen2 report's settings)
    pack: str | None = None                      # the offline pack read without --data


def _bad(path: str, number: int, what: str) -> Qwen2Error:
    return Qwen2Error(f"{path} row {number}: {what}")


def _letter_index(path: str, number: int, value, count: int) -> int:
    letters = LETTERS[:count]
    if not isinstance(value, str) or value.strip() not in list(letters):
        raise _bad(path, number, f"answer {value!r} is not one of the choice letters {', '.join(letters)}")
    return letters.index(value.strip())


def _index(path: str, number: int, value, count: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, str) and value.isdigit()):
        raise _bad(path, number, f"answer {value!r} is not a choice index 0-{count - 1}")
    if not 0 <= int(value) < count:
        raise _bad(path, number, f"answer {value!r} is outside the {count} choices (0-{count - 1})")
    return int(value)


def _lettered(options) -> str:
    return "".join(f"{letter}. {option}\n" for letter, option in zip(LETTERS, options))


# ---- subjects and descriptions -------------------------------------------------------------------

@lru_cache(maxsize=1)
def _descriptions() -> dict[tuple[str, str], str]:
    return {(r["task"], r["subject"]): r["description"] for r in read_pack("mc_descriptions")}


def subjects_of(task: str) -> list[str]:
    return sorted(s for t, s in _descriptions() if t == task)


def _described(task: str) -> Callable[[str], str]:
    def description(subject: str) -> str:
        found = _descriptions().get((task, subject))
        if found is None:
            known = subjects_of(task)
            raise Qwen2Error(f"unknown {task} subject {subject!r}; give one of its {len(known)} subjects "
                             f"({', '.join(known[:4])}, ...) in a 'subject' column or as the file's name")
        return found
    return description


def subject_from_path(path: str, task: str) -> str:
    """The subject a C-Eval/CMMLU file holds, from its name (accountant.jsonl, accountant_val.csv) or folder."""
    known = set(subjects_of(task))
    stem = os.path.basename(path).split(".")[0]
    names = [stem, re.sub(r"[_-](val|dev|test)$", "", stem)]
    names += reversed(os.path.normpath(os.path.abspath(path)).split(os.sep)[:-1])
    for name in names:
        if name in known:
            return name
    raise Qwen2Error(f"cannot tell the {task} subject of {path}: add a 'subject' column or name the file "
                     f"after its subject (e.g. {sorted(known)[0]}.jsonl)")


# ---- the formats ---------------------------------------------------------------------------------

def _mmlu(rows, path):
    items = []
    for number, row in enumerate(rows, 1):
        choices = list(row["choices"])
        items.append({"subject": str(row["subject"]), "choices": list(LETTERS[:len(choices)]),
                      "text": f"{str(row['question']).strip()}\n{_lettered(choices)}Answer:",
                      "gold": _index(path, number, row["answer"], len(choices))})
    return items


def _mmlu_pro(rows, path):
    items = []
    for number, row in enumerate(rows, 1):
        options = [str(o).strip() for o in row["options"]][:len(LETTERS)]
        items.append({"subject": str(row["category"]), "choices": list(LETTERS[:len(options)]),
                      "text": f"Question:\n{row['question']}\nOptions:\n{_lettered(options)}Answer:",
                      "gold": _index(path, number, row["answer_index"], len(options))})
    return items


def _chinese_exam(task: str, question: str, answer: str):
    def docs(rows, path):
        fallback = None
        items = []
        for number, row in enumerate(rows, 1):
            if "subject" in row:
                subject = str(row["subject"])
            else:
                fallback = fallback or subject_from_path(path, task)
                subject = fallback
            text = f"{str(row[question]).strip()}\n" + _lettered(row[c] for c in "ABCD") + "答案："
            items.append({"subject": subject, "choices": list("ABCD"), "text": text,
                          "gold": _letter_index(path, number, row[answer], 4)})
        return items
    return docs


def _arc(rows, path):
    items = []
    for number, row in enumerate(rows, 1):
        texts, labels = list(row["choices"]["text"]), list(row["choices"]["label"])
        if row["answerKey"] not in labels:
            raise _bad(path, number, f"answerKey {row['answerKey']!r} is not one of the choice labels {labels}")
        items.append({"subject": "all", "choices": texts, "text": f"Question: {row['question']}\nAnswer:",
                      "gold": labels.index(row["answerKey"])})
    return items


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)  # bracketed artefacts of HellaSwag's WikiHow part
    return text.replace("  ", " ")


def _hellaswag(rows, path):
    items = []
    for number, row in enumerate(rows, 1):
        endings = [_hellaswag_clean(e) for e in row["endings"]]
        context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        items.append({"subject": "all", "choices": endings,
                      "text": _hellaswag_clean(row["activity_label"] + ": " + context),
                      "gold": _index(path, number, row["label"], len(endings))})
    return items


def _gpqa_clean(text) -> str:
    return " " if text is None else text.strip().replace(" [title]", ". ").replace("  ", " ")


def _gpqa(rows, path):
    rng = random.Random(42)  # lm-eval's gpqa utils: one generator, drawn from row by row
    items = []
    for row in rows:
        answers = [_gpqa_clean(row[f"Incorrect Answer {i}"]) for i in (1, 2, 3)] + [_gpqa_clean(row["Correct Answer"])]
        rng.shuffle(answers)
        text = f"Question: {row['Question']}\nChoices:\n" + "".join(
            f"({letter}) {a}\n" for letter, a in zip("ABCD", answers)) + "Answer:"
        items.append({"subject": "all", "choices": ["(A)", "(B)", "(C)", "(D)"], "text": text,
                      "gold": answers.index(_gpqa_clean(row["Correct Answer"]))})
    return items


def _mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


FORMATS: dict[str, McFormat] = {f.name: f for f in (
    McFormat("mmlu", "cais/mmlu", ("question", "subject", "choices", "answer"), _mmlu, _mmlu_description, 5,
             pack="mmlu"),
    McFormat("mmlu-pro", "TIGER-Lab/MMLU-Pro", ("question", "options", "answer_index", "category"), _mmlu_pro,
             lambda s: f"The following are multiple choice questions (with answers) about {s}.\n", 5),
    McFormat("ceval", "ceval/ceval-exam", ("question", "A", "B", "C", "D", "answer"),
             _chinese_exam("ceval", "question", "answer"), _described("ceval"), 5),
    McFormat("cmmlu", "haonan-li/cmmlu", ("Question", "A", "B", "C", "D", "Answer"),
             _chinese_exam("cmmlu", "Question", "Answer"), _described("cmmlu"), 5),
    McFormat("arc", "allenai/ai2_arc", ("question", "choices", "answerKey"), _arc, lambda s: "", 25),
    McFormat("hellaswag", "Rowan/hellaswag", ("activity_label", "ctx_a", "ctx_b", "endings", "label"), _hellaswag,
             lambda s: "", 10),
    McFormat("gpqa", "Idavidrein/gpqa", ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                                         "Incorrect Answer 3"), _gpqa,
             lambda s: "Here are some example questions from experts. Answer the final question yourself, "
                       "following the format of the previous questions exactly.\n", 5),
)}


def format_of(task: str) -> McFormat:
    if task not in FORMATS:
        raise Qwen2Error(f"unknown multiple-choice task {task!r}; choose one of: {', '.join(FORMATS)}")
    return FORMATS[task]


def load_items(fmt: McFormat, path: str | None) -> list[dict]:
    """The items of `path` (the format's hub layout, JSONL or Parquet), or of the offline pack, each
    with an id "subject/n" (its place among its subject's rows: stable while the file is)."""
    if path is None:
        if fmt.pack is None:
            raise Qwen2Error(f"{fmt.name} has no offline pack (only mmlu has): give its test set with --data "
                             f"(JSONL or Parquet in {fmt.layout}'s columns)")
        from .datasets import pack_path
        path = pack_path(fmt.pack)
    rows = read_rows(path, fmt.columns, fmt.layout)
    counts: dict[str, int] = {}
    items = []
    for item in fmt.docs(rows, os.fspath(path)):
        n = counts[item["subject"]] = counts.get(item["subject"], -1) + 1
        items.append({"id": f"{item['subject']}/{n}", **item})
    for subject in counts:
        fmt.description(subject)  # an unknown subject is an error now, not midway through the run
    return items
