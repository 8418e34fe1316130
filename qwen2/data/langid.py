"""Language identification, offline: each record gets "language" (ISO 639-1) and "language_score".

The Qwen2 report pre-trains on about 30 languages and balances them. Language ID is what makes both
possible: a corpus has to be labelled before it can be filtered to those languages or re-weighted.
datatrove's own LanguageFilter downloads a fastText model at run time; this step uses lingua
(`lingua-language-detector`), whose n-gram models ship inside the wheel, so it works on a machine
without internet. lingua is a closed-set classifier: it picks the most likely language *among those
it is given*, so the set is limited to the languages a corpus is expected to hold (faster, and no
probability spent on languages nobody trains on); `languages="all"` gives lingua's 75. Its models
load on first use, per process: about 0.7 GB for the default set (high-accuracy mode, which short
texts need).

The default set is the report's: English, Chinese and the 27 further languages Qwen2's release
lists (German, French, Spanish, Portuguese, Italian, Dutch; Russian, Czech, Polish; Arabic, Persian,
Hebrew, Turkish; Japanese, Korean; Vietnamese, Thai, Indonesian, Malay, Lao, Burmese, Cebuano, Khmer,
Tagalog; Hindi, Bengali, Urdu), plus eleven European languages with a large share of the web
(Ukrainian, Swedish, Danish, Norwegian Bokmål, Finnish, Greek, Hungarian, Romanian, Bulgarian,
Catalan, Slovak), so that their text is named rather than pushed into a neighbour's. lingua has no
model for three of the report's languages, but their scripts give them away: Lao, Burmese and Khmer
are each the one major language of their script, so a text with at least a third of its characters
in that script (letters and vowel signs, against the letters of other scripts) gets that language:
a third, because interface text quotes English terms, and no other language writes those letters.
Its score is that share. Cebuano has no ISO
639-1 code and no offline model here; it is left out (lingua calls most of it Tagalog).

`--balance` down-samples to target shares in two stages over the shards (see `langid`): label and
count every language, then keep each record of language L with probability p_L, chosen so that the
kept shares are the targets and the binding language is kept whole. The draw is a hash of the seed
and the record's id, so it is the same whichever worker sees the record and however often it runs.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil

from datatrove.pipeline.filters.base_filter import BaseFilter

from ..errors import Qwen2Error
from ..fileio import write_text_atomic

# English, Chinese, and the 27 languages of the Qwen2 release, by region (Cebuano, which has no
# ISO 639-1 code, is not among them: see the module docstring).
REPORT_LANGUAGES = ("en", "zh",
                    "de", "fr", "es", "pt", "it", "nl",
                    "ru", "cs", "pl",
                    "ar", "fa", "he", "tr",
                    "ja", "ko",
                    "vi", "th", "id", "ms", "lo", "my", "km", "tl",
                    "hi", "bn", "ur")
DEFAULT_LANGUAGES = REPORT_LANGUAGES + ("uk", "sv", "da", "nb", "fi", "el", "hu", "ro", "bg", "ca", "sk")

# Languages told by their script alone: the script's Unicode blocks. Each is the one major language
# written in it (Myanmar script also writes Shan and Mon, far smaller).
SCRIPT_LANGUAGES = {
    "lo": re.compile(r"[\u0e80-\u0eff]"),
    "my": re.compile(r"[\u1000-\u109f\ua9e0-\ua9ff\uaa60-\uaa7f]"),
    "km": re.compile(r"[\u1780-\u17ff\u19e0-\u19ff]"),
}
SCRIPT_SHARE = 1 / 3  # a text is in a script language when that script has this share of its characters
UNDETERMINED = "und"  # the stats' name for records with no letters to judge (ISO 639-2's "undetermined")
OTHER = "other"       # in balance shares: every kept language the shares do not name
SAMPLE_CHARS = 2000   # lingua reads at most this much of a record (see `sample_text`)
_LETTER = re.compile(r"[^\W\d_]")
_WIDE = re.compile(r"[\u2e80-\U0010ffff]")  # CJK and the other scripts written without spaces
_NOT_PROSE = re.compile(r"(^|\s)[-+]|[\[\]{}<>=|_/\\@#$%*]")  # options (-v, --all), markup, paths, code


def lingua_languages() -> set[str]:
    """The ISO 639-1 codes lingua has models for."""
    from lingua import Language

    return {language.iso_code_639_1.name.lower() for language in Language.all()}


def resolve_languages(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The detection set of a `--languages` value: None or "default" (DEFAULT_LANGUAGES), "report"
    (REPORT_LANGUAGES), "all" (lingua's and the script-told ones), or codes, comma-separated or a
    list. An unknown code is an error naming it."""
    if spec is None or spec == "default":
        return DEFAULT_LANGUAGES
    if spec == "report":
        return REPORT_LANGUAGES
    known = lingua_languages() | set(SCRIPT_LANGUAGES)
    if spec == "all":
        return tuple(sorted(known))
    codes = parse_codes(spec)
    check_codes(codes, known, "lingua and the script rules know")
    if len(set(codes) - set(SCRIPT_LANGUAGES)) == 1:
        raise Qwen2Error(f"--languages {spec!r}: language ID picks among two or more languages; give the others a "
                         "text may be in (or use --keep to keep one)")
    return codes


def parse_codes(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Language codes from "en,zh" or a list, lower-cased, each once, in order."""
    items = spec.split(",") if isinstance(spec, str) else spec
    codes = tuple(dict.fromkeys(code.strip().lower() for code in items if code.strip()))
    if not codes:
        raise Qwen2Error(f"no language codes in {spec!r}; give ISO 639-1 codes such as en,zh,de")
    return codes


def check_codes(codes, known, what: str) -> None:
    unknown = [code for code in codes if code not in known]
    if unknown:
        raise Qwen2Error(f"unknown language code(s) {', '.join(unknown)}: not among the codes {what} "
                         f"({', '.join(sorted(known))})")


def parse_shares(spec: str, languages: tuple[str, ...]) -> dict[str, float]:
    """{code: share} of a `--balance` value "en=0.5,zh=0.2,other=0.3": weights, normalised to sum to 1.
    Codes must be among `languages` (those detected, or kept) or be "other": every language not named."""
    shares = {}
    for item in spec.split(","):
        code, sep, value = item.partition("=")
        code = code.strip().lower()
        try:
            share = float(value)
        except ValueError:
            share = -1.0
        if not sep or not code or not (share >= 0 and math.isfinite(share)):
            raise Qwen2Error(f"bad --balance item {item!r}: give code=share pairs such as en=0.5,zh=0.2,other=0.3")
        shares[code] = share
    check_codes([c for c in shares if c != OTHER], set(languages), "kept and detected (see --keep and "
                "--languages), or other=SHARE")
    total = sum(shares.values())
    if total <= 0:
        raise Qwen2Error(f"--balance {spec!r}: the shares sum to 0")
    return {code: share / total for code, share in shares.items()}


def sample_text(text: str, limit: int = SAMPLE_CHARS) -> str:
    """What the detector reads: the whole text up to `limit` characters, else four windows spread
    over it (a licence header or a title page should not decide a long document's language). The
    cost of detection then stops growing with the document."""
    if len(text) <= limit:
        return text
    window = limit // 4
    step = (len(text) - window) // 3
    return "\n".join(text[i * step:i * step + window] for i in range(4))


class Detector:
    """lingua restricted to `languages`, with the script rules in front. Built on first use in each
    process: lingua's detector cannot be pickled, and a pipeline step travels to its workers pickled."""

    def __init__(self, languages=DEFAULT_LANGUAGES):
        self.languages = tuple(languages)
        self._lingua = None

    def __getstate__(self):
        return {"languages": self.languages, "_lingua": None}

    def lingua(self):
        if self._lingua is None:
            from lingua import IsoCode639_1, LanguageDetectorBuilder

            codes = [getattr(IsoCode639_1, code.upper()) for code in self.languages if code not in SCRIPT_LANGUAGES]
            self._lingua = LanguageDetectorBuilder.from_iso_codes_639_1(*codes).build() if codes else None
        return self._lingua

    def detect(self, text: str) -> tuple[str | None, float]:
        """(ISO 639-1 code, confidence in [0, 1]) of `text`; (None, 0.0) for a text with no letters.
        The confidence is lingua's: the language's share of the probability over the set."""
        text = sample_text(text)
        letters = _LETTER.findall(text)
        if not letters:
            return None, 0.0
        for code, script in SCRIPT_LANGUAGES.items():
            if code in self.languages and script.search(text):
                written = len(script.findall(text))  # with its vowel signs, which are marks, not letters
                share = written / (written + sum(1 for c in letters if not script.match(c)))
                if share >= SCRIPT_SHARE:
                    return code, round(share, 4)
        lingua = self.lingua()
        if lingua is None:  # only script languages asked for, and the text is in none of their scripts
            return None, 0.0
        best = lingua.compute_language_confidence_values(text)[0]
        if best.value <= 0:
            return None, 0.0
        return best.language.iso_code_639_1.name.lower(), round(best.value, 4)


class LanguageID(BaseFilter):
    """datatrove step: labels each document with "language" and "language_score" (an existing
    "language" field is replaced) and, given `keep`, drops the documents in other languages (reason
    "language"). Counts documents and bytes per language in its stats (`language_<code>`,
    `language_bytes_<code>`), which `langid` reads to balance and report."""

    name = "language id"

    def __init__(self, languages=DEFAULT_LANGUAGES, keep=None, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.detector = Detector(languages)
        self.keep = None if keep is None else frozenset(keep)

    def filter(self, doc) -> bool | tuple[bool, str]:
        language, score = self.detector.detect(doc.text)
        doc.metadata["language"] = language
        doc.metadata["language_score"] = score
        code = language or UNDETERMINED
        self.stat_update(f"language_{code}")
        self.stat_update(f"language_bytes_{code}", value=len(doc.text.encode("utf-8")))
        if self.keep is not None and language not in self.keep:
            return False, "language"
        return True


class LanguageBalance(BaseFilter):
    """datatrove step over labelled documents: keeps a document of language L with probability
    `keep_probability[L]` (None stands for no language), drawing from a hash of `seed` and the
    document's id; a language without a probability is dropped with reason "language", a document
    not drawn with reason "balance". Counts what it keeps per language (`kept_<code>`,
    `kept_bytes_<code>`)."""

    name = "language balance"

    def __init__(self, keep_probability: dict, seed: int = 0, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.keep_probability = dict(keep_probability)
        self.seed = seed

    def filter(self, doc) -> bool | tuple[bool, str]:
        language = doc.metadata.get("language")
        p = self.keep_probability.get(language)
        if p is None:
            return False, "language"
        if uniform(self.seed, doc.id) >= p:
            return False, "balance"
        code = language or UNDETERMINED
        self.stat_update(f"kept_{code}")
        self.stat_update(f"kept_bytes_{code}", value=len(doc.text.encode("utf-8")))
        return True


def uniform(seed: int, key) -> float:
    """A number in [0, 1) fixed by (seed, key): the same draw in every process and every rerun."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


def keep_probabilities(counts: dict[str, float], shares: dict[str, float],
                       keep=None) -> tuple[dict[str, float], float | None]:
    """({language: keep probability}, probability for OTHER languages or None) that turn `counts`
    (documents or bytes per language) into `shares`, keeping as much as possible: the total kept is
    T = min over languages of count / share, and language L keeps share_L * T of its count_L. Only
    languages in `keep` (all, if None) count; a named language with nothing in the corpus is left
    out of the targets (the others' shares are renormalised), so it cannot make T zero."""
    def kept(code):
        return keep is None or code in keep

    groups = {code: counts.get(code, 0) for code in shares if code != OTHER}
    if OTHER in shares:
        groups[OTHER] = sum(n for code, n in counts.items() if code not in shares and kept(code))
    present = {code: n for code, n in groups.items() if n > 0 and shares[code] > 0}
    if not present:
        return {}, None
    total_share = sum(shares[code] for code in present)
    total = min(n / (shares[code] / total_share) for code, n in present.items())
    p = {code: min(1.0, shares[code] / total_share * total / present[code]) if code in present else 0.0
         for code in groups}
    other = p.pop(OTHER, None)
    return p, other


def langid(inputs, out_dir: str, languages=None, keep=None, balance: str | None = None, by: str = "bytes",
           seed: int = 0, options=None) -> dict:
    """`qwen2 data langid`: label every record (see `LanguageID`), keep the languages `keep`, and with
    `balance` ("en=0.5,zh=0.3,other=0.2") down-sample to those shares of `by` ("bytes" or
    "documents"). Returns the stats written to OUT/stats.json, with "languages" (documents and bytes
    per language, in and out) and, when balancing, the targets, probabilities and realised shares.

    Balancing runs in two stages: the labelled records go to OUT/.datatrove/labelled (so lingua runs
    once), their counts give the probabilities, then `LanguageBalance` writes OUT from them. A killed
    run resumes in whichever stage it stopped; the labelled copy is removed when the run finishes."""
    from . import shards

    options = options or shards.RunOptions()
    languages = resolve_languages(languages)
    keep = None if keep is None else parse_codes(keep)
    if keep is not None:
        check_codes(keep, set(languages), "the detection set holds; add them with --languages")
    shares = None if balance is None else parse_shares(balance, keep or languages)
    if by not in ("bytes", "documents"):
        raise Qwen2Error(f"balance by {by!r}: use bytes or documents")
    out_dir = os.path.abspath(out_dir)
    excluded = shards.removed_writer(out_dir) if options.removed else None
    if shares is None:
        stats = shards.run([LanguageID(languages, keep, excluded)], inputs, out_dir, options, "langid")
        counted = _language_counts(out_dir, "language id", "language")
        stats["languages"] = _in_and_out(counted, {c: n for c, n in counted.items() if keep is None or c in keep})
        return _rewrite(out_dir, stats)

    staged = os.path.join(out_dir, shards.STATE_DIR, "labelled")
    first = shards.run([LanguageID(languages)], inputs, staged, dataclasses.replace(options, removed=None), "langid")
    counted = _language_counts(staged, "language id", "language")
    unit = "bytes" if by == "bytes" else "documents"
    p, other = keep_probabilities({code: c[unit] for code, c in counted.items()}, shares, keep)
    if other is not None:  # "other": every kept language the shares do not name (no language, if nothing is kept)
        for code in (*languages, None):
            if code not in p and (keep is None or code in keep):
                p[code] = other
    labelled = sorted(glob.glob(os.path.join(staged, "*.jsonl")))  # not its stats.json
    stats = shards.run([LanguageBalance(p, seed, excluded)], labelled, out_dir, options, "langid")
    stats.update({key: first[key] for key in ("shards", "documents_in", "bytes_in", "bad_records", "empty_shards")})
    for reason, n in first["removed"].items():
        stats["removed"][reason] = stats["removed"].get(reason, 0) + n
    stats["seconds"] = round(first["seconds"] + stats["seconds"], 2)
    kept = _language_counts(out_dir, "language balance", "kept")
    stats["languages"] = _in_and_out(counted, kept)
    kept_total = sum(c[unit] for c in kept.values()) or 1
    stats["balance"] = {"by": by, "seed": seed, "targets": shares,
                        "keep_probability": {**{code: round(p.get(code, 0.0), 6) for code in shares if code != OTHER},
                                             **({OTHER: round(other, 6)} if other is not None else {})},
                        "shares_out": {code: round(c[unit] / kept_total, 4) for code, c in kept.items()}}
    shutil.rmtree(staged, ignore_errors=True)
    return _rewrite(out_dir, stats)


def _language_counts(out_dir: str, step_name: str, prefix: str) -> dict[str, dict[str, int]]:
    """{language: {"documents", "bytes"}} from a finished run's per-task stats of the step `step_name`
    (its counters `<prefix>_<code>` and `<prefix>_bytes_<code>`)."""
    from .shards import STATE_DIR, step_counters

    counts: dict[str, dict[str, int]] = {}
    for name, counters in step_counters(os.path.join(out_dir, STATE_DIR)):
        if name != step_name:
            continue
        for key, value in counters.items():
            if key.startswith(f"{prefix}_bytes_"):
                counts.setdefault(key[len(prefix) + 7:], {"documents": 0, "bytes": 0})["bytes"] = int(value)
            elif key.startswith(f"{prefix}_"):
                counts.setdefault(key[len(prefix) + 1:], {"documents": 0, "bytes": 0})["documents"] = int(value)
    return dict(sorted(counts.items()))


def _in_and_out(counted: dict, kept: dict) -> dict:
    """{language: documents and bytes in and out}, most documents first."""
    table = {code: {"documents_in": c["documents"], "bytes_in": c["bytes"],
                    "documents_out": kept.get(code, {}).get("documents", 0),
                    "bytes_out": kept.get(code, {}).get("bytes", 0)} for code, c in counted.items()}
    return dict(sorted(table.items(), key=lambda item: (-item[1]["documents_in"], item[0])))


def _rewrite(out_dir: str, stats: dict) -> dict:
    write_text_atomic(os.path.join(out_dir, "stats.json"), json.dumps(stats, indent=1) + "\n")
    return stats


# ---- measuring it: labelled sentences from a source lingua never saw -------------------------------
#
# Debian's message catalogues hold the same interface messages in dozens of labelled languages
# (qwen2.data.corpora reads them). Short interface strings ("Open", "%s: %d") are ambiguous in any
# language and say little about a detector, so only prose counts: see `is_prose`.

def is_prose(line: str) -> bool:
    """Whether a cleaned catalogue line (corpora.sentences) is a sentence to test language ID on: at
    least 30 characters and 5 words (or 10 characters of a script written without spaces), and no
    command-line option, markup, path or code character (`-v`, `<b>`, `a/b`, `x=1`, `[FILE]`)."""
    long_enough = (len(line) >= 30 and len(line.split()) >= 5) or len(_WIDE.findall(line)) >= 10
    return long_enough and not _NOT_PROSE.search(line)


def labelled_sentences(per_language: int = 100, languages=DEFAULT_LANGUAGES, seed: int = 0,
                       prose: bool = True) -> dict[str, dict]:
    """{language: {"sentences": a seeded sample of up to `per_language` lines, "catalogues":
    "held-out" or "all"}} for each of `languages` the machine's catalogues have any of: prose lines
    (`is_prose`), or with `prose=False` every line corpora calls a sentence. The sample comes from the
    catalogues qwen2.data.corpora holds out from every other use; a language with fewer than
    `per_language` there draws from all catalogues (lingua saw none of them)."""
    from . import corpora

    if not corpora.catalogues():
        raise Qwen2Error(f"no compiled message catalogues under {corpora.LOCALE_DIR}: the labelled sentences come "
                         "from Debian's translations")

    def wanted(line):
        return is_prose(line) or not prose

    found: dict[str, dict[str, list[str]]] = {"held-out": {}, "all": {}}
    for s in corpora.sentences(set(languages), held_out=True):
        if wanted(s["text"]):
            found["held-out"].setdefault(s["language"], []).append(s["text"])
    sparse = {code for code in languages if len(found["held-out"].get(code, ())) < per_language}
    if sparse:
        for s in corpora.sentences(sparse, held_out=None):
            if wanted(s["text"]):
                found["all"].setdefault(s["language"], []).append(s["text"])
    rng = random.Random(seed)
    sample = {}
    for code in languages:
        where = "all" if code in sparse and found["all"].get(code) else "held-out"
        lines = found[where].get(code, [])
        if lines:
            sample[code] = {"sentences": rng.sample(lines, min(per_language, len(lines))), "catalogues": where}
    return sample


def evaluate(labelled: dict[str, list[str]], languages=DEFAULT_LANGUAGES) -> dict:
    """Language ID over `labelled` ({language: sentences}): {"confusion": {true: {predicted: n}},
    "per_language": {true: {"n", "correct", "accuracy"}}, "accuracy": over every sentence,
    "macro_accuracy": the mean of the languages'}. An undetermined sentence counts as "und"."""
    detector = Detector(languages)
    confusion: dict[str, dict[str, int]] = {}
    for true, sentences in labelled.items():
        row = confusion.setdefault(true, {})
        for sentence in sentences:
            predicted = detector.detect(sentence)[0] or UNDETERMINED
            row[predicted] = row.get(predicted, 0) + 1
    per_language = {}
    for true, row in confusion.items():
        n = sum(row.values())
        per_language[true] = {"n": n, "correct": row.get(true, 0), "accuracy": row.get(true, 0) / n}
    total = sum(v["n"] for v in per_language.values())
    return {"confusion": confusion, "per_language": per_language,
            "accuracy": sum(v["correct"] for v in per_language.values()) / total,
            "macro_accuracy": sum(v["accuracy"] for v in per_language.values()) / len(per_language)}
