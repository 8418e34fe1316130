"""Verifiers for rejection sampling (qwen2/synth/verifiers.py): the math one against the records'
answers, the code one in the sandbox, a user's function by name, and each way a verifier can fail
as a one-line error."""
from __future__ import annotations

import pytest

from qwen2.errors import Qwen2Error
from qwen2.synth.verifiers import checked_score, missing_field, verifier

USER_MODULE = '''
import time

def is_polite(record, reply):
    return "please" in reply.lower()

def explodes(record, reply):
    raise KeyError("tone")

def hangs(record, reply):
    time.sleep(3)
    return True

def says_maybe(record, reply):
    return "maybe"
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_checks"


def test_the_math_verifier_reads_the_records_answer():
    math = verifier("math")
    record = {"prompt": "What is 3/4 of 1?", "answer": "3/4"}
    assert checked_score(math, record, r"so it is \boxed{0.75}") == 1.0
    assert checked_score(math, record, "#### 0.7") == 0.0
    assert missing_field(math, record) is None
    assert missing_field(math, {"prompt": "x"}) == 'the math verifier needs a "answer" field in every record'


def test_the_code_verifier_scores_the_share_of_the_records_tests_passed():
    code = verifier("code", sandbox_timeout=10)
    record = {"prompt": [{"role": "user", "content": "Write add(a, b)."}], "entry_point": "add",
              "tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]}
    assert checked_score(code, record, "```python\ndef add(a, b):\n    return a + b\n```") == 1.0
    assert checked_score(code, record, "```python\ndef add(a, b):\n    return a * b + 1\n```") == 0.5
    assert checked_score(code, record, "no code at all") == 0.0
    assert missing_field(code, {"prompt": "x"}) == 'the code verifier needs a "tests" field in every record'


def test_a_users_function_by_name_and_its_failures_in_one_line(user_module):
    polite = verifier(f"python:{user_module}.is_polite")
    assert (checked_score(polite, {}, "Please pass the salt"), checked_score(polite, {}, "salt!")) == (1.0, 0.0)
    with pytest.raises(Qwen2Error, match=r"^verifier python:my_checks.explodes raised KeyError on record 7: 'tone'$"):
        checked_score(verifier(f"python:{user_module}.explodes"), {}, "x", where="record 7")
    with pytest.raises(Qwen2Error, match=r"took more than 0.3 s on record 2; make it faster or raise its timeout"):
        checked_score(verifier(f"python:{user_module}.hangs"), {}, "x", timeout=0.3, where="record 2")
    with pytest.raises(Qwen2Error, match=r"returned 'maybe' on a reply; it must return True or False \(or a score"):
        checked_score(verifier(f"python:{user_module}.says_maybe"), {}, "x")


@pytest.mark.parametrize("spec, message", [
    ("maths", r"unknown verifier 'maths'; use one of math, code, python:MODULE.FUNCTION"),
    ("python:is_polite", r"must name a module and a function: python:my_module.my_function"),
    ("python:no_such_module_here.check", r"cannot import check from no_such_module_here .*PYTHONPATH"),
    ("python:my_checks.absent", r"cannot import absent from my_checks"),
    ("python:my_checks.USER_CONSTANT", None),
])
def test_bad_verifier_names_are_one_line_errors(spec, message, user_module):
    if message is None:  # a name that is there but is no function
        (__import__(user_module)).USER_CONSTANT = 3
        message = r"is not a function \(record, reply\) -> bool"
    with pytest.raises(Qwen2Error, match=message):
        verifier(spec)
