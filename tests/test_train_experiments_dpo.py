"""The DPO experiment's tasks and bookkeeping (benchmarks/experiments/train_dpo_experiment.py, imported as a
package module; benchmarks/data/dpo_tasks_*.jsonl). Fast: the sandbox runs the reference solutions, no model
is loaded.

- the task files read cleanly with online DPO's own reader, 40 train / 20 held out, no overlap;
- every reference solution passes all of its tests in the sandbox, and a wrong solution fails them;
- the execution reward scores a reply holding the reference 1 and a broken one less;
- SFT records and preference pairs built from scored samples; stage skipping and sample resuming;
- the per-run summary (margin, accuracy, pass rate and perplexity before and after) from logs.
"""
from __future__ import annotations

import concurrent.futures
import json

import pytest

from benchmarks.experiments import train_dpo_experiment as X
from qwen2.eval.sandbox import Limits, run_python
from qwen2.train import data as D
from qwen2.train.online import ExecutionReward, code_tasks

TRAIN, HELDOUT = X.read_tasks(X.TRAIN_TASKS), X.read_tasks(X.HELDOUT_TASKS)
ALL = TRAIN + HELDOUT


def test_task_files_read_with_online_dpos_reader_and_split_cleanly():
    for path, n in ((X.TRAIN_TASKS, 40), (X.HELDOUT_TASKS, 20)):
        report = D.DataReport(path)  # on_bad_record="fail": a bad line raises
        tasks = code_tasks(path, report)
        assert len(tasks) == report.records == n and report.skipped == 0
        assert all(isinstance(t.tests, list) and len(t.tests) >= 4 for t in tasks)
    names = [t["entry_point"] for t in ALL]
    assert len(set(names)) == 60 and len({t["task_id"] for t in ALL}) == 60
    for d, n in ((1, 20), (2, 22), (3, 18)):  # every third task of each level is held out
        assert sum(t["difficulty"] == d for t in ALL) == n
        assert sum(t["difficulty"] == d for t in HELDOUT) == (n + 1) // 3
    for t in ALL:
        assert t["task_id"].startswith("heldout/" if t in HELDOUT else "train/")
        [message] = t["prompt"]
        assert message["role"] == "user" and f"`{t['entry_point']}(" in message["content"]
        assert all(t["entry_point"] in test for test in t["tests"])


def _run(source: str):
    return run_python(source, Limits(timeout=20))


def test_every_reference_solution_passes_all_its_tests_in_the_sandbox():
    programs = [t["reference"] + "\n\n" + "\n\n".join(t["tests"]) + "\n" for t in ALL]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(_run, programs))
    failed = [(t["task_id"], r.error) for t, r in zip(ALL, results) if not r.ok]
    assert not failed


def test_the_tests_reject_a_wrong_solution():
    """Each task's tests, run one by one against a stub that returns None: at least two fail, so
    the tests check what the function returns, not merely that it runs."""
    program = ["import json\nfailures = {}"]
    for t in ALL:
        program.append(f"failures[{t['task_id']!r}] = 0")
        for test in t["tests"]:
            program.append(f"ns = {{}}\nexec('def {t['entry_point']}(*a, **k):\\n    return None', ns)\n"
                           f"try:\n    exec({test!r}, ns)\nexcept Exception:\n    failures[{t['task_id']!r}] += 1")
    program.append("print(json.dumps(failures))")
    result = _run("\n".join(program) + "\n")
    assert result.ok, result.error
    failures = json.loads(result.stdout)
    assert set(failures) == {t["task_id"] for t in ALL}
    assert min(failures.values()) >= 2


def test_execution_reward_scores_the_reference_reply_and_a_broken_one():
    reward = ExecutionReward(timeout=20)
    task = next(t for t in TRAIN if t["entry_point"] == "sum_of_squares")
    reply = "Here is the function:\n\n" + X.fenced(task["reference"]) + "\n\nIt sums i*i."
    assert X.score(reward, task, reply) == 1.0
    off_by_one = X.fenced(task["reference"].replace("range(1, n + 1)", "range(1, n)"))
    assert 0 < X.score(reward, task, off_by_one) < 1.0  # the n <= 0 tests still pass


# ---- data from scored samples --------------------------------------------------------------------

TASKS = {"t/a": {"task_id": "t/a", "prompt": [{"role": "user", "content": "a?"}], "reference": "def a():\n    return 1\n"},
         "t/b": {"task_id": "t/b", "prompt": [{"role": "user", "content": "b?"}], "reference": "def b():\n    return 2\n"},
         "t/c": {"task_id": "t/c", "prompt": [{"role": "user", "content": "c?"}], "reference": "def c():\n    return 3\n"}}
SAMPLES = [{"task_id": "t/a", "responses": ["a1", "a2", "a1", "a3", "a4"], "rewards": [1.0, 0.5, 1.0, 0.0, 1.0]},
           {"task_id": "t/b", "responses": ["b1", "b2"], "rewards": [0.0, 0.25]},  # nothing passes
           {"task_id": "t/c", "responses": ["c1", "c2"], "rewards": [1.0, 1.0]}]  # everything passes


def test_sft_records_are_distinct_passing_replies_with_an_optional_reference_fallback():
    records, stats = X.sft_records(SAMPLES, TASKS, per_task=2, fallback=False)
    replies = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in records]
    assert replies == [("a?", "a1"), ("a?", "a4"), ("c?", "c1"), ("c?", "c2")]
    assert all(r["messages"][1]["role"] == "assistant" for r in records)
    assert stats == {"tasks": 3, "tasks_with_a_pass": 2, "from_samples": 4, "from_reference": 0}
    records, stats = X.sft_records(SAMPLES, TASKS, per_task=1, fallback=True)
    assert [r["messages"][1]["content"] for r in records] == ["a1", X.fenced(TASKS["t/b"]["reference"]), "c1"]
    assert stats["from_reference"] == 1 and stats["from_samples"] == 2


def test_preference_pairs_put_passing_replies_against_the_worst_failures():
    pairs, stats = X.preference_records(SAMPLES, TASKS, per_task=2, fallback=False)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a1", "a3"), ("a4", "a2")]  # worst failure first
    assert all(p["prompt"] == TASKS["t/a"]["prompt"] for p in pairs)
    assert stats == {"tasks": 3, "all_pass": 1, "none_pass": 1, "mixed": 1, "pairs_from_samples": 2,
                     "pairs_with_reference": 0}
    pairs, stats = X.preference_records(SAMPLES, TASKS, per_task=2, fallback=True)
    assert (pairs[-1]["chosen"], pairs[-1]["rejected"]) == (X.fenced(TASKS["t/b"]["reference"]), "b1")
    assert stats["pairs_with_reference"] == 1 and len(pairs) == 3
    # what qwen2.train.dpo reads: the experiment's extra field is ignored
    assert all({"prompt", "chosen", "rejected"} <= set(p) for p in pairs)


# ---- stages ------------------------------------------------------------------------------------------

def test_a_finished_training_stage_is_skipped(tmp_path, monkeypatch):
    out = tmp_path / "dpo"
    out.mkdir()
    (out / X.DONE).write_text(json.dumps({"model_dir": "m", "log": [], "seconds": 1.0}))
    monkeypatch.setattr(X.qwen2.train, "dpo", lambda *a, **k: pytest.fail("a finished stage ran again"))
    args = X.parse_args(["--work-dir", str(tmp_path)])
    assert X.train_stage("dpo", {"output_dir": str(out)}, args)["model_dir"] == "m"


def test_sampling_resumes_with_the_tasks_left_and_the_same_seeds(tmp_path, monkeypatch):
    path = tmp_path / "samples.jsonl"
    done = {"task_id": TRAIN[0]["task_id"], "responses": ["x", "y"], "rewards": [0.0, 0.0]}
    path.write_text(json.dumps(done) + "\n" + '{"task_id": "cut in the mid')  # killed while writing
    seeds = []

    class FakeTokenizer:  # the prompt "ids" are the prompt text, so the fake engine knows the task
        def apply_chat_template(self, messages, add_generation_prompt):
            return messages[0]["content"]

        def encode(self, text):
            return text

    class FakeModel:
        tokenizer = FakeTokenizer()

    def fake_engine(m, jobs, max_batch):
        for j in reversed(range(len(jobs))):  # replies finish in any order
            prompt, params = jobs[j]
            seeds.append(params.seed)
            task = next(t for t in TRAIN if t["prompt"][0]["content"] == prompt)
            yield j, X.fenced(task["reference"]) if params.seed % 2 else "no code"

    monkeypatch.setattr(X.qwen2, "load", lambda *a, **k: FakeModel())
    monkeypatch.setattr(X, "engine_generate", fake_engine)
    monkeypatch.setattr(X, "ExecutionReward", lambda timeout: lambda task, reply: float("def " in reply))
    args = X.parse_args(["--work-dir", str(tmp_path), "--samples", "2"])
    result = X.sample_stage(str(path), "unused", TRAIN[:3], args)
    # task 0 was done; reply i of task t samples with seed t * 1000 + i (seed 0), however the run was cut
    assert sorted(seeds) == [1000, 1001, 2000, 2001]
    assert [r["task_id"] for r in result] == [t["task_id"] for t in TRAIN[:3]] and result[0] == done
    assert result[1]["responses"] == ["no code", X.fenced(TRAIN[1]["reference"])]
    assert result[1]["rewards"] == [0.0, 1.0]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["task_id"] for line in lines] == [TRAIN[0]["task_id"], TRAIN[2]["task_id"], TRAIN[1]["task_id"]]


def test_summary_reads_margin_accuracy_and_before_after_from_logs():
    log = [{"step": i, "loss": 0.7 - 0.1 * i, "margin": 0.1 * i, "accuracy": 0.5 + 0.1 * i, "sample_reward": 0.2 * i}
           for i in range(1, 5)]
    evals = {name: {"pass_rate": p, "tests_passed": p + 0.1, "perplexity": {"declaration": q, "tempest": q + 1}}
             for name, p, q in (("base", 0.5, 10.0), ("sft", 0.55, 10.5), ("online", 0.6, 11.0))}
    runs = {"sft": {"log": [{"step": 1, "loss": 1.0}], "seconds": 3.0, "peak_rss_gb": 1.0},
            "online": {"log": log, "seconds": 5.0, "peak_rss_gb": 2.0},
            "dpo": {"log": log, "seconds": 1.0, "peak_rss_gb": 2.0}}  # no eval yet: left out
    s = X.summarise(runs, evals)
    assert set(s) == {"sft", "online"}
    r = s["online"]
    assert r["start"] == "sft" and r["steps"] == 4
    assert r["margin_first"] == pytest.approx(0.1) and r["margin_last_quarter"] == pytest.approx(0.4)
    assert r["accuracy_last_quarter"] == pytest.approx(0.9) and r["sample_reward_last_quarter"] == pytest.approx(0.8)
    assert (r["pass_before"], r["pass_after"]) == (0.55, 0.6)
    assert (r["ppl_tempest_before"], r["ppl_tempest_after"]) == (11.5, 12.0)
    assert s["sft"]["margin_last_quarter"] is None and s["sft"]["pass_before"] == 0.5
    # an online step that found no pair (its replies all scored alike) logs zeros: not a margin of 0
    unpaired = log + [{"step": 5, "loss": 0.0, "margin": 0.0, "accuracy": 0.0, "sample_reward": 0.0}]
    r5 = X.summarise({"online": {"log": unpaired, "seconds": 5.0, "peak_rss_gb": 2.0}}, evals)["online"]
    assert r5["steps"] == 5 and r5["steps_without_pair"] == 1
    assert r5["margin_last_quarter"] == pytest.approx(0.4) and r5["accuracy_last_quarter"] == pytest.approx(0.9)
    assert r5["sample_reward_last_quarter"] == 0.0  # the sampled reward counts (last quarter of 5: step 5)
    data = {"args": vars(X.parse_args([])), "base_model": "/x/base", "tasks": {"train": 40, "heldout": 20},
            "sft_data": {"from_samples": 30, "from_reference": 0},
            "pairs": {"pairs_from_samples": 12, "pairs_with_reference": 0}, "summary": s, "evals": evals,
            "torch": "2", "threads": 2}
    md = X.markdown(data)
    assert "| online | sft | 4 | 0.100 → 0.400 | 0.90 | 0.200 → 0.800 | 0.550 → 0.600 |" in md
    assert "| base | 0.500 | 0.600 | 10.000 | 11.000 |" in md
