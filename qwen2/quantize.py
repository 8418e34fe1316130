"""Weight-only quantised linears for CPU inference: int8 per output channel, int4 group-wise.

Only the weights of the linear layers are quantised; activations, norms, attention, the residual
stream and the embedding stay in the model's dtype (fp32). A quantised linear computes

    y = x @ dequant(W)^T + b            dequant(W) int8: q[n, k] * s[n]
                                                   int4: (q[n, k] - 8) * s[n, g] + z[n, g],  g = k // group_size

with q/s/z stored as below and the bias (q/k/v only) kept in fp32 and added after. Three ways to
compute it (`QuantLinear.backend`):

  "kernel"     PyTorch's CPU weight-only kernels, `aten._weight_int8pack_mm` and
               `aten._weight_int4pack_mm_for_cpu`. They are vectorised for bf16 activations only (fp32
               ones take a scalar path ~10x slower), so x is cast to bf16 for the kernel and the result
               (bf16) back to x's dtype. Their cost grows linearly with the rows of x: ideal for decode.
  "dense"      dequantise the weight (in row chunks, to bf16 where the CPU has bf16 matrix units, else
               fp32) and run one ordinary GEMM: for many rows (prefill) this beats the int kernels ~4x.
  "reference"  dequantise to x's dtype (fp32) and `F.linear`: pure PyTorch, the numerical reference,
               and the path taken when a kernel op is missing or does not fit the shape.
  "auto"       (default) kernel below `dense_rows` rows of x (32 for int8, 128 for int4: the measured
               crossovers on a 2-core AVX-512/AMX Xeon), dense from there; reference without the kernels.

Storage (the scales are bf16 because the kernels take them so; every path uses the same rounded
values, so "kernel", "dense" and "reference" compute the same quantised weight):

  int8  weight   int8 [N, K] in [-127, 127]        scales bf16 [N]
  int4  weight   uint8 [Np, K/2], the layout of `aten._convert_weight_to_int4pack_for_cpu` (Np = N
                 rounded up to 64, the padding rows dequantise to 0 and are cut from the output)
        scales_and_zeros  bf16 [K / group_size, Np, 2]  (scale, zero) as the kernel reads them

Quantisers (round to nearest, never clipping): int8 s = absmax(row) / 127 rounded *up* to bf16, so
|w - q s| <= s / 2. int4: z = bf16(min + 8 (max - min) / 15), then s = max((max - z) / 7, (z - min) / 8)
rounded up to bf16, so every (w - z) / s lies in [-8, 7] and |w - dequant| <= s / 2 as well.
"""
from __future__ import annotations

import ctypes
import os
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import Qwen2Error

MODES = ("int8", "int4", "int4-pure")
GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
DEFAULT_GROUP_SIZE = 32
# In "int4" mode these stay int8, as llama.cpp's Q4_K_M keeps attn_v and ffn_down at 6 bits: on the
# 0.5B model, int4 v_proj alone costs +5.7 % perplexity and int4 down_proj +2.8 %, while they hold
# under a third of the block weights (v_proj is 2 % of them). "int4-pure" quantises them to int4 too.
INT4_KEEP_INT8 = ("self_attn.v_proj", "mlp.down_proj")
BACKENDS = ("auto", "kernel", "dense", "reference")
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_INT4_BLOCK_N = 64  # rows interleaved per block by the CPU int4 packing
_CHUNK_ELEMENTS = 1 << 22  # weight elements dequantised (or quantised) at a time: bounds temporary memory


# --------------------------------------------------------------------------------------------------
# What this machine's PyTorch offers
# --------------------------------------------------------------------------------------------------

def _op(name: str):
    return getattr(torch.ops.aten, name, None) if hasattr(torch.ops.aten, name) else None


def int8_kernel_available() -> bool:
    return _op("_weight_int8pack_mm") is not None


_int4_ok: bool | None = None


def int4_kernel_available() -> bool:
    """The int4 ops exist and pack exactly as `pack_int4` does (checked once on a small probe, so a
    future PyTorch that changes the layout falls back to the reference path instead of computing garbage)."""
    global _int4_ok
    if _int4_ok is None:
        convert, mm = _op("_convert_weight_to_int4pack_for_cpu"), _op("_weight_int4pack_mm_for_cpu")
        _int4_ok = False
        if convert is not None and mm is not None:
            try:
                q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
                _int4_ok = torch.equal(convert(q, 1), pack_int4(q))
            except Exception:  # noqa: BLE001 (an op that exists but fails is as good as absent)
                _int4_ok = False
    return _int4_ok


def _bf16_gemm_is_fast() -> bool:
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


_DENSE_DTYPE = torch.bfloat16 if _bf16_gemm_is_fast() else torch.float32


# --------------------------------------------------------------------------------------------------
# Quantisers (pure functions, fp32 in)
# --------------------------------------------------------------------------------------------------

def _bf16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= x (x >= 0, fp32)."""
    r = x.to(torch.bfloat16)
    return torch.where(r.float() < x, torch.nextafter(r, torch.full_like(r, float("inf"))), r)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> q int8 (N, K) in [-127, 127], scales bf16 (N,): w ≈ q * scale, error <= scale / 2."""
    w = w.float()
    absmax = w.abs().amax(dim=1)
    scale = _bf16_at_least(torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax)))
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) float -> q int32 (N, K) in [0, 15], scales and zeros bf16 (N, K / group_size):
    w ≈ (q - 8) * scale + zero within scale / 2."""
    N, K = w.shape
    if K % group_size:
        raise Qwen2Error(f"int4 group size {group_size} does not divide {K} input features")
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    zero = (lo + (hi - lo) * (8 / 15)).to(torch.bfloat16)
    z = zero.float()
    need = torch.maximum((hi - z) / 7, (z - lo) / 8)
    scale = _bf16_at_least(torch.where(need > 0, need, torch.ones_like(need)))
    q = torch.round((g - z[..., None]) / scale.float()[..., None]).add_(8).clamp_(0, 15).to(torch.int32)
    return q.reshape(N, K), scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values (N, K) in [0, 15], N a multiple of 64 -> uint8 (N, K/2) in the CPU kernel's layout:
    rows in blocks of 64, each block stored k-major as 32 bytes per k, byte j holding row j of the
    block in its low nibble and row 32 + j in its high nibble."""
    N, K = q.shape
    b = q.to(torch.uint8).reshape(N // _INT4_BLOCK_N, _INT4_BLOCK_N, K).transpose(1, 2)  # (N/64, K, 64)
    return (b[..., :32] | (b[..., 32:] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: uint8 (N, K/2) -> uint8 (N, K) in [0, 15]."""
    N, K = packed.shape[0], packed.shape[1] * 2
    b = packed.reshape(N // _INT4_BLOCK_N, K, 32)
    return torch.cat((b & 15, b >> 4), dim=-1).transpose(1, 2).reshape(N, K)


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------

class QuantLinear(nn.Module):
    """Common part of the quantised linears: backend choice, bias, row-chunked dequantisation."""

    mode = ""
    dense_rows = 32  # from this many rows of x on, "auto" dequantises and runs one GEMM

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.backend = "auto"

    # subclasses: kernel_ok, _kernel(x_bf16) -> (M, N) bf16, _dequant_rows(start, stop, dtype) -> (rows, K)
    kernel_ok = False
    _row_align = 1

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full (N, K) weight this layer computes with."""
        return self._dequant_rows(0, self.out_features, dtype)

    def _chunks(self) -> Iterable[tuple[int, int]]:
        step = max(self._row_align, _CHUNK_ELEMENTS // self.in_features // self._row_align * self._row_align)
        for start in range(0, self.out_features, step):
            yield start, min(start + step, self.out_features)

    def _matmul_dequantized(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        xd = x.to(dtype)
        parts = [F.linear(xd, self._dequant_rows(a, b, dtype)) for a, b in self._chunks()]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return y.to(x.dtype)

    def path(self, rows: int) -> str:
        """Which computation a forward over `rows` rows of x takes."""
        backend = self.backend
        if backend == "auto":
            if rows >= self.dense_rows:
                backend = "dense" if _DENSE_DTYPE != torch.float32 else "reference"
            else:
                backend = "kernel" if self.kernel_ok else "reference"
        if backend == "kernel" and not self.kernel_ok:
            raise Qwen2Error(f"no {self.mode} kernel for this layer here (PyTorch op missing or shape "
                             f"{self.out_features}x{self.in_features} unsupported); use backend 'reference'")
        return backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        path = self.path(x2.shape[0])
        if path == "kernel":
            y = self._kernel(x2.to(torch.bfloat16).contiguous()).to(x.dtype)
        elif path == "dense":
            y = self._matmul_dequantized(x2, _DENSE_DTYPE)
        elif path == "reference":
            y = self._matmul_dequantized(x2, x.dtype)
        else:
            raise Qwen2Error(f"unknown quantised-linear backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape, self.out_features)

    @property
    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def describe(self) -> str:
        return self.mode

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.describe()}, "
                f"bias={self.bias is not None}")


class Int8Linear(QuantLinear):
    """Weight int8 per output channel (symmetric), bf16 scales."""

    mode = "int8"
    dense_rows = 32

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, on_chunk=None):
        N, K = weight.shape
        super().__init__(K, N, bias)
        q = torch.empty(N, K, dtype=torch.int8)
        scales = torch.empty(N, dtype=torch.bfloat16)
        for a, b in self._chunks():  # row chunks: fp32 temporaries stay small even for the lm_head
            q[a:b], scales[a:b] = quantize_int8(weight[a:b])
            if on_chunk is not None:
                on_chunk(weight[a:b])
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)

    @property
    def kernel_ok(self) -> bool:
        # K not a multiple of 16 makes _weight_int8pack_mm read out of bounds (garbage, even a crash)
        return int8_kernel_available() and self.in_features % 16 == 0

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)

    def _dequant_rows(self, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        return self.weight[a:b].to(dtype) * self.scales[a:b, None].to(dtype)


class Int4Linear(QuantLinear):
    """Weight int4, asymmetric (scale and zero per group of `group_size` input features), bf16 scales."""

    mode = "int4"
    dense_rows = 128
    _row_align = _INT4_BLOCK_N

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = DEFAULT_GROUP_SIZE,
                 on_chunk=None):
        N, K = weight.shape
        check_group_size(group_size, {"weight": K})
        super().__init__(K, N, bias)
        self.group_size = group_size
        Np = -(-N // _INT4_BLOCK_N) * _INT4_BLOCK_N
        packed = torch.empty(Np, K // 2, dtype=torch.uint8)
        sz = torch.zeros(K // group_size, Np, 2, dtype=torch.bfloat16)
        packed[N:] = 0x88  # padding rows: q = 8 with scale 0 and zero 0 (sz starts zeroed) dequantise to exactly 0
        for a, b in self._chunks():
            q, s, z = quantize_int4(weight[a:b], group_size)
            if (b - a) % _INT4_BLOCK_N:  # the last, ragged chunk: pad to a block
                q = torch.cat((q, q.new_full((-(-(b - a) // _INT4_BLOCK_N) * _INT4_BLOCK_N - (b - a), K), 8)))
            packed[a:a + q.shape[0]] = pack_int4(q)
            sz[:, a:b, 0], sz[:, a:b, 1] = s.T, z.T
            if on_chunk is not None:
                on_chunk(weight[a:b])
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", sz)

    @property
    def kernel_ok(self) -> bool:
        return int4_kernel_available()

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales_and_zeros)
        return y[:, :self.out_features] if y.shape[1] != self.out_features else y

    def _dequant_rows(self, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        # a is a multiple of 64 (chunks are aligned); unpack whole blocks, then cut to b
        stop = min(-(-b // _INT4_BLOCK_N) * _INT4_BLOCK_N, self.weight.shape[0])
        q = unpack_int4(self.weight[a:stop])[:b - a].to(dtype)  # (rows, K)
        G = self.in_features // self.group_size
        sz = self.scales_and_zeros[:, a:b].to(dtype)  # (G, rows, 2)
        scale, zero = sz[..., 0].T[..., None], sz[..., 1].T[..., None]  # (rows, G, 1)
        return ((q.view(b - a, G, self.group_size) - 8) * scale + zero).view(b - a, self.in_features)

    def describe(self) -> str:
        return f"int4, group_size={self.group_size}"


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


def quantize_model(model, mode: str, group_size: int = DEFAULT_GROUP_SIZE, lm_head: bool = True,
                   release: bool = False):
    """Replace the q/k/v/o and gate/up/down projections of every block (and, with `lm_head`, the
    output head, always int8: see below) of a `Transformer` by quantised linears, in place; returns it.
    mode "int8": all per-channel int8. "int4": group-wise int4, but v_proj and down_proj int8 (see
    INT4_KEEP_INT8). "int4-pure": all seven int4.

    The lm_head is quantised per channel to int8 even in int4 mode: it is the largest single matrix
    of a small model (136 M of the 0.5B model's 494 M parameters) and reading it in fp32 is a third
    of a decode step, while its errors go straight into the logits; int8 keeps them ~16x smaller
    than int4 for ~60 MB more. A tied embedding is left intact (the head gets a quantised copy).

    `release`: the fp32 weights may live in a memory-mapped file (safetensors); drop their pages from
    this process once quantised, so resident memory does not keep the fp32 model (load() uses it).
    """
    mode = check_mode(mode)
    if mode is None:
        return model
    keep_int8 = INT4_KEEP_INT8 if mode == "int4" else ()
    if getattr(model, "quantization", None):
        raise Qwen2Error(f"the model is already quantised ({describe(model)})")
    if model.device.type != "cpu":
        raise Qwen2Error(f"quantised linears run on the CPU only, not {model.device}")
    config = model.config
    if mode.startswith("int4"):
        check_group_size(group_size, {
            "q/k/v/gate/up_proj (hidden size)": config.hidden_size,
            "o_proj (heads x head dim)": config.num_attention_heads * config.head_dim,
            "down_proj (intermediate size)": config.intermediate_size})
    mapped = _file_mappings() if release else []

    def convert(linear: nn.Linear, as_mode: str, keep: bool = False) -> QuantLinear:
        # each chunk's fp32 pages go as soon as it is quantised: never more than a chunk of them resident
        release_chunk = None if keep or not mapped else (lambda t: _release_pages(t, mapped))
        w = linear.weight.detach()
        if as_mode.startswith("int4"):
            return Int4Linear(w, linear.bias, group_size, on_chunk=release_chunk)
        return Int8Linear(w, linear.bias, on_chunk=release_chunk)

    with torch.no_grad():
        for block in model.model.layers:
            for path in BLOCK_LINEARS:
                parent_name, name = path.split(".")
                parent = getattr(block, parent_name)
                setattr(parent, name, convert(getattr(parent, name), "int8" if path in keep_int8 else mode))
        if lm_head:
            tied = model.lm_head.weight is model.model.embed_tokens.weight
            model.lm_head = convert(model.lm_head, "int8", keep=tied)
    model.quantization = {"mode": mode, "group_size": group_size if mode.startswith("int4") else None,
                          "int8": [p.split(".")[1] for p in keep_int8], "lm_head": "int8" if lm_head else None}
    return model


def describe(model) -> str:
    """'int4 (group 32; v_proj, down_proj int8), lm_head int8' or 'none'."""
    q = getattr(model, "quantization", None)
    if not q:
        return "none"
    more = ([f"group {q['group_size']}"] if q.get("group_size") else []) + \
        ([", ".join(q["int8"]) + " int8"] if q.get("int8") else [])
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
