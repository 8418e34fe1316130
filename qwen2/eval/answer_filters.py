"""Final answers read out of generated replies the way lm-eval reads them, so that a score here is
the score lm-eval gives the same reply.

Two ways, as lm-eval's task configurations define them:

    filters + exact_match   GSM8K, MGSM, BBH: a pipeline of lm-eval's own filter classes (a YAML
                            `filter_list`: `regex`, `take_first`, or a task's class such as BBH's
                            `MultiChoiceRegexFilter`, named by its dotted path) picks the answer, and
                            lm-eval's `exact_match` compares it with the target under the task's
                            options (ignore_case, regexes_to_ignore, ...). The classes are lm-eval's,
                            imported, not rewritten; a `Scoring` only says which and how.
    Minerva (MATH)          the answer after "Final Answer: The final answer is", normalised as
                            appendix D of Lewkowycz et al. (2022) says (lm-eval's `minerva_math`), and
                            compared with the normalised `\\boxed{}` answer of the reference solution,
                            as strings and then as mathematics with sympy's LaTeX parser.

lm-eval is needed (the `eval` extra); without it these raise a one-line Qwen2Error.
"""
from __future__ import annotations

import functools
import importlib
import json
import re
import signal
import threading
from dataclasses import dataclass, field

from ..errors import Qwen2Error

# lm-eval's fallback when a regex filter finds nothing: it never equals a target
INVALID = "[invalid]"
TAKE_FIRST = {"function": "take_first"}


def regex(pattern: str, group_select: int = 0) -> dict:
    """The spec of lm-eval's `regex` filter: the `group_select`-th match of `pattern` (-1: the last)."""
    return {"function": "regex", "regex_pattern": pattern, **({"group_select": group_select} if group_select else {})}


@dataclass(frozen=True)
class Scoring:
    """One metric of a task: the filters that pick the answer (specs as in a YAML `filter_list`:
    {"function": NAME or dotted.path.Class, **arguments}) and `exact_match`'s options."""
    filters: tuple[dict, ...]
    options: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "Scoring":
        return cls(tuple(d["filters"]), dict(d.get("options") or {}))


def _lm_eval(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Qwen2Error(f"scoring these answers as lm-eval does needs lm-eval ({e.name} is missing): "
                         "pip install -e '.[eval]'") from None


@functools.lru_cache(maxsize=None)
def _filter_class(function: str):
    if "." in function:  # a task's own class, e.g. lm_eval.tasks.bbh.cot_zeroshot.utils.MultiChoiceRegexFilter
        module, _, name = function.rpartition(".")
        return getattr(_lm_eval(module), name)
    _lm_eval("lm_eval.filters")  # registers the built-in filters
    return _lm_eval("lm_eval.api.registry").get_filter(function)


@functools.lru_cache(maxsize=4096)
def _filter(spec_json: str):
    # built once per spec: some filters precompute tables; the JSON text keeps the spec's key order,
    # which a mapping of patterns (BBH's MapRegexFilter) depends on
    spec = json.loads(spec_json)
    return _filter_class(spec.pop("function"))(**spec)


def extract(reply: str, doc: dict, filters) -> str:
    """The answer lm-eval's filter pipeline `filters` picks out of `reply` (`doc` is the item, which
    some filters read: BBH's multiple-choice filter looks up the options in its "input"). A filter
    that fails on a reply (BBH's number-word parser on an odd phrase), where lm-eval's whole run
    would stop, makes it "[invalid]": one unreadable reply is a wrong answer, not a lost run."""
    pipeline = [_filter(json.dumps(spec)) for spec in filters]
    responses = [[reply]]
    try:
        for step in pipeline:
            responses = list(step.apply(responses, [doc]))
    except ImportError as e:  # a filter's own dependency (BBH's number words: word2number) is missing
        raise Qwen2Error(f"lm-eval's answer filter needs {e.name}: pip install -e '.[eval]'") from None
    except Exception:  # noqa: BLE001 - any failure inside a filter of a task module
        return INVALID
    [answer] = responses
    return answer if isinstance(answer, str) else answer[0]


def exact_match(prediction: str, target: str, **options) -> float:
    """lm-eval's `exact_match` (Hugging Face evaluate's) of one prediction: 1.0 or 0.0."""
    metrics = _lm_eval("lm_eval.api.metrics")
    return float(metrics.exact_match_hf_evaluate([prediction], [target], **options)["exact_match"])


def score(reply: str, doc: dict, target: str, scorings: dict[str, Scoring]) -> dict[str, float]:
    """{metric: 1.0 or 0.0} for each named Scoring of `reply` against `target`."""
    return {name: exact_match(extract(reply, doc, s.filters), target, **s.options) for name, s in scorings.items()}


# ---- Minerva's MATH answers ---------------------------------------------------------------------

INVALID_MATH_ANSWER = "[invalidanswer]"
FINAL_ANSWER = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")

# Appendix D of Lewkowycz et al. (2022), as lm-eval applies it
SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
                 (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
REMOVED_EXPRESSIONS = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
                       "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
                       "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples",
                       "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}",
                       "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots"]
UNIT_WORDS = [w for w in REMOVED_EXPRESSIONS if w.isalpha()]
LATEX_COMMAND = re.compile(r"(\\[a-zA-Z]+)")
THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+")


def stated_answer(reply: str) -> str:
    """What a reply states after Minerva's "Final Answer: The final answer is" (up to its closing
    ". I hope it is correct.", which may be missing at the end), else "[invalidanswer]"."""
    found = FINAL_ANSWER.search(reply + "I hope it is correct.")
    return found.group(1).strip() if found else INVALID_MATH_ANSWER


def last_boxed(solution: str) -> str | None:
    """The contents of the last `\\boxed{...}` (braces balanced) or `\\boxed x` of a solution, else None."""
    if "\\boxed " in solution:
        return solution.split("\\boxed ")[-1].split("$")[0]
    start = solution.rfind("\\boxed")
    if start < 0:
        return None  # an `\fbox{}` answer, which lm-eval cannot read either
    depth = 0
    for end in range(start, len(solution)):
        depth += {"{": 1, "}": -1}.get(solution[end], 0)
        if solution[end] == "}" and depth == 0:
            boxed = solution[start:end + 1]
            return boxed[len("\\boxed{"):-1] if boxed.startswith("\\boxed{") else None
    return None


def _drop_outside_commands(text: str, word: str) -> str:
    # a unit glued to its neighbours once spaces are gone, but never inside a LaTeX command ("\left")
    pieces = LATEX_COMMAND.split(text)
    return "".join(piece if i % 2 else piece.replace(word, "") for i, piece in enumerate(pieces))


def normalize_answer(answer: str) -> str:
    """A final answer in the canonical form Minerva compares: the right side of an equation, units,
    spaces, `\\text{}`/`\\boxed{}` wrappers and `$` dropped, `\\frac12` as `\\frac{1}{2}`, thousands
    separators removed."""
    answer = answer.split("=")[-1]
    for word in UNIT_WORDS:  # while spaces still delimit words
        answer = re.sub(rf"(?<!\\)\b{word}\b", "", answer)
    for before, after in SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expression in REMOVED_EXPRESSIONS:
        answer = (_drop_outside_commands(answer, expression) if expression.isalpha()
                  else answer.replace(expression, ""))
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    for wrapper in ("text", "textbf", "overline"):
        answer = re.sub(rf"(\\{wrapper}\{{)(.*?)(\}})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)(\[[^\]]*\])(\w)", "\\1\\2{\\3}", answer)  # \sqrt[3]a, before the rule below
    answer = re.sub(r"(sqrt)(?!\[)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if THOUSANDS.fullmatch(answer):  # 100,000 but not a tuple such as 0,1
        answer = answer.replace(",", "")
    return answer


def reference_answer(solution: str) -> str | None:
    """The normalised answer of a MATH reference solution (its last `\\boxed{}`), None without one."""
    boxed = last_boxed(solution)
    return None if boxed is None else normalize_answer(boxed)


@functools.lru_cache(maxsize=1)
def _latex_parser():
    """sympy's ANTLR LaTeX parser, the one lm-eval's `is_equiv` calls. Its generated code was made
    with ANTLR 4.11 and refuses other runtimes, while Math-Verify needs the 4.13 runtime; both
    serialise the grammar the same way, so the generated lexer and parser run on 4.13 unchanged
    once their version check is skipped."""
    try:
        import antlr4
        from sympy.parsing.latex import _parse_latex_antlr as antlr_latex
    except ImportError:
        raise Qwen2Error("comparing MATH answers needs the ANTLR runtime: pip install antlr4-python3-runtime") from None

    class Lexer(antlr_latex.LaTeXLexer):
        def checkVersion(self, version):
            pass

    class Parser(antlr_latex.LaTeXParser):
        def checkVersion(self, version):
            pass

    def parse(text: str):
        text = text.strip()
        errors = antlr_latex.MathErrorListener(text)
        lexer = Lexer(antlr4.InputStream(text))
        lexer.removeErrorListeners()
        lexer.addErrorListener(errors)
        parser = Parser(antlr4.CommonTokenStream(lexer))
        parser.removeErrorListeners()
        parser.addErrorListener(errors)
        return antlr_latex.convert_relation(parser.math().relation())

    return parse


class _Deadline:
    """SIGALRM after `seconds` (only the main thread may set it; elsewhere no limit)."""

    def __init__(self, seconds: int):
        self.seconds = seconds if threading.current_thread() is threading.main_thread() else 0

    def _expired(self, signum, frame):
        raise TimeoutError

    def __enter__(self):
        if self.seconds:
            self.previous = signal.signal(signal.SIGALRM, self._expired)
            signal.alarm(self.seconds)

    def __exit__(self, *exc):
        if self.seconds:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, self.previous)


def answers_equivalent(answer: str, reference: str, timeout: int = 5) -> bool:
    """Minerva's check of two normalised answers: equal strings, or LaTeX whose difference sympy
    simplifies to 0 within `timeout` seconds. Anything unparseable, or too slow, is not equal."""
    if answer and answer == reference:
        return True
    parse = _latex_parser()
    import sympy

    try:
        with _Deadline(timeout):
            return bool(sympy.simplify(parse(answer) - parse(reference)) == 0)
    except Exception:  # noqa: BLE001 - lm-eval counts every failure (parse, subtraction, timeout) as unequal
        return False
