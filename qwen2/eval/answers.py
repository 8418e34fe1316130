"""Final answers in generated replies: extracting them and scoring a reply against the right one.

A task with a checkable answer (arithmetic, and in the Qwen2 report GSM8K and MATH) is scored by
the answer a reply ends with, not by how it is worded. Two readings of a reply, kept apart because
they answer different questions:

    formatted   the reply is exactly GSM8K's machine-readable answer line `#### <integer>`: did the
                model follow the format?
    last number the last integer written anywhere in the reply: did it get the number right,
                whatever the format?

`score` applies both (and the exact-line check) to one reply; `accuracy` tallies many.

Answers that are not integers (fractions, decimals, percentages, LaTeX such as `\\frac{3}{4}` or
`\\sqrt{2}`, MATH's `\\boxed{}`) are compared as mathematics by `math_answer_matches`, on
Math-Verify (Hugging Face's answer checker, as lighteval and TRL's accuracy rewards use it).
"""
from __future__ import annotations

import re
import threading

from ..errors import Qwen2Error

FORMAT = re.compile(r"#### (-?\d+)")
INTEGER = re.compile(r"-?\d+")
CHECKS = ("exact", "format", "number")


def answer_line(answer: int) -> str:
    """The one reply counted as exactly right: GSM8K's answer line."""
    return f"#### {answer}"


def formatted_answer(reply: str) -> int | None:
    """The number of a reply that is exactly `#### <integer>` (surrounding whitespace aside), else None."""
    m = FORMAT.fullmatch(reply.strip())
    return int(m.group(1)) if m else None


def last_number(reply: str) -> int | None:
    """The last integer written in the reply (thousands separators removed), else None."""
    found = INTEGER.findall(reply.replace(",", ""))
    return int(found[-1]) if found else None


def score(reply: str, answer: int) -> dict:
    """{"exact": the reply is `#### <answer>` itself, "format": it is `#### <some integer>`,
    "number": its last integer is the answer}: strict about the format, lenient about the number."""
    return {"exact": reply.strip() == answer_line(answer), "format": formatted_answer(reply) is not None,
            "number": last_number(reply) == answer}


def accuracy(scored: list[dict]) -> dict:
    """The share of scored replies that pass each check (`exact`, `format`, `number`), the counts
    (`exact_count`, ...) and `n`."""
    n = len(scored)
    if n == 0:
        raise Qwen2Error("accuracy needs at least one scored reply")
    return {"n": n, **{k: sum(s[k] for s in scored) / n for k in CHECKS},
            **{f"{k}_count": sum(s[k] for s in scored) for k in CHECKS}}


def math_answer_matches(reply: str, answer: str | int | float) -> bool:
    """Whether the final answer of `reply` equals `answer` as mathematics: the last `\\boxed{}`, else a
    stated final answer ("the answer is ...", `#### n`), else the last number of the reply, parsed as
    LaTeX or as an expression (thousands separators, `$`, `%` and trailing units dropped) and compared
    symbolically and numerically by Math-Verify. So 0.75, 3/4 and `\\frac{3}{4}` match each other,
    42.0 matches 42; 42.01, 0.333 for 1/3, a set `{42, 43}` for 42, and no number at all do not.
    `answer` is the right answer: a number, or a string of LaTeX or plain math ("x+1", "\\sqrt{2}")."""
    from math_verify import parse, verify

    # Math-Verify bounds its sympy work with SIGALRM, which only the main thread may set; elsewhere
    # (the serving engine's threads) it runs unbounded.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_text = str(answer).strip()
    if "$" not in gold_text and "\\boxed" not in gold_text:
        gold_text = f"${gold_text}$"
    gold = parse(gold_text, parsing_timeout=timeout)
    if not gold:
        raise Qwen2Error(f"the right answer {answer!r} is not a number or formula Math-Verify can read")
    return bool(verify(gold, parse(reply, parsing_timeout=timeout), timeout_seconds=timeout))
