"""Quantised layers taken exactly from a GGUF's own blocks: Q4_K as int4 groups of 32 (or, as
loading now does, as its super-blocks kept byte for byte: tests/test_q4k_kernels.py), Q8_0 and
Q5_0 as int8 groups of 32, bit-exact against gguf-py's dequantisation, and swapped in by
`qwen2.load(quantize=...)`: the GGUF's own 4-bit blocks, converted losslessly."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from gguf import GGMLQuantizationType

import qwen2
from ggufs import random_model, small_tokenizer_metadata, state_dict_of, tiny_config, write_gguf
from qwen2 import quant as Q
from qwen2.checkpoint.gguf import block_tensors, open_gguf
from qwen2.quant.gguf_blocks import q4k_to_int4, q4k_to_packed_int4, q5_0_to_int8, q8_0_to_int8
from qwen2.quant.kquant import Q4KLinear, Q6KLinear


def random_q4k_rows(rng: np.random.Generator, N: int, K: int, d_range: float | None = None) -> np.ndarray:
    """Raw Q4_K rows (N, K / 256 * 144) of random bytes: any bytes are a valid block once d and dmin
    are finite. d_range=None draws d/dmin from every finite fp16 (subnormals, negatives, 65504);
    otherwise uniform in +-d_range, so a model's weights stay of order one."""
    blocks = rng.integers(0, 256, size=(N * K // 256, 144), dtype=np.uint8)
    if d_range is None:
        bits = rng.integers(0, 1 << 16, size=(len(blocks), 2), dtype=np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] ^= 0x4000  # an all-ones exponent (inf/NaN) -> a finite one
        halves = bits.view(np.float16)
    else:
        halves = rng.uniform(-d_range, d_range, size=(len(blocks), 2)).astype(np.float16)
    blocks[:, 0:4] = halves.view(np.uint8)
    return blocks.reshape(N, K // 256 * 144)


def gguf_dequantized(rows: np.ndarray) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants

    w = quants.dequantize(rows, GGMLQuantizationType.Q4_K)
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))


@pytest.mark.parametrize("N, K", [(1, 256), (7, 768), (64, 2048)])
def test_q4k_blocks_convert_bit_exactly(N, K):
    rows = random_q4k_rows(np.random.default_rng(N * K), N, K)
    q, scale, minimum = q4k_to_int4(rows)
    assert q.shape == (N, K) and q.dtype == torch.uint8 and int(q.max()) <= 15
    assert scale.shape == minimum.shape == (N, K // 32) and scale.dtype == minimum.dtype == torch.float32
    layer = Q.Int4Linear(Q.pack_int4(q), scale, minimum, 32)
    assert torch.equal(layer.dequantize(), gguf_dequantized(rows))
    packed, scale2, minimum2 = q4k_to_packed_int4(rows)  # what loading uses: no (N, K) array of values
    assert torch.equal(packed, Q.pack_int4(q)) and torch.equal(scale2, scale) and torch.equal(minimum2, minimum)


def test_q4k_nibble_and_scale_order():
    """One block decoded by hand: sub-block j has scale d * sc_j, min -dmin * m_j; byte 32 r + i
    holds weight i of sub-block 2 r (low nibble) and of sub-block 2 r + 1 (high nibble)."""
    block = np.zeros(144, dtype=np.uint8)
    block[0:4] = np.array([0.5, 0.25], dtype=np.float16).view(np.uint8)
    sc, m = [1, 2, 3, 4, 61, 62, 63, 5], [6, 7, 8, 9, 40, 50, 60, 33]
    for j in range(4):  # 6-bit values 0-3 direct, 4-7 split into a low nibble and 2 top bits
        block[4 + j] = sc[j] | (sc[4 + j] >> 4) << 6
        block[8 + j] = m[j] | (m[4 + j] >> 4) << 6
        block[12 + j] = (sc[4 + j] & 15) | (m[4 + j] & 15) << 4
    block[16:] = (np.arange(128) * 37 % 256).astype(np.uint8)
    q, scale, minimum = q4k_to_int4(block[None])
    assert scale[0].tolist() == [0.5 * s for s in sc] and minimum[0].tolist() == [-0.25 * v for v in m]
    qs = block[16:].reshape(4, 32)
    for j in range(8):
        nibbles = qs[j // 2] & 15 if j % 2 == 0 else qs[j // 2] >> 4
        assert q[0, 32 * j:32 * j + 32].tolist() == nibbles.tolist(), j


# ----------------------------------------------------------------------------------------------
# Loading a tiny GGUF with Q4_K tensors
# ----------------------------------------------------------------------------------------------

def _q4k_qtype(gguf_name: str, ndim: int) -> str:
    """Every 2-D tensor Q4_K (the tied embedding too), except blk.1's attn_v: F32, so requantised."""
    if ndim == 1:
        return "F32"
    return "F32" if gguf_name == "blk.1.attn_v.weight" else "Q4_K"


def write_q4k_gguf(path, config) -> str:
    """A GGUF whose Q4_K tensors are random blocks (gguf-py cannot quantise to Q4_K: its quantize
    is patched to return them); the model's weights are then whatever the blocks decode to."""
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(0)
    real_quantize = quants.quantize

    def quantize(array, qtype):
        if qtype != GGMLQuantizationType.Q4_K:
            return real_quantize(array, qtype)
        return random_q4k_rows(rng, array.shape[0], array.shape[1], d_range=4e-3)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quants, "quantize", quantize)
        return write_gguf(path, config, state_dict_of(random_model(config)), small_tokenizer_metadata(),
                          qtype=_q4k_qtype)


def q4k_config(tied: bool):
    # every input width a multiple of 256, Q4_K's block: hidden 256, heads x head dim 4 x 64, ffn 512
    return tiny_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=300, tie_word_embeddings=tied)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def q4k_gguf(request, tmp_path_factory):
    path = write_q4k_gguf(tmp_path_factory.mktemp("q4k") / "q4k.gguf", q4k_config(request.param))
    return path, qwen2.load(path, progress=False)


def _logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0].float()


@pytest.mark.parametrize("mode", ["int4", "int4-pure"])
def test_load_converts_q4k_linears_exactly(q4k_gguf, mode):
    path, fp32 = q4k_gguf
    model = qwen2.load(path, quantize=mode, progress=False).model
    q4k = block_tensors(open_gguf(path), {GGMLQuantizationType.Q4_K})
    lossless = {name: m for name, m in Q.quantized_linears(model).items() if f"{name}.weight" in q4k
                or (name == "lm_head" and "model.embed_tokens.weight" in q4k)}
    assert model.quantization["gguf_exact"]["Q4_K"] == len(lossless) == 14  # 13 block linears + the lm_head
    for name, layer in lossless.items():
        reference = fp32.model.get_submodule(name)
        assert isinstance(layer, Q4KLinear), name  # its super-blocks as they are (tests/test_q4k_kernels.py)
        assert torch.equal(layer.dequantize(), reference.weight), name
        assert (layer.bias is None) == (reference.bias is None), name
        if layer.bias is not None:
            assert torch.equal(layer.bias, reference.bias), name
    # the F32 tensor is requantised as the mode says
    v_proj = model.model.layers[1].self_attn.v_proj
    assert isinstance(v_proj, Q.Int8Linear if mode == "int4" else Q.Int4Linear) and v_proj.scales.dtype == torch.bfloat16

    # With that one layer fp32 again, the model computes the GGUF's own weights: the logits of the
    # reference path are fp32's to rounding (bias added after the matmul, not fused)
    model.model.layers[1].self_attn.v_proj = fp32.model.model.layers[1].self_attn.v_proj
    Q.set_backend(model, "reference")
    ids = [1, 5, 200, 17, 42, 99, 3]
    diff = float((_logits(model, ids) - _logits(fp32.model, ids)).abs().max())
    print(f"\ntiny Q4_K model, lossless layers only: max |logit - fp32| = {diff:.3g}")
    assert diff < 1e-4


def test_q4k_conversion_only_where_it_is_lossless(q4k_gguf):
    path, _ = q4k_gguf
    group64 = qwen2.load(path, quantize="int4", group_size=64, progress=False).model
    assert "Q4_K" not in group64.quantization.get("gguf_exact", {})  # Q4_K's groups are 32: no other size is exact
    assert all(m.scales.dtype == torch.bfloat16 for m in Q.quantized_linears(group64).values())
    int8 = qwen2.load(path, quantize="int8", progress=False).model
    assert "Q4_K" not in int8.quantization.get("gguf_exact", {})
    assert not any(isinstance(m, Q.Int4Linear) for m in int8.modules())
    fp32_head = qwen2.load(path, quantize="int4", quantize_lm_head=False, progress=False).model
    assert fp32_head.quantization["gguf_exact"]["Q4_K"] == 13 and isinstance(fp32_head.lm_head, nn.Linear)


def test_hf_directory_source_is_requantised(q4k_gguf, tmp_path):
    path, fp32 = q4k_gguf
    fp32.save(tmp_path / "hf")
    model = qwen2.load(tmp_path / "hf", quantize="int4", progress=False).model
    assert "gguf_exact" not in model.quantization  # no GGUF to take blocks from


# ----------------------------------------------------------------------------------------------
# The real 0.5B model: its 12 Q4_K ffn_down tensors
# ----------------------------------------------------------------------------------------------

@pytest.mark.real_model
def test_real_q4k_down_projections_are_exact(real_model):
    int4 = qwen2.load(quantize="int4", progress=False).model
    Q.set_backend(int4, "reference")
    lossless = {name: m for name, m in Q.quantized_linears(int4).items() if isinstance(m, (Q4KLinear, Q6KLinear))}
    # the 24 down_proj: 12 Q4_K and 12 Q6_K, both kept as their super-blocks (tests/test_q4k_kernels.py)
    assert int4.quantization["gguf_exact"]["Q4_K"] == int4.quantization["gguf_exact"]["Q6_K"] == 12
    assert len(lossless) == 24 and all(name.endswith("mlp.down_proj") for name in lossless)
    fp32 = real_model.model
    for name, layer in lossless.items():
        assert torch.equal(layer.dequantize(), fp32.get_submodule(name).weight), name

    ids = real_model.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    reference = _logits(fp32, ids)
    full = float((_logits(int4, ids) - reference).abs().max())
    # Only the lossless layers quantised: the fixture's own down_projs are swapped for a moment.
    originals = {name: fp32.get_submodule(name) for name in lossless}
    try:
        for name, layer in lossless.items():
            parent, _, attr = name.rpartition(".")
            setattr(fp32.get_submodule(parent), attr, layer)
        only_lossless = float((_logits(fp32, ids) - reference).abs().max())
    finally:
        for name, layer in originals.items():
            parent, _, attr = name.rpartition(".")
            setattr(fp32.get_submodule(parent), attr, layer)
    print(f"\n0.5B, {len(ids)} tokens, reference path: max |logit - fp32| = {only_lossless:.3g} with only the "
          f"{len(lossless)} lossless Q4_K/Q6_K layers quantised, {full:.3g} with the whole int4 model")
    assert only_lossless < 1e-2
    assert all(isinstance(fp32.get_submodule(name), nn.Linear) for name in originals)


# ----------------------------------------------------------------------------------------------
# Q8_0 and Q5_0 -> int8 groups of 32, exactly
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,to_int8,block_bytes", [("Q8_0", q8_0_to_int8, 34), ("Q5_0", q5_0_to_int8, 22)])
def test_q8_0_and_q5_0_blocks_are_int8_exactly(kind, to_int8, block_bytes):
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(7)
    rows = rng.integers(0, 256, size=(6, 4 * block_bytes), dtype=np.uint8)  # 6 rows of 128 weights
    d = rng.normal(0, 0.01, size=(6, 4)).astype(np.float16)
    d[0, 0], d[1, 1] = 0.0, np.float16(6e-8)  # zero and subnormal scales
    rows.reshape(6, 4, block_bytes)[..., :2] = d.view(np.uint8).reshape(6, 4, 2)
    q, scale = to_int8(rows)
    assert q.dtype == torch.int8 and q.shape == (6, 128) and scale.dtype == torch.float32 and scale.shape == (6, 4)
    if kind == "Q5_0":
        assert int(q.min()) >= -16 and int(q.max()) <= 15
    expected = torch.from_numpy(quants.dequantize(rows, getattr(GGMLQuantizationType, kind)))
    int8 = Q.Int8Linear((q.to(torch.int16) + 128).to(torch.uint8), scale, 32)
    assert torch.equal(int8.dequantize(), expected)


@pytest.mark.real_model
def test_real_int8_mode_takes_the_gguf_blocks_exactly(real_model):
    """The 0.5B GGUF: every Q5_0/Q8_0 block linear becomes an exact int8 layer (the 24 down_proj,
    Q4_K/Q6_K, are requantised); the same for the lm_head (Q8_0) when quantised."""
    int8 = qwen2.load(quantize="int8", quantize_lm_head=True, progress=False).model
    assert int8.quantization["gguf_exact"] == {"Q5_0": 132, "Q8_0": 13}
    fp32 = real_model.model
    for name, layer in Q.quantized_linears(int8).items():
        exact = torch.equal(layer.dequantize(), fp32.get_submodule(name).weight)
        assert exact == (not name.endswith("down_proj")), name
        assert layer.dense_dtype == torch.float32, name  # int8 mode prefills in fp32
