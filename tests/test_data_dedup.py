"""qwen2.data.dedup / `qwen2 data dedup`: exact and near-duplicate removal measured on a planted
corpus whose copies are labelled, plus the properties every data verb owes: records unchanged and
in order, stats.json, --removed, resume, the same output with more workers, one-line errors."""
import glob
import json
import os
from pathlib import Path

import pytest

from qwen2.cli import main
from qwen2.data import dedup, planted
from qwen2.data.shards import RunOptions
from qwen2.errors import Qwen2Error

COPIES = ("exact_duplicate", "normalized_duplicate", "near_duplicate")
# more copies than the default corpus, so a 1.2 MB corpus holds dozens of each kind
SHARES = {"exact_duplicate": 0.08, "normalized_duplicate": 0.05, "near_duplicate": 0.2, "junk": 0.05}
QUIET = RunOptions(progress=False)
WORDS = Path(__file__).parent / "data" / "declaration_of_independence.txt"


def read(paths) -> list[dict]:
    return [json.loads(line) for path in paths for line in open(path, encoding="utf-8")]


def outputs(out_dir) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "[0-9]*.jsonl")))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """A planted corpus of three shards (copies come after their original, often in a later shard)."""
    root = tmp_path_factory.mktemp("planted") / "corpus"
    planted.build(str(root), 1.2, seed=5, shards=3, shares=SHARES)
    return sorted(glob.glob(str(root / "shard-*.jsonl")))


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """`qwen2 data dedup` on the corpus through the CLI: (input records, output records, removed records, stats)."""
    tmp = tmp_path_factory.mktemp("dedup")
    out, removed = tmp / "out", tmp / "removed.jsonl"
    assert main(["data", "dedup", *corpus, str(out), "--removed", str(removed), "--no-progress"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    return read(corpus), read(outputs(out)), read([removed]), stats


def kind(record) -> str:
    return record["planted"]["kind"] if record["planted"] else "clean"


def test_every_exact_and_normalised_copy_is_removed_as_exact(run):
    records, _, removed, _ = run
    reasons = {r["id"]: r["filter_reason"] for r in removed}
    copies = [r["id"] for r in records if kind(r) in ("exact_duplicate", "normalized_duplicate")]
    assert len(copies) >= 8  # the corpus is drawn from this machine's files: how many copies varies a little
    assert all(reasons.get(i) == dedup.EXACT for i in copies)  # recall 100 %


def test_near_duplicates_found_with_high_recall_and_precision(run):
    """Ground truth: the planted near copies whose Jaccard similarity with their original, on the
    very shingles MinHash hashes, is >= 0.8. Recall >= 95 % of those; of the documents removed as
    near duplicates, >= 99 % are planted copies."""
    records, _, removed, _ = run
    by_id = {r["id"]: r for r in records}
    reasons = {r["id"]: r["filter_reason"] for r in removed}
    truth = [r["id"] for r in records if kind(r) == "near_duplicate"
             and dedup.jaccard(r["text"], by_id[r["planted"]["of"]]["text"]) >= dedup.DEFAULT_NEAR]
    assert len(truth) >= 20
    recall = sum(reasons.get(i) == dedup.NEAR for i in truth) / len(truth)
    near = [i for i, reason in reasons.items() if reason == dedup.NEAR]
    precision = sum(kind(by_id[i]) in COPIES for i in near) / len(near)
    assert recall >= 0.95 and precision >= 0.99, (recall, precision)


def test_nothing_unique_is_removed_and_the_first_of_each_cluster_is_kept(run):
    records, kept, removed, _ = run
    kept_ids = {r["id"] for r in kept}
    assert not [r["id"] for r in records if kind(r) not in COPIES and r["id"] not in kept_ids]
    assert all(r["planted"]["of"] in kept_ids for r in removed)  # every copy's original (read earlier) stays


def test_records_are_written_unchanged_and_in_order(run):
    records, kept, removed, _ = run
    gone = {r["id"] for r in removed}
    assert kept == [r for r in records if r["id"] not in gone]  # every field, same order
    by_id = {r["id"]: r for r in records}
    assert all({k: v for k, v in r.items() if k != "filter_reason"} == by_id[r["id"]] for r in removed)


def test_stats_count_documents_bytes_and_reasons(run):
    records, kept, removed, stats = run
    assert stats["verb"] == "dedup" and stats["shards"] == 3
    assert (stats["documents_in"], stats["documents_out"]) == (len(records), len(kept))
    assert stats["bytes_in"] == sum(len(r["text"].encode()) for r in records)
    assert stats["bytes_out"] == sum(len(r["text"].encode()) for r in kept)
    reasons = [r["filter_reason"] for r in removed]
    assert stats["removed"] == {reason: reasons.count(reason) for reason in (dedup.EXACT, dedup.NEAR)}
    assert stats["dedup"] == {"near": 0.8, "bands": 26, "rows": 8, "shingle_words": 5}


def test_the_first_copy_in_input_order_is_kept_across_shards(tmp_path):
    """The earliest document of a cluster is kept even when later shards hold more of it, or hold
    its copies at lower positions in their shard (what datatrove's own choice goes by)."""
    words = WORDS.read_text(encoding="utf-8").split()

    def edited(at):  # the first 400 words with 6-word runs replaced at `at`: 10 shingles fewer a run
        text = list(words[:400])
        for i in at:
            text[i:i + 6] = [f"edit{i}"] * 6
        return " ".join(text)

    # "near1" is a near copy of "first" (Jaccard 0.83), "near2" and "near3" closer ones of "near1"
    # (0.96): in most bands the three pair up without "first", and a union by size keeps near1.
    fillers = [{"id": f"u{i}", "text": " ".join(words[400 + 40 * i:440 + 40 * i])} for i in range(4)]
    shard0 = fillers[:3] + [{"id": "first", "text": edited([])}]
    shard1 = [{"id": "copy", "text": edited([]).upper()}, {"id": "near1", "text": edited([40, 120, 200, 280])},
              {"id": "near2", "text": edited([40, 120, 200, 280, 360])},
              {"id": "near3", "text": edited([10, 40, 120, 200, 280])}, fillers[3]]
    paths = []
    for k, shard in enumerate((shard0, shard1)):
        paths.append(tmp_path / f"{k}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in shard))
    dedup.dedup([str(p) for p in paths], str(tmp_path / "out"), options=QUIET)
    assert [r["id"] for r in read(outputs(tmp_path / "out"))] == ["u0", "u1", "u2", "first", "u3"]


def test_skipped_bad_records_leave_the_rest_in_step(tmp_path):
    """With --skip-bad every stage skips the same records, so the documents stages number alike."""
    words = WORDS.read_text(encoding="utf-8").split()
    a, b = " ".join(words[:200]), " ".join(words[200:400])
    lines = [json.dumps({"id": "a", "text": a}), "{not json", json.dumps({"id": "a2", "text": a}),
             json.dumps({"id": "b", "text": b}), json.dumps({"id": "b2", "text": b.replace("the", "a", 1)})]
    (tmp_path / "in.jsonl").write_text("".join(line + "\n" for line in lines))
    stats = dedup.dedup([str(tmp_path / "in.jsonl")], str(tmp_path / "out"),
                        options=RunOptions(skip_bad=True, progress=False))
    assert [r["id"] for r in read(outputs(tmp_path / "out"))] == ["a", "b"]
    assert stats["bad_records"] == 1 and stats["removed"] == {dedup.EXACT: 1, dedup.NEAR: 1}


def test_near_zero_removes_exact_copies_only(corpus, run, tmp_path):
    records, *_ = run
    stats = dedup.dedup(corpus, str(tmp_path / "out"), near=0, options=QUIET)
    exact = {r["id"] for r in records if kind(r) in ("exact_duplicate", "normalized_duplicate")}
    assert {r["id"] for r in records} - {r["id"] for r in read(outputs(tmp_path / "out"))} == exact
    assert stats["removed"] == {dedup.EXACT: len(exact)}
    assert not os.path.exists(tmp_path / "out" / ".datatrove" / "near-signatures")


def test_a_rerun_redoes_only_what_did_not_finish(corpus, monkeypatch, tmp_path):
    """Killed in the clustering stage: the rerun keeps the signatures already made. Then one output
    shard unfinished (its completion mark gone): the rerun writes that shard alone."""
    out = tmp_path / "out"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(dedup._KeepFirstCluster, "run", killed)
        with pytest.raises(KeyboardInterrupt):
            dedup.dedup(corpus, str(out), options=QUIET)
    assert not outputs(out) and not (out / "stats.json").exists()
    signatures = sorted(glob.glob(str(out / ".datatrove" / "near-signatures" / "data" / "*" / "*")))
    made = [os.stat(p).st_mtime_ns for p in signatures]
    first = dedup.dedup(corpus, str(out), options=QUIET)
    assert [os.stat(p).st_mtime_ns for p in signatures] == made
    before = {p: (os.stat(p).st_mtime_ns, open(p).read()) for p in outputs(out)}
    os.remove(out / ".datatrove" / "completions" / "00001")
    os.remove(out / "00001.jsonl")
    again = dedup.dedup(corpus, str(out), options=QUIET)
    after = {p: (os.stat(p).st_mtime_ns, open(p).read()) for p in outputs(out)}
    assert after.keys() == before.keys() and all(after[p][1] == before[p][1] for p in before)  # same bytes
    assert [p for p in before if after[p][0] != before[p][0]] == [str(out / "00001.jsonl")]  # only it rewritten
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
    with pytest.raises(Qwen2Error, match="--near"):
        dedup.dedup(corpus, str(out), near=0.9, options=QUIET)


def test_two_workers_write_the_same_output_as_one(corpus, run, tmp_path):
    _, kept, *_ = run
    dedup.dedup(corpus, str(tmp_path / "out"), options=RunOptions(workers=2, progress=False))
    assert read(outputs(tmp_path / "out")) == kept


def test_lsh_shape_finds_pairs_at_the_threshold_and_few_below():
    bands, rows = dedup.lsh_shape(0.8)
    assert bands * rows <= dedup.MAX_HASHES
    assert dedup.lsh_probability(0.8, bands, rows) >= dedup.TARGET_RECALL
    assert dedup.lsh_probability(0.5, bands, rows) < 0.1 and dedup.lsh_probability(0.3, bands, rows) < 0.002
    assert dedup.lsh_shape(1.0) == (1, dedup.MAX_HASHES)  # identical shingle sets always agree


def test_normalised_text_ignores_spacing_case_and_unicode_composition():
    assert dedup.normalise("  Caf\u0065\u0301\tAU\r\n\nlait ") == dedup.normalise("café au lait") == "café au lait"
    assert dedup.normalise("a b") != dedup.normalise("ab")


@pytest.mark.parametrize("problem, lines, message", [
    ("bad json", ['{"id": 1, "text": "ok"}', '{"id": 2, "text": '], "bad.jsonl:2: not valid JSON"),
    ("no text", ['{"id": 1, "body": "x"}'], 'bad.jsonl:1: a record without "text"'),
    ("empty", [], "bad.jsonl: an empty shard"),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, capsys, problem, lines, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(line + "\n" for line in lines))
    assert main(["data", "dedup", str(bad), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not outputs(tmp_path / "out") and not (tmp_path / "out" / "stats.json").exists()


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": 1, "text": "ok"}\n')
    assert main(["data", "dedup", str(tmp_path / "missing.jsonl"), str(tmp_path / "out")]) == 1
    assert main(["data", "dedup", str(good), str(tmp_path / "out2"), "--near", "1.5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "missing.jsonl: no such file" in err[0] and "--near must be" in err[1]
