"""Sliding-window perplexity with the stride convention of Hugging Face's perplexity guide.

Windows of `context` tokens start every `stride` tokens; each window scores only the tokens the
previous window did not reach, so every token is scored once, by the window that gives it the most
context within the budget:

    tokens       0 1 2 3 4 5 6 7 8 9          context 4, stride 2
    window 0     [0 1 2 3]       scores 1 2 3  (token 0 has no context: never scored)
    window 1         [2 3 4 5]   scores 4 5    (with at least context - stride = 2 tokens before)
    window 2             [4 5 6 7]    6 7
    window 3                 [6 7 8 9]  8 9    (the last window ends at the text's end)

A window's first token has nothing before it in that window, so it is never scored there: with
stride == context (disjoint windows) the first token of every window goes unscored, as in the guide.
perplexity = exp(sum of negative log-likelihoods / number of scored tokens).

`perplexity_of_documents` pools several documents (held-out texts scored separately, so no window
spans two of them) into one perplexity over all their scored tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..errors import Qwen2Error
from ..progress import progress_bar


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # total negative log-likelihood, nats
    scored: int  # tokens scored
    tokens: int  # tokens in the text
    windows: int
    context: int
    stride: int

    @property
    def mean_nll(self) -> float:
        return self.nll / self.scored


def windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over n_tokens tokens."""
    if not (isinstance(context, int) and isinstance(stride, int) and context >= 2 and 1 <= stride <= context):
        raise Qwen2Error(f"need context >= 2 and 1 <= stride <= context, got context={context}, stride={stride}; "
                         "a stride above the context would leave tokens unscored")
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        yield begin, end, max(prev_end, begin + 1)
        prev_end = end
        if end == n_tokens:
            return


@torch.no_grad()
def perplexity(model, ids: Sequence[int], context: int | None = None, stride: int | None = None,
               progress: bool = False) -> Perplexity:
    """Perplexity of `model` (a qwen2 Transformer) on token ids. context defaults to the model's
    max_position_embeddings (capped at 4096), stride to half the context."""
    n = len(ids)
    if n < 2:
        raise Qwen2Error(f"perplexity needs at least 2 tokens of text, got {n}")
    if context is None:  # not `or`: an explicit 0 is an error (windows() says so), not the default
        context = min(model.config.max_position_embeddings, 4096)
    if context > model.config.max_position_embeddings:
        raise Qwen2Error(f"context {context} exceeds the model's {model.config.max_position_embeddings} positions")
    if stride is None:
        stride = max(1, context // 2)
    spans = list(windows(n, context, stride))
    all_ids = torch.tensor(list(ids), dtype=torch.long, device=model.device)
    nll, scored = 0.0, 0
    for begin, end, first in progress_bar(spans, desc="perplexity", unit="window", disable=not progress):
        logits = model(all_ids[None, begin:end])[0]  # (T, V)
        # logits at position t predict token t + 1: the scored tokens [first, end) come from [first-1, end-1)
        predicted = logits[first - 1 - begin:end - 1 - begin].float()
        nll += F.cross_entropy(predicted, all_ids[first:end], reduction="sum").item()
        scored += end - first
    return Perplexity(math.exp(nll / scored), nll, scored, n, len(spans), context, stride)


def perplexity_of_documents(model, documents: Sequence[Sequence[int]], context: int | None = None,
                            stride: int | None = None, max_tokens: int | None = None,
                            progress: bool = False) -> Perplexity:
    """One perplexity over several documents (token ids), each windowed on its own as `perplexity`
    does: the pooled mean NLL of every scored token. `max_tokens` spreads a budget evenly, the
    first max_tokens / len(documents) tokens of each (at least 2), so every document weighs alike."""
    if not documents:
        raise Qwen2Error("perplexity_of_documents needs at least one document")
    per_document = None if max_tokens is None else max(2, max_tokens // len(documents))
    parts = [perplexity(model, list(ids)[:per_document], context, stride, progress) for ids in documents]
    nll, scored = sum(p.nll for p in parts), sum(p.scored for p in parts)
    return Perplexity(math.exp(nll / scored), nll, scored, sum(p.tokens for p in parts),
                      sum(p.windows for p in parts), parts[0].context, parts[0].stride)
