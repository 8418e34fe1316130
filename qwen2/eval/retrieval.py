"""Synthetic long-context retrieval: a fact (the "needle") hidden at a chosen depth in filler text of
a chosen token length, then a question about it.

    passkey   the classic test (Mohtashami & Jaggi 2023, "Landmark Attention"): a 5-digit pass key in
              repeated grass-is-green filler; "What is the pass key? The pass key is"
    needle    RULER-style: "One of the special magic numbers for <word> is: <7 digits>." in the
              same filler, asked back by the word

One generator, `haystack_prompt`, builds both (and whatever needle a caller brings); the
long-context work reuses it. The prompt's token length is the one requested to within a few
tokens; `depth` 0.0 puts the needle right after the task description, 1.0 right before the question,
at the filler sentence boundary nearest to that fraction of the filler tokens.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

from ..errors import Qwen2Error
from ..long_context import context_length
from ..progress import progress_bar

TASK = ("There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about the important information there.")
FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.")
_WORDS = ("apple", "river", "candle", "falcon", "marble", "violet", "harbor", "pepper", "lantern", "meadow",
          "copper", "willow", "thunder", "saffron", "glacier", "orchid", "compass", "velvet", "cactus", "ember")


@dataclass
class RetrievalPrompt:
    prompt: str  # the text to give the model (chat template applied if chat=True)
    answer: str  # what a correct reply contains
    tokens: int  # the prompt's length in tokens
    needle_token: int  # tokens of the prompt before the needle
    depth: float


def _sentences() -> list[str]:
    return re.findall(r" [^.]*\.", FILLER)


def _wrap(tokenizer, text: str, chat: bool) -> str:
    if not chat:
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)


def haystack_prompt(tokenizer, length_tokens: int, depth: float, needle: str, question: str, answer: str,
                    chat: bool = False) -> RetrievalPrompt:
    """TASK + filler with `needle` at `depth` + `question`, `length_tokens` tokens long in all
    (chat template included when chat=True)."""
    if not 0.0 <= depth <= 1.0:
        raise Qwen2Error(f"depth must be between 0.0 (start) and 1.0 (end), got {depth}")
    head, needle, question = TASK, " " + needle.strip(), "\n\n" + question.strip()
    fixed = len(tokenizer.encode(_wrap(tokenizer, head + needle + question, chat)))
    budget = length_tokens - fixed
    if budget < 0:
        raise Qwen2Error(f"length {length_tokens} tokens is too short: the task, needle and question alone "
                         f"take {fixed}; ask for at least {fixed}")
    # Filler token ids, sentence after sentence, cut to the budget. Every sentence starts with a
    # space and a word, which the pre-tokeniser always splits at, so the sentences' token ids
    # simply concatenate; sentence_ends marks where the needle may go.
    pieces = [tokenizer.encode(s) for s in _sentences()]
    filler, sentence_ends = [], [0]
    while len(filler) < budget + 64:
        for piece in pieces:
            filler += piece
            sentence_ends.append(len(filler))
    for _ in range(4):  # the joins may merge or split a token or two: correct the budget and rebuild
        built = _assemble(tokenizer, head, needle, question, filler[:budget], sentence_ends, depth, chat)
        if built.tokens == length_tokens or budget + length_tokens - built.tokens < 0:
            break
        budget += length_tokens - built.tokens
    return RetrievalPrompt(built.prompt, answer, built.tokens, built.needle_token, depth)


def _assemble(tokenizer, head: str, needle: str, question: str, filler: list[int], sentence_ends: list[int],
              depth: float, chat: bool) -> RetrievalPrompt:
    target = depth * len(filler)
    cut = min((e for e in sentence_ends if e <= len(filler)), key=lambda e: abs(e - target))
    before, after = tokenizer.decode(filler[:cut]), tokenizer.decode(filler[cut:])
    prompt = _wrap(tokenizer, head + before + needle + after + question, chat)
    needle_at = prompt.index(head + before) + len(head + before)
    return RetrievalPrompt(prompt, "", len(tokenizer.encode(prompt)), len(tokenizer.encode(prompt[:needle_at])), depth)


def passkey_prompt(tokenizer, length_tokens: int, depth: float, seed: int = 0, chat: bool = False) -> RetrievalPrompt:
    """The passkey test: a random 5-digit key (from `seed`) at `depth` of `length_tokens` tokens."""
    key = str(random.Random(seed).randint(10000, 99999))
    return haystack_prompt(tokenizer, length_tokens, depth, f"The pass key is {key}. Remember it. {key} is the pass key.",
                           "What is the pass key? The pass key is", key, chat=chat)


def needle_prompt(tokenizer, length_tokens: int, depth: float, seed: int = 0, chat: bool = False) -> RetrievalPrompt:
    """A RULER-style needle: a random 7-digit "magic number" for a random word, asked back by the word."""
    rng = random.Random(seed)
    word, number = rng.choice(_WORDS), str(rng.randint(1_000_000, 9_999_999))
    return haystack_prompt(tokenizer, length_tokens, depth, f"One of the special magic numbers for {word} is: {number}.",
                           f"What is the special magic number for {word} mentioned in the provided text? "
                           f"The special magic number for {word} mentioned in the provided text is", number, chat=chat)


def retrieved(reply: str, answer: str) -> bool:
    """Whether the reply gives the answer: the answer is the first number in it (so "12345" is
    right for 12345 but "123456" or "1, 12345" are not)."""
    numbers = re.findall(r"\d+", reply)
    return bool(numbers) and numbers[0] == answer


def fitting_length(length: int, max_new_tokens: int, context: int | None) -> int:
    """The prompt length that tests a model of `context` positions at `length` tokens: prompt and
    reply must both fit, so a length within the last max_new_tokens of the context gives up those
    tokens (a "32K" prompt for a 32,768-position model is 32,752 tokens). Other lengths, and any
    length when the context is unbounded (None), are taken as they are."""
    if context is not None and context - max_new_tokens < length <= context:
        return context - max_new_tokens
    return length


PROMPTS = {"passkey": passkey_prompt, "needle": needle_prompt}


def run(m, kind: str, lengths: Sequence[int], depths: Sequence[float], trials: int = 1, chat: bool | None = None,
        max_new_tokens: int = 16, progress: bool = True) -> list[dict]:
    """Greedy replies to `trials` prompts (seeds 0..trials-1) at every length x depth; one record
    each: length, depth, seed, tokens, answer, reply, correct. A length at the model's context is
    cut to leave room for the reply (`fitting_length`)."""
    if kind not in PROMPTS:
        raise Qwen2Error(f"unknown retrieval test {kind!r}; use one of {', '.join(PROMPTS)}")
    chat = m.tokenizer.chat_template is not None if chat is None else chat
    context = context_length(m.config)
    cases = [(n, d, s) for n in lengths for d in depths for s in range(trials)]
    records = []
    for length, depth, seed in progress_bar(cases, desc=kind, unit="prompt", disable=not progress):
        p = PROMPTS[kind](m.tokenizer, fitting_length(length, max_new_tokens, context), depth, seed=seed, chat=chat)
        reply = m.generate(p.prompt, max_new_tokens=max_new_tokens, temperature=0.0)
        records.append({"length": length, "depth": depth, "seed": seed, "tokens": p.tokens, "answer": p.answer,
                        "reply": reply, "correct": retrieved(reply, p.answer)})
    return records


def table(records: Sequence[dict]) -> str:
    """Accuracy per length (rows) and depth (columns), as a markdown table."""
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    lines = ["| tokens | " + " | ".join(f"depth {d:g}" for d in depths) + " |",
             "|---:|" + "---:|" * len(depths)]
    for n in lengths:
        cells = []
        for d in depths:
            hits = [r["correct"] for r in records if r["length"] == n and r["depth"] == d]
            cells.append(f"{sum(hits)}/{len(hits)}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
