"""qwen2.eval.answers: a reply's final answer read strictly (the `#### <integer>` line) and
leniently (its last integer), and the tally over many replies."""
import pytest

from qwen2.errors import Qwen2Error
from qwen2.eval.answers import accuracy, last_number, score


@pytest.mark.parametrize("reply, exact, fmt, number", [
    ("#### 85", True, True, True),
    ("  #### 85\n", True, True, True),        # surrounding whitespace aside
    ("#### 86", False, True, False),          # the format, a wrong number
    ("#### 085", False, True, True),          # the format, not the exact line
    ("####85", False, False, True),
    ("#### 85.", False, False, True),
    ("The answer is #### 85", False, False, True),
    ("47 + 38 equals 85.", False, False, True),
    ("#### 85\n#### 86", False, False, False),
    ("85", False, False, True),
    ("1,085", False, False, False),            # 1085, not 85
    ("", False, False, False),
])
def test_scoring_is_strict_about_the_format_and_lenient_about_the_number(reply, exact, fmt, number):
    assert score(reply, 85) == {"exact": exact, "format": fmt, "number": number}


def test_negative_answers_and_the_tally():
    assert score("#### -23", -23) == {"exact": True, "format": True, "number": True}
    assert score("#### 23", -23)["exact"] is False
    assert last_number("from 1,234 down to -7") == -7
    scored = [score(r, 5) for r in ("#### 5", "#### 6", "5", "x")]
    acc = accuracy(scored)
    assert (acc["exact_count"], acc["format_count"], acc["number_count"], acc["n"]) == (1, 2, 2, 4)
    assert acc["exact"] == 0.25 and acc["format"] == 0.5
    with pytest.raises(Qwen2Error, match="at least one"):
        accuracy([])
