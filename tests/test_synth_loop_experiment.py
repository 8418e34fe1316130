"""The synthesised-data loop experiment (benchmarks/experiments/synth_loop_experiment.py):

- its word problems are the same for a seed and differ for another, distinct, split into disjoint
  train and held-out sets; every answer is recomputed here from the record's own expression (exact
  fractions, not the generator's code), whose numbers are the question's;
- the math verifier, which decides what the loop keeps, takes "The answer is N." for the right N only;
- the whole loop with --smoke (a tiny random model, 12 train / 6 held-out problems, 2 steps per
  training run) writes every stage's accuracy with its interval, the data stats, both throughputs,
  the markdown and the plot; run again it redoes no stage, and other settings are refused.
"""
from __future__ import annotations

import ast
import json
import operator
import os
import re
from fractions import Fraction

import pytest

from benchmarks.experiments import synth_loop_experiment as S
from qwen2.synth.rejection import read_tasks
from qwen2.synth.verifiers import checked_score, verifier

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
STAGES = ("base_eval", "teacher_sft_data", "sft", "sft_eval", "student_pairs", "dpo", "dpo_eval", "throughput")


def exact_value(expression: str) -> Fraction:
    """The value of an expression of integers, + - * / and brackets, in exact fractions."""
    def value(node):
        if isinstance(node, ast.BinOp):
            return OPS[type(node.op)](value(node.left), value(node.right))
        assert isinstance(node, ast.Constant) and type(node.value) is int
        return Fraction(node.value)
    return value(ast.parse(expression, mode="eval").body)


def question(record: dict) -> str:
    return record["prompt"][0]["content"]


def test_problems_are_deterministic_distinct_and_split():
    assert S.word_problems(3, 60) == S.word_problems(3, 60)
    assert S.word_problems(3, 60) != S.word_problems(4, 60)
    train, heldout = S.split_problems(0, 300, 100)
    assert len(train) == 300 and len(heldout) == 100
    everything = train + heldout
    assert everything == S.word_problems(0, 400)
    assert len({question(p) for p in everything}) == 400
    assert len({p["task_id"] for p in everything}) == 400
    assert not {question(p) for p in train} & {question(p) for p in heldout}
    assert {p["template"] for p in everything} == set(S.TEMPLATES)


def test_every_answer_is_the_value_of_the_records_own_numbers():
    for p in S.word_problems(0, 400):
        truth = exact_value(p["expression"])
        assert truth.denominator == 1 and truth >= 0, p
        assert p["answer"] == str(truth.numerator)
        assert len(re.findall(r"[-+*/]", p["expression"])) in (2, 3)  # multi-step: two or three operations
        for number in re.findall(r"\d+", p["expression"]):
            assert re.search(rf"(?<![\d.]){number}(?!\d)", question(p)), (number, question(p))
        assert question(p).endswith(S.ASK) and p["reference"].endswith(f"The answer is {p['answer']}.")


def test_math_verifier_takes_the_right_answer_only(tmp_path):
    math = verifier("math")
    problems = S.word_problems(1, 30)
    for p in problems:
        n = int(p["answer"])
        assert checked_score(math, p, f"Working it out step by step.\nThe answer is {n}.") == 1.0
        assert checked_score(math, p, f"Working it out step by step.\nThe answer is {n + 1}.") == 0.0
        assert checked_score(math, p, p["reference"]) == 1.0
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems), encoding="utf-8")
    assert read_tasks(path, needs=math) == problems  # what `qwen2 synth reject --verifier math` reads


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("synth_loop_smoke")
    assert S.main(["--smoke", "--work-dir", str(work)]) == 0
    with open(work / "results" / "synth_loop.json", encoding="utf-8") as f:
        return work, json.load(f)


def test_smoke_run_writes_every_stage(smoke):
    work, results = smoke
    assert set(results["stages"]) == {"base", "sft", "dpo"}
    for e in results["stages"].values():
        assert e["n"] == 6 and 0 <= e["correct"] <= 6 and e["accuracy"] == e["correct"] / e["n"]
        assert 0 <= e["ci95"][0] <= e["accuracy"] <= e["ci95"][1] <= 1
    problems = results["problems"]
    assert problems["train"] == 12 and problems["heldout"] == 6 and problems["disjoint"]
    assert results["teacher_data"]["kept"] > 0 and results["student_pairs"]["pairs"] > 0
    assert results["training"]["sft"]["steps"] == 2 and results["training"]["dpo"]["steps"] == 2
    runs = results["throughput"]["runs"]
    assert [r["batch"] for r in runs.values()] == [1, 8]
    assert all(r["samples"] == 4 * 2 and r["samples_per_s"] > 0 for r in runs.values())
    assert set(results["seconds"]) == set(STAGES)
    for name in STAGES:
        assert (work / name / "done.json").exists()
    for name, n in (("train", 12), ("heldout", 6)):
        assert len((work / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()) == n
    md = (work / "results" / "synth_loop.md").read_text(encoding="utf-8")
    assert md.startswith("`python -m benchmarks.experiments.synth_loop_experiment --smoke")
    assert "after DPO" in md and "samples/s" in md
    assert (work / "results" / "synth_loop.png").stat().st_size > 0


def test_smoke_rerun_redoes_no_stage_and_refuses_other_settings(smoke, capsys):
    work, results = smoke
    marks = {name: os.path.getmtime(work / name / "done.json") for name in STAGES}
    assert S.main(["--smoke", "--work-dir", str(work)]) == 0
    assert {name: os.path.getmtime(work / name / "done.json") for name in STAGES} == marks
    with open(work / "results" / "synth_loop.json", encoding="utf-8") as f:
        again = json.load(f)
    assert again["stages"] == results["stages"] and again["throughput"] == results["throughput"]
    capsys.readouterr()
    assert S.main(["--smoke", "--work-dir", str(work), "--seed", "1"]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {work} holds a run with other settings (seed); rerun with "
                                               "the same ones to resume, or give another --work-dir")


def test_bad_option_is_one_line_error(capsys):
    assert S.main(["--smoke", "--train", "0"]) == 1
    assert capsys.readouterr().err.strip() == "error: --train must be at least 1, got 0"


def test_paired_change_counts_flips_and_gives_mcnemars_exact_p():
    def run(rights):
        return {"replies": [{"task_id": i, "right": r} for i, r in enumerate(rights)]}
    before = run([True, False, False, False, True, False])
    after = run([True, True, True, True, False, False])
    change = S.paired_change(before, after)
    assert (change["gained"], change["lost"]) == (3, 1)
    assert change["p_value"] == pytest.approx(2 * (1 + 4) / 16)  # 2 * P(Binomial(4, 1/2) <= 1)
    assert S.paired_change(before, before) == {"gained": 0, "lost": 0, "p_value": 1.0}
