"""Log-likelihoods of a question's choices, as lm-eval's HF model computes them, with the context's
key/value cache computed once and reused.

lm-eval scores a choice as the sum of log p(continuation token | everything before it) over
context + continuation, the context's trailing whitespace moved into the continuation and the pair
encoded whole and split at the context's token count (`encode_pair`). Every choice of a question
shares those context tokens, and consecutive questions of a subject share their few-shot prefix, so:

  1. the context is run once, on top of the longest prefix it shares with the previous context (the
     cache is rewound to that prefix): the last context token's logits score every continuation's
     first token, so one-token answers (" A", " B", ...) need nothing more;
  2. longer continuations run together, one row each, against a copy of the context's cache
     (`branch`), their first token already scored.

The result equals one whole forward per choice to float rounding. A pair longer than `max_length`
is scored as lm-eval's adapter does (the sequence cut on the left, no cache).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..model.cache import KVCache


def encode_pair(tokenizer, context: str, continuation: str, eot_id: int) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's TemplateLM makes them; an empty context is the
    end-of-text token (or the continuation's first token when that is end-of-text already)."""
    if not context:
        ids = tokenizer.encode(continuation)
        return (ids[:1], ids[1:]) if ids and ids[0] == eot_id else ([eot_id], ids)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def branch(prefix: KVCache, model, rows: int, room: int) -> KVCache:
    """A cache of `rows` rows, each holding the one-row `prefix`'s tokens, with `room` free slots."""
    n = prefix.length
    cache = model.new_cache(rows, n + room)
    cache.k[:, :, :, :n] = prefix.k[:, :1, :, :n]  # broadcast over the rows
    cache.v[:, :, :, :n] = prefix.v[:, :1, :, :n]
    cache.valid[:, :n] = prefix.valid[:1, :n]
    cache.positions[:] = prefix.positions[0]
    cache.length = n
    return cache


class ChoiceScorer:
    """Scores (context ids, continuation ids) pairs with `model` (a `qwen2.model.Transformer`),
    keeping the last context's cache for the next call. `stats` counts the context tokens asked for
    and those actually run (the rest came from the cache)."""

    def __init__(self, model, max_length: int, batch_size: int = 8):
        self.model, self.max_length, self.batch_size = model, max_length, max(1, batch_size)
        self.cache: KVCache | None = None
        self.cached: list[int] = []  # the tokens whose keys/values `cache` holds
        self.stats = {"context_tokens": 0, "context_tokens_run": 0, "continuation_rows": 0}

    @torch.inference_mode()
    def loglikelihoods(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[float]:
        results: list[float | None] = [None] * len(pairs)
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (context, continuation) in enumerate(pairs):
            if not context or not continuation:
                raise ValueError("a choice needs a context and a non-empty continuation")
            if len(context) + len(continuation) - 1 > self.max_length:
                results[i] = self._truncated(context, continuation)
            else:
                by_context.setdefault(tuple(context), []).append(i)
        for context, members in by_context.items():
            first = self._run_context(list(context))
            for i in members:
                results[i] = first[pairs[i][1][0]].item()
            longer = [i for i in members if len(pairs[i][1]) > 1]
            for start in range(0, len(longer), self.batch_size):
                chunk = longer[start:start + self.batch_size]
                for i, rest in zip(chunk, self._run_continuations([pairs[i][1] for i in chunk])):
                    results[i] += rest
        return results  # type: ignore[return-value]

    def _run_context(self, context: list[int]) -> torch.Tensor:
        """log p(next token) after `context` (V,), running only what the cache does not hold; the
        last token always runs, since its logits are what is needed."""
        if self.cache is None:
            self.cache = self.model.new_cache(1, self.max_length)
        keep = min(shared_prefix(self.cached, context), len(context) - 1)
        self.cache.rewind(self.cache.length - keep)
        self.cached = context[:keep]
        ids = torch.tensor([context[keep:]], device=self.model.device)
        logits = self.model(ids, cache=self.cache, last_only=True)  # (1, 1, V)
        self.cached = context
        self.stats["context_tokens"] += len(context)
        self.stats["context_tokens_run"] += len(context) - keep
        return F.log_softmax(logits[0, -1].float(), dim=-1)

    def _run_continuations(self, continuations: list[list[int]]) -> list[float]:
        """log p of each continuation's tokens after its first, given the cached context: one row per
        continuation, right-padded (a padded slot comes after every real one, so none sees it)."""
        inputs = [c[:-1] for c in continuations]  # the last token is only predicted
        T = max(len(x) for x in inputs)
        ids = torch.zeros(len(inputs), T, dtype=torch.long)
        mask = torch.zeros(len(inputs), T, dtype=torch.bool)
        for row, x in enumerate(inputs):
            ids[row, :len(x)], mask[row, :len(x)] = torch.tensor(x), True
        device = self.model.device
        cache = branch(self.cache, self.model, len(inputs), T)
        logits = self.model(ids.to(device), attention_mask=None if bool(mask.all()) else mask.to(device), cache=cache)
        self.stats["continuation_rows"] += len(inputs)
        out = []
        for row, c in enumerate(continuations):
            targets = torch.tensor(c[1:], device=logits.device)
            logprobs = F.log_softmax(logits[row, :len(targets)].float(), dim=-1)
            out.append(logprobs.gather(-1, targets[:, None]).sum().item())
        return out

    def _truncated(self, context: list[int], continuation: list[int]) -> float:
        whole = (context + continuation)[-(self.max_length + 1):]
        logits = self.model(torch.tensor([whole[:-1]], device=self.model.device))
        targets = torch.tensor(continuation, device=logits.device)
        logprobs = F.log_softmax(logits[0, -len(targets):].float(), dim=-1)
        return logprobs.gather(-1, targets[:, None]).sum().item()
