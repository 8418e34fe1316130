"""What decides that a sampled reply is right, for rejection sampling: a verifier is any function
`(record, reply) -> bool` of the prompt's record and one reply, or a score in [0, 1] where 1 is right
(the code verifier's: the fraction of tests passed, which orders failures for preference pairs).

    math              the reply's final answer equals the record's "answer" as mathematics
                      (`qwen2.eval.answers.math_answer_matches`: fractions, decimals, LaTeX, \\boxed{})
    code              the fraction of the record's "tests" the reply's code passes in the sandbox
                      (online DPO's execution reward)
    python:MOD.FN     a function of the user's, imported by name (`python:my_checks.is_polite`)

`verifier(spec)` builds one; `fields` names what each needs in a record, so a prompt file without it
is refused before any sampling. `checked_score` runs a verifier with a time limit, so one that hangs
or raises is a one-line error naming the record, never a stuck run.
"""
from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Callable

from ..errors import Qwen2Error
from ..eval.answers import math_answer_matches
from ..train.online import CodeTask, ExecutionReward

VERIFIERS = ("math", "code", "python:MODULE.FUNCTION")


@dataclass(frozen=True)
class Verifier:
    name: str
    score: Callable[[dict, str], bool | float]  # (record, reply) -> right or not, or a score in [0, 1]
    fields: tuple[str, ...] = ()  # what it reads from a record


def _math(record: dict, reply: str) -> bool:
    return math_answer_matches(reply, record["answer"])


def _code(timeout: float) -> Callable[[dict, str], float]:
    run_tests = ExecutionReward(timeout)

    def tests_passed(record: dict, reply: str) -> float:
        return run_tests(CodeTask(record["prompt"], record["tests"], record.get("entry_point")), reply)

    return tests_passed


def verifier(spec: str, sandbox_timeout: float = 10.0) -> Verifier:
    """The verifier `spec` names: math, code, or python:MODULE.FUNCTION."""
    if spec == "math":
        return Verifier("math", _math, ("answer",))
    if spec == "code":
        return Verifier("code", _code(sandbox_timeout), ("tests",))
    if spec.startswith("python:"):
        module_name, _, function_name = spec[len("python:"):].rpartition(".")
        if not module_name:
            raise Qwen2Error(f"verifier {spec!r} must name a module and a function: python:my_module.my_function")
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as e:
            raise Qwen2Error(f"verifier {spec!r}: cannot import {function_name} from {module_name} ({e}); "
                             "is the module on PYTHONPATH?") from None
        if not callable(function):
            raise Qwen2Error(f"verifier {spec!r} is not a function (record, reply) -> bool")
        return Verifier(spec, function)
    raise Qwen2Error(f"unknown verifier {spec!r}; use one of {', '.join(VERIFIERS)}")


def missing_field(v: Verifier, record: dict) -> str | None:
    """Why `record` cannot be checked by `v` (a field it reads is missing), or None."""
    for name in v.fields:
        if record.get(name) in (None, "", []):
            return f"the {v.name} verifier needs a \"{name}\" field in every record"
    return None


def checked_score(v: Verifier, record: dict, reply: str, timeout: float = 60.0, where: str = "") -> float:
    """`v`'s score of `reply` (1.0: right), within `timeout` seconds; a verifier that raises, hangs or
    answers something other than a bool or a number in [0, 1] is a one-line error naming `where` (the
    record). It runs in a daemon thread of its own: one that hangs is left behind, and the process
    can still end."""
    outcome: dict = {}

    def run():
        try:
            outcome["verdict"] = v.score(record, reply)
        except BaseException as e:  # the user's code: any failure is theirs to fix, reported in one line
            outcome["error"] = e

    thread = threading.Thread(target=run, name=f"verifier {v.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    where = where or "a reply"
    if thread.is_alive():
        raise Qwen2Error(f"verifier {v.name} took more than {timeout:g} s on {where}; make it faster or raise its timeout")
    if "error" in outcome:
        e = outcome["error"]
        if isinstance(e, Qwen2Error):
            raise e
        raise Qwen2Error(f"verifier {v.name} raised {type(e).__name__} on {where}: {e}")
    verdict = outcome["verdict"]
    if isinstance(verdict, str) or not _is_score(verdict):
        raise Qwen2Error(f"verifier {v.name} returned {verdict!r} on {where}; it must return True or False "
                         "(or a score from 0 to 1)")
    return float(verdict)


def _is_score(value) -> bool:
    try:
        return 0.0 <= float(value) <= 1.0  # bool, numpy's bool, int, float
    except (TypeError, ValueError):
        return False
