"""The DPO experiment (benchmarks/experiments/train_dpo_experiment.py): its task files, read as data
(benchmarks/data/dpo_tasks_*.jsonl), and the script itself, run as a command over a work dir whose
stages are all finished. Fast: the sandbox runs the reference solutions, no model is loaded.

- the task files read cleanly with online DPO's own reader, 40 train / 20 held out, no overlap;
- every reference solution passes all of its tests in the sandbox, and a wrong solution fails them;
- a finished stage is skipped, and the per-run summary (margin, accuracy, pass rate and perplexity
  before and after) and its markdown table come from the stages' logs and evaluations.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

import pytest

from qwen2.eval.sandbox import Limits, run_python
from qwen2.synth.rejection import read_tasks
from qwen2.train import data as D
from qwen2.train.online import code_tasks

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_TASKS = os.path.join(REPO_ROOT, "benchmarks", "data", "dpo_tasks_train.jsonl")
HELDOUT_TASKS = os.path.join(REPO_ROOT, "benchmarks", "data", "dpo_tasks_heldout.jsonl")
TRAIN, HELDOUT = read_tasks(TRAIN_TASKS), read_tasks(HELDOUT_TASKS)
ALL = TRAIN + HELDOUT


def test_task_files_read_with_online_dpos_reader_and_split_cleanly():
    for path, n in ((TRAIN_TASKS, 40), (HELDOUT_TASKS, 20)):
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


# ---- the script, over finished stages ----------------------------------------------------------------

def _write(path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value if isinstance(value, str) else json.dumps(value))


def test_a_run_over_finished_stages_trains_nothing_and_reports_from_their_logs(tmp_path):
    """Every stage of a 1-task run is already in the work dir: samples, evaluations and training
    runs marked done. The script loads no model and trains nothing (the base model directory is
    empty and the stages' model directories do not exist: a stage that ran would fail), and its
    summary reads margin, accuracy and before/after values from the logs and evaluations."""
    work, base = tmp_path / "work", tmp_path / "base"
    base.mkdir()
    task, heldout = TRAIN[0], HELDOUT[0]
    log = [{"step": i, "loss": 0.7 - 0.1 * i, "margin": 0.1 * i, "accuracy": 0.5 + 0.1 * i, "sample_reward": 0.2 * i}
           for i in range(1, 5)]
    # an online step that found no pair (its replies all scored alike) logs zeros: not a margin of 0
    unpaired = log + [{"step": 5, "loss": 0.0, "margin": 0.0, "accuracy": 0.0, "sample_reward": 0.0}]
    evals = {name: {"pass_rate": p, "tests_passed": p + 0.1, "perplexity": {"declaration": q, "tempest": q + 1}}
             for name, p, q in (("base", 0.5, 10.0), ("sft", 0.55, 10.5), ("dpo", 0.5, 10.2), ("online", 0.6, 11.0),
                                ("online-ondare", 0.6, 11.0))}
    for name, e in evals.items():
        _write(work / "eval" / f"{name}.json",
               {**e, "seconds": 1.0, "tasks": [{"task_id": heldout["task_id"], "tests_passed": e["pass_rate"]}]})
    good = "```python\n" + task["reference"] + "\n```"  # re-verified when the SFT records are written
    for name in ("base", "sft"):  # one passing and one failing reply: an SFT record and a pair
        _write(work / "synth" / name / "samples.jsonl",
               json.dumps({"task_id": task["task_id"], "responses": [good, "bad"], "rewards": [1.0, 0.0]}) + "\n")
    for name, run_log, seconds in (("sft", [{"step": 1, "loss": 1.0}], 3.0), ("dpo", log, 1.0), ("online", log, 5.0),
                                   ("online-ondare", unpaired, 5.0)):
        _write(work / name / "done.json", {"model_dir": str(tmp_path / f"{name}-model"), "log": run_log,
                                           "seconds": seconds, "peak_rss_gb": 2.0})
    out = tmp_path / "report" / "train_dpo.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.experiments.train_dpo_experiment", "--model", str(base),
                          "--work-dir", str(work), "--out", str(out), "--train-limit", "1", "--heldout-limit", "1"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "starting from the beginning" not in run.stdout  # no training run started
    s = json.loads(out.read_text())["summary"]
    assert set(s) == {"sft", "dpo", "online", "online+ondare"}  # every run, each against the model it started from
    r = s["online"]
    assert r["start"] == "sft" and r["steps"] == 4
    assert r["margin_first"] == pytest.approx(0.1) and r["margin_last_quarter"] == pytest.approx(0.4)
    assert r["accuracy_last_quarter"] == pytest.approx(0.9) and r["sample_reward_last_quarter"] == pytest.approx(0.8)
    assert (r["pass_before"], r["pass_after"]) == (0.55, 0.6)
    assert (r["ppl_tempest_before"], r["ppl_tempest_after"]) == (11.5, 12.0)
    assert s["sft"]["margin_last_quarter"] is None and s["sft"]["pass_before"] == 0.5
    r5 = s["online+ondare"]
    assert r5["steps"] == 5 and r5["steps_without_pair"] == 1
    assert r5["margin_last_quarter"] == pytest.approx(0.4) and r5["accuracy_last_quarter"] == pytest.approx(0.9)
    assert r5["sample_reward_last_quarter"] == 0.0  # the sampled reward counts (last quarter of 5: step 5)
    md = (tmp_path / "report" / "train_dpo.md").read_text()
    assert "| online | sft | 4 | 0.100 → 0.400 | 0.90 | 0.200 → 0.800 | 0.550 → 0.600 |" in md
    assert "| base | 0.500 | 0.600 | 10.000 | 11.000 |" in md
