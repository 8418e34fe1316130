"""Final-answer math: GSM8K, MATH and MGSM, prompted and scored as lm-eval's tasks do it, so a
score here is lm-eval's score of the same replies.

    gsm8k     lm-eval's `gsm8k_cot`: 8-shot chain of thought, "Q: ...\\nA:", each exemplar ending "The
              answer is N."; `strict_match` reads the number after "The answer is", `flexible_extract`
              the last number of the reply; both exact match after dropping "," "$" and a final ".".
    math      lm-eval's `minerva_math`: 4-shot "Problem:\\n...\\n\\nSolution:", the reply's answer after
              "Final Answer: The final answer is", normalised as Minerva does and compared with the
              reference solution's last `\\boxed{}` (`exact_match`), and Math-Verify's reading of the
              whole reply against the solution (`math_verify`).
    mgsm-XX   lm-eval's `mgsm_native_cot_XX` for the 11 MGSM languages: the question and "step by
              step answer" headers and the "The answer is" sentence in the language itself; 0-shot by
              default, as lm-eval's tasks are.

Items: without `--data`, the exemplars that lm-eval ships (GSM8K's 8, Minerva's 4 MATH exemplars),
each asked with the OTHER exemplars as its shots (never itself), so a pack item gets at most 7 (3)
shots. With `--data`, the full test set in the hub layout: `openai/gsm8k` (question, answer ending
"#### n"), `EleutherAI/hendrycks_math` or `hendrycks/competition_math` (problem, solution; level and
type kept), `juletxara/mgsm` (question, answer, answer_number). No package ships MGSM's exemplars or
questions, so `mgsm-XX` needs `--data`: rows whose `answer` holds a worked solution (the train split)
are the few-shot exemplars, drawn for each test row (`answer` null) as lm-eval draws them (its
seeded sampler, seed 1234); a file of train rows alone is asked like a pack, each row with the
others as shots.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Sequence

from ..errors import Qwen2Error
from .answer_filters import (TAKE_FIRST, Scoring, answers_equivalent, normalize_answer, reference_answer, regex,
                             score, stated_answer)
from .datasets import read_pack, read_rows
from .prompts import first_shots, render
from .runner import GenerationBenchmark

# lm-eval's defaults for a few-shot text: " " between question and answer, a blank line between shots
TARGET_DELIMITER = " "
LM_EVAL_FEWSHOT_SEED = 1234
LM_EVAL_MAX_GEN_TOKS = 256


@functools.lru_cache(maxsize=None)
def _pack(name: str) -> tuple[dict, ...]:
    return tuple(read_pack(name))


def _prompt(item: dict, shots: int, chat: bool, tokenizer) -> str:
    """The item's question after its shots: the first `shots` of its pool (itself left out), or, for
    MGSM's test rows, the ones lm-eval's seeded sampler draws for the item at that position."""
    pool = item["pool"]
    if item.get("draw") is None:
        chosen = first_shots(pool, shots, leave_out=item.get("leave_out"), name=item["pool_name"])
    else:
        chosen = [pool[i] for i in lm_eval_draws(len(pool), shots, item["draw"], name=item["pool_name"])]
    return render(tokenizer, item["question"], chosen, chat=chat)


def lm_eval_draws(pool_size: int, k: int, position: int, seed: int = LM_EVAL_FEWSHOT_SEED,
                  name: str = "exemplars") -> list[int]:
    """The indices of the `k` exemplars lm-eval's default sampler gives the test document at
    `position`: one `Random(seed)`, and one `sample(pool, k)` per document in order before it."""
    if k == 0:
        return []
    if k > pool_size:
        raise Qwen2Error(f"--shots {k}: there are only {pool_size} {name}; give --shots {pool_size} or fewer")
    rnd = random.Random(seed)
    for _ in range(position):
        rnd.sample(range(pool_size), k)
    return rnd.sample(range(pool_size), k)


# ---- GSM8K ----------------------------------------------------------------------------------------

GSM8K_QUESTION = "Q: {question}\nA:"
GSM8K_STOP = ("Q:", "</s>", "<|im_end|>")
GSM8K_OPTIONS = {"ignore_case": True, "ignore_punctuation": False,
                 "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}
# lm-eval's flexible-extract for GSM8K and MGSM: the last number-looking run of the reply
LAST_NUMBER = regex(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
GSM8K_SCORINGS = {"strict_match": Scoring((regex(r"The answer is (\-?[0-9\.\,]+)."), TAKE_FIRST), GSM8K_OPTIONS),
                  "flexible_extract": Scoring((LAST_NUMBER, TAKE_FIRST), GSM8K_OPTIONS)}


def gsm8k_target(answer: str) -> str:
    """The number a GSM8K answer ends with, after its "####" (lm-eval's doc_to_target)."""
    return str(answer).split("####")[-1].strip()


def gsm8k_items(data: str | None) -> list[dict]:
    exemplars = _pack("gsm8k")
    pool = [(GSM8K_QUESTION.format(question=e["question"]), TARGET_DELIMITER + e["target"]) for e in exemplars]
    common = {"pool": pool, "pool_name": "GSM8K exemplars"}
    if data is None:
        return [{"id": e["id"], "question": GSM8K_QUESTION.format(question=e["question"]), "target": e["answer"],
                 "leave_out": i, **common} for i, e in enumerate(exemplars)]
    rows = read_rows(data, ("question", "answer"), layout="openai/gsm8k")
    return [{"id": str(i), "question": GSM8K_QUESTION.format(question=r["question"]),
             "target": gsm8k_target(r["answer"]), **common} for i, r in enumerate(rows)]


def gsm8k_score(item: dict, reply: str) -> dict:
    return score(reply, item, item["target"], GSM8K_SCORINGS)


# ---- MATH (Minerva) -------------------------------------------------------------------------------

MATH_QUESTION = "Problem:\n{problem}\n\nSolution:"
MATH_STOP = ("Problem:",)


def math_items(data: str | None) -> list[dict]:
    exemplars = _pack("math")
    pool = [(MATH_QUESTION.format(problem=e["problem"]), TARGET_DELIMITER + e["solution"]) for e in exemplars]
    common = {"pool": pool, "pool_name": "Minerva MATH exemplars"}
    if data is None:
        rows, ids, leave_out = exemplars, [e["id"] for e in exemplars], range(len(exemplars))
    else:
        rows = read_rows(data, ("problem", "solution"), layout="EleutherAI/hendrycks_math")
        ids, leave_out = [str(i) for i in range(len(rows))], [None] * len(rows)
    items = []
    for number, (row, item_id, own) in enumerate(zip(rows, ids, leave_out), 1):
        target = reference_answer(row["solution"])
        if target is None:
            raise Qwen2Error(f"{data or 'the MATH pack'} row {number}: its solution has no \\boxed{{}} answer to "
                             "score against; give MATH rows whose solution ends in \\boxed{...}")
        items.append({"id": item_id, "type": str(row.get("type") or row.get("subject") or "exemplars"),
                      "question": MATH_QUESTION.format(problem=row["problem"]), "solution": row["solution"],
                      "target": target, "leave_out": own, **common})
    return items


def math_verified(reply: str, solution: str) -> bool:
    """lm-eval's `math_verify` metric: Math-Verify's answer of the reply against the solution's."""
    from .answers import math_answer_matches

    try:
        return math_answer_matches(reply, solution)
    except Qwen2Error:  # a solution Math-Verify cannot read: no reply matches it
        return False


def math_score(item: dict, reply: str) -> dict:
    stated = normalize_answer(stated_answer(reply))
    return {"exact_match": float(answers_equivalent(stated, item["target"])),
            "math_verify": float(math_verified(reply, item["solution"]))}


# ---- MGSM (native chain of thought) ---------------------------------------------------------------

MGSM_LANGUAGES = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")


@functools.lru_cache(maxsize=None)
def mgsm_format(language: str) -> dict:
    """The language's row of the `mgsm_tasks` pack: headers, stop strings, filters, options."""
    for row in _pack("mgsm_tasks"):
        if row["language"] == language:
            return row
    raise Qwen2Error(f"the mgsm_tasks pack has no language {language!r}; rebuild it with "
                     "`python -m benchmarks.eval_packs math`")


def mgsm_items(language: str, data: str | None) -> list[dict]:
    if data is None:
        raise Qwen2Error(f"mgsm-{language} has no offline items (no package ships MGSM): give --data with the "
                         f"{language} split of juletxara/mgsm (JSONL or Parquet: question, answer, answer_number)")
    spec = mgsm_format(language)
    rows = read_rows(data, ("question", "answer", "answer_number"), layout="juletxara/mgsm")
    exemplars = [r for r in rows if r["answer"] is not None]
    tests = [r for r in rows if r["answer"] is None]
    pool = [(f"{r['question']}\n{spec['answer_header']}", TARGET_DELIMITER + r["answer"][spec["target_skip"]:])
            for r in exemplars]
    common = {"pool": pool, "pool_name": f"MGSM {language} exemplars (rows of --data with an answer)"}
    if not tests:  # the train split alone: its rows are the items, each with the others as shots
        return [{"id": str(i), "question": question, "target": str(r["answer_number"]), "leave_out": i, **common}
                for i, (r, (question, _)) in enumerate(zip(exemplars, pool))]
    return [{"id": str(i), "question": f"{spec['question_header']} {r['question']}\n{spec['answer_header']}",
             "target": str(r["answer_number"]), "draw": i, **common} for i, r in enumerate(tests)]


@functools.lru_cache(maxsize=None)
def mgsm_scorings(language: str) -> dict[str, Scoring]:
    return {name: Scoring.from_dict(s) for name, s in mgsm_format(language)["scoring"].items()}


def mgsm_score(language: str, item: dict, reply: str) -> dict:
    return score(reply, item, item["target"], mgsm_scorings(language))


class _MgsmStop(Sequence):
    """A language's stop strings (its question header, which the pack holds), read on first use: so
    importing this module, as the pack builder does before the pack exists, reads no pack."""

    def __init__(self, language: str):
        self.language = language

    def _strings(self) -> tuple[str, ...]:
        return tuple(mgsm_format(self.language)["stop"])

    def __getitem__(self, i):
        return self._strings()[i]

    def __len__(self) -> int:
        return len(self._strings())


def _mgsm(language: str) -> GenerationBenchmark:
    return GenerationBenchmark(
        name=f"mgsm-{language}",
        help=f"MGSM in {language}, native chain of thought (lm-eval's mgsm_native_cot_{language})",
        load=functools.partial(mgsm_items, language), prompt=_prompt, score=functools.partial(mgsm_score, language),
        metrics=("strict_match", "flexible_extract"), stop=_MgsmStop(language),
        max_new_tokens=LM_EVAL_MAX_GEN_TOKS, shots=0)


BENCHMARKS: dict[str, GenerationBenchmark] = {
    "gsm8k": GenerationBenchmark(
        name="gsm8k", help="GSM8K, 8-shot chain of thought (lm-eval's gsm8k_cot)", load=gsm8k_items,
        prompt=_prompt, score=gsm8k_score, metrics=tuple(GSM8K_SCORINGS), stop=GSM8K_STOP,
        max_new_tokens=LM_EVAL_MAX_GEN_TOKS, shots=8, pack_shots=7),
    "math": GenerationBenchmark(
        name="math", help="MATH, Minerva's 4-shot prompt and answer checks (lm-eval's minerva_math)",
        load=math_items, prompt=_prompt, score=math_score, metrics=("exact_match", "math_verify"), stop=MATH_STOP,
        max_new_tokens=LM_EVAL_MAX_GEN_TOKS, shots=4, pack_shots=3, group="type"),
    **{f"mgsm-{language}": _mgsm(language) for language in MGSM_LANGUAGES},
}
