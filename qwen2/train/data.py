"""Training data: pre-training text packed into rows, chat conversations for SFT, preference pairs
for DPO; and the batches a training step consumes.

Every example becomes a `Row`: token ids, labels (the id to predict there, -100 where no loss is
taken; shifted by one in the loss, as transformers does) and document ids. Tokens attend only to
earlier tokens of their own document, so several documents share a row without seeing each other.

A bad record (invalid JSON, a missing or mistyped field) is reported with file and line; it stops
the run (`on_bad_record = "fail"`, the default) or is skipped and counted (`"skip"`). Nothing is
dropped silently: the counts go to the log and the run's summary.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..errors import Qwen2Error
from ..fileio import read_text

IGNORE_INDEX = -100  # labels with this value take no loss (transformers' convention)
END_OF_DOCUMENT = "<|endoftext|>"  # separates pre-training documents, as in Qwen2's own data
END_OF_TURN = "<|im_end|>"  # ChatML closes every turn with it; an assistant turn's loss includes it
PAD_DOCUMENT = -1  # document id of padding: a document of its own, never attended by real tokens


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    doc_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PreferencePair:
    chosen: Row
    rejected: Row
    ref_chosen_logp: float | None = None  # precomputed reference log-probs, when the data has them
    ref_rejected_logp: float | None = None


@dataclass
class DataReport:
    """What reading a file found: records used, skipped (bad) and truncated; first problems kept."""
    path: str
    on_bad_record: str = "fail"
    records: int = 0
    skipped: int = 0
    truncated: int = 0
    problems: list[str] = field(default_factory=list)

    def bad(self, line: int, why: str) -> None:
        where = f"{self.path}:{line}: {why}"
        if self.on_bad_record == "fail":
            raise Qwen2Error(f"bad record at {where} (set on_bad_record=skip to skip such records)")
        self.skipped += 1
        if len(self.problems) < 20:
            self.problems.append(where)
        print(f"warning: skipping bad record at {where}", file=sys.stderr)

    def summary(self) -> dict[str, Any]:
        return {"file": self.path, "records": self.records, "skipped": self.skipped, "truncated": self.truncated}


def jsonl_records(path: str, report: DataReport) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; bad JSON or a non-object goes to `report`."""
    # Lines end at "\n" only: str.splitlines would also break at U+0085, U+2028 and other characters
    # JSON leaves unescaped inside strings, cutting a record in two.
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            report.bad(number, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(record, dict):
            report.bad(number, f"a record must be a JSON object, got {type(record).__name__}")
            continue
        yield number, record


# ---- pre-training: documents packed into rows ---------------------------------------------------

def read_documents(path: str, report: DataReport) -> list[str]:
    """A .jsonl file holds one document per line ({"text": ...}); any other file is plain text whose
    documents are separated by <|endoftext|> (a file without one is a single document)."""
    if path.endswith(".jsonl"):
        docs = []
        for number, record in jsonl_records(path, report):
            text = record.get("text")
            if not isinstance(text, str) or not text:
                report.bad(number, "a pre-training record needs a non-empty string field \"text\"")
                continue
            docs.append(text)
            report.records += 1
        return docs
    docs = [d for d in read_text(path).split(END_OF_DOCUMENT) if d.strip()]
    report.records += len(docs)
    return docs


def pack_documents(token_lists: list[list[int]], seq_len: int, eod_id: int, pad_id: int,
                   pack: bool = True) -> list[Row]:
    """Rows of `seq_len` tokens. Each document ends with <|endoftext|> (the model learns to end
    documents). Packed, documents follow each other across rows, and a document cut by a row's end
    continues in the next row as a new document (positions from 0; it cannot see its beginning).
    Unpacked, each document starts its own row. The last row is padded, so no token is dropped.
    The first token of each document is no target: nothing before it in its document predicts it."""
    rows, ids, docs = [], [], []

    def flush():
        n = len(ids)
        padded_ids = ids + [pad_id] * (seq_len - n)
        labels = [IGNORE_INDEX if i == 0 or docs[i] != docs[i - 1] else t for i, t in enumerate(ids)]
        rows.append(Row(padded_ids, labels + [IGNORE_INDEX] * (seq_len - n), docs + [PAD_DOCUMENT] * (seq_len - n)))
        ids.clear()
        docs.clear()

    for tokens in token_lists:
        tokens = tokens + [eod_id]
        if not pack and ids:
            flush()
        while tokens:
            doc = docs[-1] + 1 if docs else 0
            take = tokens[:seq_len - len(ids)]
            ids.extend(take)
            docs.extend([doc] * len(take))
            tokens = tokens[len(take):]
            if len(ids) == seq_len:
                flush()
    if ids:
        flush()
    return rows


def pretraining_rows(tokenizer, path: str, seq_len: int, pack: bool, report: DataReport) -> list[Row]:
    eod = tokenizer.token_to_id(END_OF_DOCUMENT)
    if eod is None:
        raise Qwen2Error(f"the tokenizer has no {END_OF_DOCUMENT} token to separate pre-training documents")
    docs = read_documents(path, report)
    from ..progress import progress_bar

    token_lists = [tokenizer.encode(d) for d in progress_bar(docs, desc="tokenizing", unit="doc")]
    return pack_documents(token_lists, seq_len, eod, tokenizer.pad_token_id, pack)


# ---- SFT: chat conversations, loss on the assistant's turns --------------------------------------

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages) -> str | None:
    """Why `messages` is not an OpenAI-style conversation with an assistant turn to learn, or None."""
    if not isinstance(messages, list) or not messages:
        return "\"messages\" must be a non-empty list of {\"role\": ..., \"content\": ...} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return f"message {i} must be an object whose \"role\" is one of {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"message {i} ({m['role']}) needs a string \"content\""
    if messages[0]["role"] == "assistant":
        return "the conversation starts with an assistant message; it must start with a system or user message"
    if not any(m["role"] == "assistant" for m in messages):
        return "the conversation has no assistant message to learn from"
    return None


def render_chat(tokenizer, messages: list[dict], train_on: str = "all") -> Row:
    """The conversation in the model's chat template, with labels on the assistant turns only:
    each reply's tokens and its closing <|im_end|>, not the `<|im_start|>assistant\\n` header nor the
    newline after. `train_on="last"` labels only the final assistant turn (DPO responses).

    Each turn's characters are found by rendering the conversation up to it (with the generation
    prompt: where the reply starts) and through it (up to its <|im_end|>); the tokens of the whole
    rendered text that overlap those characters are labelled. Tokenising the whole text at once
    gives exactly the tokens inference sees."""
    text = tokenizer.apply_chat_template(messages)
    spans = []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns[-1:] if train_on == "last" else turns:
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:i + 1])
        end = through.rfind(END_OF_TURN) + len(END_OF_TURN)
        if not (text.startswith(before) and text.startswith(through)) or end < len(before) + len(END_OF_TURN):
            raise Qwen2Error("the chat template does not render each turn as a prefix of the whole conversation "
                             f"ending in {END_OF_TURN}; SFT needs a ChatML template")
        spans.append((len(before), end))
    ids, offsets = tokenizer.encode_with_offsets(text)
    labels = [t if any(s < o_end and o_start < e for s, e in spans) else IGNORE_INDEX
              for t, (o_start, o_end) in zip(ids, offsets)]
    return Row(ids, labels, [0] * len(ids))


def truncate(row: Row, seq_len: int, report: DataReport) -> Row:
    if len(row) <= seq_len:
        return row
    report.truncated += 1
    return Row(row.input_ids[:seq_len], row.labels[:seq_len], row.doc_ids[:seq_len])


def has_targets(row: Row) -> bool:
    return any(t != IGNORE_INDEX for t in row.labels[1:])  # the first label is never predicted


def sft_rows(tokenizer, path: str, seq_len: int, report: DataReport) -> list[Row]:
    rows = []
    for number, record in jsonl_records(path, report):
        why = check_messages(record.get("messages"))
        if why:
            report.bad(number, why)
            continue
        row = truncate(render_chat(tokenizer, record["messages"]), seq_len, report)
        if not has_targets(row):
            report.bad(number, f"no assistant token is left within seq_len={seq_len}; raise seq_len")
            continue
        rows.append(row)
        report.records += 1
    return rows


# ---- DPO: preference pairs ---------------------------------------------------------------------

def as_messages(prompt) -> list[dict] | None:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return prompt if isinstance(prompt, list) else None


def as_reply(reply) -> str | None:
    if isinstance(reply, dict) and reply.get("role") == "assistant":
        reply = reply.get("content")
    return reply if isinstance(reply, str) else None


def preference_pairs(tokenizer, path: str, seq_len: int, report: DataReport) -> list[PreferencePair]:
    """{"prompt": str or messages, "chosen": str, "rejected": str} per line, optionally with
    precomputed "ref_chosen_logp" and "ref_rejected_logp" (then no reference model is needed; all
    records or none must have them)."""
    pairs, with_ref = [], None
    for number, record in jsonl_records(path, report):
        prompt = as_messages(record.get("prompt"))
        chosen, rejected = as_reply(record.get("chosen")), as_reply(record.get("rejected"))
        why = None
        if prompt is None or chosen is None or rejected is None:
            why = "a preference record needs \"prompt\" (string or messages), \"chosen\" and \"rejected\" (strings)"
        else:
            why = check_messages(prompt + [{"role": "assistant", "content": chosen}])
        refs = [record.get("ref_chosen_logp"), record.get("ref_rejected_logp")]
        has_ref = any(r is not None for r in refs)
        if not why and has_ref and not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in refs):
            why = "\"ref_chosen_logp\" and \"ref_rejected_logp\" must both be numbers"
        if not why and with_ref is not None and has_ref != with_ref:
            why = "precomputed reference log-probs must be given for all records or none"
        if why:
            report.bad(number, why)
            continue
        with_ref = has_ref
        rows = [truncate(render_chat(tokenizer, prompt + [{"role": "assistant", "content": reply}], "last"),
                         seq_len, report) for reply in (chosen, rejected)]
        if not all(has_targets(r) for r in rows):
            report.bad(number, f"no response token is left within seq_len={seq_len}; raise seq_len")
            continue
        pairs.append(PreferencePair(*rows, *(float(r) for r in refs) if has_ref else (None, None)))
        report.records += 1
    return pairs


# ---- batches -----------------------------------------------------------------------------------

@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) IGNORE_INDEX where no loss
    doc_ids: torch.Tensor  # (B, T) PAD_DOCUMENT for padding

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.labels.to(device), self.doc_ids.to(device))

    @property
    def num_targets(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return int((self.doc_ids != PAD_DOCUMENT).sum())


def collate(rows: list[Row], pad_id: int) -> Batch:
    """Right-pad rows to the longest one."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    docs = torch.full((len(rows), T), PAD_DOCUMENT, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r)
        ids[b, :n], labels[b, :n], docs[b, :n] = (torch.tensor(r.input_ids), torch.tensor(r.labels),
                                                 torch.tensor(r.doc_ids))
    return Batch(ids, labels, docs)


class ExampleOrder:
    """Which examples make micro-batch m: a pure function of (seed, m), so the data position of a
    run is just the number of micro-batches consumed, and a resumed run reads exactly what the
    uninterrupted one would have. Examples are visited in a fresh random order each epoch; an
    epoch's tail continues into the next epoch's head, so every micro-batch is full."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if num_examples == 0:
            raise Qwen2Error("the training data holds no usable example")
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen).tolist()
        return self._perm

    def at(self, i: int) -> int:
        """The i-th example the run reads."""
        return self._permutation(i // self.n)[i % self.n]

    def micro_batch(self, m: int) -> list[int]:
        first = m * self.batch_size
        return [self.at(i) for i in range(first, first + self.batch_size)]

    def epoch_of(self, m: int) -> float:
        return (m + 1) * self.batch_size / self.n
