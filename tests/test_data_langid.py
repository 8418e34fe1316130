"""qwen2.data.langid and `qwen2 data langid`: every record labelled with its language and a score,
offline, every field kept; --keep, --balance to target shares (seeded); the report's languages told
apart on sentences from a source the detector never saw; bad language codes a one-line error."""
import glob
import json
import os
import pathlib

import pytest

from qwen2.cli import main
from qwen2.data.langid import (DEFAULT_LANGUAGES, REPORT_LANGUAGES, SCRIPT_LANGUAGES, Detector, evaluate,
                               keep_probabilities, labelled_sentences)


@pytest.fixture(scope="module")
def labelled() -> dict[str, dict]:
    """Up to 100 prose sentences per default language from Debian's message catalogues."""
    return labelled_sentences(per_language=100)


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


def read_shards(out) -> list[dict]:
    """The records of OUT's shards, in shard order."""
    lines = [line for shard in sorted(glob.glob(os.path.join(out, "*.jsonl")))
             for line in pathlib.Path(shard).read_text(encoding="utf-8").splitlines()]
    return list(map(json.loads, lines))


def read_stats(out) -> dict:
    with open(os.path.join(out, "stats.json"), encoding="utf-8") as f:
        return json.load(f)


def sentence_records(labelled, counts: dict[str, int]) -> list[dict]:
    """Records of `counts[language]` sentences each, with fields of every JSON type beside the text."""
    return [{"id": f"{code}-{i}", "text": text, "label": code, "meta": {"n": i, "tags": ["a", code]}, "ok": True}
            for code, n in counts.items() for i, text in enumerate(labelled[code]["sentences"][:n])]


def test_labels_scores_and_every_field_kept(tmp_path, labelled):
    """Two shards through two worker processes (the step is pickled to them; lingua loads in each):
    each record comes back with every field as it was, plus an ISO 639-1 language and a score."""
    records = sentence_records(labelled, {"en": 40, "de": 40, "ja": 40, "ar": 40, "ru": 40, "zh": 40})
    inputs = [write_jsonl(tmp_path / "a.jsonl", records[::2]), write_jsonl(tmp_path / "b.jsonl", records[1::2])]
    out = tmp_path / "out"
    assert main(["data", "langid", *inputs, str(out), "--workers", "2", "--no-progress"]) == 0
    got = {r["id"]: r for r in read_shards(out)}
    assert len(got) == len(records)
    for record in records:
        labelled_record = got[record["id"]]
        assert {k: v for k, v in labelled_record.items() if k not in ("language", "language_score")} == record
        assert labelled_record["language"] in DEFAULT_LANGUAGES
        assert 0 < labelled_record["language_score"] <= 1
    correct = sum(got[r["id"]]["language"] == r["label"] for r in records)
    assert correct >= 0.95 * len(records)
    stats = read_stats(out)
    assert stats["documents_in"] == stats["documents_out"] == len(records) and stats["removed"] == {}
    assert sum(c["documents_in"] for c in stats["languages"].values()) == len(records)
    assert stats["languages"]["ja"]["documents_in"] == sum(r["language"] == "ja" for r in got.values())


def test_keep_drops_other_languages_with_their_reason(tmp_path, labelled):
    records = sentence_records(labelled, {"fr": 30, "de": 30, "es": 30})
    out, removed = tmp_path / "out", tmp_path / "removed.jsonl"
    assert main(["data", "langid", write_jsonl(tmp_path / "in.jsonl", records), str(out), "--keep", "fr,de",
                 "--removed", str(removed), "--no-progress"]) == 0
    kept = read_shards(out)
    assert kept and {r["language"] for r in kept} <= {"fr", "de"}
    with open(removed, encoding="utf-8") as f:
        dropped = [json.loads(line) for line in f]
    assert {r["filter_reason"] for r in dropped} == {"language"}
    assert all(r["language"] not in ("fr", "de") for r in dropped)
    assert len(kept) + len(dropped) == len(records)
    assert read_stats(out)["removed"] == {"language": len(dropped)}


def balanced(tmp_path, source, name, *options) -> tuple[list[dict], dict]:
    out = tmp_path / name
    assert main(["data", "langid", source, str(out), "--no-progress", *options]) == 0
    return read_shards(out), read_stats(out)


def test_balance_reaches_target_shares_seeded(tmp_path, labelled):
    """600 sentences, en:de:fr 300:200:100, balanced to 0.5/0.3/0.2 of documents: French binds (kept
    whole), English and German are sampled down; shares within 0.05 of the targets, the same records
    for the same seed and other records for another."""
    source = write_jsonl(tmp_path / "in.jsonl", sentence_records(labelled, {"en": 100, "de": 100, "fr": 100}) * 1
                         + [{**r, "id": r["id"] + "-2"} for r in sentence_records(labelled, {"en": 100, "de": 100})]
                         + [{**r, "id": r["id"] + "-3"} for r in sentence_records(labelled, {"en": 100})])
    shares = "en=0.5,de=0.3,fr=0.2"
    first, stats = balanced(tmp_path, source, "a", "--balance", shares, "--balance-by", "documents", "--seed", "1")
    counts = {code: sum(r["language"] == code for r in first) for code in ("en", "de", "fr")}
    assert sum(counts.values()) == len(first)  # languages not named, and no other=: dropped
    for code, target in {"en": 0.5, "de": 0.3, "fr": 0.2}.items():
        assert abs(counts[code] / len(first) - target) <= 0.05, counts
        assert abs(stats["balance"]["shares_out"][code] - target) <= 0.05
    assert stats["balance"]["keep_probability"]["fr"] == 1.0
    assert stats["documents_in"] == 600 and stats["documents_out"] == len(first)
    assert stats["removed"]["balance"] + stats["removed"].get("language", 0) == 600 - len(first)
    assert not os.path.exists(tmp_path / "a" / ".datatrove" / "labelled")  # the staged copy is gone

    again, _ = balanced(tmp_path, source, "b", "--balance", shares, "--balance-by", "documents", "--seed", "1")
    other, _ = balanced(tmp_path, source, "c", "--balance", shares, "--balance-by", "documents", "--seed", "2")
    assert [r["id"] for r in again] == [r["id"] for r in first]
    assert {r["id"] for r in other} != {r["id"] for r in first}


def test_keep_probabilities_by_bytes_and_other():
    """The binding group is kept whole and the rest sampled to the shares; `other` pools the
    languages the shares do not name (only those kept, given `keep`)."""
    counts = {"en": 6000, "de": 1500, "fr": 400, "it": 100}
    p, other = keep_probabilities(counts, {"en": 0.5, "de": 0.3, "other": 0.2})
    kept = {"en": p["en"] * 6000, "de": p["de"] * 1500, "other": other * 500}
    assert other == 1.0 and kept == pytest.approx({"en": 1250, "de": 750, "other": 500})
    p, other = keep_probabilities(counts, {"en": 0.5, "other": 0.5}, keep={"en", "fr"})
    assert other == 1.0 and p["en"] * 6000 == pytest.approx(400)
    p, other = keep_probabilities(counts, {"en": 0.5, "zh": 0.5})  # nothing in zh: en takes it all
    assert p == {"en": 1.0, "zh": 0.0} and other is None


def test_accuracy_on_held_out_sentences(labelled):
    """>= 95 % over >= 20 languages, 50 sentences each, from catalogues lingua never saw (the
    benchmark, benchmarks/experiments/langid_accuracy.py, measures 100 each with the confusion table)."""
    sample = {code: v["sentences"][:50] for code, v in labelled.items() if len(v["sentences"]) >= 50}
    result = evaluate(sample)
    assert len(result["per_language"]) >= 20
    assert set(REPORT_LANGUAGES) - {"lo", "my", "km", "ur"} <= set(result["per_language"])
    assert result["accuracy"] >= 0.95, {k: v["accuracy"] for k, v in result["per_language"].items()}


def test_script_languages_and_text_without_letters(labelled):
    """Lao, Burmese and Khmer, which lingua has no model for, are told by their script (every
    catalogue sentence written in it, English terms and all; a translator's credits in Latin letters
    are not); a text with no letters has no language."""
    detector = Detector()
    assert detector.detect("ພາສາລາວເປັນພາສາທາງການຂອງປະເທດລາວ")[0] == "lo"
    for code in ("my", "km"):
        for sentence in labelled.get(code, {"sentences": []})["sentences"]:
            if SCRIPT_LANGUAGES[code].search(sentence):
                assert detector.detect(sentence)[0] == code, sentence
    assert detector.detect("ဖောင့် မိသားစု အမည်၊ ဥပမာ - Sans၊ Helvetica")[0] == "my"
    assert detector.detect("12345 + 678 = 7023; ... !!!") == (None, 0.0)


@pytest.mark.parametrize("option", [["--keep", "en,xx"], ["--languages", "en,de,qq"], ["--balance", "en=0.5,zz=0.5"],
                                    ["--balance", "en=half"], ["--languages", "en,de", "--keep", "fr"]])
def test_unknown_language_code_is_a_one_line_error(tmp_path, capsys, option):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "Hello there, how are you today?"}])
    out = tmp_path / "out"
    assert main(["data", "langid", source, str(out), "--no-progress", *option]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ")
    assert any(code in error[0] for code in ("xx", "qq", "zz", "half", "fr"))
    assert not out.exists()  # checked before any work
