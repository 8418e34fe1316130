"""Reward-model scores for replies already written: every reply of a JSONL file scored by a model
`qwen2 train reward` trained, each record written back with its scores (`qwen2 synth score`).

A record is a whole conversation ({"messages": [...]}, its last turn the reply: "reward"), or a
prompt (string or messages) with "response" ("reward") or "chosen" and "rejected"
("reward_chosen", "reward_rejected"), the shapes `qwen2 train sft|dpo` read."""
from __future__ import annotations

import json
import os

from ..fileio import write_text_atomic
from ..train.data import DataReport, as_messages, jsonl_records
from ..train.reward import load_reward_model, score_replies

REPLY_KEYS = {"response": "reward", "chosen": "reward_chosen", "rejected": "reward_rejected"}


def conversations_of(path: str | os.PathLike, report: DataReport) -> tuple[list[dict], list[list[dict]], list[tuple[int, str]]]:
    """(records, conversations to score, where each score goes: (record index, key))."""
    records, conversations, slots = [], [], []
    for number, record in jsonl_records(os.fspath(path), report):
        prompt = as_messages(record.get("prompt"))
        replies = [(k, record[k]) for k in REPLY_KEYS if isinstance(record.get(k), str)]
        if isinstance(record.get("messages"), list):
            conversations.append(record["messages"])
            slots.append((len(records), "reward"))
        elif prompt is not None and replies:
            for key, reply in replies:
                conversations.append(prompt + [{"role": "assistant", "content": reply}])
                slots.append((len(records), REPLY_KEYS[key]))
        else:
            report.bad(number, 'a record needs "messages", or "prompt" with "response" (or "chosen" and "rejected")')
            continue
        records.append(record)
    return records, conversations, slots


def score_file(path: str | os.PathLike, reward_model: str | os.PathLike, out: str | os.PathLike, *,
               batch: int = 8, on_bad_record: str = "fail") -> dict:
    """Score every reply of `path` with the reward model in the directory `reward_model`; the records,
    each with its scores, written atomically to `out`. Returns {"records", "replies", "skipped"}."""
    model, tokenizer = load_reward_model(reward_model)
    report = DataReport(os.fspath(path), on_bad_record)
    records, conversations, slots = conversations_of(path, report)
    for (i, key), value in zip(slots, score_replies(model, tokenizer, conversations, batch=batch)):
        records[i][key] = value
    write_text_atomic(os.fspath(out), "".join(json.dumps(r) + "\n" for r in records))
    return {"records": len(records), "replies": len(conversations), "skipped": report.skipped}
