"""Rejection sampling: prompts in, the model's own replies that a verifier accepts out, as SFT
records and DPO pairs (`qwen2 synth reject`).

A task is a JSONL record: `task_id`, `prompt` (a string, or chat messages) and what its verifier
reads (`qwen2.synth.verifiers`): `answer` for math; for code (execution feedback) `tests` (test
snippets, or one test program), optionally `entry_point` (the function the tests call: it picks the
right code block of a reply) and `reference` (a solution, the fallback for a task the model never
solves). Online DPO reads the same code records (`qwen2.train.online.code_tasks`).

  sample_and_score    k sampled replies per task, each scored by the verifier (code: the fraction
                      of tests passed, as online DPO's execution reward); one JSONL line per task,
                      appended as it finishes, so a killed run goes on where it was
  sft_records         the distinct replies that pass (score 1), as chat records (rejection-sampling
                      fine-tuning on the model's own correct answers)
  preference_records  passing replies (chosen) against failing ones (rejected), worst failure first
  reject              all of it into a directory: samples.jsonl, sft.jsonl, pairs.jsonl, stats.json

Reply i of task t samples with its own seed, (seed * 1,000,003 + t) * 1,000 + i, and each decodes as
if alone (the serving engine's rows do not see each other), so a rerun or a resumed run draws the same
replies whatever else decodes beside them.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from typing import Callable, Iterable, Iterator

from ..api import Qwen2, load
from ..errors import Qwen2Error
from ..eval.humaneval import fenced
from ..fileio import read_text, write_text_atomic
from ..progress import progress_bar
from ..runtime.generate import SamplingParams
from ..train.data import DataReport, check_messages, jsonl_records
from .verifiers import Verifier, checked_score, missing_field, verifier

MAX_SAMPLES = 1_000  # replies per task: the seeds of task t are t * 1,000 + i, so more would overlap task t + 1


# ---- tasks and scoring ----------------------------------------------------------------------------

def read_tasks(path: str | os.PathLike, on_bad_record: str = "fail", needs: Verifier | None = None) -> list[dict]:
    """The task records of a JSONL file, checked the way training data is (`qwen2.train.data`): a bad
    record (invalid JSON, no string task_id, a prompt that is neither a string nor a conversation, a
    field the verifier `needs` missing (default: the code verifier's tests), a task_id seen before:
    sampling resumes by it) stops with its file and line, or with on_bad_record="skip" is skipped
    with a warning. A string prompt becomes the conversation of one user message."""
    if on_bad_record not in ("fail", "skip"):
        raise Qwen2Error(f"on_bad_record must be 'fail' or 'skip', got {on_bad_record!r}")
    needs = needs or verifier("code")
    report = DataReport(os.fspath(path), on_bad_record)
    tasks, seen = [], set()
    for number, task in jsonl_records(report.path, report):
        if isinstance(task.get("prompt"), str):
            task["prompt"] = [{"role": "user", "content": task["prompt"]}]
        why = _task_problem(task, needs)
        if why is None and task["task_id"] in seen:
            why = f"task_id {task['task_id']!r} appears twice"
        if why:
            report.bad(number, why)
            continue
        seen.add(task["task_id"])
        tasks.append(task)
        report.records += 1
    return tasks


def _task_problem(task: dict, needs: Verifier) -> str | None:
    """Why a record is not a task `needs` can check, or None."""
    prompt, tests = task.get("prompt"), task.get("tests")
    if not isinstance(task.get("task_id"), str):
        return "a task needs a string \"task_id\""
    if not isinstance(prompt, list):
        return "\"prompt\" must be a string or a list of chat messages"
    if "tests" in needs.fields and not (isinstance(tests, str) and tests.strip()
                                        or isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests)):
        return "\"tests\" must be a test program or a list of test snippets"
    return missing_field(needs, task) or check_messages(prompt + [{"role": "assistant", "content": "the reply"}])


def reference_reply(task: dict) -> str:
    """The task's reference solution as a reply, in the code block the prompts ask for."""
    if not isinstance(task.get("reference"), str):
        raise Qwen2Error(f"task {task['task_id']!r} has no \"reference\" solution to fall back on")
    return fenced(task["reference"])


# ---- generation ---------------------------------------------------------------------------------

def task_prompt_ids(m: Qwen2, task: dict) -> list[int]:
    """The task's prompt through the chat template, the assistant's turn begun."""
    return m.tokenizer.encode(m.tokenizer.apply_chat_template(task["prompt"], add_generation_prompt=True))


def generate_replies(m: Qwen2, jobs: list[tuple[list[int], SamplingParams]], max_batch: int) -> Iterator[tuple[int, str]]:
    """Yield (job index, reply) for every (prompt ids, sampling) job, as each finishes, through the
    serving engine's continuous batching: up to `max_batch` replies decode together and a finished
    one's row is refilled at once, so one long reply holds no other back (a plain batch runs until
    its longest reply ends; sampled replies run from tens to hundreds of tokens). Each row attends
    over its own keys as if alone: a greedy reply equals the prompt's alone, and a seeded one does not
    depend on what decodes beside it."""
    from ..serve.engine import Engine, complete_all

    if not jobs:
        return
    longest = max(len(ids) + params.max_new_tokens for ids, params in jobs)
    engine = Engine(m.model, m.tokenizer, m.eos_ids, max_batch=max_batch, max_model_len=longest)
    for j, (text,) in complete_all(engine, [(ids, params, 1) for ids, params in jobs]):
        yield j, text


def loaded(model: Qwen2 | str | os.PathLike | Callable[[], Qwen2]) -> Qwen2:
    """The model `model` names: a loaded one as it is, a path or registry name loaded, a loader called."""
    if isinstance(model, (str, os.PathLike)):
        return load(model)
    return model() if callable(model) else model


def append_in_chunks(path: str, keys: list[str], key_field: str, model, work: Callable[[Qwen2, list[str]], list[dict]],
                     chunk: int, desc: str, progress: bool = True) -> dict[str, dict]:
    """The records of the JSONL file `path` by their `key_field`, completed: the keys not there yet
    are done by `work(model, keys)` `chunk` keys at a time, each chunk's records appended as it
    finishes, so a killed run goes on with the keys left (a cut last line is dropped). The model is
    loaded (`loaded`) only when keys are left."""
    done = {r[key_field]: r for r in read_lines(path)}
    todo = [k for k in keys if k not in done]
    if todo:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in done.values()))  # drops a cut last line
        m = loaded(model)
        with open(path, "a", encoding="utf-8") as out, progress_bar(total=len(todo), desc=desc, unit="item",
                                                                    disable=not progress) as bar:
            for first in range(0, len(todo), chunk):
                for record in work(m, todo[first:first + chunk]):
                    out.write(json.dumps(record) + "\n")
                    done[record[key_field]] = record
                out.flush()
                bar.update(len(todo[first:first + chunk]))
    return done


def reply_seed(seed: int, task_index: int, reply_index: int) -> int:
    return (seed * 1_000_003 + task_index) * 1_000 + reply_index


def read_lines(path: str) -> list[dict]:
    """The task lines a previous run finished; a cut last line (killed while writing) is dropped."""
    if not os.path.exists(path):
        return []
    done = []
    for number, line in enumerate(read_text(path).splitlines(keepends=True), 1):
        if not line.endswith("\n"):
            break
        try:
            done.append(json.loads(line))
        except json.JSONDecodeError:
            raise Qwen2Error(f"{path} line {number} is not JSON: not a file this run wrote; give another path") from None
    return done


def sample_and_score(path: str | os.PathLike, tasks: list[dict], model: Qwen2 | str | os.PathLike | Callable[[], Qwen2],
                     params: SamplingParams, *, samples: int, seed: int = 0, batch: int = 8,
                     scorer: Verifier | None = None, progress: bool = True) -> list[dict]:
    """`samples` replies per task sampled with `params` (its seed replaced by each reply's own), each
    scored by the verifier `scorer` (default: the code verifier, 10 s per test). One JSONL line per task,
    {"task_id", "responses", "rewards", "seconds"}, appended to `path` as soon as its replies are in:
    run again with the same file, it samples only the tasks not there. `model` is a loaded model, a
    model directory or registry name, or a function that loads one; the last two are loaded only when
    tasks are left. Returns the tasks' lines in
    the order of `tasks`."""
    if not (isinstance(samples, int) and 1 <= samples <= MAX_SAMPLES):
        raise Qwen2Error(f"samples per task must be an integer from 1 to {MAX_SAMPLES}, got {samples!r}")
    if not (isinstance(batch, int) and batch >= 1):
        raise Qwen2Error(f"the sampling batch must be an integer >= 1, got {batch!r}")
    path = os.fspath(path)
    done = read_lines(path)
    have = {s["task_id"] for s in done}
    todo = [(t, task) for t, task in enumerate(tasks) if task["task_id"] not in have]
    if todo:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_text_atomic(path, "".join(json.dumps(s) + "\n" for s in done))  # drops a cut last line
        m = loaded(model)
        scorer = scorer or verifier("code")
        jobs, owner = [], []  # owner[j] = (todo position, reply index)
        for position, (t, task) in enumerate(todo):
            ids = task_prompt_ids(m, task)
            for i in range(samples):
                jobs.append((ids, dataclasses.replace(params, seed=reply_seed(seed, t, i))))
                owner.append((position, i))
        replies = [[None] * samples for _ in todo]
        last = time.perf_counter()
        with open(path, "a", encoding="utf-8") as out, progress_bar(
                total=len(todo), desc=f"sampling {os.path.basename(path)}", unit="task", disable=not progress) as bar:
            for j, text in generate_replies(m, jobs, batch):
                position, i = owner[j]
                replies[position][i] = text
                if any(r is None for r in replies[position]):
                    continue
                task = todo[position][1]
                line = {"task_id": task["task_id"], "responses": replies[position],
                        "rewards": [checked_score(scorer, task, r, where=f"task {task['task_id']!r}")
                                    for r in replies[position]],
                        "seconds": time.perf_counter() - last}  # wall time since the previous task finished
                last = time.perf_counter()
                out.write(json.dumps(line) + "\n")
                out.flush()
                done.append(line)
                bar.update(1)
        del m
        gc.collect()  # a model loaded here is freed before the caller's next stage loads its own
    order = {task["task_id"]: t for t, task in enumerate(tasks)}
    return sorted((s for s in done if s["task_id"] in order), key=lambda s: order[s["task_id"]])


# ---- data for SFT and DPO, from scored samples ----------------------------------------------------

def distinct(replies: Iterable[str]) -> list[str]:
    """The replies without repeats, in first-seen order (a sampled reply often comes twice)."""
    return list(dict.fromkeys(replies))


def sft_records(samples: list[dict], tasks: dict[str, dict], per_task: int, fallback: bool) -> tuple[list[dict], dict]:
    """Chat records of up to `per_task` distinct replies per task that pass every test (rejection
    sampling). With `fallback`, a task none of whose samples passes gets its reference solution."""
    records, stats = [], {"tasks": len(samples), "tasks_with_a_pass": 0, "from_samples": 0, "from_reference": 0}
    for s in samples:
        task = tasks[s["task_id"]]
        passing = distinct(r for r, x in zip(s["responses"], s["rewards"]) if x == 1.0)[:per_task]
        stats["tasks_with_a_pass"] += bool(passing)
        if not passing and fallback:
            passing = [reference_reply(task)]
            stats["from_reference"] += 1
        else:
            stats["from_samples"] += len(passing)
        records += [{"messages": task["prompt"] + [{"role": "assistant", "content": r}], "task_id": s["task_id"]}
                    for r in passing]
    return records, stats


def preference_records(samples: list[dict], tasks: dict[str, dict], per_task: int,
                       fallback: bool) -> tuple[list[dict], dict]:
    """Up to `per_task` (chosen, rejected) pairs per task, as `qwen2.train.dpo` reads them (plus the
    task_id): distinct replies that pass every test against distinct ones that fail some, the
    lowest-scored first. With `fallback`, a task with failures but no passing reply pairs its
    reference solution with the worst failure."""
    records, stats = [], {"tasks": len(samples), "all_pass": 0, "none_pass": 0, "mixed": 0, "pairs_from_samples": 0,
                          "pairs_with_reference": 0}
    for s in samples:
        task = tasks[s["task_id"]]
        scored = list(zip(s["responses"], s["rewards"]))
        chosen = distinct(r for r, x in scored if x == 1.0)
        rejected = distinct(r for r, x in sorted(scored, key=lambda p: p[1]) if x < 1.0)
        if not rejected:
            stats["all_pass"] += 1
            continue
        if not chosen:
            stats["none_pass"] += 1
            if not fallback:
                continue
            chosen = [reference_reply(task)]
            stats["pairs_with_reference"] += 1
            rejected = rejected[:1]
        else:
            stats["mixed"] += 1
            stats["pairs_from_samples"] += min(per_task, len(chosen), len(rejected))
        records += [{"prompt": task["prompt"], "chosen": c, "rejected": r, "task_id": s["task_id"]}
                    for c, r in list(zip(chosen, rejected))[:per_task]]
    return records, stats


# ---- the whole run: qwen2 synth reject -------------------------------------------------------------

SAMPLES_FILE, SFT_FILE, PAIRS_FILE, STATS_FILE = "samples.jsonl", "sft.jsonl", "pairs.jsonl", "stats.json"


def write_jsonl(path: str, records: list[dict]) -> str:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def reject(prompts: str | os.PathLike, model: Qwen2 | str | os.PathLike | Callable[[], Qwen2], out_dir: str | os.PathLike, *,
           verifier_name: str = "code", samples: int, params: SamplingParams, seed: int = 0, batch: int = 8,
           pairs: bool = False, per_task: int = 1, fallback: bool = False, sandbox_timeout: float = 10.0,
           on_bad_record: str = "fail", progress: bool = True) -> dict:
    """`samples` replies per prompt of the file `prompts`, scored by the verifier named `verifier_name`;
    into `out_dir`: samples.jsonl (every reply and its score; a rerun samples only the prompts not
    there), sft.jsonl (up to `per_task` distinct passing replies per prompt, chat records for
    `qwen2 train sft`), with `pairs` pairs.jsonl (passing over failing replies, for `qwen2 train dpo`),
    and stats.json: prompts, samples, passing, acceptance rate, kept, pairs. Every kept reply is scored
    again before it is written (`reverified`): a verifier that changes its mind is caught here, not in
    training. Returns the stats."""
    out_dir = os.fspath(out_dir)
    start = time.perf_counter()
    scorer = verifier(verifier_name, sandbox_timeout)
    tasks = read_tasks(prompts, on_bad_record, scorer)
    if not tasks:
        raise Qwen2Error(f"{os.fspath(prompts)} holds no prompt to sample")
    scored = sample_and_score(os.path.join(out_dir, SAMPLES_FILE), tasks, model, params, samples=samples,
                              seed=seed, batch=batch, scorer=scorer, progress=progress)
    by_id = {t["task_id"]: t for t in tasks}
    sft, sft_stats = sft_records(scored, by_id, per_task, fallback)
    reverified = sum(checked_score(scorer, by_id[r["task_id"]], r["messages"][-1]["content"],
                                   where=f"task {r['task_id']!r}") == 1.0 for r in sft)
    if reverified != len(sft):
        raise Qwen2Error(f"verifier {scorer.name} rejects {len(sft) - reverified} of the {len(sft)} replies kept "
                         "(it accepted them once, or they are reference solutions that fail); a verifier must give "
                         "the same answer every time")
    write_jsonl(os.path.join(out_dir, SFT_FILE), sft)
    scores = [x for s in scored for x in s["rewards"]]
    passing = sum(x == 1.0 for x in scores)
    stats = {"verifier": scorer.name, "prompts": len(scored), "samples": len(scores), "passing": passing,
             "acceptance_rate": passing / len(scores), "kept": len(sft), "reverified": reverified, "sft": sft_stats}
    if pairs:
        preference, pair_stats = preference_records(scored, by_id, per_task, fallback)
        write_jsonl(os.path.join(out_dir, PAIRS_FILE), preference)
        stats.update(pairs=len(preference), pair_stats=pair_stats)
    stats["seconds"] = time.perf_counter() - start
    write_text_atomic(os.path.join(out_dir, STATS_FILE), json.dumps(stats, indent=2) + "\n")
    return stats

