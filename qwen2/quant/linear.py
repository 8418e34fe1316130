"""Weight-only quantised linears for CPU inference: int8 and int4, both group-wise.

Only the weights of the linear layers are quantised; norms, attention, the residual stream and the
embedding stay in the model's dtype (fp32). A quantised linear computes y = x @ dequant(W)^T + b with

    int8   dequant(W)[n, k] = (q[n, k] - 128) * scale[n, g]      q uint8 (N, K), the int8 value + 128
    int4   dequant(W)[n, k] = q[n, k] * scale[n, g] + min[n, g]   q in [0, 15], two per byte (N, K/2)

g = k // group_size. Within each block of 32 inputs, byte j of an int4 row holds input j in its low
nibble and input j + 16 in its high nibble (the layout `qwen2/kernels/quant_linear.cpp` reads).
scale and min are (N, K / group_size), bf16 when this module quantises (every (scale, min) pair costs
4 bytes per group, 1 bit per weight at group 32) and fp32 when they come losslessly from a GGUF's
blocks (Q4_K's scales are products that bf16 cannot hold). The bias (q/k/v only) stays fp32.

Three ways to compute it (`QuantLinear.backend`):

  "kernel"     the native kernels (`qwen2.kernels`, compiled on first use): x is rounded to int8 per
               block of 32 inputs (one fp32 scale each; two int8 digits, ~16-bit exact, for the
               attention projections: `activation_digits`) and the dot products run on 8-bit
               integers, as llama.cpp does; decode is then bound by memory bandwidth, not arithmetic.
               Cost grows with the rows of x (weights are read once per 4 rows): the decode path.
  "gemm"       the same arithmetic for many rows of x (prefill): the native GEMM repacks the weights a
               panel of rows at a time so that each vector's lanes are output rows, and multiplies
               every row of x by each panel on 8-bit integers (4-8x the products per instruction of an
               fp32 FMA; `qwen2/kernels/quant_gemm.cpp`).
  "dense"      dequantise the weight in row chunks (to bf16 where the CPU has bf16 matrix units, else
               fp32; always fp32 in int8 mode) and run one GEMM.
  "reference"  dequantise to fp32 and `F.linear` with fp32 x: pure PyTorch, the numerical reference,
               and the path for decode when the native kernels are unavailable (slow but correct).
  "auto"       (default) kernel below `gemm_rows` rows of x, gemm from there (dense, or the reference,
               where the native kernels are unavailable).

Quantisers (round to nearest, never clipping): int8 scale = absmax(group) / 127 rounded *up* to the
scale dtype, so |w - dequant| <= scale / 2. int4 min = the group's minimum rounded *down*, scale =
(max - min) / 15 rounded up, so every (w - min) / scale lies in [0, 15] and again |w - dequant| <= scale / 2.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..errors import Qwen2Error
from .kinds import KIND_CODES, NO_TENSOR, bias_or_empty

MODES = ("int8", "int4", "int4-pure")
GROUP_SIZES = (32, 64, 128, 256)  # int4 choices (and what the kernel's 32-input blocks allow)
DEFAULT_GROUP_SIZE = 32
INT8_GROUP_SIZE = 32  # int8's groups (one per row when 32 does not divide the width); see int8_group_size
SCALE_DTYPE = torch.bfloat16
# In "int4" mode these stay int8, as llama.cpp's Q4_K_M keeps attn_v and ffn_down at 6 bits: on the
# 0.5B model, int4 v_proj alone costs +5.7 % perplexity and int4 down_proj +2.8 %, while they hold
# under a third of the block weights (v_proj is 2 % of them). "int4-pure" quantises them to int4 too.
INT4_KEEP_INT8 = ("self_attn.v_proj", "mlp.down_proj")
BACKENDS = ("auto", "kernel", "gemm", "dense", "reference")
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_BLOCK = 32  # inputs per int4 packing block (and per activation block in the kernel)
_CHUNK_ELEMENTS = 1 << 22  # weight elements dequantised at a time for a GEMM: bounds temporary memory
# weight elements quantised at a time (fill_in_row_chunks): a chunk's fp32 temporaries (4 MB) stay in the
# caches; quantising the 0.5B model's int4 layers from its GGUF took 1.8 s in chunks of 1 << 22, ~1 s in these
_FILL_CHUNK_ELEMENTS = 1 << 20


def _bf16_gemm_is_fast() -> bool:
    """The CPU has bf16 units and PyTorch runs its AVX-512 code (ATEN_CPU_CAPABILITY=avx2 on such a CPU
    emulates an AVX2-only one, whose bf16 GEMMs are 3-50x slower than fp32: then fp32)."""
    cpu = torch.cpu
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and any(
        getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


_DENSE_DTYPE = torch.bfloat16 if _bf16_gemm_is_fast() else torch.float32


# --------------------------------------------------------------------------------------------------
# Quantisers (pure functions, fp32 in)
# --------------------------------------------------------------------------------------------------

def _round_to(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """x (fp32) rounded to `dtype`, towards +inf (up) or -inf: the nearest value on that side."""
    r = x.to(dtype)
    if dtype == torch.float32:
        return r
    wrong = r.float() < x if up else r.float() > x
    return torch.where(wrong, torch.nextafter(r, torch.full_like(r, float("inf") if up else float("-inf"))), r)


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = w.shape
    if K % group_size:
        raise Qwen2Error(f"group size {group_size} does not divide {K} input features")
    return w.float().reshape(N, K // group_size, group_size)


def quantize_int8(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = SCALE_DTYPE):
    """w (N, K) -> q uint8 (N, K) (int8 value + 128, in [1, 255]), scale (N, K / group_size):
    w ≈ (q - 128) * scale within scale / 2."""
    g = _groups(w, group_size)
    absmax = g.abs().amax(-1)
    scale = _round_to(torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax)), scale_dtype, up=True)
    q = torch.round(g / scale.float()[..., None]).clamp_(-127, 127).add_(128).to(torch.uint8)
    return q.reshape(w.shape), scale


def quantize_int4(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = SCALE_DTYPE):
    """w (N, K) -> q uint8 (N, K) in [0, 15], scale and min (N, K / group_size):
    w ≈ q * scale + min within scale / 2."""
    g = _groups(w, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    low = _round_to(lo, scale_dtype, up=False)
    need = (hi - low.float()) / 15
    scale = _round_to(torch.where(need > 0, need, torch.ones_like(need)), scale_dtype, up=True)
    q = torch.round((g - low.float()[..., None]) / scale.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.reshape(w.shape), scale, low


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values (N, K) in [0, 15] -> uint8 (N, K/2): per block of 32 inputs, byte j = input j
    (low nibble) | input j + 16 (high nibble)."""
    N, K = q.shape
    b = q.to(torch.uint8).reshape(N, K // _BLOCK, 2, _BLOCK // 2)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: uint8 (N, K/2) -> uint8 (N, K) in [0, 15]."""
    N, K = packed.shape[0], packed.shape[1] * 2
    b = packed.reshape(N, K // _BLOCK, 1, _BLOCK // 2)
    return torch.cat((b & 15, b >> 4), dim=2).reshape(N, K)


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """Common part of the quantised linears: backend choice, bias, row-chunked dequantisation."""

    mode = ""
    # from this many rows of x on, "auto" takes the GEMM: the decode kernels' time over the GEMM's, 2 threads,
    # an 8960 x 1536 weight, at 12 / 16 / 24 rows: int4 0.90 / 1.08 / 1.52 (AVX-512 VNNI), 1.33 / 1.15 / 1.52
    # (AVX2); Q4_K 0.76 / 0.95 / 1.25 and 0.81 / 0.92 / 1.11; Q6_K 0.62 / 0.80 / 1.15 and 0.92 / 1.05 / 1.26
    gemm_rows = 16

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.backend = "auto"
        self._kernel_ok: bool | None = None
        self._ops = None  # torch.ops.qwen2_kernels once kernel_ok has been asked (no lock on the hot path)
        # the "dense" path's dtype: bf16 where the CPU multiplies it fast; int8 mode sets fp32 (see quantize_model)
        self.dense_dtype = _DENSE_DTYPE
        # The kernel's activations: 1 or 2 int8 digits per block of 32 inputs. quantize_model gives the
        # attention projections 2 (with 1 everywhere, int4 perplexity on the 0.5B model rose ~2 %, most
        # of it there) and, in the int4 modes, the MLP and lm_head 1 (no measurable loss; 2 costs ~3 %
        # decode speed); int8 mode, the accuracy mode, 2 everywhere.
        self.activation_digits = 2
        # The GEMM's (prefill's) digits: one everywhere. Over a whole prompt the rounding averages out: on
        # 2,048 tokens of HumanEval, int4 perplexity through the GEMM is +0.53 % of fp32 with one digit and
        # +0.55 % with two in the attention projections (0.5B model; 1.5B +0.16 % / +0.12 %), while two
        # digits double the GEMM's integer work on those layers.
        self.gemm_digits = 1

    def __setattr__(self, name: str, value) -> None:
        # any setting or tensor set may change how the native decode ops compute this layer
        self.__dict__.pop("_native", None)
        super().__setattr__(name, value)

    def native_layout(self, rows: int) -> tuple | None:
        """`qwen2.runtime.native.native_linear(self, rows)`: built once, as decode asks it of every layer at every step,
        and forgotten whenever an attribute is set."""
        native = self.__dict__.get("_native")
        if native is None:
            native = self._native_layout()
            self.__dict__["_native"] = native  # set around __setattr__, which would drop it again
        most_rows, layout = native
        return layout if rows < most_rows else None

    def _native_layout(self) -> tuple[float, tuple | None]:
        """(rows below which forward takes the kernel, the layout native_linear gives); `path` decides
        (and raises as forward would): a one-row forward on the kernel means "auto" below gemm_rows
        rows, or "kernel" at any count."""
        if self.mode not in KIND_CODES or self.path(1) != "kernel":
            return 0, None
        buffers = self._buffers
        layout = [buffers["weight"], buffers.get("scales", NO_TENSOR), buffers.get("mins", NO_TENSOR), bias_or_empty(self)]
        most_rows = self.gemm_rows if self.backend == "auto" else math.inf
        return most_rows, (KIND_CODES[self.mode], self.group_size, self.activation_digits, layout)

    # subclasses: _kernel(x_fp32) and _gemm(x_fp32) -> (M, N) fp32, _dequant_rows(rows, dtype) -> (n, K) for `rows` a
    # slice or a 1-d index tensor of output rows

    @property
    def kernel_ok(self) -> bool:
        """The native kernel exists here and takes this shape (inputs a multiple of 64)."""
        if self._kernel_ok is None:  # asked on every forward: decided once
            self._ops = kernels.ops() if self.in_features % (2 * _BLOCK) == 0 else None
            self._kernel_ok = self._ops is not None
        return self._kernel_ok

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full (N, K) weight this layer computes with."""
        return self._dequant_rows(slice(0, self.out_features), dtype)

    def _chunks(self) -> Iterable[tuple[int, int]]:
        step = max(1, _CHUNK_ELEMENTS // self.in_features)
        for start in range(0, self.out_features, step):
            yield start, min(start + step, self.out_features)

    def _matmul_dequantized(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        xd = x.to(dtype)
        parts = [F.linear(xd, self._dequant_rows(slice(a, b), dtype)) for a, b in self._chunks()]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y.to(x.dtype)

    def path(self, rows: int) -> str:
        """Which computation a forward over `rows` rows of x takes."""
        backend = self.backend
        if backend == "auto":
            if not self.kernel_ok:
                backend = "dense" if rows >= self.gemm_rows and self.dense_dtype != torch.float32 else "reference"
            else:
                backend = "gemm" if rows >= self.gemm_rows else "kernel"
        if backend in ("kernel", "gemm") and not self.kernel_ok:
            raise Qwen2Error(f"no native {self.mode} kernel for this layer here ({kernels.status()}; or input "
                             f"width {self.in_features} not a multiple of 64); use backend 'reference'")
        if backend not in BACKENDS:
            raise Qwen2Error(f"unknown quantised-linear backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        return backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        path = self.path(x2.shape[0])
        if path in ("kernel", "gemm"):  # decode: every microsecond here is paid ~170 times per token
            xf = x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.float().contiguous()
            y = self._kernel(xf) if path == "kernel" else self._gemm(xf)
            y = y if self.bias is None else y.add_(self.bias)
            return y.view(*shape, self.out_features).to(x.dtype)
        y = self._matmul_dequantized(x2, self.dense_dtype if path == "dense" else x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape, self.out_features)

    @property
    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def describe(self) -> str:
        return f"{self.mode}, group_size={self.group_size}, scales {str(self.scales.dtype).replace('torch.', '')}"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.describe()}, "
                f"bias={self.bias is not None}")


def check_group_size(group_size: int, in_features: dict[str, int]) -> None:
    """Raise Qwen2Error unless `group_size` is one the int4 kernel takes and divides every input width."""
    if group_size not in GROUP_SIZES:
        raise Qwen2Error(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, not {group_size!r}")
    bad = {name: k for name, k in in_features.items() if k % group_size}
    if bad:
        fits = [g for g in GROUP_SIZES if all(k % g == 0 for k in in_features.values())]
        name, k = next(iter(bad.items()))
        raise Qwen2Error(f"int4 group size {group_size} does not divide the {k} input features of {name}; "
                         + (f"group sizes that fit: {', '.join(map(str, fits))}" if fits else
                            "no int4 group size fits this model; use int8"))


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def int8_group_size(in_features: int) -> int:
    """INT8_GROUP_SIZE when it divides the width, else one group per row (per output channel).
    Why groups of 32 and not one scale per output channel: per channel, one outlier weight coarsens
    its whole row. On the 0.5B model, 32-token greedy continuations of 20 prompts equal fp32's in 15
    of 20 per channel, 17 with groups of 128 or 32, and 18 with groups of 32 and an fp32 lm_head
    (hence int8 mode's default); the scales cost 0.5 bit per weight."""
    return INT8_GROUP_SIZE if in_features % INT8_GROUP_SIZE == 0 else in_features


def buffer_shapes(layout: str, out_features: int, in_features: int, group_size: int | None = None,
                  scale_dtype: torch.dtype | None = None) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each buffer `Int4Linear.from_float` ("int4", at `group_size`) or
    `Int8Linear.from_float` ("int8") makes for an (out_features, in_features) weight, in the order their
    `out=` takes them: to place them before quantising (e.g. all in one region of 2 MB pages)."""
    N, K, scale_dtype = out_features, in_features, scale_dtype or SCALE_DTYPE
    if layout.startswith("int4"):
        return [((N, K // 2), torch.uint8), ((N, K // group_size), scale_dtype), ((N, K // group_size), scale_dtype)]
    return [((N, K), torch.uint8), ((N, K // (group_size or int8_group_size(K))), scale_dtype)]


def fill_in_row_chunks(weight, quantizer, out: tuple, in_features: int, on_chunk=None):
    """Fill the row slices of the `out` tensors with `quantizer(weight[a:b])`, chunk by chunk, about
    _FILL_CHUNK_ELEMENTS weights at a time (temporaries stay small even for the lm_head);
    `on_chunk(weight[a:b])` after each. `weight` is any row-indexable array of `in_features`-wide
    rows: an fp32 tensor, or a GGUF tensor's raw block rows."""
    row_chunk = max(1, _FILL_CHUNK_ELEMENTS // in_features)
    for a in range(0, weight.shape[0], row_chunk):
        b = min(a + row_chunk, weight.shape[0])
        for target, value in zip(out, quantizer(weight[a:b])):
            target[a:b] = value
        if on_chunk is not None:
            on_chunk(weight[a:b])


class Int8Linear(QuantLinear):
    """Weight int8 (stored + 128 as uint8), symmetric, one scale per group of `group_size` inputs."""

    mode = "int8"

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, group_size: int, bias: torch.Tensor | None = None):
        N, K = q.shape
        super().__init__(K, N, group_size, bias)
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scales", scales.contiguous())

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int | None = None,
                   on_chunk=None, scale_dtype: torch.dtype | None = None, out: tuple | None = None) -> "Int8Linear":
        """`weight` (N, K) quantised. `out`: (q, scales) to fill and keep instead of new tensors (see `buffer_shapes`)."""
        N, K = weight.shape
        group_size = group_size or int8_group_size(K)
        scale_dtype = scale_dtype or SCALE_DTYPE
        q, scales = out or (torch.empty(N, K, dtype=torch.uint8), torch.empty(N, K // group_size, dtype=scale_dtype))
        fill_in_row_chunks(weight, lambda w: quantize_int8(w, group_size, scale_dtype), (q, scales), K, on_chunk)
        return cls(q, scales, group_size, bias)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops.int8_linear(x, self.weight, self.scales, self.group_size, self.activation_digits)

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops.int8_gemm(x, self.weight, self.scales, self.group_size, self.gemm_digits)

    def _dequant_rows(self, rows, dtype: torch.dtype) -> torch.Tensor:
        G = self.in_features // self.group_size
        q = self.weight[rows].view(-1, G, self.group_size).to(dtype) - 128
        return (q * self.scales[rows][:, :, None].to(dtype)).view(-1, self.in_features)


class Int4Linear(QuantLinear):
    """Weight int4, asymmetric: a scale and a min per group of `group_size` inputs."""

    mode = "int4"

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None):
        N, K = packed.shape[0], packed.shape[1] * 2
        check_group_size(group_size, {"weight": K})
        super().__init__(K, N, group_size, bias)
        self.register_buffer("weight", packed.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("mins", mins.contiguous())

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = DEFAULT_GROUP_SIZE,
                   on_chunk=None, scale_dtype: torch.dtype | None = None, out: tuple | None = None) -> "Int4Linear":
        """`weight` (N, K) quantised. `out`: (packed, scales, mins) to fill and keep instead of new
        tensors (see `buffer_shapes`)."""
        N, K = weight.shape
        check_group_size(group_size, {"weight": K})
        scale_dtype = scale_dtype or SCALE_DTYPE
        packed, scales, mins = out or (torch.empty(N, K // 2, dtype=torch.uint8),
                                       torch.empty(N, K // group_size, dtype=scale_dtype),
                                       torch.empty(N, K // group_size, dtype=scale_dtype))

        def quantize(w):
            q, s, m = quantize_int4(w, group_size, scale_dtype)
            return pack_int4(q), s, m
        fill_in_row_chunks(weight, quantize, (packed, scales, mins), K, on_chunk)
        return cls(packed, scales, mins, group_size, bias)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops.int4_linear(x, self.weight, self.scales, self.mins, self.group_size, self.activation_digits)

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops.int4_gemm(x, self.weight, self.scales, self.mins, self.group_size, self.gemm_digits)

    def _dequant_rows(self, rows, dtype: torch.dtype) -> torch.Tensor:
        G = self.in_features // self.group_size
        q = unpack_int4(self.weight[rows]).view(-1, G, self.group_size).to(dtype)
        scales, mins = self.scales[rows][:, :, None].to(dtype), self.mins[rows][:, :, None].to(dtype)
        return (q * scales + mins).view(-1, self.in_features)


class QuantEmbedding(nn.Module):
    """The token embedding read from a quantised tied head's rows, as llama.cpp reads its token_embd:
    each looked-up row dequantised, so the model keeps no fp32 table (a second copy of the head's
    matrix: 544 MB at the 0.5B model's size). Used only where it is exact: when the head holds a
    tied GGUF's own token_embd blocks, whose dequantisation equals the fp32 table's bit for bit
    (see `qwen2.quant.gguf_blocks.convert_exact_linears`). An untied GGUF's embedding is read from its
    own token_embd instead (`qwen2.quant.gguf_blocks.GGUFEmbedding`)."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        # Not a submodule: the head stays `lm_head` alone in named_modules (its buffers are counted,
        # saved and described once, under that name).
        object.__setattr__(self, "head", head)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.head._dequant_rows(input_ids.reshape(-1), torch.float32)  # (B*T, C)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the lm_head ({self.head.mode})"
