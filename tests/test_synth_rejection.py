"""Rejection sampling with execution feedback (qwen2.synth.rejection), on the DPO experiment's task
files (benchmarks/data/dpo_tasks_*.jsonl, read as data) and on hand-made samples. Fast: the sandbox
runs reference solutions, no model is loaded.

- the execution reward scores a reply holding the reference 1 and a broken one less;
- SFT records and preference pairs built from scored samples;
- sampling resumes with the tasks left, the same seeds, after a cut last line;
- task files with a bad record are a one-line error.
"""
from __future__ import annotations

import json
import os

import pytest

from qwen2.errors import Qwen2Error
from qwen2.eval.humaneval import fenced
from qwen2.runtime.generate import SamplingParams
from qwen2.synth import rejection
from qwen2.train.online import ExecutionReward

TASK_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "benchmarks", "data", "dpo_tasks_train.jsonl")
TRAIN = rejection.read_tasks(TASK_FILE)


def test_execution_reward_scores_the_reference_reply_and_a_broken_one():
    reward = ExecutionReward(timeout=20)
    task = next(t for t in TRAIN if t["entry_point"] == "sum_of_squares")
    reply = "Here is the function:\n\n" + fenced(task["reference"]) + "\n\nIt sums i*i."
    assert rejection.score(reward, task, reply) == 1.0
    off_by_one = fenced(task["reference"].replace("range(1, n + 1)", "range(1, n)"))
    assert 0 < rejection.score(reward, task, off_by_one) < 1.0  # the n <= 0 tests still pass


# ---- data from scored samples --------------------------------------------------------------------

TASKS = {"t/a": {"task_id": "t/a", "prompt": [{"role": "user", "content": "a?"}], "reference": "def a():\n    return 1\n"},
         "t/b": {"task_id": "t/b", "prompt": [{"role": "user", "content": "b?"}], "reference": "def b():\n    return 2\n"},
         "t/c": {"task_id": "t/c", "prompt": [{"role": "user", "content": "c?"}], "reference": "def c():\n    return 3\n"}}
SAMPLES = [{"task_id": "t/a", "responses": ["a1", "a2", "a1", "a3", "a4"], "rewards": [1.0, 0.5, 1.0, 0.0, 1.0]},
           {"task_id": "t/b", "responses": ["b1", "b2"], "rewards": [0.0, 0.25]},  # nothing passes
           {"task_id": "t/c", "responses": ["c1", "c2"], "rewards": [1.0, 1.0]}]  # everything passes


def test_sft_records_are_distinct_passing_replies_with_an_optional_reference_fallback():
    records, stats = rejection.sft_records(SAMPLES, TASKS, per_task=2, fallback=False)
    replies = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in records]
    assert replies == [("a?", "a1"), ("a?", "a4"), ("c?", "c1"), ("c?", "c2")]
    assert all(r["messages"][1]["role"] == "assistant" for r in records)
    assert stats == {"tasks": 3, "tasks_with_a_pass": 2, "from_samples": 4, "from_reference": 0}
    records, stats = rejection.sft_records(SAMPLES, TASKS, per_task=1, fallback=True)
    assert [r["messages"][1]["content"] for r in records] == ["a1", fenced(TASKS["t/b"]["reference"]), "c1"]
    assert stats["from_reference"] == 1 and stats["from_samples"] == 2


def test_preference_pairs_put_passing_replies_against_the_worst_failures():
    pairs, stats = rejection.preference_records(SAMPLES, TASKS, per_task=2, fallback=False)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a1", "a3"), ("a4", "a2")]  # worst failure first
    assert all(p["prompt"] == TASKS["t/a"]["prompt"] for p in pairs)
    assert stats == {"tasks": 3, "all_pass": 1, "none_pass": 1, "mixed": 1, "pairs_from_samples": 2,
                     "pairs_with_reference": 0}
    pairs, stats = rejection.preference_records(SAMPLES, TASKS, per_task=2, fallback=True)
    assert (pairs[-1]["chosen"], pairs[-1]["rejected"]) == (fenced(TASKS["t/b"]["reference"]), "b1")
    assert stats["pairs_with_reference"] == 1 and len(pairs) == 3
    # what qwen2.train.dpo reads: the extra task_id field is ignored
    assert all({"prompt", "chosen", "rejected"} <= set(p) for p in pairs)


def test_the_reference_fallback_needs_a_reference():
    tasks = {**TASKS, "t/b": {k: v for k, v in TASKS["t/b"].items() if k != "reference"}}
    with pytest.raises(Qwen2Error, match="'t/b' has no \"reference\""):
        rejection.sft_records(SAMPLES, tasks, per_task=1, fallback=True)


# ---- sampling ------------------------------------------------------------------------------------

class FakeTokenizer:  # the prompt "ids" are the prompt text, so the fake engine knows the task
    def apply_chat_template(self, messages, add_generation_prompt):
        return messages[0]["content"]

    def encode(self, text):
        return text


class FakeModel:
    tokenizer = FakeTokenizer()


def test_sampling_resumes_with_the_tasks_left_and_the_same_seeds(tmp_path, monkeypatch):
    path = tmp_path / "samples.jsonl"
    done = {"task_id": TRAIN[0]["task_id"], "responses": ["x", "y"], "rewards": [0.0, 0.0]}
    path.write_text(json.dumps(done) + "\n" + '{"task_id": "cut in the mid')  # killed while writing
    seeds = []

    def fake_engine(m, jobs, max_batch):
        for j in reversed(range(len(jobs))):  # replies finish in any order
            prompt, params = jobs[j]
            seeds.append(params.seed)
            task = next(t for t in TRAIN if t["prompt"][0]["content"] == prompt)
            yield j, fenced(task["reference"]) if params.seed % 2 else "no code"

    monkeypatch.setattr(rejection, "generate_replies", fake_engine)
    result = rejection.sample_and_score(str(path), TRAIN[:3], FakeModel(), SamplingParams(temperature=0.8),
                                        samples=2, reward=lambda task, reply: float("def " in reply), progress=False)
    # task 0 was done; reply i of task t samples with seed t * 1000 + i (seed 0), however the run was cut
    assert sorted(seeds) == [1000, 1001, 2000, 2001]
    assert [r["task_id"] for r in result] == [t["task_id"] for t in TRAIN[:3]] and result[0] == done
    assert result[1]["responses"] == ["no code", fenced(TRAIN[1]["reference"])]
    assert result[1]["rewards"] == [0.0, 1.0]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["task_id"] for line in lines] == [TRAIN[0]["task_id"], TRAIN[2]["task_id"], TRAIN[1]["task_id"]]
    # every task there: the model (here a directory that does not exist) is not even loaded
    again = rejection.sample_and_score(str(path), TRAIN[:3], str(tmp_path / "no-model"), SamplingParams(),
                                       samples=2, progress=False)
    assert again == result


def test_sampling_settings_out_of_range_are_one_line_errors(tmp_path):
    for samples in (0, rejection.MAX_SAMPLES + 1):
        with pytest.raises(Qwen2Error, match="samples per task must be an integer from 1 to 1000"):
            rejection.sample_and_score(tmp_path / "s.jsonl", TRAIN[:1], FakeModel(), SamplingParams(), samples=samples)
    with pytest.raises(Qwen2Error, match="sampling batch"):
        rejection.sample_and_score(tmp_path / "s.jsonl", TRAIN[:1], FakeModel(), SamplingParams(), samples=1, batch=0)


@pytest.mark.parametrize("line, why", [
    ("{not json", "invalid JSON"),
    ('{"task_id": "t/x", "prompt": "a string", "tests": ["assert 1"]}', "\"prompt\" must be a list"),
    ('{"task_id": "t/x", "prompt": [{"role": "robot", "content": "x?"}], "tests": ["assert 1"]}', "message 0 must"),
    ('{"task_id": "t/x", "prompt": [{"role": "user", "content": "x?"}], "tests": []}', "\"tests\" must be"),
    ('{"prompt": [{"role": "user", "content": "x?"}], "tests": ["assert 1"]}', "a task needs a string"),
    ('{"task_id": "t/a", "prompt": [{"role": "user", "content": "x?"}], "tests": "assert 1"}', "task_id 't/a' appears twice"),
])
def test_a_bad_task_record_is_a_one_line_error_or_skipped(tmp_path, capsys, line, why):
    path = tmp_path / "tasks.jsonl"
    first = {"task_id": "t/a", "prompt": [{"role": "user", "content": "a?"}], "tests": ["assert a() == 1"]}
    path.write_text(json.dumps(first) + "\n" + line + "\n")
    with pytest.raises(Qwen2Error, match=f"tasks.jsonl:2: {why}") as e:
        rejection.read_tasks(path)
    assert "\n" not in str(e.value)
    assert rejection.read_tasks(path, on_bad_record="skip") == [first]
    assert f"tasks.jsonl:2: {why}" in capsys.readouterr().err
