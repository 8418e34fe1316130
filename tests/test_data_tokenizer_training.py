"""qwen2.data.tokenizer_training and `qwen2 data train-tokenizer`: a BPE learnt with Qwen2's
normaliser, pre-tokeniser and byte alphabet, laid out as Qwen2's vocabulary is (bytes, merges, then
the control tokens), runs in qwen2's own tokenizer exactly as in transformers, round-trips text,
tokenises digits and contractions as Qwen2's does, and pre-trains from scratch."""
import glob
import json
import math
import os
import re

import pytest

import qwen2
import qwen2.train
from qwen2.checkpoint.registry import DEFAULT_MODEL, hf_dir
from qwen2.cli import main
from qwen2.config import Qwen2Config
from qwen2.data.tokenizer_training import CONTROL_TOKENS, END_OF_DOCUMENT, QWEN25_EXTRAS, train_tokenizer
from qwen2.errors import Qwen2Error
from qwen2.tokenizer import Tokenizer
from qwen2.train.run import save_initial_model

DATA = os.path.join(os.path.dirname(__file__), "data")
VOCAB = 1000  # BPE tokens of the tokenizer the CLI trains here; its control tokens are 1000, 1001, ...
QWEN2_BPE = 151_643  # the real vocabulary's BPE tokens: <|endoftext|> is 151643


@pytest.fixture(scope="module")
def corpus_lines() -> list[tuple[str, str]]:
    """(language, sentence) of tests/data/tokenizer_corpus.txt: real sentences in many scripts."""
    with open(os.path.join(DATA, "tokenizer_corpus.txt"), encoding="utf-8") as f:
        return [tuple(line.rstrip("\n").split("\t", 1)) for line in f if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_lines):
    """(directory, stats) of `qwen2 data train-tokenizer` on a multilingual corpus from every kind of
    input: a JSONL shard of this project's Python sources (code and English docstrings), a Parquet
    shard of every other sentence of the tokenizer test corpus, and a text file as one text."""
    import pyarrow
    import pyarrow.parquet

    root = tmp_path_factory.mktemp("train-tokenizer")
    sources = sorted(glob.glob(os.path.join(os.path.dirname(qwen2.__file__), "**", "*.py"), recursive=True))
    with open(root / "code.jsonl", "w", encoding="utf-8") as f:
        for path in sources:
            with open(path, encoding="utf-8") as source:
                f.write(json.dumps({"id": path, "text": source.read(), "language": "code"}) + "\n")
    sentences = corpus_lines[::2]
    pyarrow.parquet.write_table(pyarrow.table({"text": [s for _, s in sentences] * 3,
                                               "language": [lang for lang, _ in sentences] * 3}),
                                root / "sentences.parquet")
    out = root / "tokenizer"
    assert main(["data", "train-tokenizer", str(root / "code.jsonl"), str(root / "sentences.parquet"),
                 os.path.join(DATA, "declaration_of_independence.txt"), "--vocab-size", str(VOCAB),
                 "--out", str(out), "--qwen25-extras", "--held-out", "0.2"]) == 0
    with open(out / "stats.json", encoding="utf-8") as f:
        return str(out), json.load(f)


@pytest.fixture(scope="module")
def ours(trained) -> Tokenizer:
    return Tokenizer.from_dir(trained[0])


def test_every_corpus_text_round_trips_and_transformers_gives_the_same_ids(trained, ours, corpus_lines):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(trained[0])
    texts = [s for _, s in corpus_lines]
    texts += ["\n".join(texts), "<|im_start|>user\n東京は 2024年, it's<|im_end|>\n<tool_call>x</tool_call>"]
    for text in texts:
        ids = ours.encode(text)
        assert ours.decode(ids) == text, text
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids, text
    assert theirs.eos_token == theirs.pad_token == END_OF_DOCUMENT and theirs.bos_token is None  # as Qwen2 base
    chat = [{"role": "user", "content": "Grüß Gott"}, {"role": "assistant", "content": "你好"}]
    assert theirs.apply_chat_template(chat, tokenize=False) == ours.apply_chat_template(chat)


def test_control_tokens_come_after_the_merges_in_qwen2s_order_and_are_never_split(ours, real_tokenizer):
    added = [(s.id - VOCAB, s.content, s.special) for s in ours.added_tokens]
    assert [a for a in added if a[0] < len(CONTROL_TOKENS) + len(QWEN25_EXTRAS)] == added  # nothing else added
    real = [(s.id - QWEN2_BPE, s.content, s.special) for s in real_tokenizer.added_tokens]
    assert added == real  # the same tokens, offsets from the first and specialness as Qwen2.5's
    assert len(ours) == VOCAB + len(added)
    # the 256 byte tokens have Qwen2's ids
    assert [ours.id_to_token(i) for i in range(256)] == [real_tokenizer.id_to_token(i) for i in range(256)]
    for _, content, special in added:
        token_id = ours.token_to_id(content)
        text = f"x{content}{content}y {content}\n{content[:-1]}"  # glued to words, to itself; a cut-off copy
        ids = ours.encode(text)
        assert ids.count(token_id) == 3 and ours.decode(ids) == text
        assert (content in ours.decode(ids, skip_special_tokens=True)) == (not special)


def test_the_pipeline_is_qwen2s_so_digits_and_contractions_split_as_in_qwen2(trained, ours, real_tokenizer):
    def pipeline(directory):
        with open(os.path.join(directory, "tokenizer.json"), encoding="utf-8") as f:
            spec = json.load(f)
        return {k: spec[k] for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")}

    assert pipeline(trained[0]) == pipeline(hf_dir(DEFAULT_MODEL, progress=False))
    text = "In 2024 it's 31337, isn't it? don't: 1,000,000.5 and the cat's 42nd hat"

    mine, qwen = ours.encode_with_offsets(text)[1], real_tokenizer.encode_with_offsets(text)[1]
    digits = [text[a:b] for a, b in mine if any(c.isdigit() for c in text[a:b])]
    assert digits == list("2024313371000000542") == [text[a:b] for a, b in qwen if any(c.isdigit() for c in text[a:b])]
    # Qwen2 makes 's and 't tokens of their own; a small vocabulary may spell 't as ' + t, but no
    # token of ours crosses into or out of one, and the frequent 's is one token as in Qwen2.
    contractions = [(a, b) for a, b in qwen if text[a:b] in ("'s", "'t")]
    assert [text[a:b] for a, b in contractions] == ["'s", "'t", "'t", "'s"]
    cuts = {a for a, _ in mine} | {b for _, b in mine}
    assert all(a in cuts and b in cuts for a, b in contractions)
    assert [text[a:b] for a, b in mine if text[a:b] == "'s"] == ["'s", "'s"]


def test_stats_report_what_was_read_and_bytes_per_token_next_to_qwen2(trained, ours):
    stats = trained[1]
    assert stats["vocab_size"] == stats["bpe_tokens"] == VOCAB and stats["total_tokens"] == len(ours)
    assert stats["texts"] > 100 and stats["bytes"] > 100_000 and stats["seconds"] > 0
    assert stats["reference"].startswith(DEFAULT_MODEL)
    rows = stats["bytes_per_token"]
    assert "code" in rows and "all" in rows and stats["held_out_texts"] == sum(
        row["texts"] for language, row in rows.items() if language != "all")
    for row in rows.values():  # a byte is the least a token holds (a script the corpus barely has)
        assert 1.0 <= row["ours"] < row["qwen2"]
    for language in ("code", "all"):  # a 1,000-token BPE compresses, but less than Qwen2's 151,643 tokens
        assert 2.0 < rows[language]["ours"] < rows[language]["qwen2"]


def test_the_directory_pretrains_from_scratch_and_loads(trained, ours, corpus_lines, tmp_path):
    config = Qwen2Config(vocab_size=len(ours), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=ours.eos_token_id,
                         torch_dtype="float32")
    init = str(tmp_path / "init")
    save_initial_model(init, config, Tokenizer.from_dir(trained[0]), seed=3)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for _, s in corpus_lines), encoding="utf-8")
    result = qwen2.train.pretrain({"model": init, "from_scratch": True, "data": str(data),
                                   "output_dir": str(tmp_path / "run"), "seq_len": 32, "batch_size": 2,
                                   "max_steps": 2, "lr": 1e-3})
    assert [r["step"] for r in result.log] == [1, 2]
    assert abs(result.log[0]["loss"] - math.log(len(ours))) < 1.0  # a fresh model over this vocabulary
    m = qwen2.load(result.model_dir, progress=False)
    text = corpus_lines[1][1]
    assert m.tokenizer.encode(text) == ours.encode(text) and len(m.tokenizer) == len(ours)


def test_the_trained_bpe_of_the_fixture_runs_in_qwen2_as_in_transformers(trained_bpe, project_prose, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert len(trained_bpe) == 400 + len(CONTROL_TOKENS)
    eod = trained_bpe.token_to_id(END_OF_DOCUMENT)
    assert trained_bpe.eos_token_id == eod == 400 and trained_bpe.encode("<|endoftext|>") == [eod]
    text = "Now is the winter of our discontent\n\n  Made glorious summer — ça, 1623!<|endoftext|>Exit."
    ids = trained_bpe.encode(text)
    assert trained_bpe.decode(ids) == text and ids.count(eod) == 1
    prose = "\n\n".join(project_prose)
    assert len(trained_bpe.encode(prose)) < 0.75 * len(prose.encode())  # the merges apply in our pipeline
    trained_bpe.save(tmp_path)
    assert Tokenizer.from_dir(tmp_path).encode(text) == ids
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs(text, add_special_tokens=False)["input_ids"] == ids


def test_no_text_is_a_one_line_error():
    with pytest.raises(Qwen2Error, match="needs some text"):
        train_tokenizer(["", ""], vocab_size=300)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or directory"),
    ("no-text", r"records.jsonl:2: a record without \"text\""),
    ("bad-json", r"records.jsonl:2: not valid JSON"),
    ("vocab", "vocab size 256 leaves no merges"),
    ("not-empty", "is not empty; choose another --out or pass --force"),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(case, message, tmp_path, capsys):
    shard = tmp_path / "records.jsonl"
    second = {"no-text": '{"txt": "oops"}', "bad-json": '{"text": "cut'}.get(case, '{"text": "fine"}')
    shard.write_text('{"text": "hello world"}\n' + second + "\n", encoding="utf-8")
    out = tmp_path / "out"
    if case == "not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    inputs = [str(tmp_path / "absent.jsonl")] if case == "missing" else [str(shard)]
    vocab = "256" if case == "vocab" else "300"
    assert main(["data", "train-tokenizer", *inputs, "--vocab-size", vocab, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]
    assert sorted(os.listdir(tmp_path)) == sorted(["records.jsonl"] + (["out"] if case == "not-empty" else []))
    if case == "not-empty":
        assert os.listdir(out) == ["keep.txt"]
        assert main(["data", "train-tokenizer", str(shard), "--vocab-size", "300", "--out", str(out), "--force"]) == 0
        assert sorted(os.listdir(out)) == ["stats.json", "tokenizer.json", "tokenizer_config.json"]
