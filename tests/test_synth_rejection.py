"""Rejection sampling (qwen2.synth.rejection, `qwen2 synth reject`), on the DPO experiment's task
files (benchmarks/data/dpo_tasks_*.jsonl, read as data) and on hand-made samples. Fast: the sandbox
runs reference solutions; the engine is replaced by one that answers from the task records.

- the code verifier scores a reply holding the reference 1 and a broken one less, as online DPO's
  execution reward does;
- SFT records and preference pairs built from scored samples;
- sampling resumes with the tasks left, the same seeds, after a cut last line;
- the command: math and code prompts in, samples, SFT records, pairs and stats out, every kept reply
  re-verified; a rerun loads no model;
- task files with a bad record, or without what the verifier reads, are a one-line error.
"""
from __future__ import annotations

import json
import os

import pytest

from qwen2.errors import Qwen2Error
from qwen2.eval.humaneval import fenced
from qwen2.runtime.generate import SamplingParams
from qwen2.cli import main
from qwen2.synth import rejection
from qwen2.synth.verifiers import Verifier, checked_score, verifier
from qwen2.train.online import CodeTask, ExecutionReward

from ggufs import save_random_model_dir, small_tokenizer_metadata

TASK_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "benchmarks", "data", "dpo_tasks_train.jsonl")
TRAIN = rejection.read_tasks(TASK_FILE)


def test_the_code_verifier_scores_as_the_execution_reward_the_reference_reply_and_a_broken_one():
    code, reward = verifier("code", sandbox_timeout=20), ExecutionReward(timeout=20)
    task = next(t for t in TRAIN if t["entry_point"] == "sum_of_squares")
    reply = "Here is the function:\n\n" + fenced(task["reference"]) + "\n\nIt sums i*i."
    off_by_one = fenced(task["reference"].replace("range(1, n + 1)", "range(1, n)"))
    as_online_dpo = CodeTask(task["prompt"], task["tests"], task["entry_point"])
    assert checked_score(code, task, reply) == reward(as_online_dpo, reply) == 1.0
    assert 0 < checked_score(code, task, off_by_one) == reward(as_online_dpo, off_by_one) < 1.0  # n <= 0 still pass


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
    assert [r["task_id"] for r in records] == ["t/a", "t/a", "t/c", "t/c"]
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
                                        samples=2, scorer=Verifier("has-def", lambda task, reply: "def " in reply),
                                        progress=False)
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
    ('{"task_id": "t/x", "prompt": 7, "tests": ["assert 1"]}', "\"prompt\" must be a string or a list"),
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


# ---- the command ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> str:
    from qwen2.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(small_tokenizer_metadata())
    return save_random_model_dir(tmp_path_factory.mktemp("small") / "model", tokenizer)


def engine_answering(replies_by_prompt):
    """An engine whose reply to a prompt is replies_by_prompt[prompt text](seed)."""
    def engine(m, jobs, max_batch):
        for j, (ids, params) in enumerate(jobs):
            text = m.tokenizer.decode(ids)
            prompt = next(p for p in replies_by_prompt if p in text)
            yield j, replies_by_prompt[prompt](params.seed)
    return engine


def test_synth_reject_with_the_code_verifier_keeps_passing_replies_and_pairs(small_dir, tmp_path, monkeypatch, capsys):
    tasks = TRAIN[:3]
    prompts = tmp_path / "tasks.jsonl"
    prompts.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    broken = "```python\ndef f(*a):\n    return None\n```"
    # task 0 always right, task 1 right on odd seeds, task 2 never
    answers = {tasks[0]["prompt"][0]["content"]: lambda seed: fenced(tasks[0]["reference"]),
               tasks[1]["prompt"][0]["content"]: lambda seed: fenced(tasks[1]["reference"]) if seed % 2 else broken,
               tasks[2]["prompt"][0]["content"]: lambda seed: "I cannot write that."}
    monkeypatch.setattr(rejection, "generate_replies", engine_answering(answers))
    out = tmp_path / "out"
    args = ["synth", "reject", str(prompts), "--model", small_dir, "--out", str(out), "--verifier", "code",
            "--samples", "2", "--pairs", "--per-prompt", "2", "--no-progress", "--seed", "0"]
    assert main(args) == 0
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    stats = json.loads((out / "stats.json").read_text())
    # the experiment's way (sample_and_score + sft_records on the execution reward, which the code
    # verifier equals: test above) gives the same records
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [line["rewards"] for line in samples] == [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]  # seeds 0 and 1 per task
    assert sft == rejection.sft_records(samples, {t["task_id"]: t for t in tasks}, 2, False)[0]
    assert [r["task_id"] for r in sft] == [tasks[0]["task_id"], tasks[1]["task_id"]]  # distinct replies only
    assert [(p["task_id"], p["chosen"]) for p in pairs] == [(tasks[1]["task_id"], fenced(tasks[1]["reference"]))]
    assert (stats["prompts"], stats["samples"], stats["passing"], stats["kept"], stats["pairs"]) == (3, 6, 3, 2, 1)
    assert stats["acceptance_rate"] == 0.5 and stats["reverified"] == 2
    assert "3 prompts, 3/6 samples passed (50.0%): 2 SFT records, 1 DPO pairs" in capsys.readouterr().out
    # a rerun samples nothing and loads no model: the model path may be gone
    assert main([*args[:3], "--model", str(tmp_path / "gone"), *args[5:]]) == 0
    assert [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()] == sft


def test_synth_reject_with_the_math_verifier_on_string_prompts(small_dir, tmp_path, monkeypatch):
    prompts = tmp_path / "math.jsonl"
    records = [{"task_id": "m1", "prompt": "What is 1/2 + 1/4?", "answer": "3/4"},
               {"task_id": "m2", "prompt": "What is 6 * 7?", "answer": 42}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    answers = {"1/2 + 1/4": lambda seed: [r"It is \boxed{0.75}", "It is 0.7", r"\frac{3}{4}"][seed % 3],
               "6 * 7": lambda seed: ["#### 42", "6 * 7 = 43"][seed % 2]}
    monkeypatch.setattr(rejection, "generate_replies", engine_answering(answers))
    stats = rejection.reject(prompts, small_dir, tmp_path / "out", verifier_name="math", samples=6,
                             params=SamplingParams(temperature=1.0), per_task=3, pairs=True, progress=False)
    sft = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    kept = {(r["task_id"], r["messages"][-1]["content"]) for r in sft}
    assert kept == {("m1", r"It is \boxed{0.75}"), ("m1", r"\frac{3}{4}"), ("m2", "#### 42")}
    assert all(r["messages"][0] == {"role": "user", "content": records[int(r["task_id"][1]) - 1]["prompt"]} for r in sft)
    assert stats["passing"] == 4 + 3 and stats["samples"] == 12 and stats["reverified"] == 3


def test_synth_reject_refuses_prompts_without_what_the_verifier_reads(small_dir, tmp_path, capsys):
    prompts = tmp_path / "math.jsonl"
    prompts.write_text(json.dumps({"task_id": "m1", "prompt": "What is 2 + 2?"}) + "\n")
    assert main(["synth", "reject", str(prompts), "--model", small_dir, "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: bad record at {prompts}:1: the math verifier needs a \"answer\" "
                                               "field in every record (set on_bad_record=skip to skip such records)")
    assert not (tmp_path / "o").exists()


def test_a_verifier_that_fails_mid_run_is_one_line_and_the_finished_prompts_stay(small_dir, tmp_path, monkeypatch,
                                                                                 capsys):
    (tmp_path / "picky.py").write_text("def check(record, reply):\n"
                                       "    if record['task_id'] == 'm2':\n"
                                       "        raise ValueError('cannot read ' + reply)\n"
                                       "    return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"task_id": f"m{i}", "prompt": f"say {i}"}) + "\n" for i in (1, 2, 3)))
    monkeypatch.setattr(rejection, "generate_replies", engine_answering({f"say {i}": (lambda seed, i=i: f"reply {i}")
                                                                         for i in (1, 2, 3)}))
    out = tmp_path / "out"
    assert main(["synth", "reject", str(prompts), "--model", small_dir, "--out", str(out), "--samples", "1",
                 "--verifier", "python:picky.check", "--batch", "1", "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == ("error: verifier python:picky.check raised ValueError on task 'm2': "
                                               "cannot read reply 2")
    kept = [json.loads(line)["task_id"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert kept == ["m1"] and not (out / "sft.jsonl").exists()
