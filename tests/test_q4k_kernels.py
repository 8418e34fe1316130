"""GGUF Q4_K and Q6_K super-blocks kept byte for byte (qwen2/quant/kquant.py) and their native decode
kernels (qwen2/kernels/quant_linear.cpp): the dequantisation of the kept
bytes bit-exact against gguf-py's (what qwen2/checkpoint/gguf.py dequantises with); the kernels
against a float64 model of their own arithmetic and against the fp32 reference within the bound
their activation rounding allows; `qwen2.load(quantize="int4")` taking the blocks from a GGUF; and
the first layers of the real GGUFs through the kernels.

The bound (the same reasoning as tests/test_quantize.py). The kernels round x per block of 32 inputs
to one int8 digit (each element moves by at most xs / 2, xs = absmax(block) / 127) or two (the
second in steps of xs / 256, clamped at 127: at most a full step); the integer dot products are
exact, and Q4_K's min term takes the exact fp32 x. So with W_scaled the part of the weight that
multiplies the rounded x (d sc q for Q4_K, without its min; all of it for Q6_K)

    |kernel - reference| <= (step per input) @ |W_scaled|^T  + fp32 rounding.
"""
import copy
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from gguf import GGMLQuantizationType, quants

import qwen2
from ggufs import random_model, small_tokenizer_metadata, state_dict_of, tiny_config, write_gguf
from qwen2 import kernels
from qwen2 import quant as Q
from qwen2.checkpoint.gguf import config_from_metadata, dequantized_tensors, hf_tensor_name, open_gguf
from qwen2.quant.gguf_blocks import q4k_to_int4
from qwen2.errors import Qwen2Error
from qwen2.quant.kquant import Q4KLinear, Q6KLinear, q4k_dequantize, q6k_dequantize
from qwen2.model import Block, NoCache, RotaryEmbedding

LAYERS = {"Q4_K": Q4KLinear, "Q6_K": Q6KLinear}
TORCH_DEQUANTIZE = {"Q4_K": q4k_dequantize, "Q6_K": q6k_dequantize}
BLOCK_BYTES = {"Q4_K": 144, "Q6_K": 210}
D_OFFSETS = {"Q4_K": (0, 2), "Q6_K": (208,)}  # where the fp16 super-scales sit in a block


def random_rows(kind: str, N: int, K: int, seed: int, d_range: float | None = None, zero_blocks: int = 0) -> np.ndarray:
    """Raw rows (N, K / 256 * block bytes) of random bytes, which are valid blocks of either format
    once their fp16 super-scales are finite. d_range=None draws those from every finite fp16
    (subnormals, negatives, +-65504: extreme scales); otherwise uniform in +-d_range. `zero_blocks`
    blocks become all-zero bytes (d = 0; for Q6_K the quants read -32)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(N * K // 256, BLOCK_BYTES[kind]), dtype=np.uint8)
    for at in D_OFFSETS[kind]:
        if d_range is None:
            bits = rng.integers(0, 1 << 16, size=len(blocks), dtype=np.uint16)
            bits[(bits & 0x7C00) == 0x7C00] ^= 0x4000  # inf/NaN exponent -> a finite one
            halves = bits.view(np.float16)
        else:
            halves = rng.uniform(-d_range, d_range, size=len(blocks)).astype(np.float16)
        blocks[:, at:at + 2] = halves[:, None].view(np.uint8)
    if d_range is None:  # the largest super-scales, whatever the draw
        extremes = np.array([65504, -65504], np.float16)[:len(blocks)]
        blocks[:len(extremes), D_OFFSETS[kind][0]:D_OFFSETS[kind][0] + 2] = extremes[:, None].view(np.uint8)
    blocks[rng.permutation(len(blocks))[:zero_blocks]] = 0
    return blocks.reshape(N, -1)


def gguf_dequantized(kind: str, rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(quants.dequantize(rows, GGMLQuantizationType[kind]), dtype=np.float32))


def weight_parts(kind: str, rows: np.ndarray, weight: torch.Tensor | None = None):
    """(W_scaled, W_min) fp32 (N, K), W = W_scaled + W_min: Q4_K's d sc q and -dmin m as gguf.py's own
    numpy decoder gives them (independent of qwen2/quant/kquant.py); Q6_K has no min (None) and W_scaled is
    gguf-py's W (`weight` when already at hand)."""
    if kind == "Q4_K":
        q, scale, minimum = q4k_to_int4(rows)
        return q.float() * scale.repeat_interleave(32, 1), minimum.repeat_interleave(32, 1)
    return (gguf_dequantized(kind, rows) if weight is None else weight), None


def rounded_x(x: torch.Tensor, digits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as the kernels round it, in float64; the largest error per input): per block of 32,
    xq = round(x * 127 / absmax) and with two digits xr = round((that - xq) * 256) clamped to 127,
    in fp32 and round-half-even as the kernel does."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # 127 / amax correctly rounded, as the kernel's 127.f / amax: torch's scalar / tensor is not (it
    # is off by an ulp in a third of the blocks, which moves a value sitting on a .5 tie)
    t = blocks * torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    xq = torch.round(t)
    if digits == 2:
        xr = torch.round((t - xq) * 256).clamp(-127, 127)
        xhat, step = (xq.double() * 256 + xr.double()) * (amax / 127 / 256).double(), amax / 127 / 256
    else:
        xhat, step = xq.double() * (amax / 127).double(), amax / 127 / 2
    return xhat.reshape(x.shape), step.expand(-1, -1, 32).reshape(x.shape).double()


def kernel_model(x: torch.Tensor, w_scaled: torch.Tensor, w_min: torch.Tensor | None, digits: int) -> torch.Tensor:
    """The kernels' arithmetic in float64: rounded x times W_scaled, exact x times Q4_K's min."""
    y = rounded_x(x, digits)[0] @ w_scaled.double().T
    return y if w_min is None else y + x.double() @ w_min.double().T


def magnitude(x: torch.Tensor, w_scaled: torch.Tensor, w_min: torch.Tensor | None) -> torch.Tensor:
    """|x| @ (|W_scaled| + |W_min|)^T: the size of what the kernel adds up, which its fp32 rounding
    is relative to."""
    w = w_scaled.abs() if w_min is None else w_scaled.abs() + w_min.abs()
    return x.abs() @ w.T


def layer_of(kind: str, rows: np.ndarray, bias=None) -> nn.Module:
    layer = LAYERS[kind](torch.from_numpy(rows.copy()), bias)
    assert layer.kernel_ok, f"the native kernels are expected on this machine: {kernels.status()}"
    return layer


# ----------------------------------------------------------------------------------------------
# The kept bytes dequantise exactly as gguf-py does
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("N, K, zero_blocks", [(1, 256, 0), (7, 768, 3), (64, 2048, 20)])
def test_kept_bytes_dequantise_exactly_as_gguf(kind, N, K, zero_blocks):
    rows = random_rows(kind, N, K, seed=N * K, zero_blocks=zero_blocks)  # every finite fp16 as d (and dmin)
    layer = LAYERS[kind](torch.from_numpy(rows.copy()))
    assert (layer.in_features, layer.out_features) == (K, N)
    assert layer.weight_bytes == rows.nbytes == N * K * layer.bits_per_weight / 8  # the GGUF's bytes, no more
    expected = gguf_dequantized(kind, rows)
    assert torch.equal(layer.dequantize(), expected)  # the native decoder (the prefill's)
    assert torch.equal(TORCH_DEQUANTIZE[kind](layer.weight), expected)  # the PyTorch one (no kernels)
    # the bf16 prefill's weight: the exact value rounded once
    assert torch.equal(layer.dequantize(torch.bfloat16), expected.to(torch.bfloat16))
    # any row range (the prefill dequantises in row chunks)
    assert torch.equal(layer._dequant_rows(slice(N // 2, N), torch.float32), expected[N // 2:])


def test_bits_per_weight():
    assert (Q4KLinear.bits_per_weight, Q6KLinear.bits_per_weight) == (4.5, 6.5625)


# ----------------------------------------------------------------------------------------------
# The kernels
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("N, K, d_range", [(1, 256, None), (7, 1536, None), (33, 512, 1e-3)])
def test_kernel_computes_its_integer_arithmetic_exactly(kind, N, K, d_range):
    """The decode kernel and the GEMM equal the float64 model of their arithmetic up to fp32 rounding
    (relative to the magnitudes they add up; 3000 random cases gave at most 4e-8 for the kernel), for 1
    to 8 rows of x (the kernel takes them 4 at a time, the GEMM 4 against each panel of 16 or 32 weight
    rows) and 37 (the GEMM's size), one or two digits, odd output counts, extreme fp16 super-scales (every
    finite one, +-65504) and all-zero blocks of weights and of x."""
    rows = random_rows(kind, N, K, seed=N + K, d_range=d_range, zero_blocks=N * K // 256 // 4)
    layer = layer_of(kind, rows)
    w_scaled, w_min = weight_parts(kind, rows)
    gen = torch.Generator().manual_seed(K)
    for M in (1, 2, 3, 4, 5, 8, 37):
        x = torch.randn(M, K, generator=gen) * torch.rand(M, K // 32, 1, generator=gen).mul(8).exp().repeat_interleave(32, 1).reshape(M, K)
        x[0, :32] = 0.0  # an all-zero activation block
        scale = magnitude(x.double(), w_scaled.double(), None if w_min is None else w_min.double())
        for backend in ("kernel", "gemm"):
            layer.backend = backend
            for digits in (1, 2):
                layer.activation_digits = layer.gemm_digits = digits
                got = layer(x)
                assert got.shape == (M, N) and got.dtype == torch.float32
                error = (got.double() - kernel_model(x, w_scaled, w_min, digits)).abs()
                assert float((error / scale.clamp_min(1e-300)).max()) < 1e-6, (backend, M, digits)  # measured <= 4e-8


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("N, K", [(256, 1536), (61, 768)])
def test_every_path_matches_the_dequantised_reference(kind, N, K):
    """Kernel and GEMM ("auto": the kernel for few rows, the GEMM for many) within the rounding bound of
    the module docstring, "dense" (bf16 GEMM where the CPU has bf16 units) within bf16's bound,
    "reference" exact: all against x @ W^T + b with W the GGUF's own weights in fp32."""
    d_range = 4e-3 if kind == "Q4_K" else 1e-4  # weights of order 0.1, as in a model
    rows = random_rows(kind, N, K, seed=N, d_range=d_range, zero_blocks=5)
    bias = torch.randn(N)
    layer = layer_of(kind, rows, bias)
    w = gguf_dequantized(kind, rows)
    w_scaled, _ = weight_parts(kind, rows)
    for M in (1, 8, 40, 100):  # decode sizes and, past gemm_rows, a prefill
        x = torch.randn(M, K)
        x[:, 5] *= 30  # an outlier channel, as Qwen2's activations have
        expected = x @ w.T + bias
        layer.backend = "reference"
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-4)
        for digits in (1, 2):
            layer.activation_digits = layer.gemm_digits = digits
            step = rounded_x(x, digits)[1].float()
            bound = step @ w_scaled.abs().T + 1e-5 * (x.abs() @ w.abs().T)
            for backend in ("kernel", "gemm", "auto"):
                layer.backend = backend
                assert bool(((layer(x) - expected).abs() <= bound * 1.01 + 1e-6).all()), (backend, M, digits)
            assert layer.path(M) == ("kernel" if M < layer.gemm_rows else "gemm")
        layer.backend = "dense"
        w16 = layer.dequantize(layer.dense_dtype).float()
        dense_bound = (2.0 ** -8 * (x.abs() @ w16.abs().T) + x.abs() @ (w16 - w).abs().T
                       if layer.dense_dtype != torch.float32 else 1e-5 * (x.abs() @ w.abs().T))
        assert bool(((layer(x) - expected).abs() <= dense_bound * 1.01 + 1e-5).all()), M



def test_without_native_kernels_decode_takes_the_reference(monkeypatch):
    monkeypatch.setattr(kernels, "ops", lambda: None)
    monkeypatch.setattr(kernels, "status", lambda: "disabled for this test")
    for kind in LAYERS:
        rows = random_rows(kind, 16, 512, seed=3, d_range=1e-3)
        layer = LAYERS[kind](torch.from_numpy(rows))
        assert not layer.kernel_ok and layer.path(1) == "reference"
        assert layer.path(layer.gemm_rows) == ("dense" if layer.dense_dtype != torch.float32 else "reference")
        x = torch.randn(2, 512)
        torch.testing.assert_close(layer(x), x @ gguf_dequantized(kind, rows).T, rtol=0, atol=1e-5)
        for backend in ("kernel", "gemm"):
            layer.backend = backend
            with pytest.raises(Qwen2Error, match=f"no native {layer.mode} kernel"):
                layer(x)


def test_bad_rows_and_shapes_are_refused():
    with pytest.raises(Qwen2Error, match=r"Q4_K rows must be uint8 \(N, K / 256 \* 144\)"):
        Q4KLinear(torch.zeros(4, 100, dtype=torch.uint8))
    with pytest.raises(Qwen2Error, match="Q6_K rows must be uint8"):
        Q6KLinear(torch.zeros(4, 210, dtype=torch.int8))
    ops = kernels.ops()
    with pytest.raises(RuntimeError, match="multiple of 256"):
        ops.q4k_linear(torch.randn(1, 128), torch.zeros(4, 72, dtype=torch.uint8), 1)
    with pytest.raises(RuntimeError, match=r"weight must be contiguous uint8 \(N, 210\)"):
        ops.q6k_linear(torch.randn(1, 256), torch.zeros(4, 144, dtype=torch.uint8), 1)


# ----------------------------------------------------------------------------------------------
# Loading a GGUF with quantize="int4"
# ----------------------------------------------------------------------------------------------

def _qtype(gguf_name: str, ndim: int) -> str:
    """Q4_K almost everywhere; Q6_K for layer 0's attn_v and ffn_down and the output (int8 layers in
    int4 mode: taken) and for layer 1's attn_q (an int4 layer: requantised); layer 1's attn_v F32."""
    if ndim == 1 or gguf_name == "blk.1.attn_v.weight":
        return "F32"
    if gguf_name in ("blk.0.attn_v.weight", "blk.0.ffn_down.weight", "output.weight", "blk.1.attn_q.weight"):
        return "Q6_K"
    return "Q4_K"


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory):
    """A GGUF whose Q4_K/Q6_K tensors are random blocks (gguf-py cannot quantise to them); the
    model's weights are whatever the blocks decode to. Every input width a multiple of 256."""
    config = tiny_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=300)
    seeds = iter(range(1000))
    real_quantize = quants.quantize

    def quantize(array, qtype):
        if qtype.name not in LAYERS:
            return real_quantize(array, qtype)
        return random_rows(qtype.name, *array.shape, seed=next(seeds), d_range=4e-3 if qtype.name == "Q4_K" else 1e-4)

    path = tmp_path_factory.mktemp("kquant") / "kquant.gguf"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quants, "quantize", quantize)
        write_gguf(path, config, state_dict_of(random_model(config)), small_tokenizer_metadata(), qtype=_qtype)
    return path, qwen2.load(path, progress=False)


def test_int4_load_keeps_q4k_and_q6k_super_blocks(kquant_gguf):
    path, fp32 = kquant_gguf
    m = qwen2.load(path, quantize="int4", progress=False)
    model = m.model
    kinds = {name: type(layer).__name__ for name, layer in Q.quantized_linears(model).items()}
    assert kinds == {
        **{f"model.layers.{i}.{p}": "Q4KLinear" for i in (0, 1) for p in Q.BLOCK_LINEARS},
        "model.layers.0.self_attn.v_proj": "Q6KLinear", "model.layers.0.mlp.down_proj": "Q6KLinear",
        "model.layers.1.self_attn.q_proj": "Int4Linear",  # Q6_K where int4 is asked: requantised, as before
        "model.layers.1.self_attn.v_proj": "Int8Linear",  # F32 in the file
        "lm_head": "Q6KLinear"}
    assert model.quantization["gguf_exact"] == {"Q4_K": 10, "Q6_K": 3}
    assert Q.describe(model) == ("int4 (group 32; v_proj, down_proj int8; exact from the GGUF: 10 Q4_K as q4_k, "
                                 "3 Q6_K as q6_k), lm_head q6_k")
    assert "q6_k, GGUF Q6_K super-blocks as they are (6.5625 bits per weight)" in repr(model.lm_head)
    reference = fp32.model
    for name, layer in Q.quantized_linears(model).items():
        if isinstance(layer, (Q4KLinear, Q6KLinear)):
            assert torch.equal(layer.dequantize(), reference.get_submodule(name).weight), name
            source = reference.get_submodule(name)
            assert (layer.bias is None) == (source.bias is None) and (layer.bias is None or torch.equal(layer.bias, source.bias))
            assert layer.activation_digits == (2 if "self_attn" in name else 1), name  # as quantize_model sets
    # decode through the kernels and prefill through the dense path both stay near the fp32 logits
    ids = torch.tensor([[1, 5, 200, 17, 42, 99, 3]])
    with torch.inference_mode():
        expected = reference(ids)
        for backend in ("kernel", "dense", "reference"):
            Q.set_backend(model, backend)
            rel = float((model(ids) - expected).norm() / expected.norm())
            assert rel < 0.1, (backend, rel)  # two requantised layers (int4, int8) in the mix


def test_other_modes_keep_their_layouts(kquant_gguf):
    path, _ = kquant_gguf
    pure = qwen2.load(path, quantize="int4-pure", progress=False).model
    assert isinstance(pure.lm_head, Q6KLinear)  # int8 in int4-pure too: Q6_K takes it
    for name in ("self_attn.v_proj", "mlp.down_proj"):  # Q6_K, but "pure" means no 6-bit block linear
        assert isinstance(pure.model.layers[0].get_submodule(name), Q.Int4Linear), name
    assert pure.quantization["gguf_exact"] == {"Q4_K": 10, "Q6_K": 1}
    # int8 mode is unchanged (tests/test_gguf_exact.py: the real 0.5B's Q4_K/Q6_K down_proj stay requantised)
    group64 = qwen2.load(path, quantize="int4", group_size=64, progress=False).model
    assert "gguf_exact" not in group64.quantization  # as before: only group size 32 takes GGUF blocks


def test_compiled_decode_with_kquant_layers(kquant_gguf):
    """torch.compile of the decode step takes the q4_k/q6_k ops (their fake shapes: qwen2/runtime/compile.py)
    and gives the eager step's logits, up to a quantisation step of the activations that fused fp32
    arithmetic can move (as tests/test_compile.py)."""
    from qwen2.runtime.executor import make_decoder

    path, _ = kquant_gguf
    model = make_decoder(qwen2.load(path, quantize="int4", progress=False).model)

    def decode_logits(steps=5):
        out = []
        with torch.inference_mode():
            cache = model.new_cache(1, 4 + steps)
            logits = model(torch.tensor([[1, 5, 200, 17]]), cache=cache, last_only=True)
            for _ in range(steps):
                out.append(logits[:, -1])
                logits = model(logits[:, -1].argmax(-1)[:, None], cache=cache)
        return torch.stack(out, 1)

    eager = decode_logits()
    model = compiled = make_decoder(model.model, "compiled")
    got = decode_logits()
    assert compiled.error is None, compiled.error
    assert float((got - eager).abs().max()) <= 1e-2 * float(eager.abs().max())
    assert torch.equal(got.argmax(-1), eager.argmax(-1))


# ----------------------------------------------------------------------------------------------
# The real GGUFs' first layers
# ----------------------------------------------------------------------------------------------

def _run(blocks, config, x):
    positions = torch.arange(x.shape[1])[None]
    cos, sin = RotaryEmbedding(config)(positions, x.dtype)
    with torch.inference_mode():
        for i, block in blocks:
            x = block(x, cos, sin, None, NoCache(), i)
    return x


@pytest.mark.real_model
@pytest.mark.parametrize("model_name", ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
def test_real_gguf_layers_through_the_kernels(model_name, real_gguf, real_gguf_1_5b):
    """The first layer(s) of a real GGUF. Every Q4_K/Q6_K linear built from the kept bytes
    dequantises to exactly gguf.py's fp32 weight; on the activations it receives in the fp32 model
    (8 tokens: 8 decode rows at once) its kernel output equals fp32 with the same activation rounding
    (float64) up to fp32 rounding; and the decoder layers' outputs with all of them on the kernels stay
    near fp32's (the activation rounding, measured). The 0.5B (installed with the tests) has Q4_K/Q6_K
    in its down_proj only: layer 0 (Q6_K) and the first Q4_K one. The 1.5B's layer 0 has Q4_K
    q/k/o/gate/up and Q6_K v/down."""
    path = {"qwen2.5-coder-0.5b-instruct": real_gguf, "qwen2.5-coder-1.5b-instruct": real_gguf_1_5b}[model_name]
    reader = open_gguf(path)
    config = config_from_metadata(dict(reader.metadata), {t.name for t in reader.tensors})
    kquant = {t.name: t for t in reader.tensors if t.tensor_type.name in LAYERS and t.name.startswith("blk.")}
    first_q4k = min(int(n.split(".")[1]) for n, t in kquant.items() if t.tensor_type.name == "Q4_K")
    layers = sorted({0, first_q4k})

    fp32, kernel, checks, layer_weights = [], [], [], {}  # checks: (GGUF tensor, kernel layer, its fp32 twin's inputs)
    for i in layers:
        tensors = [t for t in reader.tensors if t.name.startswith(f"blk.{i}.")]
        reader_of_layer = types.SimpleNamespace(tensors=tensors)  # all dequantized_tensors reads
        state = {name.split(f"layers.{i}.", 1)[1]: w for name, w in dequantized_tensors(reader_of_layer, progress=False)}
        with torch.device("meta"):  # no random init of weights about to be replaced
            block = Block(config, i).eval()
        block.load_state_dict(state, assign=True)
        fast = copy.deepcopy(block)
        for t in tensors:
            if t.name not in kquant:
                continue
            name = hf_tensor_name(t.name).split(f"layers.{i}.", 1)[1].removesuffix(".weight")
            parent, attr = name.split(".")
            linear = block.get_submodule(name)
            layer = LAYERS[t.tensor_type.name].from_gguf(t, linear.bias)
            assert torch.equal(layer.dequantize(), linear.weight), t.name  # gguf.py's dequantisation, exactly
            layer.backend, layer.activation_digits = "kernel", 2 if parent == "self_attn" else 1  # as quantize_model
            setattr(fast.get_submodule(parent), attr, layer)
            inputs = []
            linear.register_forward_pre_hook(lambda module, args, inputs=inputs: inputs.append(args[0].detach().clone()))
            checks.append((t, layer, inputs))
            layer_weights[t.name] = linear.weight
        fp32.append((i, block))
        kernel.append((i, fast))

    ids = [9707, 1879, 25, 220, 17, 488, 220, 18]  # "Hello world: 2 + 3"-like ids
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    x = torch.from_numpy(np.ascontiguousarray(quants.dequantize(embedding.data[ids], embedding.tensor_type),
                                              dtype=np.float32))[None]
    expected, got = _run(fp32, config, x), _run(kernel, config, x)

    worst = 0.0
    for t, layer, inputs in checks:
        (xin,) = inputs
        xin = xin.reshape(-1, layer.in_features)
        w_scaled, w_min = weight_parts(t.tensor_type.name, t.data, layer_weights[t.name])
        model = kernel_model(xin, w_scaled, w_min, layer.activation_digits)
        model = model if layer.bias is None else model + layer.bias.double()
        with torch.inference_mode():
            error = (layer(xin).double() - model).abs() / magnitude(xin, w_scaled, w_min).double().clamp_min(1e-30)
        error = float(error.max())
        assert error < 1e-6, (t.name, error)
        worst = max(worst, error)
    rounding = float((got - expected).norm() / expected.norm())
    print(f"\n{model_name}, layers {layers}, {len(checks)} Q4_K/Q6_K linears on the kernels, 8 tokens: largest "
          f"|kernel - fp32 with the same activation rounding| {worst:.2g} of |x| @ |W|^T; layer outputs against "
          f"fp32: relative error {rounding:.2g}")
    assert rounding < 1e-2  # the activation rounding itself (one digit in the MLP)


@pytest.mark.parametrize("kind", ["Q8_0", "Q6_K", "Q4_K"])
def test_a_tied_embedding_is_read_from_the_exact_head(tmp_path, kind):
    """Tied token_embd taken exactly as the head: the embedding reads its rows there (llama.cpp's
    way), bit for bit the fp32 table's, and the model keeps no fp32 table."""
    config = tiny_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=300, tie_word_embeddings=True)
    real_quantize = quants.quantize

    def quantize(array, qtype):
        if qtype.name not in LAYERS:
            return real_quantize(array, qtype)
        return random_rows(qtype.name, *array.shape, seed=3, d_range=4e-3 if qtype.name == "Q4_K" else 1e-4)

    def qtype(name, ndim):
        return "F32" if ndim == 1 else kind if name == "token_embd.weight" else "Q8_0"

    path = tmp_path / "tied.gguf"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quants, "quantize", quantize)
        write_gguf(path, config, state_dict_of(random_model(config)), small_tokenizer_metadata(), qtype=qtype)
    fp32 = qwen2.load(path, progress=False).model
    model = qwen2.load(path, quantize="int4", progress=False).model
    embedding = model.model.embed_tokens
    assert isinstance(embedding, Q.QuantEmbedding) and embedding.head is model.lm_head
    assert not any(p.shape == (300, 256) for p in model.parameters())  # no fp32 table left
    ids = torch.arange(300).view(3, 100)
    with torch.inference_mode():
        assert torch.equal(embedding(ids), fp32.model.embed_tokens(ids))
        logits = model(ids[:1, :9])
        model.model.embed_tokens = fp32.model.embed_tokens
        assert torch.equal(model(ids[:1, :9]), logits)
    assert "lm_head" in Q.quantized_linears(model) and "rows of the lm_head" in repr(embedding)


def test_an_untied_embedding_is_read_from_its_gguf_rows(kquant_gguf, tmp_path):
    path, fp32 = kquant_gguf  # untied: output.weight is its own Q6_K tensor, token_embd Q4_K
    model = qwen2.load(path, quantize="int4", progress=False).model
    embedding = model.model.embed_tokens
    assert isinstance(embedding, Q.GGUFEmbedding)  # token_embd row by row, as llama.cpp reads it
    assert not any(p.shape == (300, 256) for p in model.parameters())  # no fp32 table
    ids = torch.arange(300).view(3, 100)
    with torch.inference_mode():
        assert torch.equal(embedding(ids), fp32.model.model.embed_tokens(ids))
        with pytest.raises(IndexError):
            embedding(torch.tensor([[300]]))
    fp32.save(tmp_path / "hf")  # no GGUF blocks to take: a requantised head, so the embedding stays fp32
    requantised = qwen2.load(tmp_path / "hf", quantize="int4", progress=False).model
    assert isinstance(requantised.model.embed_tokens, nn.Embedding)
