"""Replies of a model to many prompts, the batch jobs' way: through the serving engine's continuous
batching, so up to `batch` sequences decode together and a finished row is refilled at once. Each
row attends over its own keys as if alone, so a greedy reply is the one the prompt gets by itself."""
from __future__ import annotations

from typing import Iterator, Sequence


def generate_replies(m, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                     batch: int = 8, samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                     seeds: Sequence[int] | None = None) -> Iterator[tuple[int, list[str]]]:
    """(prompt index, its `samples` replies) for every prompt, in the order they finish. Greedy by
    default; with temperature > 0, prompt i is sampled with seed `seeds[i]` (default i), so a resumed run
samples each item as the first run would have. A reply stops at the
    model's end-of-turn tokens or the first of `stop` (which it does not include)."""
    from ..serve.engine import Engine, complete_all

    if not prompts:
        return
    sampled = {"top_p": top_p} if temperature > 0 else {}
    requests = [(m.tokenizer.encode(prompt),
                 m.sampling(max_new_tokens=max_new_tokens, temperature=temperature, stop=list(stop),
                            **({**sampled, "seed": seeds[i] if seeds else i} if temperature > 0 else {})),
                 samples) for i, prompt in enumerate(prompts)]
    longest = max(len(ids) for ids, _, _ in requests) + max_new_tokens
    engine = Engine(m.decoder, m.tokenizer, m.eos_ids, max_batch=max(batch, samples),
                    max_model_len=min(longest, m.config.max_position_embeddings))
    yield from complete_all(engine, requests)
