"""Record shards through datatrove (qwen2/data/shards.py), what every `qwen2 data` verb streams: every
input field kept, stats.json and the removed records with their reasons, bad input as one line naming
the file and line (or counted with skip_bad), a failed run resumed without redoing the shards it
finished, the same output with one worker or two."""
import gzip
import json
import os

import pytest

pytest.importorskip("datatrove")
from datatrove.pipeline.filters import RegexFilter  # noqa: E402

from qwen2.data import shards  # noqa: E402
from qwen2.errors import Qwen2Error  # noqa: E402

QUIET = shards.RunOptions(progress=False)


def write_jsonl(path, records, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def read_out(out_dir):
    records = []
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".jsonl"):
            with open(os.path.join(out_dir, name), encoding="utf-8") as f:
                records += [json.loads(line) for line in f]
    return records


@pytest.fixture
def corpus(tmp_path):
    a = [{"id": f"a{i}", "text": f"a clean line {i}", "lang": "en", "n": 0, "tags": ["x", i], "rank": 9 - i}
         for i in range(4)]  # a field named "rank" is a field, not the output shard's name
    b = [{"text": "spam spam spam", "source": "web"}, {"text": "Grüße aus Köln", "source": "web", "score": 0.5}]
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", a)
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in b)
    return folder, a, b


def test_every_field_is_kept_and_stats_count_what_went_in_and_out(corpus, tmp_path):
    folder, a, b = corpus
    spam = RegexFilter(r"spam", exclusion_writer=shards.removed_writer(str(tmp_path / "out")))
    options = shards.RunOptions(progress=False, removed=str(tmp_path / "removed.jsonl"))
    stats = shards.run([spam], [str(folder)], str(tmp_path / "out"), options, verb="test")
    out = read_out(tmp_path / "out")
    # a.jsonl is shard 0, b.jsonl.gz shard 1; ids default to FILE:LINE; every other field as it was
    assert out == a + [{"id": "b.jsonl.gz:2", "text": "Grüße aus Köln", "source": "web", "score": 0.5}]
    assert stats == json.loads((tmp_path / "out" / "stats.json").read_text())
    assert (stats["shards"], stats["documents_in"], stats["documents_out"]) == (2, 6, 5)
    text_bytes = [len(r["text"].encode()) for r in a + b]
    assert stats["bytes_in"] == sum(text_bytes) and stats["bytes_out"] == sum(text_bytes) - len(b"spam spam spam")
    assert sum(stats["removed"].values()) == 1 and stats["bad_records"] == 0
    [removed] = [json.loads(line) for line in open(tmp_path / "removed.jsonl", encoding="utf-8")]
    assert removed["text"] == "spam spam spam" and removed["source"] == "web"
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(shards.PARTIAL)]


def test_one_worker_or_two_write_the_same_shards(corpus, tmp_path):
    folder, _, _ = corpus
    shards.run([RegexFilter(r"spam")], [str(folder)], str(tmp_path / "one"), QUIET)
    shards.run([RegexFilter(r"spam")], [str(folder)], str(tmp_path / "two"),
               shards.RunOptions(workers=2, progress=False))
    for name in ("00000.jsonl", "00001.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.mark.parametrize("lines, problem", [
    (['{"text": "fine"}', '{"text": "cut in the mid'], "b.jsonl:2: not valid JSON"),
    (['{"text": "fine"}', '{"title": "no text here"}'], 'b.jsonl:2: a record without "text"'),
    (['{"text": 7}'], 'b.jsonl:1: "text" must be a string, got int'),
    (['["a", "list"]'], "b.jsonl:1: a record must be a JSON object, got list"),
    (['{"text": "\\ud800"}'], "b.jsonl:1: \"text\" is not valid Unicode"),
    ([], "b.jsonl: an empty shard"),
])
def test_bad_input_is_one_line_naming_the_file_and_line(tmp_path, lines, problem):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "good"}])
    write_jsonl(tmp_path / "b.jsonl", [], lines)
    with pytest.raises(Qwen2Error) as e:
        shards.run([], [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], str(tmp_path / "out"), QUIET)
    assert problem in str(e.value) and "--skip-bad" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "stats.json").exists()
    # with skip_bad they are counted and the good records go through
    stats = shards.run([], [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], str(tmp_path / "skipped"),
                       shards.RunOptions(skip_bad=True, progress=False))
    assert stats["bad_records"] + stats["empty_shards"] == 1
    assert [r["text"] for r in read_out(tmp_path / "skipped")] == ["good"] + (["fine"] if len(lines) == 2 else [])


def test_missing_inputs_and_an_output_that_is_a_file(tmp_path):
    with pytest.raises(Qwen2Error, match="no such file or directory"):
        shards.run([], [str(tmp_path / "nope.jsonl")], str(tmp_path / "out"), QUIET)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Qwen2Error, match="no shards"):
        shards.run([], [str(tmp_path / "empty")], str(tmp_path / "out"), QUIET)
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    (tmp_path / "file").write_text("x")
    with pytest.raises(Qwen2Error, match="is a file"):
        shards.run([], [str(tmp_path / "a.jsonl")], str(tmp_path / "file"), QUIET)


def test_a_failed_run_resumes_without_redoing_the_shards_it_finished(tmp_path):
    paths = [write_jsonl(tmp_path / f"{k}.jsonl", [{"text": f"{k} {i}"} for i in range(3)]) for k in "ab"]
    bad = write_jsonl(tmp_path / "c.jsonl", [{"text": "c 0"}], ['{"text": "c 1" broken'])
    out = tmp_path / "out"
    with pytest.raises(Qwen2Error, match="c.jsonl:2"):
        shards.run([], paths + [bad], str(out), QUIET)
    done = {name: os.stat(out / name).st_mtime_ns for name in ("00000.jsonl", "00001.jsonl")}
    assert (out / ("00002.jsonl" + shards.PARTIAL)).exists() and not (out / "00002.jsonl").exists()
    write_jsonl(tmp_path / "c.jsonl", [{"text": "c 0"}, {"text": "c 1"}])  # the input fixed
    stats = shards.run([], paths + [bad], str(out), QUIET)
    assert {name: os.stat(out / name).st_mtime_ns for name in done} == done  # not written again
    assert [r["text"] for r in read_out(out)] == [f"{k} {i}" for k in "ab" for i in range(3)] + ["c 0", "c 1"]
    assert stats["documents_out"] == 8 and stats["shards"] == 3
    # resuming over other inputs would mix two runs' shards
    with pytest.raises(Qwen2Error, match="other input shards"):
        shards.run([], paths, str(out), QUIET)


def test_run_options_are_checked():
    with pytest.raises(Qwen2Error, match="workers must be an integer >= 1"):
        shards.RunOptions(workers=0)
    with pytest.raises(Qwen2Error, match="unknown executor 'slurm'"):
        shards.RunOptions(executor="slurm")
