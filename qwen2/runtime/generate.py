"""Decoding: prefill the prompt into a KV cache, then one token at a time.

Three layers, each usable alone:
  `next_token`     logits -> token ids (greedy, temperature, top-k, top-p, min-p, repetition penalty)
  `decode_steps`   token ids in, a stream of next-token rows out (batched, left-padded)
  `generate_text`  text in, text out (eos ids, stop strings, streaming without broken characters)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Iterator, Sequence

import torch

from ..errors import Qwen2Error
from ..long_context import context_length
from .executor import as_decoder

MIN_TEMPERATURE = 1e-5  # sampling below it is sampling at it (see sampling_distribution)
# A repetition penalty outside this range acts as its bound (see apply_repetition_penalty)
REPETITION_PENALTY_RANGE = (1e-5, 1e5)


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; HF's rule: divide positive logits, multiply negative ones
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be an integer >= 1"),
            (_finite(self.temperature) and self.temperature >= 0, "temperature must be >= 0 (0 means greedy)"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 turns it off)"),
            (_finite(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1] (1 turns it off)"),
            (_finite(self.min_p) and 0 <= self.min_p < 1, "min_p must be in [0, 1) (0 turns it off)"),
            (_finite(self.repetition_penalty) and self.repetition_penalty > 0,
             "repetition_penalty must be > 0 (1 turns it off)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise Qwen2Error(f"invalid sampling parameter: {message}")

    @classmethod
    def from_generation_config(cls, gen: dict, **overrides) -> "SamplingParams":
        """Defaults from a generation_config.json (sampling only when it sets do_sample), then overrides."""
        kwargs = {}
        if gen.get("do_sample"):
            kwargs = {k: gen[k] for k in ("temperature", "top_k", "top_p", "min_p") if gen.get(k) is not None}
        if gen.get("repetition_penalty") is not None:
            kwargs["repetition_penalty"] = gen["repetition_penalty"]
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise Qwen2Error(f"unknown sampling option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def greedy_choice(logits: torch.Tensor) -> torch.Tensor:
    """The index of the largest logit along the last dim, the first one on ties (NaN counting as
    largest): argmax's result. Through `max(-1)`, whose CPU reduction is vectorised where argmax's
    is not: ~70 against ~250 µs over a 151,936-token vocabulary here, on every decode step."""
    return logits.max(-1).indices


def next_token(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). `seen` (B, V) marks tokens already in each row's context,
    for the repetition penalty."""
    if params.temperature == 0:
        return greedy_choice(apply_repetition_penalty(logits.float(), params, seen))
    return draw(sampling_distribution(logits, params, seen), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` (B, V), drawn by inverting each row's cumulative distribution
    at a uniform point: the same law as torch.multinomial at ~1/20 of its time over a 151,936-token
    vocabulary (~3 against ~60 ms for 16 rows on one core). A token of probability 0 is never
    drawn: the first index whose cumulative sum exceeds u always adds mass."""
    cumulative = probs.cumsum(-1)  # (B, V)
    total = cumulative[..., -1:]  # (B, 1), 1 up to rounding
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=probs.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total even after rounding
    return torch.searchsorted(cumulative, u, right=True).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    if params.repetition_penalty == 1.0 or seen is None:
        return logits
    # A penalty of 1e5 already ranks every seen token below the unseen ones (and 1e-5 above); a more
    # extreme one (an API accepts 5e-324) would scale finite logits to inf and the softmax to NaN.
    low, high = REPETITION_PENALTY_RANGE
    penalty = min(max(params.repetition_penalty, low), high)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


TOP_P_SHORTLIST = 64  # the candidates top-p sorts first; a flatter distribution widens it


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """`logits` (B, V) with -inf for every token outside the nucleus: a token is dropped once the
    tokens ranked above it already hold `top_p` of the mass; the most likely one always stays.

    Sorting all 151,936 logits of every row at every step costs more than a batched decode step,
    while the nucleus is nearly always a few tokens: the top TOP_P_SHORTLIST are sorted first, and
    only when they hold less than top_p is the shortlist widened (up to the whole vocabulary). Every
    token past a shortlist that holds top_p is dropped, as the full sort would drop it."""
    probs = logits.softmax(-1)
    vocab = logits.shape[-1]
    k = min(TOP_P_SHORTLIST, vocab)
    while True:
        top, order = probs.topk(k, dim=-1)  # (B, k), most likely first
        mass_above = top.cumsum(-1) - top  # (B, k) the mass of the tokens ranked above each
        if k == vocab or bool((mass_above[..., -1] + top[..., -1] >= top_p).all()):
            break
        k = min(k * 16, vocab)
    keep_top = mass_above < top_p
    keep_top[..., 0] = True  # even for a top_p that rounds to 0 in fp32 (5e-324 does)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, keep_top)
    return logits.masked_fill(~keep, -math.inf)


def sampling_distribution(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The probabilities sampling draws from, (B, V). Order as in HF: repetition penalty,
    temperature, top-k, top-p, min-p."""
    # A temperature this small is already argmax (ties aside); a smaller one (an API accepts 1e-300)
    # would scale finite logits to inf and the softmax to NaN, so it is taken as this one, as vLLM does.
    logits = apply_repetition_penalty(logits.float(), params, seen) / max(params.temperature, MIN_TEMPERATURE)
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p > 0:
        # keep tokens at least min_p times as likely as the most likely one
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, -math.inf)
    return logits.softmax(-1)


def check_fits(model, prompt_lengths: Sequence[int], max_new_tokens: int) -> None:
    if any(n == 0 for n in prompt_lengths):
        raise Qwen2Error("empty prompt: give at least one token of text")
    context = context_length(model.config)  # more than max_position_embeddings under YaRN rope_scaling
    longest = max(prompt_lengths)
    if longest + max_new_tokens > context:
        raise Qwen2Error(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                         f"length of {context} tokens; shorten the prompt or lower max_new_tokens")


def decode_steps(model, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 pad_id: int = 0, choose=next_token) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) per step, up to params.max_new_tokens steps.
    Prompts of different lengths are left-padded; the caller stops iterating when done.
    `choose` has `next_token`'s signature and picks each step's tokens (structured output passes
    `qwen2.runtime.constrained.constrained_choice(...)`, which masks each row's logits first)."""
    model = as_decoder(model)  # a bare model runs through its fastest executor
    check_fits(model, [len(p) for p in prompts], params.max_new_tokens)
    B, T = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, T - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, T - len(prompt):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(model.device).manual_seed(params.seed)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=model.device)
        seen.scatter_(1, ids, mask.bool())
    # inference_mode is entered per call, never across a `yield`, so it does not leak into the caller
    with torch.inference_mode():
        cache = model.new_cache(B, T + params.max_new_tokens)
        logits = model(ids, attention_mask=None if bool(mask.all()) else mask, cache=cache, last_only=True)
    for step in range(params.max_new_tokens):
        with torch.inference_mode():
            token = choose(logits[:, -1], params, seen, generator)  # (B,)
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
        yield token
        if step + 1 < params.max_new_tokens:
            with torch.inference_mode():
                logits = model(token[:, None], cache=cache)


class TextStream:
    """Turns one row's tokens into text: stops at an end token or a stop string and never emits
    half a UTF-8 character or the beginning of what may turn out to be a stop string."""

    def __init__(self, tokenizer, eos_ids: Sequence[int], stop: Sequence[str]):
        self.decoder = tokenizer.stream_decoder()
        self.eos_ids = set(eos_ids)
        self.stop = list(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # chars a stop string could still need
        self.text = ""  # decoded so far, not yet emitted
        self.done = False
        self.finish_reason: str | None = None
        self.n_tokens = 0

    def push(self, token: int) -> str:
        """Text that is now final, possibly empty."""
        if self.done:
            return ""
        self.n_tokens += 1
        if token in self.eos_ids:
            return self._finish("stop", self.text + self.decoder.flush())
        self.text += self.decoder.push(token)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                return self._finish("stop", self.text[:at])
        cut = len(self.text) - self.hold
        ready, self.text = self.text[:max(cut, 0)], self.text[max(cut, 0):]
        return ready

    def close(self) -> str:
        """At the token limit: whatever is left."""
        return "" if self.done else self._finish("length", self.text + self.decoder.flush())

    def _finish(self, reason: str, text: str) -> str:
        self.done, self.finish_reason, self.text = True, reason, ""
        return text


def stream_rows(model, tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams,
                eos_ids: Sequence[int], steps=None) -> Iterator[tuple[int, str]]:
    """Yield (row, text piece) as tokens are generated, until every row has finished.
    `steps(model, prompts, params, pad_id=...)` makes the token stream; `decode_steps` by default
    (`qwen2.runtime.speculative` passes its own, with the same contract)."""
    rows = [TextStream(tokenizer, eos_ids, params.stop) for _ in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for token in (steps or decode_steps)(model, prompts, params, pad_id=pad_id):
        for row, t in enumerate(token.tolist()):
            piece = rows[row].push(t)
            if piece:
                yield row, piece
        if all(r.done for r in rows):
            return
    for row, r in enumerate(rows):
        piece = r.close()
        if piece:
            yield row, piece


def generate_text(model, tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams,
                  eos_ids: Sequence[int], steps=None) -> list[str]:
    texts = [""] * len(prompts)
    for row, piece in stream_rows(model, tokenizer, prompts, params, eos_ids, steps=steps):
        texts[row] += piece
    return texts
