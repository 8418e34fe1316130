"""Speculative decoding: greedy output token-identical to `decode_steps`, in fewer target forwards.

A drafter guesses the next k tokens cheaply; the target model checks all of them in one forward
over [last token, d1 .. dk] (T = k + 1) through its KV cache, keeps the longest prefix of the draft
that equals its own argmax at each position, adds its own next token, and rewinds its cache over
the rejected positions (`KVCache.rewind`). Every emitted token is the target's greedy choice, so
the text is exactly plain greedy decoding's; only the number of target forwards changes.

Drafters:
  `PromptLookupDrafter`  n-gram lookup in prompt + output: no second model. Suits code editing,
                         summaries, anything whose output copies the input.
  `DraftModelDrafter`    a smaller model with the same tokenizer proposes k greedy tokens from
                         its own KV cache (e.g. Qwen2.5-Coder-0.5B for the 1.5B). Its embedding
                         may have fewer rows than the target's (Qwen2's 0.5B/1.5B pad the
                         vocabulary to 151,936 rows, the 7B and 72B to 152,064): every row it
                         has is the same token, so it can only propose ids the target knows.

`speculative_steps` has `decode_steps`' contract (one (1,) LongTensor per token, up to
params.max_new_tokens), so `TextStream` ends on eos ids and stop strings exactly as it does for
plain decoding. Greedy only (temperature 0, repetition_penalty 1) and one prompt at a time.

Identity holds up to floating point: the verify forward computes T = k + 1 positions at once,
whose matmuls may round differently from T = 1 ones, so a near-exact tie between the two best
logits could in principle break the other way. Steps without a draft are the very same T = 1
forward as plain decoding.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import torch

from ..errors import Qwen2Error
from ..model import Transformer
from .decoder import EagerDecoder
from .executor import as_decoder
from .generate import SamplingParams, check_fits, greedy_choice

SPECULATIVE_METHODS = ("prompt-lookup",)
DEFAULT_NUM_DRAFT_TOKENS = {"prompt-lookup": 10, "draft-model": 5}


@dataclass
class SpeculationStats:
    """Counts of one speculative run. After a run to max_new_tokens:
    generated == 1 (from the prefill) + accepted + verify_forwards + plain_forwards."""
    proposed: int = 0  # draft tokens the target checked
    accepted: int = 0  # of those, equal to the target's own greedy choice (hence emitted)
    verify_forwards: int = 0  # target forwards over a draft (T = draft length + 1)
    plain_forwards: int = 0  # target forwards with no draft to check (T = 1, as plain decoding)
    generated: int = 0  # tokens yielded

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def target_forwards(self) -> int:
        """Target forwards after the prefill; plain decoding needs generated - 1."""
        return self.verify_forwards + self.plain_forwards

    def as_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate, "target_forwards": self.target_forwards}


class Drafter:
    """Proposes draft tokens. `stats` holds the counts of the latest `speculative_steps` run."""

    num_draft_tokens: int

    def __init__(self, num_draft_tokens: int):
        if not isinstance(num_draft_tokens, int) or isinstance(num_draft_tokens, bool) or num_draft_tokens < 1:
            raise Qwen2Error(f"num_draft_tokens must be an integer >= 1, not {num_draft_tokens!r}")
        self.num_draft_tokens = num_draft_tokens
        self.stats = SpeculationStats()

    def start(self, target: Transformer, prompt: Sequence[int], max_len: int) -> None:
        """A new sequence begins; it will never grow past `max_len` tokens."""

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k guesses of the tokens that follow `tokens` (the prompt and every token emitted)."""
        raise NotImplementedError


class PromptLookupDrafter(Drafter):
    """Prompt-lookup decoding: find the most recent earlier occurrence of the last n tokens
    (n = max_ngram down to 1) in prompt + output and propose the tokens that followed it."""

    def __init__(self, max_ngram: int = 3, num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS["prompt-lookup"]):
        super().__init__(num_draft_tokens)
        if not isinstance(max_ngram, int) or isinstance(max_ngram, bool) or max_ngram < 1:
            raise Qwen2Error(f"max_ngram must be an integer >= 1, not {max_ngram!r}")
        self.max_ngram = max_ngram

    def propose(self, tokens: list[int], k: int) -> list[int]:
        L = len(tokens)
        for n in range(min(self.max_ngram, L - 1), 0, -1):
            pattern = tokens[L - n:]
            first = pattern[0]
            for i in range(L - n - 1, -1, -1):  # the match must end before the last token
                if tokens[i] == first and tokens[i:i + n] == pattern:
                    return tokens[i + n:i + n + k]
        return []


class DraftModelDrafter(Drafter):
    """A draft model (a `Qwen2` from `qwen2.load`, or a `Transformer`) with the target's tokenizer
    proposes k greedy tokens, through its own KV cache, rewound like the target's. A token of the
    target's beyond the draft's rows (a padding row, never a real token of a shared tokenizer) is
    read by the draft as token 0: only its guesses can suffer, never the output."""

    def __init__(self, draft_model, num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS["draft-model"]):
        super().__init__(num_draft_tokens)
        model = draft_model if isinstance(draft_model, (Transformer, EagerDecoder)) else \
            getattr(draft_model, "decoder", None)
        if not isinstance(model, (Transformer, EagerDecoder)):
            raise Qwen2Error("draft_model must be a Qwen2 from qwen2.load (or a Transformer), "
                             f"not {type(draft_model).__name__}")
        self.model = as_decoder(model)
        self.cache = None
        self.cached: list[int] = []  # the tokens in self.cache, slot by slot
        self.rows = self.model.config.vocab_size

    def start(self, target: Transformer, prompt: Sequence[int], max_len: int) -> None:
        check_vocab_compatible(target.config.vocab_size, self.model.config.vocab_size)
        context = self.model.config.max_position_embeddings
        if max_len > context:
            raise Qwen2Error(f"prompt + max_new_tokens ({max_len} tokens) exceeds the draft model's context length "
                             f"of {context} tokens; shorten the prompt or lower max_new_tokens")
        self.cache = self.model.new_cache(1, max_len)
        self.cached = []

    def propose(self, tokens: list[int], k: int) -> list[int]:
        # Keep the longest cached prefix of `tokens` (rejected draft tokens go), but always feed at
        # least one token so there are logits to start from.
        keep, limit = 0, min(len(self.cached), len(tokens) - 1)
        while keep < limit and self.cached[keep] == tokens[keep]:
            keep += 1
        self.cache.rewind(len(self.cached) - keep)
        del self.cached[keep:]
        device = self.model.device
        feed = tokens[keep:]
        draft: list[int] = []
        with torch.inference_mode():
            while True:
                readable = [t if t < self.rows else 0 for t in feed]
                logits = self.model(torch.tensor([readable], device=device), cache=self.cache, last_only=True)
                self.cached += feed
                draft.append(int(greedy_choice(logits[0, -1].float())))
                if len(draft) == k:
                    return draft
                feed = draft[-1:]


def check_vocab_compatible(target_vocab: int, draft_vocab: int) -> None:
    """A draft's vocabulary may be the target's or a prefix of it (fewer padding rows), not larger:
    it could propose ids the target has no row for."""
    if draft_vocab > target_vocab:
        raise Qwen2Error(f"draft model's vocabulary ({draft_vocab} rows) is larger than the target's ({target_vocab}); "
                         "a draft model must share the target's tokenizer, with at most as many embedding rows")


def check_greedy(params: SamplingParams) -> None:
    if params.temperature != 0 or params.repetition_penalty != 1.0:
        raise Qwen2Error(f"speculative decoding is greedy only: use temperature=0 and repetition_penalty=1 "
                         f"(got temperature={params.temperature}, repetition_penalty={params.repetition_penalty})")


def speculative_steps(model: Transformer, prompt_ids: Sequence[int], params: SamplingParams,
                      drafter: Drafter) -> Iterator[torch.Tensor]:
    """Yield the target's greedy tokens one at a time, each a LongTensor of shape (1,), up to
    params.max_new_tokens: the same tokens `decode_steps(model, [prompt_ids], params)` yields.
    Counts go to `drafter.stats` (reset at the start of each run)."""
    check_greedy(params)
    prompt = [int(t) for t in prompt_ids]
    model = as_decoder(model)
    check_fits(model, [len(prompt)], params.max_new_tokens)
    stats = drafter.stats = SpeculationStats()
    device, vocab = model.device, model.config.vocab_size
    max_len = len(prompt) + params.max_new_tokens
    # inference_mode is entered per call, never across a `yield`, so it does not leak into the caller
    with torch.inference_mode():
        drafter.start(model, prompt, max_len)
        cache = model.new_cache(1, max_len)
        logits = model(torch.tensor([prompt], device=device), cache=cache, last_only=True)
        cache.exact_rows = True  # verification attends as plain decoding's one-token steps do
        token = int(greedy_choice(logits[0, -1].float()))
    tokens = prompt + [token]
    stats.generated += 1
    yield torch.tensor([token], device=device)
    while stats.generated < params.max_new_tokens:
        # Never draft past max_new_tokens: this step emits up to k + 1 tokens, and the cache
        # (the prompt + every emitted token but the last) stays within max_len.
        k = min(drafter.num_draft_tokens, params.max_new_tokens - stats.generated - 1)
        draft = [int(t) for t in drafter.propose(tokens, k)[:k]] if k > 0 else []
        if any(not 0 <= t < vocab for t in draft):
            raise Qwen2Error(f"drafter proposed a token id outside the vocabulary (0..{vocab - 1}): {draft}")
        with torch.inference_mode():
            logits = model(torch.tensor([tokens[-1:] + draft], device=device), cache=cache)  # (1, 1 + d, V)
            choices = greedy_choice(logits[0].float()).tolist()  # the target's greedy token after each position
            accepted = 0
            while accepted < len(draft) and draft[accepted] == choices[accepted]:
                accepted += 1
            cache.rewind(len(draft) - accepted)  # the target's cache now ends with the last accepted token
        if draft:
            stats.verify_forwards += 1
            stats.proposed += len(draft)
            stats.accepted += accepted
        else:
            stats.plain_forwards += 1
        for t in draft[:accepted] + [choices[accepted]]:
            tokens.append(t)
            stats.generated += 1
            yield torch.tensor([t], device=device)


def steps_with(drafter: Drafter):
    """A steps factory for `generate.stream_rows` / `generate_text` (one prompt only)."""
    def steps(model, prompts, params, pad_id=0):
        if len(prompts) != 1:
            raise Qwen2Error("speculative decoding takes one prompt, not a list")
        return speculative_steps(model, prompts[0], params, drafter)
    return steps


def make_drafter(speculative=None, draft_model=None, num_draft_tokens: int | None = None) -> Drafter | None:
    """The drafter for `Qwen2.generate`'s options: speculative="prompt-lookup" (or a Drafter),
    or draft_model (a loaded Qwen2 or Transformer); None when neither is given."""
    if speculative is not None and draft_model is not None:
        raise Qwen2Error("give either speculative='prompt-lookup' or draft_model, not both")
    if speculative is None and draft_model is None:
        if num_draft_tokens is not None:
            raise Qwen2Error("num_draft_tokens needs speculative='prompt-lookup' or a draft_model")
        return None
    if isinstance(speculative, Drafter):
        if num_draft_tokens is not None:
            raise Qwen2Error("num_draft_tokens is the drafter's own setting; set it when creating the drafter")
        return speculative
    if draft_model is not None:
        return DraftModelDrafter(draft_model, DEFAULT_NUM_DRAFT_TOKENS["draft-model"] if num_draft_tokens is None
                                 else num_draft_tokens)
    if speculative == "prompt-lookup":
        return PromptLookupDrafter(num_draft_tokens=DEFAULT_NUM_DRAFT_TOKENS["prompt-lookup"] if num_draft_tokens is None
                                   else num_draft_tokens)
    if isinstance(speculative, (str, os.PathLike)):
        raise Qwen2Error(f"unknown speculative method {speculative!r}; use {', '.join(SPECULATIVE_METHODS)}, "
                         "or draft_model=... for a draft model")
    raise Qwen2Error(f"speculative must be one of {', '.join(SPECULATIVE_METHODS)} or a Drafter, "
                     f"not {type(speculative).__name__}")
