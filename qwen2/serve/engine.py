"""Continuous batching: one scheduler thread owns the model and decodes every live sequence together.

    submit() --bounded queue--> [scheduler thread]  admit: prefill the new prompt alone (B=1), copy its
                                                     keys/values into a free row of the slot pool
                                                    step:  one token for every live row at once
                                                    retire: finished or cancelled rows leave; the last
                                                     live row moves into the hole
                                                    emit:  text pieces back to each request's callback

The slot pool is one KV tensor (L, max_batch, nkv, max_model_len, hs). Rows 0..n-1 are the live
sequences, each at its own length: a decode step is one forward through a `StaticKV` view of rows [:n] and
the first S slots (S = longest live length + 1, not max_model_len), where each row writes its new
key/value to its own slot (`StaticKV.slot` of shape (n,)), sees only its own slots through `valid`,
and takes its own RoPE position. There is no padding in the pool (every row starts at slot 0), so a
row's slot is also its position.

Sampling is per sequence, with `qwen2.runtime.generate`'s pieces: `next_token` with the request's
SamplingParams and its own seeded generator (a seeded request samples what `qwen2.runtime.generate` samples
with that seed), and `TextStream` for end tokens, stop strings and whole UTF-8 characters. A
request's `constraint` (structured output, `qwen2.runtime.constrained`) gives each of its choices a
parser of its own, which masks that row's logits before each choice.

LoRA adapters (`qwen2.adapters`): a request's `adapter` names the one its rows run with. Before each
forward (a prefill: its one request; a decode step: every live row) the engine tells the model's
`AdapterSet` which adapter each row takes, so rows on different adapters, or none, share the step.
"""
from __future__ import annotations

import collections
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .. import long_context
from ..errors import Qwen2Error
from ..model.static_cache import StaticKV
from ..runtime.constrained import Constraint, constrained_choice
from ..runtime.executor import as_decoder
from ..runtime.generate import SamplingParams, TextStream, next_token


def _base_model_only(names) -> None:
    """A model serving no adapters: every row runs the base model (`submit` refused any other)."""


class QueueFull(Exception):
    """The admission queue is full: the server answers 429 with Retry-After."""


@dataclass
class Delta:
    index: int  # which choice
    text: str


@dataclass
class Finish:
    index: int
    reason: str  # "stop" (end token or stop string) or "length"
    completion_tokens: int


@dataclass
class Failure:
    message: str


@dataclass
class Request:
    """One prompt with `n` choices. `emit(events)` is called from the scheduler thread after each
    step with that step's Delta/Finish events (or a Failure); it must not block."""
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[list], None]
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_ids: Sequence[int] = ()  # end ids of this request besides the engine's (fill-in-the-middle's)
    constraint: Constraint | None = None  # structured output: each choice's row gets its own parser
    adapter: str | None = None  # the LoRA adapter its rows run with (qwen2.adapters); None: the base model
    cancelled: bool = False  # set by the client side (disconnect); the scheduler retires its rows
    submitted_at: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled = True


class LiveSequence:
    """One choice of one request, living in a row of the slot pool."""

    def __init__(self, request: Request, index: int, tokenizer, eos_ids, vocab_size: int, device):
        self.request, self.index = request, index
        params = request.params
        self.stream = TextStream(tokenizer, [*eos_ids, *request.stop_ids], params.stop)
        self.length = len(request.prompt)  # tokens in the cache
        self.pending: int | None = None  # sampled, not yet fed
        self.generated = 0
        self.generator = None
        if params.seed is not None:  # choice i of a seeded request samples with seed + i
            self.generator = torch.Generator(device).manual_seed(params.seed + index)
        self.seen = None  # repetition penalty: every token of the context, as decode_steps marks it
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, request.prompt] = True
        self.counts = None  # OpenAI presence/frequency penalties: generated tokens only
        if request.presence_penalty or request.frequency_penalty:
            self.counts = torch.zeros(1, vocab_size, device=device)
        # next_token, or for structured output next_token over logits this choice's own parser masked
        self.next_token = next_token if request.constraint is None else constrained_choice([request.constraint.start()])

    def choose(self, logits: torch.Tensor) -> int:
        """logits (1, V) -> the next token, with this request's sampling."""
        request = self.request
        if self.counts is not None:
            logits = logits.float() - request.frequency_penalty * self.counts \
                - request.presence_penalty * (self.counts > 0).float()
        token = int(self.next_token(logits, request.params, self.seen, self.generator))
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1
        return token


class Engine:
    """The continuous-batching scheduler over a slot pool of `max_batch` sequences of up to
    `max_model_len` tokens (prompt + completion). `start()` runs the scheduler thread, `close()` stops it."""

    def __init__(self, model, tokenizer, eos_ids: Sequence[int], max_batch: int = 8,
                 max_model_len: int | None = None, max_queue: int | None = None, prefill_budget: int = 512,
                 adapters=None):
        config = model.config
        max_model_len = max_model_len or min(config.max_position_embeddings, 2048)
        if not isinstance(max_batch, int) or max_batch < 1:
            raise Qwen2Error(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not isinstance(max_model_len, int) or not 2 <= max_model_len <= config.max_position_embeddings:
            raise Qwen2Error(f"max_model_len must be between 2 and the model's context length "
                             f"({config.max_position_embeddings}), got {max_model_len!r}")
        self.model = as_decoder(model)  # a bare model runs through its fastest executor
        self.tokenizer, self.eos_ids = tokenizer, list(eos_ids)
        self.max_batch, self.max_model_len = max_batch, max_model_len
        self.max_queue = max_queue if max_queue is not None else 4 * max_batch
        self.prefill_budget = prefill_budget  # prompt tokens admitted per step (one longer prompt still goes alone)
        # LoRA adapters (a qwen2.adapters.AdapterSet over this model): each forward's rows choose theirs first
        self.adapters = adapters
        self._select_adapters = adapters.select if adapters is not None else _base_model_only
        # Each row attends over its own keys, unmasked, as it would alone (B small SDPA calls per layer
        # instead of one masked one): greedy text then equals the request's alone, quantised models too.
        self.exact_rows = not (long_context.sliding_layers(config) or config.dual_chunk_attention_config)
        shape = (config.num_hidden_layers, max_batch, config.num_key_value_heads, max_model_len, config.head_dim)
        with torch.inference_mode():  # pages are only touched as rows fill, so RSS grows with use
            self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)  # (L, max_batch, nkv, max_len, hs)
            self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.rows: list[LiveSequence] = []  # row i of the pool is rows[i]; rows 0..n-1 are live
        self._queue: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Counters read by /metrics (written by the scheduler thread only).
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.decode_steps = 0
        self.decode_rows = 0  # rows summed over decode steps: / decode_steps = the mean batch

    @property
    def kv_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.rows)

    # ---- client side ---------------------------------------------------------------------------

    def check(self, prompt_len: int, max_tokens: int | None, n: int = 1) -> int:
        """The max_tokens to use (default: the rest of the context); Qwen2Error if it cannot fit."""
        if prompt_len == 0:
            raise Qwen2Error("empty prompt: give at least one token of text")
        if n > self.max_batch:
            raise Qwen2Error(f"n ({n}) exceeds the server's batch of {self.max_batch} sequences; "
                             f"ask for fewer choices or start the server with --max-batch {n}")
        room = self.max_model_len - prompt_len
        if room < 1:
            raise Qwen2Error(f"prompt ({prompt_len} tokens) leaves no room in the context of {self.max_model_len} "
                             "tokens; shorten the prompt (or raise --max-model-len)")
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise Qwen2Error(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                             f"{self.max_model_len} tokens; shorten the prompt or lower max_tokens")
        return max_tokens

    def submit(self, request: Request) -> None:
        """Queue a request (thread-safe). Raises QueueFull when max_queue requests are waiting."""
        self.check(len(request.prompt), request.params.max_new_tokens, request.n)
        if request.adapter is not None:
            if self.adapters is None:
                raise Qwen2Error(f"no adapter named {request.adapter!r}: this model serves no LoRA adapters")
            self.adapters.index(request.adapter)  # a Qwen2Error naming an unknown one
        with self._wake:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting; retry shortly")
            self._queue.append(request)
            self._wake.notify()

    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="qwen2-scheduler", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for request in list(self._queue) + [s.request for s in self.rows]:
            request.emit([Failure("the server is shutting down")])
        self._queue.clear()
        self.rows.clear()

    # ---- scheduler thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._queue and not self.rows:
                    self._wake.wait()
                if self._stopping:
                    return
                admitted = self._take_admissible()
            try:
                with torch.inference_mode():
                    self._step(admitted)
            except Exception:  # noqa: BLE001 (a bug must not kill the server: fail the live requests, go on)
                traceback.print_exc(file=sys.stderr)
                failed = {id(s.request): s.request for s in self.rows}
                failed.update({id(r): r for r in admitted})
                for request in failed.values():
                    request.emit([Failure("internal error while generating; see the server log")])
                self.rows.clear()

    def _take_admissible(self) -> list[Request]:
        """Requests that fit in the free rows, first come first served (cancelled ones dropped), up to
        `prefill_budget` prompt tokens per step (at least one request): the running sequences wait for
        the admitted prompts' prefills, so a burst of arrivals joins over a few steps instead of
        stalling every stream at once."""
        taken, free, budget = [], self.free_slots, self.prefill_budget
        while self._queue:
            request = self._queue[0]
            if request.cancelled:
                self._queue.popleft()
                continue
            if request.n > free or (taken and len(request.prompt) > budget):
                break
            taken.append(self._queue.popleft())
            free -= request.n
            budget -= len(request.prompt)
        return taken

    def _step(self, admitted: list[Request]) -> None:
        events: dict[int, tuple[Request, list]] = {}
        for request in admitted:
            self._admit(request, events)
            self._emit(events)  # its first token goes out now, not after the other prefills
        # Cancelled rows, and rows an admission just finished (max_tokens 1, an end token first), have no
        # token to feed: they leave before the decode step.
        self._retire([i for i, s in enumerate(self.rows) if s.request.cancelled or s.pending is None])
        if self.rows:
            logits = self._decode()  # (n, V)
            for row, seq in enumerate(self.rows):
                self._advance(seq, logits[row:row + 1], events)
        self._retire([i for i, s in enumerate(self.rows) if s.pending is None])
        self._emit(events)

    @staticmethod
    def _emit(events: dict) -> None:
        for request, batch in events.values():
            if not request.cancelled and batch:
                request.emit(batch)
        events.clear()

    def _admit(self, request: Request, events) -> None:
        """Prefill the prompt alone (exactly as `decode_steps` does for one prompt), copy its keys and
        values into one free row per choice, and sample each choice's first token."""
        if request.cancelled:
            return
        T = len(request.prompt)
        cache = self.model.new_cache(1, T + request.params.max_new_tokens)  # the span decode_steps gives it
        self._select_adapters([request.adapter])
        logits = self.model(torch.tensor([request.prompt], device=self.model.device), cache=cache, last_only=True)
        self.prompt_tokens += T
        for index in range(request.n):
            row = len(self.rows)
            self.k[:, row, :, :T].copy_(cache.k[:, 0, :, :T])
            self.v[:, row, :, :T].copy_(cache.v[:, 0, :, :T])
            seq = LiveSequence(request, index, self.tokenizer, self.eos_ids, self.model.config.vocab_size,
                            self.model.device)
            self.rows.append(seq)
            self._advance(seq, logits[:, -1], events)

    def _decode(self) -> torch.Tensor:
        """One token for every live row: row b feeds its pending token at slot lengths[b]."""
        n = len(self.rows)
        device = self.model.device
        lengths = torch.tensor([s.length for s in self.rows], device=device)  # (n,) = each row's new slot
        S = int(lengths.max()) + 1  # attend over the longest live row, not the whole pool
        valid = torch.arange(S, device=device)[None, :] <= lengths[:, None]  # (n, S)
        ids = torch.tensor([[s.pending] for s in self.rows], device=device)  # (n, 1)
        cache = StaticKV(self.k[:, :n, :, :S], self.v[:, :n, :, :S], valid, lengths, lengths, exact_rows=self.exact_rows)
        self._select_adapters([s.request.adapter for s in self.rows])
        logits = self.model(ids, cache=cache)
        for seq in self.rows:
            seq.length += 1
        self.decode_steps += 1
        self.decode_rows += n
        return logits[:, -1]  # (n, V)

    def _advance(self, seq: LiveSequence, logits: torch.Tensor, events) -> None:
        """Sample seq's next token from logits (1, V), turn it into text; finished -> pending None."""
        token = self._choose(seq, logits)
        seq.generated += 1
        self.generated_tokens += 1
        out = events.setdefault(id(seq.request), (seq.request, []))[1]
        piece = seq.stream.push(token)
        if not seq.stream.done and seq.generated >= seq.request.params.max_new_tokens:
            piece += seq.stream.close()
        if piece:
            out.append(Delta(seq.index, piece))
        if seq.stream.done:
            out.append(Finish(seq.index, seq.stream.finish_reason, seq.generated))
            seq.pending = None
        else:
            seq.pending = token

    def _choose(self, seq: LiveSequence, logits: torch.Tensor) -> int:
        return seq.choose(logits)  # a test replaces this to script the model's output (tool calls)

    def _retire(self, rows: list[int]) -> None:
        """Free these rows: the last live row moves into each hole, so rows 0..n-1 stay the live ones.
        Highest first, so that the row moved in is never one still waiting to leave."""
        for row in sorted(rows, reverse=True):
            last = len(self.rows) - 1
            if row != last:
                n = self.rows[last].length
                self.k[:, row, :, :n].copy_(self.k[:, last, :, :n])
                self.v[:, row, :, :n].copy_(self.v[:, last, :, :n])
                self.rows[row] = self.rows[last]
            self.rows.pop()


def complete_all(engine: Engine, requests: Sequence[tuple[list[int], SamplingParams, int]]):
    """Run every (prompt ids, sampling, n choices) request to its end through `engine`, the batch
    jobs' way of using it (HumanEval, the training experiments): yield (request index, the text of
    each choice) as each request finishes, in whatever order they finish. Starts the engine and
    closes it when done (or when the caller stops iterating). At most 2 x max_batch requests are
    submitted at a time, so the engine's bounded queue never fills and rows are refilled at once."""
    finished: queue.Queue = queue.Queue()

    def submit(index: int, prompt: list[int], params: SamplingParams, n: int) -> None:
        texts, left = [""] * n, [n]

        def emit(events):  # called from the scheduler thread
            for event in events:
                if isinstance(event, Failure):
                    finished.put(Qwen2Error(f"generation failed: {event.message}"))
                elif isinstance(event, Delta):
                    texts[event.index] += event.text
                elif isinstance(event, Finish):
                    left[0] -= 1
                    if left[0] == 0:
                        finished.put((index, texts))

        engine.submit(Request(prompt, params, emit, n=n))

    waiting, in_flight = collections.deque(enumerate(requests)), 0
    engine.start()
    try:
        while waiting or in_flight:
            while waiting and in_flight < 2 * engine.max_batch:
                index, (prompt, params, n) = waiting.popleft()
                submit(index, prompt, params, n)
                in_flight += 1
            done = finished.get()
            if isinstance(done, Exception):
                raise done
            in_flight -= 1
            yield done
    finally:
        engine.close()
