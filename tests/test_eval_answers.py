"""qwen2.eval.answers: a reply's final answer read strictly (the `#### <integer>` line) and
leniently (its last integer), and the tally over many replies."""
import pytest

from qwen2.errors import Qwen2Error
from qwen2.eval.answers import accuracy, last_number, math_answer_matches, score


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


# ---- math answers of any form (Math-Verify) -------------------------------------------------------

@pytest.mark.parametrize("reply, answer", [
    ("The answer is 42.", 42), ("#### 42", 42), ("#### 1,000", 1000), ("1,000 apples", "1000"),
    ("It costs 12 dollars.", 12), ("It costs $12.", 12), ("$42.00", 42), ("42.0", 42), ("7 cm", 7), ("7.", 7),
    (r"\boxed{7\text{ cm}}", 7), (r"\boxed{12 \text{ km/h}}", 12), ("x = -5", -5), (r"\boxed{-3}", "-3"),
    (r"so \boxed{\frac{3}{4}}", "3/4"), (r"\boxed{3/4}", "0.75"), (r"\boxed{\dfrac{1}{2}}", "1/2"),
    (r"\boxed{0.5}", "1/2"), (r"\boxed{2/4}", "1/2"), ("5/2", 2.5), ("0.3333333333", "1/3"), ("42%", "0.42"),
    (r"\boxed{100\%}", 1), (r"\boxed{1+x}", "x+1"), (r"\boxed{\sqrt 2}", r"\sqrt{2}"),
    (r"The final answer is $\boxed{3}$. I hope it is correct.", 3),
    ("Step 1: 4 * 3 = 12. Step 2: 12 + 30 = 42. #### 42", 42),   # the stated answer, not the steps' numbers
    (r"First 10, then 20; \boxed{30}", 30),                       # the boxed answer over earlier numbers
])
def test_equivalent_forms_of_the_answer_are_accepted(reply, answer):
    assert math_answer_matches(reply, answer)


@pytest.mark.parametrize("reply, answer", [
    ("41", 42), ("42.01", 42), ("answer: 4242", 42), ("0.333", "1/3"), (r"\boxed{3}", "-3"), ("x=-5", 5),
    ("I think 4 2", 42), ("41 and then 42 is wrong? no, 43", 42), ("42\n\nWait, actually 41.", 42),
    (r"\boxed{42, 43}", 42), (r"\boxed{42}, \boxed{43}", 42),       # extra numbers in the final answer
    ("x=2, y=3", 2), ("1.2 thousand", 1200), ("five", 5), ("", 42), ("no idea", 42),
    (r"\boxed{\sqrt 3}", r"\sqrt{2}"), ("1.41", r"\sqrt{2}"), (r"\boxed{x-1}", "x+1"),
])
def test_near_misses_extra_numbers_and_no_answer_are_rejected(reply, answer):
    assert not math_answer_matches(reply, answer)


def test_an_unreadable_right_answer_is_a_one_line_error():
    with pytest.raises(Qwen2Error, match=r"the right answer ' ' is not a number or formula"):
        math_answer_matches("42", " ")
