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
  "dense"      dequantise the weight in row chunks (to bf16 where the CPU has bf16 matrix units, else
               fp32; always fp32 in int8 mode) and run one GEMM: for many rows (prefill) this is
               compute-bound and much faster.
  "reference"  dequantise to fp32 and `F.linear` with fp32 x: pure PyTorch, the numerical reference,
               and the path for decode when the native kernels are unavailable (slow but correct).
  "auto"       (default) kernel below `dense_rows` rows of x, dense from there.

Quantisers (round to nearest, never clipping): int8 scale = absmax(group) / 127 rounded *up* to the
scale dtype, so |w - dequant| <= scale / 2. int4 min = the group's minimum rounded *down*, scale =
(max - min) / 15 rounded up, so every (w - min) / scale lies in [0, 15] and again |w - dequant| <= scale / 2.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .errors import Qwen2Error

MODES = ("int8", "int4", "int4-pure")
GROUP_SIZES = (32, 64, 128, 256)  # int4 choices (and what the kernel's 32-input blocks allow)
DEFAULT_GROUP_SIZE = 32
INT8_GROUP_SIZE = 32  # int8's groups (one per row when 32 does not divide the width); see int8_group_size
SCALE_DTYPE = torch.bfloat16
# In "int4" mode these stay int8, as llama.cpp's Q4_K_M keeps attn_v and ffn_down at 6 bits: on the
# 0.5B model, int4 v_proj alone costs +5.7 % perplexity and int4 down_proj +2.8 %, while they hold
# under a third of the block weights (v_proj is 2 % of them). "int4-pure" quantises them to int4 too.
INT4_KEEP_INT8 = ("self_attn.v_proj", "mlp.down_proj")
BACKENDS = ("auto", "kernel", "dense", "reference")
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_BLOCK = 32  # inputs per int4 packing block (and per activation block in the kernel)
_CHUNK_ELEMENTS = 1 << 22  # weight elements dequantised (or quantised) at a time: bounds temporary memory


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
    dense_rows = 32  # from this many rows of x on, "auto" dequantises and runs one GEMM

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

    def __setattr__(self, name: str, value) -> None:
        # any setting or tensor set may change how the native decode ops compute this layer
        self.__dict__.pop("_native", None)
        super().__setattr__(name, value)

    def native_layout(self, rows: int) -> tuple | None:
        """`native_linear(self, rows)`: built once, as decode asks it of every layer at every step,
        and forgotten whenever an attribute is set."""
        native = self.__dict__.get("_native")
        if native is None:
            native = self._native_layout()
            self.__dict__["_native"] = native  # set around __setattr__, which would drop it again
        most_rows, layout = native
        return layout if rows < most_rows else None

    def _native_layout(self) -> tuple[float, tuple | None]:
        """(rows below which forward takes the kernel, the layout native_linear gives); `path` decides
        (and raises as forward would): a one-row forward on the kernel means "auto" below dense_rows
        rows, or "kernel" at any count."""
        if self.mode not in NATIVE_KINDS or self.path(1) != "kernel":
            return 0, None
        buffers = self._buffers
        layout = [buffers["weight"], buffers.get("scales", _NO_TENSOR), buffers.get("mins", _NO_TENSOR), _bias(self)]
        most_rows = self.dense_rows if self.backend == "auto" else math.inf
        return most_rows, (NATIVE_KINDS[self.mode], self.group_size, self.activation_digits, layout)

    # subclasses: _kernel(x_fp32) -> (M, N) fp32, _dequant_rows(rows, dtype) -> (n, K) for `rows` a
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
            if rows >= self.dense_rows:
                backend = "dense" if self.dense_dtype != torch.float32 else "reference"
            else:
                backend = "kernel" if self.kernel_ok else "reference"
        if backend == "kernel" and not self.kernel_ok:
            raise Qwen2Error(f"no native {self.mode} kernel for this layer here ({kernels.status()}; or input "
                             f"width {self.in_features} not a multiple of 64); use backend 'reference'")
        if backend not in BACKENDS:
            raise Qwen2Error(f"unknown quantised-linear backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        return backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        path = self.path(x2.shape[0])
        if path == "kernel":  # decode: every microsecond here is paid ~170 times per token
            y = self._kernel(x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.float().contiguous())
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


def int8_group_size(in_features: int) -> int:
    """INT8_GROUP_SIZE when it divides the width, else one group per row (per output channel).
    Why groups of 32 and not one scale per output channel: per channel, one outlier weight coarsens
    its whole row. On the 0.5B model, 32-token greedy continuations of 20 prompts equal fp32's in 15
    of 20 per channel, 17 with groups of 128 or 32, and 18 with groups of 32 and an fp32 lm_head
    (hence int8 mode's default); the scales cost 0.5 bit per weight."""
    return INT8_GROUP_SIZE if in_features % INT8_GROUP_SIZE == 0 else in_features


def fill_in_row_chunks(weight, quantizer, out: tuple, in_features: int, on_chunk=None):
    """Fill the row slices of the `out` tensors with `quantizer(weight[a:b])`, chunk by chunk, about
    _CHUNK_ELEMENTS weights at a time (temporaries stay small even for the lm_head);
    `on_chunk(weight[a:b])` after each. `weight` is any row-indexable array of `in_features`-wide
    rows: an fp32 tensor, or a GGUF tensor's raw block rows."""
    row_chunk = max(1, _CHUNK_ELEMENTS // in_features)
    for a in range(0, weight.shape[0], row_chunk):
        b = min(a + row_chunk, weight.shape[0])
        for target, value in zip(out, quantizer(weight[a:b])):
            target[a:b] = value
        if on_chunk is not None:
            on_chunk(weight[a:b])


class Int8Linear(QuantLinear):
    """Weight int8 (stored + 128 as uint8), symmetric, one scale per group of `group_size` inputs."""

    mode = "int8"
    dense_rows = 48  # measured crossovers on a 2-core AVX-512 Xeon: int8 ~45 rows, int4 ~100

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, group_size: int, bias: torch.Tensor | None = None):
        N, K = q.shape
        super().__init__(K, N, group_size, bias)
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scales", scales.contiguous())

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int | None = None,
                   on_chunk=None, scale_dtype: torch.dtype | None = None) -> "Int8Linear":
        N, K = weight.shape
        group_size = group_size or int8_group_size(K)
        scale_dtype = scale_dtype or SCALE_DTYPE
        q = torch.empty(N, K, dtype=torch.uint8)
        scales = torch.empty(N, K // group_size, dtype=scale_dtype)
        fill_in_row_chunks(weight, lambda w: quantize_int8(w, group_size, scale_dtype), (q, scales), K, on_chunk)
        return cls(q, scales, group_size, bias)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops.int8_linear(x, self.weight, self.scales, self.group_size, self.activation_digits)

    def _dequant_rows(self, rows, dtype: torch.dtype) -> torch.Tensor:
        G = self.in_features // self.group_size
        q = self.weight[rows].view(-1, G, self.group_size).to(dtype) - 128
        return (q * self.scales[rows][:, :, None].to(dtype)).view(-1, self.in_features)


class Int4Linear(QuantLinear):
    """Weight int4, asymmetric: a scale and a min per group of `group_size` inputs."""

    mode = "int4"
    dense_rows = 96

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
                   on_chunk=None, scale_dtype: torch.dtype | None = None) -> "Int4Linear":
        N, K = weight.shape
        check_group_size(group_size, {"weight": K})
        scale_dtype = scale_dtype or SCALE_DTYPE
        packed = torch.empty(N, K // 2, dtype=torch.uint8)
        scales = torch.empty(N, K // group_size, dtype=scale_dtype)
        mins = torch.empty_like(scales)

        def quantize(w):
            q, s, m = quantize_int4(w, group_size, scale_dtype)
            return pack_int4(q), s, m
        fill_in_row_chunks(weight, quantize, (packed, scales, mins), K, on_chunk)
        return cls(packed, scales, mins, group_size, bias)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops.int4_linear(x, self.weight, self.scales, self.mins, self.group_size, self.activation_digits)

    def _dequant_rows(self, rows, dtype: torch.dtype) -> torch.Tensor:
        G = self.in_features // self.group_size
        q = unpack_int4(self.weight[rows]).view(-1, G, self.group_size).to(dtype)
        scales, mins = self.scales[rows][:, :, None].to(dtype), self.mins[rows][:, :, None].to(dtype)
        return (q * scales + mins).view(-1, self.in_features)


_NO_TENSOR = torch.empty(0)
NATIVE_KINDS = {"dense": 0, "int4": 1, "int8": 2, "q4_k": 3, "q6_k": 4}  # qwen2/kernels/decode_block.cpp's


def native_linear(module: nn.Module, rows: int) -> tuple | None:
    """How `decode_block` (qwen2/kernels/decode_block.cpp) computes `module` for `rows` rows of x as
    its forward would: (kind, group_size, digits, [three layout tensors, bias]), unused ones empty;
    None when the forward would take another path (a quantised linear's dense or reference
    backend) or the module is neither nn.Linear nor one of our quantised linears (a LoRA wrapper)."""
    if type(module) is nn.Linear:
        if module.weight.dtype != torch.float32:
            return None
        return NATIVE_KINDS["dense"], 0, 0, [module.weight, _NO_TENSOR, _NO_TENSOR, _bias(module)]
    return module.native_layout(rows) if isinstance(module, QuantLinear) else None


def _bias(linear: nn.Module) -> torch.Tensor:
    return _NO_TENSOR if linear.bias is None else linear.bias


class QuantEmbedding(nn.Module):
    """The token embedding read from a quantised tied head's rows, as llama.cpp reads its token_embd:
    each looked-up row dequantised, so the model keeps no fp32 table (a second copy of the head's
    matrix: 544 MB at the 0.5B model's size). Used only where it is exact: when the head holds a
    tied GGUF's own token_embd blocks, whose dequantisation equals the fp32 table's bit for bit
    (see `qwen2.checkpoint.gguf.convert_exact_linears`). The registry's GGUFs store output.weight
    apart from token_embd, so they load untied and keep their fp32 embedding."""

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


# --------------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------------

def check_mode(mode: str | None) -> str | None:
    if mode is None or mode in ("none", "fp32", ""):
        return None
    if mode not in MODES:
        raise Qwen2Error(f"unknown quantization {mode!r}; use one of {', '.join(MODES)} (or none)")
    return mode


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


def quantize_model(model, mode: str, group_size: int = DEFAULT_GROUP_SIZE, lm_head: bool | None = None,
                   release: bool = False):
    """Replace the q/k/v/o and gate/up/down projections of every block (and, with `lm_head`, the
    output head, always int8: see below) of a `Transformer` by quantised linears, in place; returns it.
    mode "int8": all int8 (groups of 32, `int8_group_size`). "int4": group-wise int4, but v_proj and
    down_proj int8 (see INT4_KEEP_INT8). "int4-pure": all seven int4.

    `lm_head` None means the mode's default: int8 in the int4 modes, fp32 in int8 mode. The lm_head
    is the largest single matrix of a small model (136 M of the 0.5B model's 494 M parameters), so
    reading it in fp32 is a third of a decode step; but its errors go straight into the logits, where
    they flip near-tie greedy choices: int8 mode is the accuracy mode, so it keeps the head exact.
    When quantised it is int8, never int4 (errors ~16x smaller for ~60 MB more). A tied embedding
    is left intact (the head gets a quantised copy; loading from a GGUF then reads the embedding's
    rows from the head's exact blocks: `QuantEmbedding`).

    `release`: the fp32 weights may live in a memory-mapped file (safetensors); drop their pages from
    this process once quantised, so resident memory does not keep the fp32 model (load() uses it).
    """
    mode = check_mode(mode)
    if mode is None:
        return model
    keep_int8 = INT4_KEEP_INT8 if mode == "int4" else ()
    lm_head = mode != "int8" if lm_head is None else lm_head
    if getattr(model, "quantization", None):
        raise Qwen2Error(f"the model is already quantised ({describe(model)})")
    if model.device.type != "cpu":
        raise Qwen2Error(f"quantised linears run on the CPU only, not {model.device}")
    config = model.config
    if config.num_experts:
        raise Qwen2Error("quantised linears do not cover mixture-of-experts layers yet; load this Qwen2-MoE model "
                         "without quantize=")
    if mode.startswith("int4"):
        check_group_size(group_size, {
            "q/k/v/gate/up_proj (hidden size)": config.hidden_size,
            "o_proj (heads x head dim)": config.num_attention_heads * config.head_dim,
            "down_proj (intermediate size)": config.intermediate_size})
    mapped = _file_mappings() if release else []

    def convert(linear: nn.Linear, as_mode: str) -> QuantLinear:
        # each chunk's fp32 pages go as soon as it is quantised: never more than a chunk of them resident
        release_chunk = None if not mapped else (lambda t: _release_pages(t, mapped))
        w = linear.weight.detach()
        if as_mode.startswith("int4"):
            return Int4Linear.from_float(w, linear.bias, group_size, on_chunk=release_chunk)
        return Int8Linear.from_float(w, linear.bias, on_chunk=release_chunk)

    with torch.no_grad():
        for block in model.model.layers:
            for path in BLOCK_LINEARS:
                parent_name, name = path.split(".")
                parent = getattr(block, parent_name)
                setattr(parent, name, convert(getattr(parent, name), "int8" if path in keep_int8 else mode))
        if lm_head:
            # A tied embedding's pages go too, as they are read: they belong to a file mapping (the
            # only pages released), so a later lookup faults its row back in from the checkpoint,
            # and a GGUF's exact head soon replaces the table altogether (QuantEmbedding).
            model.lm_head = convert(model.lm_head, "int8")
    for name, layer in quantized_linears(model).items():
        layer.activation_digits = 2 if "self_attn" in name or mode == "int8" else 1
        if mode == "int8":
            # int8 mode is the accuracy mode: a bf16 prefill alone flips 1-2 of 20 greedy continuations
            layer.dense_dtype = torch.float32
    model.quantization = {"mode": mode, "group_size": group_size if mode.startswith("int4") else None,
                          "int8": [p.split(".")[1] for p in keep_int8], "lm_head": "int8" if lm_head else None}
    return model


def describe(model) -> str:
    """'int4 (group 32; v_proj, down_proj int8; exact from the GGUF: 197 Q4_K as q4_k, 29 Q6_K as q6_k),
    lm_head q6_k' or 'none': GGUF block types taken exactly, each with the layout that holds it (q4_k
    and q6_k: the GGUF's super-blocks kept as they are, `qwen2.kquant`)."""
    q = getattr(model, "quantization", None)
    if not q:
        return "none"
    layouts = q.get("gguf_layouts", {})
    more = ([f"group {q['group_size']}"] if q.get("group_size") else []) + \
        ([", ".join(q["int8"]) + " int8"] if q.get("int8") else []) + \
        (["exact from the GGUF: " + ", ".join(f"{n} {t}" + (f" as {layouts[t]}" if t in layouts else "")
                                              for t, n in sorted(q["gguf_exact"].items()))]
         if q.get("gguf_exact") else [])
    text = q["mode"] + (f" ({'; '.join(more)})" if more else "")
    return text + (f", lm_head {q['lm_head']}" if q.get("lm_head") else ", lm_head fp32")


def num_parameters(model: nn.Module) -> int:
    """Logical parameter count: a quantised linear counts its in x out weights (and bias) once."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n + sum(m.in_features * m.out_features for m in quantized_linears(model).values())


def set_backend(model: nn.Module, backend: str) -> None:
    """Use `backend` ("auto", "kernel", "dense", "reference") in every quantised linear of `model`."""
    if backend not in BACKENDS:
        raise Qwen2Error(f"unknown quantised-linear backend {backend!r}; use one of {', '.join(BACKENDS)}")
    for m in quantized_linears(model).values():
        m.backend = backend


# --------------------------------------------------------------------------------------------------
# Giving back the pages of memory-mapped fp32 weights
# --------------------------------------------------------------------------------------------------

def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of regular files (Linux; empty elsewhere)."""
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/") and "(deleted)" not in parts[5]:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    spans.append((start, end))
    except OSError:
        pass
    return spans


_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _release_pages(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Drop the whole pages under `t` from this process when they belong to a file mapping (a
    memory-mapped checkpoint): re-reading them would fetch the file's bytes again, so nothing else
    can lose data; anonymous memory is never touched (it is freed when its last tensor goes)."""
    if not mapped or t.device.type != "cpu":
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    if not any(a <= start and end <= b for a, b in mapped):
        return
    first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if last <= first:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(_MADV_DONTNEED))
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------------------------------
# The quantised weights in 2 MB pages
# --------------------------------------------------------------------------------------------------

_HUGE_PAGE = 2 << 20


def into_huge_pages(model: nn.Module) -> int:
    """Move every quantised linear's buffers (weights, scales, mins, bias) into one private anonymous
    mapping advised for transparent huge pages (`MADV_HUGEPAGE`), in the model's order; returns the
    bytes placed there (0 where the OS has no such advice: the buffers stay where they are).

    Why: a decode step streams all of them from memory once per token, and with 4 KB pages a core
    reads memory markedly slower here (`torch.ones(2**28).sum()`: 11.9 GB/s on one thread with 4 KB
    pages, 15.0 with 2 MB ones); int4 decode steps took 25.2 instead of 27.9 ms on the 0.5B model and
    57.8 instead of 59.5 on the 1.5B (`benchmarks/bench_native_decode.py`, alternating). Where
    the kernel hands out no huge pages (THP "never"), the copy is all that happens. The copy is one
    buffer at a time, each old one freed as its module takes the new and its memory handed back to
    the OS every 32 MB (malloc keeps freed blocks for reuse otherwise: resident memory would grow by
    the whole quantised model, 240 MB on the 0.5B), so memory grows by ~32 MB plus the largest buffer.
    Cost: the first touch of fresh 2 MB pages, ~0.9 s for the 0.5B model's 367 MB on this VM."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    # (module, name, bytes) only: holding the tensors here would keep every old buffer alive to the end
    buffers = [(module, name, t.numel() * t.element_size()) for module in quantized_linears(model).values()
               for name, t in module.named_buffers(recurse=False) if t.device.type == "cpu" and t.numel() > 0]
    if not buffers:
        return 0
    padded = [-(-size // 64) * 64 for _, _, size in buffers]  # each cache-line aligned
    region = mmap.mmap(-1, sum(padded) + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel built without THP
        region.close()
        return 0
    arena = torch.frombuffer(region, dtype=torch.uint8)  # its views keep `region` alive
    start = offset = -arena.data_ptr() % _HUGE_PAGE  # from a 2 MB boundary: the first page can be huge too
    unreturned = 0
    for (module, name, size), step in zip(buffers, padded):
        old = getattr(module, name)
        setattr(module, name, arena[offset:offset + size].view(old.dtype).view(old.shape).copy_(old))
        del old
        offset += step
        unreturned += size
        if unreturned >= 32 << 20:
            _return_freed_memory()
            unreturned = 0
    _return_freed_memory()
    return offset - start


def _return_freed_memory() -> None:
    """Hand the pages of freed heap blocks back to the OS (glibc's malloc_trim; elsewhere nothing)."""
    try:
        ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):
        pass
