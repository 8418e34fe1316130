"""The `qwen2` command. Most tests run `main()` in-process on the session's real model; one runs
the installed console script end to end."""
import io
import re
import subprocess
import sys

import pytest

from qwen2 import cli

pytestmark = pytest.mark.real_model


@pytest.fixture
def use_real_model(monkeypatch, real_model):
    monkeypatch.setattr(cli.model_args, "load_model", lambda args: real_model)
    return real_model


def test_generate_streams_the_greedy_continuation(use_real_model, capsys):
    assert cli.main(["generate", "def add(a, b):", "--max-new-tokens", "16"]) == 0
    expected = use_real_model.generate("def add(a, b):", max_new_tokens=16)
    assert capsys.readouterr().out == expected + "\n"


def test_chat_one_message(use_real_model, capsys):
    assert cli.main(["chat", "What is 2 + 3? Answer with just the number.", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == "5"


def test_chat_from_piped_stdin_keeps_conversation_and_reset(use_real_model, monkeypatch, capsys):
    seen = []
    real_chat = use_real_model.chat

    def spy(messages, **kw):
        seen.append([dict(m) for m in messages])
        return real_chat(messages, **kw)

    monkeypatch.setattr(use_real_model, "chat", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("My name is Ada.\nWhat is my name?\n/reset\nHi\n/exit\nignored\n"))
    assert cli.main(["chat", "--max-new-tokens", "12"]) == 0
    assert [len(m) for m in seen] == [1, 3, 1]  # second turn sees the first exchange; /reset starts over
    assert seen[1][0]["content"] == "My name is Ada." and seen[1][1]["role"] == "assistant"
    assert seen[2] == [{"role": "user", "content": "Hi"}]
    assert len(capsys.readouterr().out.strip().splitlines()) >= 3


def test_invalid_sampling_is_one_line_error(use_real_model, capsys):
    assert cli.main(["generate", "x", "--temperature", "-1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: invalid sampling parameter: temperature") and err.count("\n") == 1


def test_models_lists_the_registry(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-0.5b-instruct (default)" in out and "qwen2.5-coder-1.5b-instruct" in out


def test_console_script_info_end_to_end(real_model):
    """The installed `qwen2` script, in a fresh process, on the embedded default model."""
    out = subprocess.run(["qwen2", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.stdout.splitlines())
    # 0.49 B + a separate 896 x 151936 output layer, and the output says so
    assert rows["parameters"] == "630,167,424 (0.63 B), of which lm_head 0.14 B"
    assert rows["tied embeddings"].startswith("False (this checkpoint stores lm_head apart from the embedding")
    assert rows["heads / kv heads / head dim"] == "14 / 2 / 64"
    assert rows["dtype"] == "float32" and rows["rms norm eps"] == "1e-06"
    assert rows["eos ids"] == "[151645, 151643]"


def test_a_notice_during_a_streamed_answer_starts_its_own_line(capsys):
    """A terminal shows stdout and stderr together: a note (kernels compiling, torch.compile) that
    arrives mid-answer must not land inside it ("Helloqwen2: compiling...")."""
    from qwen2.progress import notice

    def answer():
        yield "Hello"
        notice("compiling something (once)...")
        yield ", world\n"
        notice("at the start of a line")
        yield "bye"

    notice("before any answer")
    assert cli._print_stream(answer()) == "Hello, world\nbye"
    notice("after the answer")
    out, err = capsys.readouterr()
    assert out == "Hello, world\nbye\n"
    assert err == ("qwen2: before any answer\n\nqwen2: compiling something (once)...\n"
                   "qwen2: at the start of a line\nqwen2: after the answer\n")


def test_the_kernels_are_built_when_a_model_loads(monkeypatch, tmp_path):
    """So that their one-time build (and its notice) comes before the first answer, not inside it."""
    import qwen2
    from qwen2 import kernels
    from qwen2.tokenizer import Tokenizer

    from ggufs import save_random_model_dir, small_tokenizer_metadata, tiny_config

    path = save_random_model_dir(tmp_path / "tiny", Tokenizer.from_gguf_metadata(small_tokenizer_metadata()),
                                 tiny_config(vocab_size=264))
    calls = []
    monkeypatch.setattr(kernels, "ops", lambda: calls.append("ops"))
    qwen2.load(path, progress=False)
    assert calls == ["ops"]
