"""qwen2.tokenizer against the reference: transformers' tokenizer for the same GGUF file.

Everything is compared token for token: encode ids, decode text (with and without special tokens),
chat template renderings, and what transformers loads from the files our `save` writes."""
from __future__ import annotations

import json
import os
import random
import unicodedata

import pytest
from tokenizers import pre_tokenizers

from qwen2.errors import Qwen2Error
from qwen2.tokenizer import CHATML_TEMPLATE, AddedTokenSpec, Tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data")


# ---- samples --------------------------------------------------------------------------------------

def _load_corpus() -> list[tuple[str, str]]:
    with open(os.path.join(DATA, "tokenizer_corpus.txt"), encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t", 1) for line in f if line.strip() and not line.startswith("#")]
    return [(lang, text) for lang, text in rows]


CORPUS = _load_corpus()
LANGUAGE_TEXTS = [text for _, text in CORPUS]

CODE = [
    # Python
    'def fib(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
    '    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\nif __name__ == "__main__":\n'
    '    print(f"{fib(30)=}")  # 832040\n',
    # C
    '#include <stdio.h>\n\nint main(int argc, char **argv) {\n\tfor (int i = 0; i < argc; ++i)\n'
    '\t\tprintf("%d: %s\\n", i, argv[i]);\n\treturn 0;\n}\n',
    # Rust
    'use std::collections::HashMap;\n\nfn main() {\n    let mut m: HashMap<&str, i32> = HashMap::new();\n'
    '    *m.entry("a").or_insert(0) += 1;\n    println!("{:?}", m);\n}\n',
    # JavaScript
    "const add = (a, b) => a + b;\nexport default async function load(url) {\n"
    "  const res = await fetch(`${url}?q=${encodeURIComponent('x y')}`);\n  return res.json();\n}\n",
    # SQL
    "SELECT u.id, COUNT(*) AS n\nFROM users u\nLEFT JOIN orders o ON o.user_id = u.id\n"
    "WHERE u.created_at >= '2024-01-01'\nGROUP BY u.id\nHAVING COUNT(*) > 10\nORDER BY n DESC;",
    # shell
    '#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do\n  wc -l "$f" | awk \'{print $1}\' >> out.log 2>&1\ndone\n',
    # HTML
    '<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>Hi &amp; bye</title></head>\n'
    '<body>\n  <p class="x">Hello, <b>world</b>!</p>\n  <!-- comment -->\n</body>\n</html>\n',
    # JSON and YAML
    '{"name": "qwen2", "ids": [1, 2, 3], "nested": {"ok": true, "none": null}}',
    "steps:\n  - run: pip install -e .\n  - run: pytest -q\n",
]

EMOJI = [
    "I love it 😀😂🥲🤖!",
    "Family: 👨‍👩‍👧‍👦 couple: 👩‍❤️‍💋‍👨 technologist: 🧑🏽‍💻",
    "Flags 🇯🇵🇺🇸🇩🇪🇧🇷 and Scotland 🏴󠁧󠁢󠁳󠁣󠁴󠁿",
    "Skin tones 👍🏻👍🏼👍🏽👍🏾👍🏿 keycaps 1️⃣#️⃣ hearts ❤️‍🔥",
    "🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉",
]

CONTROL = [
    "tab\there\r\nCRLF\rCR",
    "nul\x00byte and escape \x1b[31mred\x1b[0m and delete\x7f",
    "bell\x07 backspace\x08 vertical\x0btab form\x0cfeed NEL\x85 end",
    "zero\u200bwidth\u200cjoin\u200dners \ufeffBOM \u2028LS\u2029PS \u202eRTL override\u202c",
    "nbsp\u00a0here ideographic\u3000space \ufffd replacement \uffff nonchar \ue000 private",
    "\x01\x02\x03\x04\x05\x06\x0e\x0f\x10\x11\x1f",
]

WHITESPACE = [
    " " * 200,
    "a" + " " * 37 + "b",
    "\t" * 50 + "x",
    "\n" * 40,
    "line\n\n\n\nline   \n  \n\t\n end",
    " \t \n \r\n\t\t  \n\n   \t",
    "   leading and trailing   ",
    "x \n" * 30,
    "\u3000\u3000 full width \u2003 em space",
]

NUMBERS = [
    "1234567890" * 30,
    "pi = 3.14159265358979323846264338327950288419716939937510",
    "2024-06-01T12:34:56Z, $1,234,567.89, 0xDEADBEEF, 1e-9, -42, +7",
    "Arabic-Indic ٠١٢٣٤٥٦٧٨٩ Devanagari ०१२३४५६७८९ full-width １２３ roman Ⅻ",
]

CONTRACTIONS = [
    "It's John's book; they're sure we've won, I'm done, he'd go, you'll see, don't",
    "IT'S JOHN'S BOOK; THEY'RE SURE WE'VE WON, I'M DONE, HE'D GO, YOU'LL SEE, DON'T",
    "She'S, I'Ll, We'Re, 'LL 's 'S 'd 'M 'T 'VE 'Re",
    "rock 'n' roll, y'all, o'clock, it’s curly, ''quoted'', '''",
    # A contraction is split off the letters after it, whatever their case: "'S" + "elect".
    "'Select 'select 'THE 'Delete 'LLama 'Dodo 'REally 'Ve'RE O'DONNELL'S DON'Tcha I'Mma",
]

NFC_NFD = ["café", "naïve Ångström", "Tiếng Việt có sáu thanh điệu", "한국어 한글", "Übergrößenträger", "ǅemal ḱ ṩ"]

TEXT_SAMPLES = LANGUAGE_TEXTS + CODE + EMOJI + CONTROL + WHITESPACE + NUMBERS + CONTRACTIONS + NFC_NFD


def _mismatches(pairs) -> list:
    return [p for p in pairs if p[1] != p[2]]


# ---- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_path() -> str:
    """QWEN2_TEST_GGUF, or the embedded default model's GGUF (the test install has it: '.[models,models-1-5b,test]')."""
    from qwen2.checkpoint import registry

    path = os.environ.get("QWEN2_TEST_GGUF") or registry.gguf_path(registry.DEFAULT_MODEL, progress=False)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"QWEN2_TEST_GGUF names no file: {path}")
    return path


@pytest.fixture(scope="module")
def meta(gguf_path):
    from qwen2.checkpoint.gguf import open_gguf, read_metadata

    return read_metadata(open_gguf(gguf_path))


@pytest.fixture(scope="module")
def ours(meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(meta)


@pytest.fixture(scope="module")
def ref(gguf_path):
    """The reference: transformers' tokenizer built from the same GGUF."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


@pytest.fixture(scope="module")
def ref_saved_dir(ref, tmp_path_factory) -> str:
    """The reference saved by transformers itself: a tokenizer.json directory (with chat_template.jinja)."""
    path = str(tmp_path_factory.mktemp("ref_saved"))
    ref.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ref_from_dir(ref_saved_dir):
    """transformers' Qwen2Tokenizer loaded from a tokenizer.json directory. Unlike the GGUF path it
    applies NFC, so it is the reference for text that is not in NFC."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ref_saved_dir)


def special_texts(ref) -> list[str]:
    """Every added token of the reference, alone and inside text, and near misses."""
    texts = []
    for token in (t.content for t in ref.added_tokens_decoder.values()):
        texts += [token, f"foo{token}bar", f" {token} ", f"{token}{token}", f"\n{token}\n", f"a {token}b",
                  f"x{token[:-1]}", f"{token}héllo 世界"]
    texts += ["[PAD151665] [PAD151935]", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
              "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>", "<|endoftext|>" * 5]
    return texts


CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "Hello! Wie geht's? 你好"}],
    "system_multi_turn": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Write hello world in C."},
        {"role": "assistant", "content": '#include <stdio.h>\nint main(){puts("hello world");}'},
        {"role": "user", "content": "Now in Rust 🦀"},
    ],
    "tool_round_trip": [
        {"role": "user", "content": "What's the weather in Zürich and in 東京?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京"}}},
        ]},
        {"role": "tool", "name": "get_weather", "content": '{"temperature": 21, "sky": "clear"}'},
        {"role": "tool", "name": "get_weather", "content": '{"temperature": 28, "sky": "rain"}'},
        {"role": "assistant", "content": "Zürich: 21 °C, clear. Tokyo: 28 °C, rain."},
    ],
    "system_with_tools": [
        {"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18"},
    ],
}

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather <now> & later, für Städte",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. \"Paris\""},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}]

CHAT_CASES = [(name, tools, gen) for name in CONVERSATIONS for tools in (None, TOOLS) for gen in (False, True)]


def tiny_tokenizer(**kwargs) -> Tokenizer:
    """A byte-level tokenizer with no merges (one token per byte): fast, needs no model file."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    return Tokenizer(vocab, [], [AddedTokenSpec(256, "<|im_start|>", True)], eos_token="<|im_end|>", **kwargs)


# ---- the corpus itself ----------------------------------------------------------------------------

def test_corpus_covers_many_languages_and_scripts():
    assert len({lang for lang, _ in CORPUS}) >= 30
    scripts = {"LATIN", "CYRILLIC", "GREEK", "ARABIC", "HEBREW", "DEVANAGARI", "BENGALI", "TAMIL", "THAI",
               "CJK", "HIRAGANA", "HANGUL", "GEORGIAN", "ARMENIAN", "ETHIOPIC"}
    names = {unicodedata.name(ch, "").split(" ")[0] for text in LANGUAGE_TEXTS for ch in text}
    assert scripts <= names
    assert all(unicodedata.is_normalized("NFC", t) for t in LANGUAGE_TEXTS)


# ---- encode / decode against the reference --------------------------------------------------------

def test_reference_adds_nothing_to_encodings(ref):
    # Our encode() is compared with the reference's encode(add_special_tokens=False); for Qwen2 that
    # is also its default (no BOS/EOS), so both ways of calling it agree.
    for text in ("hello", "<|im_start|>x"):
        assert ref.encode(text) == ref.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("group", ["languages", "code", "emoji", "control", "whitespace", "numbers",
                                   "contractions", "nfc_words", "special_tokens"])
def test_encode_and_decode_match_reference(ours, ref, group):
    samples = {"languages": LANGUAGE_TEXTS, "code": CODE, "emoji": EMOJI, "control": CONTROL,
               "whitespace": WHITESPACE, "numbers": NUMBERS, "contractions": CONTRACTIONS,
               "nfc_words": NFC_NFD, "special_tokens": special_texts(ref)}[group]
    assert samples
    encoded = [(s, ours.encode(s), ref.encode(s, add_special_tokens=False)) for s in samples]
    assert not _mismatches(encoded)[:3]
    for skip in (False, True):
        decoded = [(s, ours.decode(ids, skip_special_tokens=skip), ref.decode(ids, skip_special_tokens=skip))
                   for s, ids, _ in encoded]
        assert not _mismatches(decoded)[:3]
    assert not [s for s, ids, _ in encoded if ours.decode(ids) != s][:3]  # lossless for NFC text


def test_nfd_input_is_normalised_like_qwen2_tokenizer_json(ours, ref, ref_from_dir):
    # transformers' GGUF loader builds the tokenizer without Qwen2's NFC step; its tokenizer.json
    # loader has it. We follow Qwen2 (and the latter) everywhere.
    for word in NFC_NFD + LANGUAGE_TEXTS:
        nfd, nfc = unicodedata.normalize("NFD", word), unicodedata.normalize("NFC", word)
        ids = ours.encode(nfd)
        assert ids == ours.encode(nfc) == ref.encode(nfc, add_special_tokens=False), word
        assert ids == ref_from_dir.encode(nfd, add_special_tokens=False), word
        assert ours.decode(ids) == nfc
    assert unicodedata.normalize("NFD", "café") != "café"  # the test above does compare different inputs


def test_added_tokens_match_reference(ours, ref):
    expected = {i: (t.content, t.special) for i, t in ref.added_tokens_decoder.items()}
    assert {s.id: (s.content, s.special) for s in ours.added_tokens} == expected
    assert expected[151657] == ("<tool_call>", False)  # user-defined in the GGUF: not special
    assert expected[151645] == ("<|im_end|>", True)
    for token_id, (content, _) in expected.items():
        assert ours.encode(content) == [token_id]
        assert ours.token_to_id(content) == token_id and ours.id_to_token(token_id) == content


def test_decode_of_arbitrary_ids_matches_reference(ours, ref):
    # Random ids split multi-byte characters, so this also checks how invalid UTF-8 is rendered.
    rng = random.Random(1234)
    added = list(ref.added_tokens_decoder)
    sequences = [[rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 24))] for _ in range(300)]
    sequences += [[rng.choice(added + [151665, 151935, 9707, 220]) for _ in range(8)] for _ in range(50)]
    sequences += [[], [151643], [151665], list(range(151640, 151936))]
    for skip in (False, True):
        pairs = [(ids, ours.decode(ids, skip_special_tokens=skip), ref.decode(ids, skip_special_tokens=skip))
                 for ids in sequences]
        assert not _mismatches(pairs)[:3]


def test_named_ids_and_sizes(ours, ref):
    assert ours.vocab_size == len(ref) == 151936
    assert ours.eos_token_id == ref.eos_token_id == 151645
    assert ours.eos_token_ids == [151645, 151643]
    assert ours.pad_token_id == ref.pad_token_id == 151643
    assert ours.bos_token_id == ref.bos_token_id == 151643
    assert ours.chat_template == ref.chat_template
    assert ours.encode("") == []


# ---- chat template --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,tools,gen", CHAT_CASES)
def test_chat_template_matches_reference(ours, ref, name, tools, gen):
    messages = CONVERSATIONS[name]
    text = ours.apply_chat_template(messages, add_generation_prompt=gen, tools=tools)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=gen, tools=tools, tokenize=False)
    ids = ours.apply_chat_template(messages, add_generation_prompt=gen, tools=tools, tokenize=True)
    assert ids == ref.apply_chat_template(messages, add_generation_prompt=gen, tools=tools, tokenize=True,
                                          return_dict=False)
    assert text.endswith("<|im_start|>assistant\n") == gen
    assert ("# Tools" in text) == (tools is not None)


@pytest.mark.parametrize("template", [
    # the named special tokens and extra keyword arguments are template variables
    "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ custom }}",
    # tojson does not HTML-escape; {% generation %} and {% break %} are understood
    "{% for m in messages %}{% generation %}{{ m.get('content') | tojson }}{% endgeneration %}"
    "{% if loop.index > 1 %}{% break %}{% endif %}{% endfor %}",
    # trim_blocks and lstrip_blocks: no newline after a block tag, no indentation before one
    "{% for m in messages %}\n    {% if m.role == 'user' %}\n{{ m.role }}: {{ m.content }}\n    {% endif %}\n"
    "{% endfor %}\n",
    # fields that are None are dropped, not passed on as None
    "{% for m in messages %}{{ 'content' in m }},{{ m.content is defined }};{% endfor %}",
])
def test_chat_template_rendering_rules_match_reference(ours, ref, template):
    messages = [{"role": "user", "content": "<b>&amp;</b> ünï"}, {"role": "assistant", "content": None},
                {"role": "user", "content": "again"}]
    assert ours.apply_chat_template(messages, chat_template=template, custom=[1, "x"]) == \
        ref.apply_chat_template(messages, chat_template=template, custom=[1, "x"], tokenize=False)


def test_chatml_fallback_without_template(meta, ref):
    bare = Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if k != "tokenizer.chat_template"})
    assert bare.chat_template is None
    messages = [{"role": "user", "content": "hi"}]
    text = bare.apply_chat_template(messages, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    multi = CONVERSATIONS["system_multi_turn"]
    assert bare.apply_chat_template(multi) == ref.apply_chat_template(multi, chat_template=CHATML_TEMPLATE,
                                                                      tokenize=False)


@pytest.mark.parametrize("template,fragment", [
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{{ ''.__class__.__mro__ }}", "chat template"),
    ("{% for m in messages %}", "not valid jinja"),
])
def test_chat_template_errors_are_qwen2_errors(template, fragment):
    with pytest.raises(Qwen2Error, match=fragment):
        tiny_tokenizer(chat_template=template).apply_chat_template([{"role": "user", "content": "x"}])


def test_empty_conversation_is_an_error():
    with pytest.raises(Qwen2Error, match="empty conversation"):
        tiny_tokenizer().apply_chat_template([])


# ---- saving and loading directories ---------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_dir(ours, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ours_saved"))
    ours.save(path)
    return path


def test_save_loads_in_transformers_identically(ours, ref, saved_dir):
    from transformers import AutoTokenizer

    assert sorted(os.listdir(saved_dir)) == ["tokenizer.json", "tokenizer_config.json"]  # no temp files left
    loaded = AutoTokenizer.from_pretrained(saved_dir)
    assert type(loaded).__name__ == "Qwen2Tokenizer"
    samples = TEXT_SAMPLES + special_texts(ref) + [unicodedata.normalize("NFD", w) for w in NFC_NFD]
    encoded = [(s, ours.encode(s), loaded.encode(s, add_special_tokens=False)) for s in samples]
    assert not _mismatches(encoded)[:3]
    for skip in (False, True):
        decoded = [(s, ours.decode(ids, skip_special_tokens=skip), loaded.decode(ids, skip_special_tokens=skip))
                   for s, ids, _ in encoded]
        assert not _mismatches(decoded)[:3]
    assert {i: (t.content, t.special) for i, t in loaded.added_tokens_decoder.items()} == \
        {i: (t.content, t.special) for i, t in ref.added_tokens_decoder.items()}
    assert (loaded.eos_token, loaded.pad_token, loaded.bos_token) == ("<|im_end|>", "<|endoftext|>", "<|endoftext|>")
    assert loaded.chat_template == ours.chat_template
    for name, tools, gen in CHAT_CASES:
        assert loaded.apply_chat_template(CONVERSATIONS[name], tools=tools, add_generation_prompt=gen,
                                          tokenize=False) == \
            ours.apply_chat_template(CONVERSATIONS[name], tools=tools, add_generation_prompt=gen)


def _same_tokenizer(a: Tokenizer, b: Tokenizer):
    assert (a.vocab_size, a.eos_token_id, a.eos_token_ids, a.pad_token_id, a.bos_token_id, a.chat_template) == \
        (b.vocab_size, b.eos_token_id, b.eos_token_ids, b.pad_token_id, b.bos_token_id, b.chat_template)
    assert a.added_tokens == b.added_tokens
    assert [a.encode(s) for s in TEXT_SAMPLES] == [b.encode(s) for s in TEXT_SAMPLES]


def test_save_then_from_dir_round_trips(ours, saved_dir):
    again = Tokenizer.from_dir(saved_dir)
    _same_tokenizer(again, ours)
    assert again.model_max_length == ours.model_max_length == 32768


def test_from_transformers_saved_dir(ours, ref_saved_dir):
    assert os.path.isfile(os.path.join(ref_saved_dir, "chat_template.jinja"))  # template read from there
    _same_tokenizer(Tokenizer.from_dir(ref_saved_dir), ours)


def test_from_vocab_json_and_merges_txt(ours, ref, meta, tmp_path):
    # The layout of older Hugging Face repos: the BPE vocabulary without added tokens, the added
    # tokens in tokenizer_config.json, the padded vocabulary size in config.json.
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens) if types[i] == 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(meta["tokenizer.ggml.merges"]) + "\n")
    added = {str(i): {"content": t.content, "special": t.special} for i, t in ref.added_tokens_decoder.items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": added, "eos_token": "<|endoftext|>", "bos_token": None,
         "chat_template": ours.chat_template}))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 151936, "eos_token_id": 151643}))
    # generation_config.json may declare more stop tokens than the tokenizer's one EOS
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643, 151664]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.vocab_size, tok.eos_token_id, tok.bos_token_id) == (151936, 151643, None)
    assert tok.eos_token_ids == [151643, 151645, 151664]
    assert tok.added_tokens == ours.added_tokens
    samples = TEXT_SAMPLES + special_texts(ref)
    assert [tok.encode(s) for s in samples] == [ours.encode(s) for s in samples]


# ---- streaming ------------------------------------------------------------------------------------

def _stream(decoder, ids) -> list[str]:
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_decoder_matches_decode_without_partial_characters(ours, ref):
    held_back = 0
    for text in LANGUAGE_TEXTS + EMOJI + NUMBERS + special_texts(ref)[:40]:
        ids = ours.encode(text)
        for skip in (False, True):
            pieces = _stream(ours.stream_decoder(skip_special_tokens=skip), ids)
            assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in p for p in pieces), text
            held_back += pieces[:-1].count("")
    assert held_back > 100  # the texts really do split characters across tokens


def test_stream_decoder_holds_back_and_flushes_byte_by_byte():
    tok = tiny_tokenizer()
    ids = tok.encode("é€😀!")  # 2 + 3 + 4 + 1 bytes, one token each
    assert len(ids) == 10
    assert _stream(tok.stream_decoder(), ids) == ["", "é", "", "", "€", "", "", "", "😀", "!", ""]
    assert _stream(tok.stream_decoder(), ids[:4]) == ["", "é", "", "", "\ufffd"]  # unfinished at the end
    assert "".join(_stream(tok.stream_decoder(), tok.encode("a\ufffdb\ufffd"))) == "a\ufffdb\ufffd"


# ---- errors ---------------------------------------------------------------------------------------

def test_empty_or_missing_directory_is_an_error(tmp_path):
    with pytest.raises(Qwen2Error, match="tokenizer.json") as e:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(Qwen2Error, match="no such directory"):
        Tokenizer.from_dir(tmp_path / "missing")


@pytest.mark.parametrize("content,fragment", [
    ("{not json", "cannot read"),
    (json.dumps({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}), "not Qwen2's BPE"),
    (json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}), "damaged"),
])
def test_broken_tokenizer_json_is_an_error(tmp_path, content, fragment):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(Qwen2Error, match=fragment):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("meta,fragment", [
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<s>", "a"], "tokenizer.ggml.scores": [0.0, 0.0]},
     "'llama'"),
    ({"general.architecture": "qwen2"}, "no tokenizer"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": ["a"],
      "tokenizer.ggml.merges": []}, "'llama-bpe'"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"],
      "tokenizer.ggml.eos_token_id": 7}, "outside the vocabulary"),
])
def test_unusable_gguf_metadata_is_an_error(meta, fragment):
    with pytest.raises(Qwen2Error, match=fragment) as e:
        Tokenizer.from_gguf_metadata(meta)
    assert "\n" not in str(e.value)
