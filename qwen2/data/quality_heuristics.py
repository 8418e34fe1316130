"""Heuristic quality rules: what each measures on a document and when it drops one.

The field's rules are datatrove's: Gopher's repetition and quality rules, C4's and FineWeb's. Their
published thresholds are tuned on English web pages, and on a corpus of code, man pages and
translations in forty languages they remove nearly all the clean text (96 % of the planted corpus's:
Gopher's alpha-word rule alone drops over 90 % of man pages and Python files, FineWeb's
terminal-punctuation rule over 80 % of Python, C4's sentence rule over half of the translations; see
benchmarks/results/data_filter.md). So there are two sets:

    default    any language, code too: Gopher's line repetition (datatrove, thresholds raised
               for code), and three rules for what line statistics do not see:
               mojibake, gibberish (random characters) and web boilerplate
    web        datatrove's Gopher, C4 and FineWeb filters at their published thresholds
               (English web text)

`--heuristics` takes a preset or rule names, comma-separated. Every rule's measured values go in
the document's "quality" (see `measure`), kept or not, so thresholds can be chosen afterwards.

datatrove's word-based rules split words with spaCy's blank English pipeline, which needs the spacy
package (no model download); `OfflineWordTokenizer` is a Unicode regex in its place, so every rule
here runs with what the project installs.
"""
from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Callable

import regex

from ..errors import Qwen2Error


def _whitespace_tokenizer():
    from datatrove.utils.word_tokenizers import WhitespaceTokenizer

    return WhitespaceTokenizer


class OfflineWordTokenizer(_whitespace_tokenizer()):
    """Words for datatrove's rules without spaCy: runs of letters (with marks, digits, apostrophes and
    underscores inside), numbers, and each other symbol on its own, as spaCy's tokenizer splits
    punctuation off words. Sentences: datatrove's own regex splitter (WhitespaceTokenizer's)."""

    WORD = regex.compile(r"[\p{L}\p{M}][\p{L}\p{M}\p{N}_'’]*|\p{N}[\p{N}.,]*|[^\s\p{L}\p{M}\p{N}]")

    def word_tokenize(self, text: str) -> list[str]:
        return self.WORD.findall(text)


WORDS = OfflineWordTokenizer()


# ---- measures -------------------------------------------------------------------------------------

def repetition(text: str) -> dict:
    """Gopher's line and paragraph duplication, as datatrove's GopherRepetitionFilter counts it: the
    share of lines (paragraphs) that repeat an earlier one, and the share of characters in them."""
    from datatrove.pipeline.filters.gopher_repetition_filter import find_duplicates

    paragraphs = re.split(r"\n{2,}", text.strip())
    para_dups, para_chars = find_duplicates(paragraphs)
    lines = re.split(r"\n+", text)
    line_dups, line_chars = find_duplicates(lines)
    return {"dup_line_frac": line_dups / len(lines), "dup_line_char_frac": line_chars / len(text),
            "dup_para_frac": para_dups / len(paragraphs), "dup_para_char_frac": para_chars / len(text)}


# A UTF-8 lead byte read as Latin-1 / Windows-1252 (Â..ô) followed by a continuation byte read the
# same way (\x80-\xbf, or what cp1252 puts at 0x80-0x9f, or U+FFFD where it has nothing): "Ã©" for
# "é", "â€™" for "’". Real text almost never puts these two classes side by side.
_MOJIBAKE = re.compile("[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6"
                       "\u02dc\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122\ufffd]")


def mojibake(text: str) -> dict:
    """The share of characters that are UTF-8 decoded with the wrong codec (see _MOJIBAKE)."""
    return {"mojibake_frac": 2 * len(_MOJIBAKE.findall(text)) / len(text)}


# A letter next to a punctuation mark or symbol, either way round (whitespace between breaks the pair)
_SWITCH = regex.compile(r"[\p{L}\p{M}][\p{P}\p{S}]|[\p{P}\p{S}][\p{L}\p{M}]")


def gibberish(text: str) -> dict:
    """Random characters, in any script: such text does not compress (`compression_ratio`, zlib's; 0.78
    and more for random characters) and its letters alternate with punctuation (`symbol_switch_frac`:
    letter-symbol neighbours per non-space character; 0.25 and more for random characters, 0.03-0.07
    for prose). Either alone overlaps clean text (a short man page compresses to 0.79, dense code
    switches 0.37 times a character); the rule asks for both."""
    data = text.encode("utf-8")
    visible = len(text) - sum(map(str.isspace, text))
    return {"compression_ratio": len(zlib.compress(data, 9)) / len(data),
            "symbol_switch_frac": len(_SWITCH.findall(text, overlapped=True)) / max(1, visible)}


# Web boilerplate: C4's policy phrases (and its javascript and lorem-ipsum rules), and the
# navigation, sharing and footer lines RefinedWeb's line-wise rules remove.
_BOILERPLATE_PHRASES = (
    "terms of use", "terms of service", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
    "use cookies", "accept cookies", "cookie preferences", "cookie settings", "javascript", "lorem ipsum",
    "all rights reserved", "skip to content", "skip to main content", "back to top", "read more", "click here",
    "sign up", "sign in", "log in", "subscribe", "newsletter", "follow us", "share this", "powered by",
    "add to cart", "sponsored", "leave a reply", "leave a comment", "related posts", "posted by", "contact us")
_BOILERPLATE_ALONE = ("menu", "home", "search", "loading", "advertisement", "next", "previous", "share", "tags",
                      "categories")
_BOILERPLATE = re.compile(r"\b(?:" + "|".join(map(re.escape, _BOILERPLATE_PHRASES)) + r")\b"
                          r"|^\W*(?:" + "|".join(_BOILERPLATE_ALONE) + r")\W*$")
_BOILERPLATE_MAX_WORDS = 20  # a long line that mentions cookies is prose about them


def boilerplate(text: str) -> dict:
    """The share of non-empty lines that are web boilerplate: a short line with a policy, navigation
    or sharing phrase, or a line that is only a menu word."""
    lines = [line for line in text.splitlines() if line.strip()]
    hits = sum(len(line.split()) <= _BOILERPLATE_MAX_WORDS and bool(_BOILERPLATE.search(line.lower()))
               for line in lines)
    return {"boilerplate_line_frac": hits / max(1, len(lines))}


def gopher_quality(text: str) -> dict:
    """What GopherQualityFilter tests, counted the same way: words (without symbols), their mean
    length, the share of words with a letter, and how many English stop words appear."""
    from datatrove.pipeline.filters.gopher_quality_filter import STOP_WORDS
    from datatrove.utils.text import PUNCTUATION_SET

    words = WORDS.word_tokenize(text)
    real = [w for w in words if any(ch not in PUNCTUATION_SET for ch in w)]
    return {"words": len(real), "mean_word_length": sum(map(len, real)) / max(1, len(real)),
            "alpha_word_frac": sum(any(c.isalpha() for c in w) for w in words) / max(1, len(words)),
            "stop_words": len(set(STOP_WORDS) & set(words))}


def fineweb(text: str) -> dict:
    """What FineWebQualityFilter tests: the share of lines ending in terminal punctuation, of lines of
    30 characters or fewer, and newlines per word."""
    from datatrove.utils.text import TERMINAL_PUNCTUATION

    lines = [line for line in text.split("\n") if line.strip()]
    ends = tuple(TERMINAL_PUNCTUATION)
    return {"line_punct_frac": sum(line.endswith(ends) for line in lines) / max(1, len(lines)),
            "short_line_frac": sum(len(line) <= 30 for line in lines) / max(1, len(lines)),
            "newline_word_ratio": text.count("\n") / max(1, len(WORDS.word_tokenize(text)))}


# ---- rules ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Limit:
    """A filter on a document's measured values (its metadata["quality"]): drop it, with `reason`,
    when every condition (key, ">" or "<", threshold) holds. A missing value holds no condition."""
    reason: str
    conditions: tuple[tuple[str, str, float], ...]

    def filter(self, doc) -> bool | tuple[bool, str]:
        quality = doc.metadata.get("quality", {})
        for key, op, threshold in self.conditions:
            value = quality.get(key)
            if value is None or not (value > threshold if op == ">" else value < threshold):
                return True
        return False, self.reason


@dataclasses.dataclass(frozen=True)
class Rule:
    """A heuristic: `measures` (functions text -> {name: value}, stored in "quality"), and what
    decides: `limits` on those values, or `datatrove` (-> datatrove filters, whose .filter(doc)
    decides as `Limit.filter` does)."""
    measures: tuple[Callable[[str], dict], ...] = ()
    limits: tuple[Limit, ...] = ()
    datatrove: Callable[[], list] | None = None


def _gopher_repetition_lines() -> list:
    from datatrove.pipeline.filters import GopherRepetitionFilter

    # Characters in repeated lines/paragraphs only: code repeats short lines (")", "]") and n-grams of
    # identifiers; the planted corpus's clean Python reaches 0.80 (a test's data table), repeated
    # lines 0.93 and more.
    return [GopherRepetitionFilter(dup_line_frac=None, dup_para_frac=None, dup_line_char_frac=0.85,
                                   dup_para_char_frac=0.85, top_n_grams=(), dup_n_grams=(), language=WORDS)]


def _gopher() -> list:
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    return [GopherRepetitionFilter(language=WORDS), GopherQualityFilter(language=WORDS)]


def _c4() -> list:
    from datatrove.pipeline.filters import C4QualityFilter

    return [C4QualityFilter(language=WORDS)]


def _fineweb() -> list:
    from datatrove.pipeline.filters import FineWebQualityFilter

    return [FineWebQualityFilter(language=WORDS)]


RULES: dict[str, Rule] = {
    # > 85 % of characters in repeated lines or paragraphs (datatrove's Gopher repetition filter)
    "repetition": Rule((repetition,), datatrove=_gopher_repetition_lines),
    # > 10 % of characters in UTF-8 read with the wrong codec
    "mojibake": Rule((mojibake,), (Limit("mojibake", (("mojibake_frac", ">", 0.10),)),)),
    # random characters: incompressible with letters and symbols interleaved
    "gibberish": Rule((gibberish,), (Limit("gibberish", (("compression_ratio", ">", 0.75),
                                                         ("symbol_switch_frac", ">", 0.15))),)),
    # > 30 % of lines cookie and policy notices, navigation, sharing
    "boilerplate": Rule((boilerplate,), (Limit("boilerplate", (("boilerplate_line_frac", ">", 0.30),)),)),
    # datatrove's filters at their published thresholds, for English web text
    "gopher": Rule((repetition, gopher_quality), datatrove=_gopher),
    "c4": Rule(datatrove=_c4),  # C4 rewrites the text it keeps: QualityFilter shows it a copy
    "fineweb": Rule((fineweb,), datatrove=_fineweb),
}
PRESETS = {"default": ("repetition", "mojibake", "gibberish", "boilerplate"),
           "web": ("gopher", "c4", "fineweb"),
           "none": ()}


def parse_heuristics(spec: str | None) -> tuple[str, ...]:
    """Rule names from "default", "web", "none" or a comma-separated list of rules and presets."""
    names: list[str] = []
    for part in (spec or "none").split(","):
        part = part.strip()
        if part in PRESETS:
            names += PRESETS[part]
        elif part in RULES:
            names.append(part)
        else:
            raise Qwen2Error(f"unknown heuristic {part!r}; the rules are {', '.join(RULES)} and the presets "
                             f"{', '.join(PRESETS)}")
    return tuple(dict.fromkeys(names))


def measure(text: str, rules: tuple[str, ...]) -> dict:
    """Every value the `rules` measure on `text`, rounded to 4 decimals."""
    values: dict = {}
    if not text:
        return values
    for measure_of in dict.fromkeys(m for name in rules for m in RULES[name].measures):
        values.update(measure_of(text))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}


def filters(rules: tuple[str, ...]) -> list:
    """The filter objects of `rules`, in order."""
    out: list = []
    for name in rules:
        rule = RULES[name]
        out += rule.datatrove() if rule.datatrove else list(rule.limits)
    return out
