"""`qwen2.load(gguf, quantize=...)` builds the quantised layers straight from the GGUF's blocks
(qwen2/checkpoint/quantized.py): layer for layer and bit for bit the model the old composition
gives (fp32 model -> `quantize_model` -> `convert_gguf_exact`), without dequantising the tensors it
keeps exactly, and a registry name's int4 load makes no fp32 cache."""
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from gguf import GGMLQuantizationType, quants

import qwen2
from ggufs import gguf_tensor_name, random_model, small_tokenizer_metadata, state_dict_of, tiny_config, write_gguf
from qwen2 import quant as Q
from qwen2.checkpoint import build_model, convert_gguf_exact, load_checkpoint, registry
from qwen2.checkpoint.gguf import open_gguf
from qwen2.quant import gguf_blocks


def old_composition(source, mode, group_size=32, lm_head=None, dtype=torch.float32):
    """How `qwen2.load(source, quantize=mode)` built its model before: the fp32 model, every linear
    quantised, then the layers a GGUF holds exactly swapped in."""
    config, state_dict, _, _ = load_checkpoint(source, progress=False)
    model = build_model(config, state_dict, dtype=dtype)
    del state_dict
    Q.quantize_model(model, mode, group_size=group_size, lm_head=lm_head, release=True)
    return convert_gguf_exact(model, source, progress=False)


def assert_same_model(new: nn.Module, old: nn.Module) -> None:
    """Same modules (names and classes), same tensors bit for bit (parameters and buffers, dtypes
    included), same quantised-layer settings, same `quantization` record."""
    new_modules, old_modules = dict(new.named_modules()), dict(old.named_modules())
    assert list(new_modules) == list(old_modules)
    for name, module in old_modules.items():
        assert type(new_modules[name]) is type(module), name
    new_tensors = dict(new.named_parameters()) | dict(new.named_buffers())
    old_tensors = dict(old.named_parameters()) | dict(old.named_buffers())
    assert new_tensors.keys() == old_tensors.keys()
    for name, t in old_tensors.items():
        assert new_tensors[name].dtype == t.dtype and torch.equal(new_tensors[name], t), name
    for name, layer in Q.quantized_linears(old).items():
        twin = new_modules[name]
        for attr in ("in_features", "out_features", "group_size", "activation_digits", "dense_dtype", "backend",
                     "mode"):
            assert getattr(twin, attr) == getattr(layer, attr), (name, attr)
        assert (twin.bias is None) == (layer.bias is None), name
    assert new.quantization == old.quantization
    assert Q.describe(new) == Q.describe(old)
    # a tied head read as the embedding, or the embedding itself
    assert type(new.model.embed_tokens) is type(old.model.embed_tokens)
    if isinstance(old.model.embed_tokens, Q.QuantEmbedding):
        assert new.model.embed_tokens.head is new.lm_head
    elif isinstance(old.model.embed_tokens, Q.GGUFEmbedding):  # the GGUF's token_embd, read row by row
        ids = torch.arange(old.config.vocab_size)
        assert torch.equal(new.model.embed_tokens(ids), old.model.embed_tokens(ids))
    elif isinstance(old.lm_head, nn.Linear) and old.lm_head.weight is old.model.embed_tokens.weight:
        assert new.lm_head.weight is new.model.embed_tokens.weight  # still tied
    assert not any(t.is_meta for t in new_tensors.values())


# ----------------------------------------------------------------------------------------------
# A small GGUF with every block type loading meets
# ----------------------------------------------------------------------------------------------

def random_kquant_rows(rng, kind: str, N: int, K: int) -> np.ndarray:
    """Raw Q4_K / Q6_K rows of random bytes with small finite fp16 scales (gguf-py cannot quantise to them)."""
    size = {"Q4_K": 144, "Q6_K": 210}[kind]
    blocks = rng.integers(0, 256, size=(N * K // 256, size), dtype=np.uint8)
    halves = rng.uniform(-4e-3, 4e-3, size=(len(blocks), 2)).astype(np.float16).view(np.uint8)
    if kind == "Q4_K":
        blocks[:, 0:4] = halves  # d, dmin
    else:
        blocks[:, 208:210] = halves[:, :2]  # d
    return blocks.reshape(N, K // 256 * size)


LAYER_TYPES = {  # llama.cpp name -> type, per layer: Q4_0 and Q5_1 go through gguf-py's dequantisation
    0: {"attn_q": "Q4_K", "attn_k": "Q5_0", "attn_v": "Q6_K", "attn_output": "Q8_0", "ffn_gate": "Q4_0",
        "ffn_up": "F16", "ffn_down": "Q6_K"},
    1: {"attn_q": "Q8_0", "attn_k": "Q4_K", "attn_v": "Q5_0", "attn_output": "F32", "ffn_gate": "Q4_K",
        "ffn_up": "Q5_1", "ffn_down": "Q4_K"},
}


def write_mixed_gguf(path, tied: bool, embedding: str) -> str:
    config = tiny_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=300, tie_word_embeddings=tied)
    rng = np.random.default_rng(1)

    def qtype(name: str, ndim: int) -> str:
        if ndim == 1:
            return "F32"
        if name == "token_embd.weight":
            return embedding
        if name == "output.weight":
            return "Q6_K"
        _, layer, kind, _ = name.split(".")
        return LAYER_TYPES[int(layer)][kind]

    real_quantize = quants.quantize

    def quantize(array, kind):
        if kind.name in ("Q4_K", "Q6_K"):
            return random_kquant_rows(rng, kind.name, array.shape[0], array.shape[1])
        return real_quantize(array, kind)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quants, "quantize", quantize)
        return write_gguf(path, config, state_dict_of(random_model(config)), small_tokenizer_metadata(), qtype=qtype)


@pytest.fixture(scope="module", params=[(False, "Q5_0"), (True, "Q4_K"), (True, "Q8_0"), (True, "F16")],
                ids=["untied", "tied-Q4_K", "tied-Q8_0", "tied-F16"])
def mixed_gguf(request, tmp_path_factory):
    tied, embedding = request.param
    return write_mixed_gguf(tmp_path_factory.mktemp("mixed") / "mixed.gguf", tied, embedding)


@pytest.mark.parametrize("mode, group_size, lm_head, dtype", [
    ("int4", 32, None, torch.float32), ("int4", 64, None, torch.float32), ("int4-pure", 32, None, torch.float32),
    ("int8", None, None, torch.float32), ("int8", None, True, torch.float32), ("int4", 32, False, torch.float32),
    ("int4", 32, None, torch.bfloat16)])
def test_direct_load_equals_the_old_composition(mixed_gguf, mode, group_size, lm_head, dtype):
    new = qwen2.load(mixed_gguf, quantize=mode, group_size=group_size, quantize_lm_head=lm_head, dtype=dtype,
                     progress=False).model
    old = old_composition(mixed_gguf, mode, group_size or 32, lm_head, dtype)
    assert_same_model(new, old)
    if mode.startswith("int4") and group_size == 32:
        assert new.quantization["gguf_exact"]["Q4_K"] >= 4  # the Q4_K block linears at least
    ids = torch.tensor([[1, 5, 200, 17, 42]])
    with torch.inference_mode():
        assert torch.equal(new(ids), old(ids))


def test_exact_tensors_are_never_dequantised(mixed_gguf, monkeypatch):
    """Only the tensors that stay in `dtype` (norms, biases, an embedding that is not the head's
    exact blocks) are dequantised whole; a requantised linear is read a chunk of rows at a time, and
    an exact one is not dequantised at all."""
    whole, rows = [], []
    real_tensor, real_rows = gguf_blocks.dequantize_tensor, gguf_blocks.dequantize_rows

    def dequantize_tensor(tensor, dtype=torch.float32, out=None):
        whole.append(tensor.name)
        return real_tensor(tensor, dtype, out)

    def dequantize_rows(tensor, start, stop, out=None):
        rows.append(tensor.name)
        return real_rows(tensor, start, stop, out)
    monkeypatch.setattr(gguf_blocks, "dequantize_tensor", dequantize_tensor)
    monkeypatch.setattr(gguf_blocks, "dequantize_rows", dequantize_rows)
    model = qwen2.load(mixed_gguf, quantize="int4", progress=False).model
    reader = open_gguf(mixed_gguf)
    types_of = {t.name: t.tensor_type.name for t in reader.tensors}
    assert all(name.endswith(("norm.weight", ".bias")) or name == "token_embd.weight" for name in whole), whole
    # the embedding is never dequantised whole: a tied head's exact blocks, or token_embd row by row
    assert isinstance(model.model.embed_tokens, (Q.QuantEmbedding, Q.GGUFEmbedding))
    assert "token_embd.weight" not in whole
    # requantised layers have bf16 scales (exact ones fp32 scales or super-blocks): exactly their tensors were read
    requantised = {gguf_tensor_name(f"{name}.weight") for name, m in Q.quantized_linears(model).items()
                   if getattr(m, "scales", None) is not None and m.scales.dtype == torch.bfloat16}
    if model.config.tie_word_embeddings:  # a tied head's tensor is the embedding
        requantised = {"token_embd.weight" if n == "output.weight" else n for n in requantised}
    assert requantised and set(rows) - set(whole) == requantised
    assert {types_of[name] for name in requantised} >= {"Q8_0", "Q5_0", "Q4_0"}  # int4 layers of those types


def test_gguf_embedding_rows_are_the_dequantised_table(mixed_gguf):
    """`GGUFEmbedding` decodes each looked-up row of any tensor type (in `dtype`)
    to the bits of the whole tensor dequantised (what the fp32 model's table holds)."""
    for t in open_gguf(mixed_gguf).tensors:
        if len(t.shape) != 2:
            continue
        table = gguf_blocks.dequantize_tensor(t)
        embedding = Q.GGUFEmbedding(t)
        ids = torch.randperm(table.shape[0])[:64].view(2, 32)
        with torch.inference_mode():
            assert torch.equal(embedding(ids), table[ids]), t.tensor_type.name
        assert torch.equal(Q.GGUFEmbedding(t, torch.bfloat16)(ids), table[ids].bfloat16()), t.tensor_type.name


def test_the_reader_forgets_the_vocabulary_once_the_tokenizer_has_it(mixed_gguf):
    """`GGUFFile.forget_vocabulary` (quantised loading calls it once the tokenizer is built) drops the
    tokenizer's arrays from the header, and nothing else."""
    reader = open_gguf(mixed_gguf)
    before = dict(reader.metadata)
    reader.forget_vocabulary()
    assert set(before) - set(reader.metadata) == {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"}
    assert all(reader.metadata[k] == v for k, v in before.items() if k in reader.metadata)
    assert "tokenizer.ggml.eos_token_id" in reader.metadata and "general.architecture" in reader.metadata


def test_hf_directory_source_is_quantised_from_fp32(mixed_gguf, tmp_path):
    fp32 = qwen2.load(mixed_gguf, progress=False)
    fp32.save(tmp_path / "hf")
    model = qwen2.load(tmp_path / "hf", quantize="int4", progress=False).model
    reference = Q.quantize_model(build_model(*load_checkpoint(str(tmp_path / "hf"), progress=False)[:2]), "int4")
    assert "gguf_exact" not in model.quantization  # no GGUF to take blocks from
    assert_same_model(model, reference)


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_0", "Q5_1", "Q4_K", "Q6_K"])
def test_dequantize_rows_is_gguf_py_bit_for_bit(kind):
    rng = np.random.default_rng(3)
    weights = rng.normal(0, 0.05, size=(6, 512)).astype(np.float32)
    weights[0, :7] = [0.0, -0.0, 1e-8, -3.0, 65000.0, 6e-8, -6e-5]  # zeros, subnormals, large
    t = GGMLQuantizationType[kind]
    if kind in ("Q4_K", "Q6_K"):
        raw = random_kquant_rows(rng, kind, 6, 512)
    elif kind in ("F32", "F16"):
        raw = weights.astype(np.float32 if kind == "F32" else np.float16)
    else:
        raw = quants.quantize(weights, t)
    tensor = types.SimpleNamespace(name="w", tensor_type=t, shape=(512, 6), data=raw)
    expected = torch.from_numpy(np.ascontiguousarray(quants.dequantize(raw, t), dtype=np.float32))
    assert torch.equal(gguf_blocks.dequantize_rows(tensor, 0, 6), expected)
    assert torch.equal(gguf_blocks.dequantize_rows(tensor, 2, 5), expected[2:5])
    into = torch.empty(3, 512)
    assert gguf_blocks.dequantize_rows(tensor, 2, 5, out=into) is into and torch.equal(into, expected[2:5])
    assert torch.equal(gguf_blocks.dequantize_tensor(tensor), expected)
    assert torch.equal(gguf_blocks.dequantize_tensor(tensor, torch.bfloat16), expected.to(torch.bfloat16))
    assert torch.equal(gguf_blocks.DequantizedRows(tensor, torch.bfloat16)[1:4], expected[1:4].to(torch.bfloat16))


def test_a_failed_load_stops_the_background_work(tmp_path):
    """The weights are converted in the background while the tokenizer is built: when that fails,
    the work stops, and PyTorch's thread count (one per worker meanwhile) is as it was."""
    import threading

    from qwen2.errors import Qwen2Error

    config = tiny_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    path = write_gguf(tmp_path / "bad.gguf", config, state_dict_of(random_model(config)),
                      dict(small_tokenizer_metadata(), **{"tokenizer.ggml.model": "llama"}))
    threads = torch.get_num_threads()
    with pytest.raises(Qwen2Error, match="byte-level BPE"):
        qwen2.load(path, quantize="int4", progress=False)
    assert torch.get_num_threads() == threads
    assert not [t for t in threading.enumerate() if t.name.startswith("qwen2-gguf")]


# ----------------------------------------------------------------------------------------------
# A registry name: the assembled GGUF, never the fp32 cache
# ----------------------------------------------------------------------------------------------

FAKE = "fake-qwen2-direct"


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A registry model of one part holding a small mixed GGUF, and an empty QWEN2_CACHE."""
    from qwen2 import kernels

    kernels.ops()  # loaded from the usual cache first: the empty one below would build them again
    data = open(write_mixed_gguf(tmp_path / "src.gguf", tied=False, embedding="Q5_0"), "rb").read()
    part = tmp_path / "part01.bin"
    part.write_bytes(data)
    module = types.ModuleType("qwen2_fake_direct_part1")
    module.get_part_path = lambda: str(part)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    import hashlib

    model = registry.KnownModel(FAKE, "Fake", "qwen2-fake-direct-part", 1, "0.0.1", len(data),
                                hashlib.sha256(data).hexdigest(), "models-fake")
    monkeypatch.setitem(registry.KNOWN_MODELS, FAKE, model)
    cache = tmp_path / "cache"
    monkeypatch.setenv("QWEN2_CACHE", str(cache))
    return cache, str(tmp_path / "src.gguf")


def test_registry_int4_load_makes_no_fp32_cache(fake_registry, monkeypatch):
    from qwen2.checkpoint import gguf as gguf_module

    cache, source = fake_registry

    def no_fp32(*args, **kwargs):
        raise AssertionError("the GGUF was converted to fp32")
    monkeypatch.setattr(gguf_module, "load_gguf", no_fp32)
    monkeypatch.setattr(gguf_module, "dequantized_tensors", no_fp32)
    monkeypatch.setattr(registry, "hf_dir", no_fp32)
    m = qwen2.load(FAKE, quantize="int4", progress=False)
    assert os.listdir(cache) == [f"{FAKE}.gguf"]  # the assembled GGUF only: no HF directory
    assert m.model.quantization["gguf_exact"]["Q4_K"] >= 4
    monkeypatch.undo()  # the old composition reads the fp32 state dict of the same file
    assert_same_model(m.model, old_composition(source, "int4"))


def test_registry_fp32_load_still_converts_once(fake_registry):
    cache, _ = fake_registry
    qwen2.load(FAKE, progress=False)
    assert sorted(os.listdir(cache)) == [FAKE, f"{FAKE}.gguf"]


# ----------------------------------------------------------------------------------------------
# The real 0.5B model
# ----------------------------------------------------------------------------------------------

@pytest.mark.real_model
def test_real_int4_direct_load_equals_the_old_composition(real_gguf):
    new = qwen2.load(real_gguf, quantize="int4", progress=False).model
    assert new.quantization["gguf_exact"] == {"Q4_K": 12, "Q5_0": 12, "Q6_K": 12, "Q8_0": 13}
    assert_same_model(new, old_composition(real_gguf, "int4"))
