"""qwen2.data.planted and the offline sources in qwen2.data.corpora: a corpus assembled from the
machine's own text, with planted problems whose labels must say exactly what was planted."""
import itertools
import json
import os
import random
import re
import tracemalloc

import pytest

from qwen2.data import corpora, planted
from qwen2.errors import Qwen2Error

SIZE_MB, SEED, SHARDS = 1.5, 7, 3


def read_corpus(path):
    return [json.loads(line) for name in sorted(os.listdir(path)) if name.endswith(".jsonl")
            for line in open(os.path.join(path, name), encoding="utf-8")]


def squeezed(text):
    return " ".join(text.split())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("planted") / "corpus")
    manifest = planted.build(out, SIZE_MB, seed=SEED, shards=SHARDS)
    records = read_corpus(out)
    return out, manifest, records, {r["id"]: r for r in records}


@pytest.fixture(scope="module")
def problems():
    from qwen2.eval.humaneval import load_problems

    return {p["task_id"]: p for p in load_problems()}


def of_kind(records, kind):
    return [r for r in records if (r["planted"] or {}).get("kind", "clean") == kind]


def test_same_seed_gives_the_same_bytes(corpus, tmp_path):
    out, manifest, _, _ = corpus
    again = str(tmp_path / "again")
    assert planted.build(again, SIZE_MB, seed=SEED, shards=SHARDS) == manifest
    for name in sorted(os.listdir(out)):
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name


def test_the_manifest_counts_the_shards(corpus):
    out, manifest, records, _ = corpus
    assert sorted(os.listdir(out)) == ["manifest.json"] + [f"shard-{k:05d}.jsonl" for k in range(SHARDS)]
    ids = [r["id"] for r in records]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert manifest["records"] == len(records) == sum(s["records"] for s in manifest["shards"])
    assert manifest["bytes"] == sum(os.path.getsize(os.path.join(out, s["file"])) for s in manifest["shards"])
    assert SIZE_MB * 1e6 <= manifest["bytes"] < SIZE_MB * 1e6 + 50_000
    assert all(s["bytes"] > 0.2 * manifest["bytes"] / SHARDS for s in manifest["shards"])  # about equal shards
    kinds = {kind: len(of_kind(records, kind)) for kind in ["clean", *planted.DEFAULT_SHARES]}
    assert manifest["counts"] == {k: n for k, n in kinds.items() if n}
    assert sum(manifest["junk_kinds"].values()) == kinds["junk"]
    for r in records:
        assert {"id", "text", "source", "language", "planted"} <= set(r) and r["text"].strip()
    assert set(manifest["clean_sources"]) == {"translations", "man", "doc", "python", "plays"}
    assert json.load(open(os.path.join(out, "manifest.json"))) == manifest


def test_copies_come_after_a_clean_original(corpus):
    _, _, records, by_id = corpus
    copies = [r for r in records if r["planted"] and "of" in r["planted"]]
    assert copies
    for r in copies:
        original = by_id[r["planted"]["of"]]
        assert original["planted"] is None and original["id"] < r["id"]


def test_exact_and_normalized_duplicates(corpus):
    _, _, records, by_id = corpus
    exact, normalized = of_kind(records, "exact_duplicate"), of_kind(records, "normalized_duplicate")
    assert exact and normalized
    for r in exact:
        original = by_id[r["planted"]["of"]]
        assert r["text"] == original["text"]
        assert (r["source"], r["language"]) == (original["source"], original["language"])
    for r in normalized:
        original = by_id[r["planted"]["of"]]
        assert r["text"] != original["text"] and squeezed(r["text"].lower()) == squeezed(original["text"].lower())
        assert (r["text"] == r["text"].lower()) == (r["planted"]["change"] == "whitespace+case") or \
            original["text"] == original["text"].lower()


def test_near_duplicates_record_their_jaccard(corpus):
    _, _, records, by_id = corpus
    near = of_kind(records, "near_duplicate")
    assert len(near) >= 5
    for r in near:
        original = by_id[r["planted"]["of"]]
        words = len(original["text"].split())
        assert words >= planted.NEAR_MIN_WORDS
        assert r["planted"]["edited_words"] == max(1, round(planted.NEAR_EDIT_FRACTION * words))
        assert r["planted"]["jaccard"] == round(planted.jaccard(original["text"], r["text"]), 4) < 1
    assert sum(r["planted"]["jaccard"] >= 0.8 for r in near) >= 0.9 * len(near)


def test_near_duplicate_edits_runs_of_five_percent_of_the_words():
    rng = random.Random(0)
    text = " ".join(f"w{rng.randrange(10**6)}" for _ in range(1000)) + "\n"
    similar = []
    for seed in range(20):
        copy, edited = planted.near_duplicate(text, random.Random(seed))
        assert edited == 50 and abs(len(copy.split()) - 1000) <= 50
        similar.append(planted.jaccard(text, copy))
    assert 0.8 <= min(similar) and max(similar) < 0.95  # scattered edits would give about 0.6


def test_jaccard_is_over_word_five_gram_shingles():
    assert planted.shingles("A b c d e f") == {"a b c d e", "b c d e f"}
    assert planted.shingles("two words") == {"two words"}
    assert planted.jaccard("a b c d e f", "A  b\nc d e g") == pytest.approx(1 / 3)


def test_junk_is_what_its_label_says(corpus):
    _, _, records, by_id = corpus
    junk = {kind: [r for r in of_kind(records, "junk") if r["planted"]["junk"] == kind] for kind in planted.JUNK_KINDS}
    for r in itertools.chain(*junk.values()):
        assert r["source"] == "planted" and r["language"] is None
    for r in junk["repeated_lines"]:
        lines = r["text"].splitlines()
        assert len(lines) >= 20 and len(set(lines)) <= 3
    for r in junk["boilerplate"]:
        assert len(r["text"].splitlines()) >= 12
    for r in junk["random_chars"]:
        assert 300 <= len(r["text"]) <= 4001
    for r in junk["mojibake"]:
        original = by_id[r["planted"]["of"]]["text"]
        assert r["text"] in {original.encode().decode(codec, errors="replace") for codec in ("cp1252", "latin-1")}
        assert planted.jaccard(original, r["text"]) < 0.5  # garbled, not a near-duplicate
    rng = random.Random(1)
    assert len(set(planted.boilerplate(rng) for _ in range(50))) == 50
    assert planted.mojibake("Grüße, 世界", rng) in ("GrÃ¼ÃŸe, ä¸–ç•Œ",  # cp1252
                                                   "GrÃ¼Ã\x9fe, ä¸\x96ç\x95\x8c")  # latin-1


def test_humaneval_copies_hold_the_prompt_modulo_whitespace(corpus, problems):
    _, _, records, _ = corpus
    copies = of_kind(records, "humaneval")
    assert copies
    for r in copies:
        prompt = problems[r["planted"]["task_id"]]["prompt"].strip("\n")
        assert squeezed(prompt) in squeezed(r["text"])
        assert (prompt in r["text"]) == (r["planted"]["whitespace"] == "verbatim")
    definitions = {squeezed(line) for p in problems.values() for line in p["prompt"].splitlines()
                   if line.lstrip().startswith("def ")}
    for r in of_kind(records, "clean"):
        assert not any(squeezed(line) in definitions for line in r["text"].splitlines())


def test_respaced_changes_only_whitespace():
    rng = random.Random(3)
    text = 'def f(x):\n    """Add one.\n    >>> f(1)\n    2\n    """\n'
    for _ in range(20):
        out = planted.respaced(text, rng)
        assert out != text and squeezed(out) == squeezed(text)


def test_clean_records_are_unique(corpus):
    _, _, records, _ = corpus
    clean = [(r["id"], planted.shingles(r["text"])) for r in of_kind(records, "clean")]
    for (a, sa), (b, sb) in itertools.combinations(clean, 2):
        if sa & sb:
            assert len(sa & sb) / len(sa | sb) < 0.5, (a, b)


def test_the_guard_finds_near_copies_and_passes_new_texts():
    guard = planted.NearCopyGuard()
    rng = random.Random(5)
    texts = [" ".join(f"w{rng.randrange(10**6)}" for _ in range(300)) for _ in range(50)]
    assert not any(guard.seen_before(t) for t in texts)
    assert all(guard.seen_before(planted.near_duplicate(t, rng)[0]) for t in texts)
    assert all(guard.seen_before(t.upper()) for t in texts)


def synthetic_documents():
    """An endless clean source: what a corpus of any size reads from. Half of it in Cyrillic letters,
    for mojibake to garble."""
    rng = random.Random(11)
    for i in itertools.count():
        letters = "abcdefgh" if i % 2 else "абвгдежз"
        words = [f"{rng.choice(letters)}{rng.randrange(10**5)}" for _ in range(rng.randint(120, 200))]
        yield {"text": " ".join(words) + "\n", "source": "synthetic", "language": "xx", "origin": str(i)}


def test_records_stream_with_the_configured_shares():
    shares = {"exact_duplicate": 0.1, "normalized_duplicate": 0.05, "near_duplicate": 0.1, "junk": 0.1,
              "humaneval": 0.05}
    problems = [{"task_id": "HumanEval/0", "prompt": "def f(x):\n    return x\n"}]
    n = 4000
    records = list(itertools.islice(planted.records(1, shares, synthetic_documents(), problems), n))
    assert [r["id"] for r in records] == [f"doc{i:09d}" for i in range(n)]
    for kind, share in shares.items():
        realised = len(of_kind(records, kind)) / n
        assert abs(realised - share) < 4 * (share * (1 - share) / n) ** 0.5 + 0.005, (kind, realised)
    with pytest.raises(Qwen2Error, match="bad planted shares"):
        next(planted.records(1, {"junk": 0.7, "near_duplicate": 0.4}, synthetic_documents(), problems))


def test_memory_does_not_grow_with_the_corpus():
    problems = [{"task_id": "HumanEval/0", "prompt": "def f(x):\n    return x\n"}]

    def peak(n):
        tracemalloc.start()
        for _ in itertools.islice(planted.records(2, None, synthetic_documents(), problems), n):
            pass
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(1000), peak(4000)  # the reservoir of originals is full from about 600 records
    assert large < 1.25 * small, (small, large)


def test_locale_names_map_to_iso_639_1():
    assert [corpora.locale_language(n) for n in ("pt_BR", "zh_CN", "sr@latin", "de", "ca@valencia", "mo")] == \
        ["pt", "zh", "sr", "de", "ca", "ro"]
    assert [corpora.locale_language(n) for n in ("ast", "en@quot", "en@shaw", "zh_Hant.UTF-8x", "C")] == \
        [None, None, None, "zh", None]
    assert corpora.catalogue_family("gtk30") == corpora.catalogue_family("gtk20") == "gtk"
    assert corpora.catalogue_family("iso_3166-1") == corpora.catalogue_family("iso_3166")


def test_message_text_keeps_the_words():
    assert corpora.message_text("_Open %s in <b>%d</b> windows &amp; {0} tabs…") == "Open in windows & tabs…"
    assert corpora.message_text("Save &As: %1$s, %(name)s, %-10.3lf%%") == "Save As: , ,"
    assert corpora.is_sentence("Die Datei konnte nicht geöffnet werden")
    assert corpora.is_sentence("无法打开文件，请检查权限")
    assert not corpora.is_sentence("Cancel") and not corpora.is_sentence("0x%08x: 12 34 56 78 9a")


def test_translations_hold_20_languages_of_50_held_out_sentences():
    found = corpora.sentences_by_language(50)
    assert len(found) >= 20, sorted(found)
    assert {"de", "fr", "es", "ru", "zh", "ja", "ar"} <= set(found)
    for language, texts in found.items():
        assert len(texts) == len(set(texts)) == 50 and all(corpora.is_sentence(t) for t in texts), language
    assert corpora.sentences_by_language(50, languages={"de", "ja"}) == {k: found[k] for k in ("de", "ja")}  # fixed


def test_held_out_packages_are_never_in_the_documents():
    held = {c[1] for c in corpora.catalogues() if corpora.is_held_out(c[1])}
    assert held and len(held) < len(corpora.catalogues())
    docs = list(itertools.islice(corpora.translations(seed=0), 300))
    assert docs and not {d["origin"] for d in docs} & held
    assert all(d["language"] and len(d["text"]) >= corpora.MIN_DOCUMENT_CHARS for d in docs)
    assert len({d["language"] for d in docs}) >= 10
    sentences = list(itertools.islice(corpora.sentences(), 300))
    assert {s["origin"] for s in sentences} <= held


def test_missing_sources_give_nothing(tmp_path):
    missing = str(tmp_path / "nowhere")
    assert list(corpora.translations(root=missing)) == list(corpora.man_pages(root=missing)) == []
    assert list(corpora.documentation(root=missing)) == list(corpora.python_sources(roots=[missing])) == []
    with pytest.raises(Qwen2Error, match="no compiled message catalogues"):
        corpora.sentences_by_language(root=missing)


def test_troff_text_keeps_the_words():
    page = "\n".join([
        '.\\" a comment', '.TH LS "1" "2022"', ".SH NAME", "ls \\- list directory contents", ".SH SYNOPSIS",
        ".B ls", "[\\fI\\,OPTION\\/\\fR]...", ".de XX", "junk inside a macro", "..", ".PP",
        "Sort \\(lqentries\\(rq alphabetically if none of \\fB\\-cftuvSUX\\fR is given.", ".Op Fl a Ar file", ".sp"])
    assert corpora.troff_text(page) == ("NAME\nls - list directory contents\nSYNOPSIS\nls\n[OPTION]...\n"
                                        "Sort \u201centries\u201d alphabetically if none of -cftuvSUX is given.\n"
                                        "a file\n")


def test_chunks_cut_long_texts_at_paragraphs():
    paragraphs = [f"paragraph {i} " + "word " * 100 for i in range(40)]
    pieces = corpora.chunks("\n\n".join(paragraphs), max_chars=2000, min_chars=400)
    assert all(400 <= len(p) <= 2000 + 400 for p in pieces) and len(pieces) > 5
    assert squeezed(" ".join(pieces)) == squeezed(" ".join(paragraphs))
    assert corpora.chunks("short") == []


def test_real_sources_are_labelled(tmp_path):
    man = list(itertools.islice(corpora.man_pages(seed=1), 50))
    assert man and all(d["source"] == "man" and d["language"] for d in man)
    assert not any(re.search(r"^\.[A-Z]{2}\b|\\f[BIRP]", d["text"], re.M) for d in man)  # no troff left
    code = list(itertools.islice(corpora.python_sources(seed=1), 20))
    assert code and all(d["source"] == "python" and d["origin"].endswith(".py") for d in code)
    doc = list(itertools.islice(corpora.documentation(seed=1), 20))
    assert doc and not any(re.search(r"copyright|licen[cs]e", os.path.basename(d["origin"]), re.I) for d in doc)


def test_make_corpus_verb_end_to_end(tmp_path, capsys):
    from qwen2 import cli

    out = str(tmp_path / "corpus")
    assert cli.main(["data", "make-corpus", out, "--size-mb", "0.2", "--seed", "1", "--shards", "2"]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert len(read_corpus(out)) == manifest["records"] and manifest["seed"] == 1 and len(manifest["shards"]) == 2
    assert f"{manifest['records']} records" in capsys.readouterr().out
    assert cli.main(["data", "make-corpus", out, "--size-mb", "0.2", "--seed", "1", "--shards", "2"]) == 0  # rebuilt
    assert json.load(open(os.path.join(out, "manifest.json"))) == manifest
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert cli.main(["data", "make-corpus", str(tmp_path / "other"), "--size-mb", "0.2"]) == 1
    assert "is not a planted corpus" in capsys.readouterr().err
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
