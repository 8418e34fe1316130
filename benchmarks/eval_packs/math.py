"""The final-answer math packs, from the task files lm-eval ships (the installed `lm_eval`, or an
unpacked wheel's tasks/ folder given as `tasks_dir`):

  gsm8k.jsonl        the 8 chain-of-thought exemplars of `gsm8k_cot` (tasks/gsm8k/gsm8k-cot.yaml,
                     `fewshot_config.samples`): question, target (the worked answer), answer (the
                     number its "The answer is N." states, read with the task's own strict filter).
  math.jsonl         the 4 Minerva exemplars of `minerva_math` (the list that
                     tasks/minerva_math/utils.py's `list_fewshot_samples` returns, read as source:
                     that module refuses to import beside Math-Verify's ANTLR runtime): problem, solution.
  mgsm_tasks.jsonl   one row per language of `mgsm_native_cot_XX`: the question and answer headers
                     (read by rendering the task's own templates), how much of a worked answer is its
                     header, the stop strings, and the scoring (the YAML's filter_list and
                     exact_match options). MGSM's exemplars are not shipped by any package.

The prompt layouts of qwen2.eval.math_benchmarks are checked against the YAMLs here, so a change in
lm-eval stops the build instead of going unnoticed.
"""
from __future__ import annotations

import ast
import json
import os

from qwen2.eval import math_benchmarks as mb
from qwen2.eval.answer_filters import INVALID, extract
from qwen2.fileio import write_text_atomic

from .lm_eval_yaml import read_task, scorings, tasks_dir as default_tasks_dir

PROBE = "\x00"


def _check(what: str, ours, theirs) -> None:
    if ours != theirs:
        raise SystemExit(f"lm-eval's {what} is now {theirs!r}, qwen2.eval.math_benchmarks has {ours!r}: update it")


def gsm8k_exemplars(tasks: str) -> list[dict]:
    config = read_task(os.path.join(tasks, "gsm8k", "gsm8k-cot.yaml"))
    _check("gsm8k_cot doc_to_text", mb.GSM8K_QUESTION.replace("{question}", "{{question}}"), config["doc_to_text"])
    _check("gsm8k_cot stop strings", list(mb.GSM8K_STOP), config["generation_kwargs"]["until"])
    _check("gsm8k_cot scoring", {k: {"filters": list(s.filters), "options": s.options}
                                 for k, s in mb.GSM8K_SCORINGS.items()},
           scorings(config, {"strict-match": "strict_match", "flexible-extract": "flexible_extract"}))
    rows = []
    for i, sample in enumerate(config["fewshot_config"]["samples"]):
        answer = extract(sample["target"], sample, mb.GSM8K_SCORINGS["strict_match"].filters)
        if answer == INVALID:
            raise SystemExit(f"gsm8k_cot exemplar {i} states no 'The answer is N.': {sample['target'][-80:]!r}")
        rows.append({"id": f"gsm8k-{i}", "question": sample["question"], "target": sample["target"], "answer": answer})
    return rows


def minerva_exemplars(tasks: str) -> list[dict]:
    config = read_task(os.path.join(tasks, "minerva_math", "minerva_math_algebra.yaml"))
    _check("minerva_math stop strings", list(mb.MATH_STOP), config["generation_kwargs"]["until"])
    path = os.path.join(tasks, "minerva_math", "utils.py")
    with open(path, encoding="utf-8") as f:
        module = ast.parse(f.read())
    [function] = [node for node in module.body if isinstance(node, ast.FunctionDef)
                  and node.name == "list_fewshot_samples"]
    [returned] = [node for node in ast.walk(function) if isinstance(node, ast.Return)]
    samples = ast.literal_eval(returned.value)
    # the layout is in utils.doc_to_text's source: "Problem:" + "\n" + problem + "\n\n" + "Solution:"
    [layout] = [node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "doc_to_text"]
    parts = [ast.literal_eval(n) if isinstance(n, ast.Constant) else "{problem}"
             for n in _concatenation(layout.body[-1].value)]
    _check("minerva_math doc_to_text", mb.MATH_QUESTION, "".join(parts))
    return [{"id": f"minerva-{i}", "problem": s["problem"], "solution": s["solution"]} for i, s in enumerate(samples)]


def _concatenation(node) -> list:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _concatenation(node.left) + _concatenation(node.right)
    return [node]


def mgsm_tasks(tasks: str) -> list[dict]:
    import jinja2

    rows = []
    for language in mb.MGSM_LANGUAGES:
        config = read_task(os.path.join(tasks, "mgsm", "native_cot", f"mgsm_native_cot_{language}.yaml"))
        text, target = jinja2.Template(config["doc_to_text"]), jinja2.Template(config["doc_to_target"])
        question_header, answer_header = text.render(question=PROBE, answer=None).split(f" {PROBE}\n")
        _check(f"mgsm {language} exemplar doc_to_text", f"{PROBE}\n{answer_header}",
               text.render(question=PROBE, answer="worked answer"))
        worked = answer_header + " " + PROBE * 100
        skip = len(worked) - len(target.render(answer=worked, answer_number=0))
        _check(f"mgsm {language} exemplar target", PROBE * 100, worked[skip:])
        _check(f"mgsm {language} target_delimiter", mb.TARGET_DELIMITER, config.get("target_delimiter", " "))
        rows.append({"language": language, "question_header": question_header, "answer_header": answer_header,
                     "target_skip": skip, "stop": config["generation_kwargs"]["until"],
                     "scoring": scorings(config, {"strict-match": "strict_match",
                                                  "flexible-extract": "flexible_extract"})})
    return rows


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build(packs_dir: str, tasks_dir: str | None = None) -> list[str]:
    tasks = default_tasks_dir(tasks_dir)
    os.makedirs(packs_dir, exist_ok=True)
    written = []
    for name, rows in (("gsm8k", gsm8k_exemplars(tasks)), ("math", minerva_exemplars(tasks)),
                       ("mgsm_tasks", mgsm_tasks(tasks))):
        path = os.path.join(packs_dir, f"{name}.jsonl")
        write_text_atomic(path, _jsonl(rows))
        written.append(path)
    return written
