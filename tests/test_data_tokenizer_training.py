"""qwen2.data.tokenizer_training: a BPE learnt with Qwen2's pre-tokenisation runs in qwen2's own
tokenizer exactly as in transformers, round-trips text and compresses it."""
import pytest

from qwen2.data.tokenizer_training import END_OF_DOCUMENT, train_tokenizer
from qwen2.errors import Qwen2Error
from qwen2.tokenizer import Tokenizer


def test_trained_tokenizer_round_trips_compresses_and_matches_transformers(trained_bpe, project_prose, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert len(trained_bpe) == 400
    eod = trained_bpe.token_to_id(END_OF_DOCUMENT)
    assert trained_bpe.eos_token_id == eod and trained_bpe.encode("<|endoftext|>") == [eod]
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
