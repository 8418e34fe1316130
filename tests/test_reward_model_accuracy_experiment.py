"""The reward-model accuracy experiment (benchmarks/experiments/reward_model_accuracy.py), run with
--smoke: a tiny random model (the DPO experiment's), 3 train / 2 held-out programming tasks and a few
dozen arithmetic pairs, 4 training steps.

- the arithmetic pairs are the same for a seed and differ for another; every chosen reply is right
  and every rejected one wrong, recomputed here from the question itself (not by the generator);
- the code pairs' verdicts are the sandbox's: each chosen reply passes all its task's tests, each
  rejected one fails one (run here straight through qwen2.eval.sandbox);
- held-out questions and tasks are disjoint from the train ones;
- the results file has the accuracies (with intervals), the CPU time of training and the curve.
"""
from __future__ import annotations

import ast
import json
import operator
import re

import pytest

from benchmarks.experiments import reward_model_accuracy as R
from qwen2.eval.humaneval import extract_code
from qwen2.eval.sandbox import Limits, run_python
from qwen2.synth.rejection import read_tasks

TASKS = {t["task_id"]: t for t in read_tasks(R.TRAIN_TASKS) + read_tasks(R.HELDOUT_TASKS)}
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expression: str) -> int:
    """The value of an integer expression of + - * and brackets, by its syntax tree."""
    def value(node):
        if isinstance(node, ast.BinOp):
            return OPS[type(node.op)](value(node.left), value(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int)
        return node.value
    return value(ast.parse(expression, mode="eval").body)


def final_answer(reply: str) -> int:
    match = re.fullmatch(r".* The answer is (-?\d+)\.", reply)
    assert match, reply
    return int(match.group(1))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    run = tmp_path_factory.mktemp("reward_smoke")
    assert R.main(["--smoke", "--out", str(run), "--threads", "1"]) == 0
    with open(run / "results" / "reward_model_accuracy.json", encoding="utf-8") as f:
        results = json.load(f)

    def pairs(split):
        with open(run / "data" / f"{split}_pairs.jsonl", encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    return run, results, pairs("train"), pairs("heldout")


def test_arithmetic_pairs_are_deterministic_and_disjoint():
    a = R.arithmetic_pairs(3, 40, 20)
    assert a == R.arithmetic_pairs(3, 40, 20)
    assert a != R.arithmetic_pairs(4, 40, 20)
    train, heldout = a
    assert len(train) == 40 and len(heldout) == 20
    assert not {p["prompt"][0]["content"] for p in train} & {p["prompt"][0]["content"] for p in heldout}


def test_arithmetic_chosen_is_right_and_rejected_wrong():
    train, heldout = R.arithmetic_pairs(0, 150, 50)
    for p in train + heldout:
        question = re.fullmatch(r"What is (.+)\?", p["prompt"][-1]["content"]).group(1)
        truth = evaluate(question)
        assert final_answer(p["chosen"]) == truth
        assert final_answer(p["rejected"]) != truth
        # every worked step of the chosen reply holds; the rejected reply differs only in its result
        for left, right in re.findall(r"([\d()+*\- ]+?) = (-?\d+)\.", p["chosen"]):
            assert evaluate(left.strip()) == int(right), (left, right)
        final = r"= -?\d+\. The answer is -?\d+\.$"
        assert re.sub(final, "", p["chosen"]) == re.sub(final, "", p["rejected"])
    assert {p["source"] for p in train} == {"off_by_one", "digit_swap", "wrong_operation"}


def test_mutants_parse_and_change_the_code():
    reply = "```python\ndef f(xs):\n    return [x for x in range(len(xs)) if xs[x] >= 0]\n```"
    out = R.mutants(reply, "f", __import__("random").Random(0))
    assert out and all(m != reply for _, m in out)
    for _, m in out:
        ast.parse(extract_code(m, "f"))


def sandbox_passes(task: dict, reply: str) -> bool:
    source = extract_code(reply, task["entry_point"]) + "\n\n" + "\n".join(task["tests"]) + "\n"
    return run_python(source, Limits(timeout=20)).ok


def test_smoke_code_pairs_agree_with_the_sandbox_and_split_by_task(smoke):
    _, _, train, heldout = smoke
    code = [p for p in train + heldout if p["kind"] == "code"]
    assert code
    for p in code:
        task = TASKS[p["task_id"]]
        assert p["prompt"][-1] == task["prompt"][-1]
        assert sandbox_passes(task, p["chosen"]), p
        assert not sandbox_passes(task, p["rejected"]), p
    train_tasks = {p["task_id"] for p in train if p["kind"] == "code"}
    heldout_tasks = {p["task_id"] for p in heldout if p["kind"] == "code"}
    assert train_tasks and heldout_tasks and not train_tasks & heldout_tasks
    assert all(t.startswith("train/") for t in train_tasks) and all(t.startswith("heldout/") for t in heldout_tasks)
    assert not ({p["prompt"][-1]["content"] for p in train if p["kind"] == "arithmetic"}
                & {p["prompt"][-1]["content"] for p in heldout if p["kind"] == "arithmetic"})


def test_smoke_results_have_the_fields(smoke):
    run, results, train, heldout = smoke
    for key in ("heldout_before", "heldout_after", "train_after"):
        for kind in ("arithmetic", "code", "overall"):
            r = results[key][kind]
            assert 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1
            assert r["accuracy"] == r["correct"] / r["n"]
    assert results["heldout_after"]["overall"]["n"] == len(heldout)
    assert results["pairs"]["train"]["arithmetic"] + results["pairs"]["train"]["code"] == len(train)
    assert results["training"]["cpu_seconds"] > 0 and results["training"]["wall_seconds"] > 0
    assert [c["step"] for c in results["curve"]] == [0, 2, 4]
    assert results["disjoint"] == {"arithmetic_questions": True, "code_tasks": True}
    assert results["command"].startswith("python -m benchmarks.experiments.reward_model_accuracy")
    assert (run / "results" / "reward_model_accuracy.png").stat().st_size > 0
    md = (run / "results" / "reward_model_accuracy.md").read_text(encoding="utf-8")
    assert "held-out after" in md and "CPU minutes" in md


def test_wilson_interval():
    assert R.wilson(0, 0) == (0.0, 1.0)
    low, high = R.wilson(90, 100)
    assert low == pytest.approx(0.8256, abs=1e-3) and high == pytest.approx(0.9448, abs=1e-3)


def test_bad_option_is_one_line_error(capsys):
    assert R.main(["--smoke", "--max-steps", "0"]) == 1
    assert capsys.readouterr().err.strip() == "error: --max-steps must be at least 1, got 0"
