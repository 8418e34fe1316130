"""Few-shot prompts, as a base model reads them (one text) or as a chat model does (turns).

    base  description + shot question + shot answer + delimiter + ... + the question
          (lm-eval's layout: each question text ends where the answer starts, e.g. "A:")
    chat  the description as the system turn, each shot a user turn and an assistant turn (lm-eval's
          `--apply_chat_template --fewshot_as_multiturn`), then the question as the last user turn,
          rendered with the model's chat template up to the assistant's reply
"""
from __future__ import annotations

from typing import Sequence


def render(tokenizer, question: str, shots: Sequence[tuple[str, str]] = (), *, chat: bool,
           description: str = "", delimiter: str = "\n\n") -> str:
    """The prompt text for `question` after the (question, answer) `shots`."""
    if not chat:
        return description + "".join(q + a + delimiter for q, a in shots) + question
    messages = [{"role": "system", "content": description.strip()}] if description.strip() else []
    for q, a in shots:
        messages += [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": a.strip()}]
    messages.append({"role": "user", "content": question.strip()})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def first_shots(pool: Sequence, k: int, leave_out: int | None = None, name: str = "exemplars") -> list:
    """The first `k` of `pool` (lm-eval's `first_n` few-shot sampler), without the one at index
    `leave_out`: when a benchmark's exemplars are also its items, an item never sees its own answer
    among its shots. Asking for more than there are is a one-line error."""
    from ..errors import Qwen2Error

    candidates = [x for i, x in enumerate(pool) if i != leave_out]
    if k > len(candidates):
        itself = " besides the item itself" if leave_out is not None else ""
        raise Qwen2Error(f"--shots {k}: there are only {len(candidates)} {name}{itself}; "
                         f"give --shots {len(candidates)} or fewer")
    return candidates[:k]
