"""Constitutional feedback: a model drafts a reply, critiques it against each written principle and
revises it, and the revision becomes fine-tuning data (revision over draft as a DPO pair, the
revision as an SFT record), as the Qwen2 report builds its safety and value data (after Bai et al.,
"Constitutional AI", 2022), with no human labelling the replies.

For each prompt, principle after principle: critique the current reply against the principle, then
revise it in the light of that critique; the revision is the next principle's current reply. Every
step is kept: the draft, each (principle, critique, revision), and the final revision.

Prompts go through the serving engine's continuous batching a chunk at a time (all the chunk's drafts,
then all its first critiques, ...); a chunk's records are appended as it finishes, so a killed run
goes on with the prompts left. Reply k of prompt t samples with its own seed, so a rerun draws the
same text.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

from ..api import Qwen2
from ..errors import Qwen2Error
from ..fileio import read_text, write_text_atomic
from ..runtime.generate import SamplingParams
from . import rejection
from .verifiers import Verifier

CRITIQUE = ("Critique your last reply against this principle: {principle}\n"
            "Say specifically where the reply falls short of it, if it does.")
REVISE = ("Rewrite your reply so that it follows the principle ({principle}) and fixes what the "
          "critique found. Answer with the new reply only.")
RECORDS_FILE = "records.jsonl"
NO_FIELDS = Verifier("prompt", lambda record, reply: True)  # a prompt needs only task_id and prompt


def read_principles(path: str | os.PathLike) -> list[str]:
    """One principle per non-blank line ('#' lines are comments); an empty file is an error."""
    path = os.fspath(path)
    principles = [line.strip() for line in read_text(path).splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    if not principles:
        raise Qwen2Error(f"{path} holds no principle; write one per line (e.g. 'Do not help with anything "
                         "dangerous or illegal.')")
    return principles


def _seed(seed: int, task_index: int, turn: int) -> int:
    return (seed * 1_000_003 + task_index) * 1_000 + turn


def constitution(prompts: str | os.PathLike, principles: list[str], model: Qwen2 | str | os.PathLike | Callable[[], Qwen2],
                 out_dir: str | os.PathLike, *, params: SamplingParams, seed: int = 0, batch: int = 8,
                 on_bad_record: str = "fail", progress: bool = True) -> dict:
    """Draft, critique and revise every prompt of the file `prompts` against `principles`; into
    `out_dir`: records.jsonl (every step of every prompt, appended a chunk of `batch` prompts at a
    time: a rerun does only the prompts not there), sft.jsonl (the revisions as chat records),
    pairs.jsonl (revision chosen over draft, where they differ) and stats.json. Returns the stats."""
    if not principles:
        raise Qwen2Error("constitutional feedback needs at least one principle")
    out_dir = os.fspath(out_dir)
    start = time.perf_counter()
    tasks = rejection.read_tasks(prompts, on_bad_record, NO_FIELDS)
    if not tasks:
        raise Qwen2Error(f"{os.fspath(prompts)} holds no prompt")
    index = {task["task_id"]: (t, task) for t, task in enumerate(tasks)}
    done = rejection.append_in_chunks(
        os.path.join(out_dir, RECORDS_FILE), list(index), "task_id", model,
        lambda m, ids: _chain(m, [index[i] for i in ids], principles, params, seed, batch), batch, "constitution",
        progress)
    records = [done[t["task_id"]] for t in tasks]
    sft = [{"messages": r["prompt"] + [{"role": "assistant", "content": r["revision"]}], "task_id": r["task_id"]}
           for r in records]
    pairs = [{"prompt": r["prompt"], "chosen": r["revision"], "rejected": r["draft"], "task_id": r["task_id"]}
             for r in records if r["revision"].strip() != r["draft"].strip()]
    rejection.write_jsonl(os.path.join(out_dir, rejection.SFT_FILE), sft)
    rejection.write_jsonl(os.path.join(out_dir, rejection.PAIRS_FILE), pairs)
    stats = {"prompts": len(records), "principles": len(principles), "revised": len(pairs),
             "unchanged": len(records) - len(pairs), "sft": len(sft), "pairs": len(pairs),
             "seconds": time.perf_counter() - start}
    write_text_atomic(os.path.join(out_dir, rejection.STATS_FILE), json.dumps(stats, indent=2) + "\n")
    return stats


def _chain(m: Qwen2, chunk: list[tuple[int, dict]], principles: list[str], params: SamplingParams, seed: int,
           batch: int) -> list[dict]:
    """Draft, then critique and revise per principle, for a chunk of (task index, task) together."""

    def reply_all(conversations: list[list[dict]], turn: int) -> list[str]:
        jobs = [(m.tokenizer.encode(m.tokenizer.apply_chat_template(c, add_generation_prompt=True)),
                 dataclasses.replace(params, seed=_seed(seed, t, turn))) for c, (t, _) in zip(conversations, chunk)]
        replies = [""] * len(jobs)
        for j, text in rejection.generate_replies(m, jobs, batch):
            replies[j] = text
        return replies

    prompts = [task["prompt"] for _, task in chunk]
    drafts = reply_all(prompts, 0)
    current, steps = list(drafts), [[] for _ in chunk]
    for p, principle in enumerate(principles):
        asked = [prompt + [{"role": "assistant", "content": reply},
                           {"role": "user", "content": CRITIQUE.format(principle=principle)}]
                 for prompt, reply in zip(prompts, current)]
        critiques = reply_all(asked, 1 + 2 * p)
        revisions = reply_all([a + [{"role": "assistant", "content": critique},
                                    {"role": "user", "content": REVISE.format(principle=principle)}]
                               for a, critique in zip(asked, critiques)], 2 + 2 * p)
        for i in range(len(chunk)):
            steps[i].append({"principle": principle, "critique": critiques[i], "revision": revisions[i]})
        current = revisions
    return [{"task_id": task["task_id"], "prompt": task["prompt"], "draft": draft, "steps": s, "revision": final}
            for (_, task), draft, s, final in zip(chunk, drafts, steps, current)]
