"""GGUF k-quant super-blocks (Q4_K, Q6_K) kept byte for byte, as quantised linears for decode.

A Q4_K tensor copied into `Int4Linear`'s layout costs 6 bits per weight (an fp32 scale and min per
32 weights) against Q4_K's own 4.5, and a Q6_K tensor requantised to int8 costs 8.5 bits against
6.5625 (and a second rounding). Decode reads every weight once per token, so those bytes are its
time. These layers keep the GGUF's rows as they are, uint8 (N, K / 256 * block bytes), and run on
native kernels that read the blocks directly (`qwen2/kernels/quant_linear.cpp`, where both block
layouts are described byte by byte):

    q4_k   144 bytes per 256 weights: fp16 d, dmin; 6-bit scale and min per 32; 4-bit quants
           w = d * sc_j * q - dmin * m_j
    q6_k   210 bytes per 256 weights: 4 + 2-bit quants, int8 scale per 16, fp16 d
           w = d * sc_j * (q - 32)

The computation paths are `QuantLinear`'s: "kernel" (activations rounded to int8 per block of 32,
integer dot products), "dense"/"reference" (dequantise in row chunks, one GEMM). Dequantisation runs
natively (`q4k_dequantize`/`q6k_dequantize` ops) or, without the kernels, in the plain PyTorch below;
both equal gguf-py bit for bit: every product d * sc * q is exact in fp32 (at most 11 + 7 + 5
significant bits), so the only rounding is Q4_K's final subtraction of the min, as gguf-py's.
"""
from __future__ import annotations

import torch

from .. import kernels
from ..errors import Qwen2Error
from .linear import QuantLinear

SUPER_BLOCK = 256  # weights per super-block (and the kernels' unit along K)
Q4K_BYTES = 144
Q6K_BYTES = 210


def _halves(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) fp32 of the little-endian fp16 they hold."""
    return b.contiguous().view(torch.float16).float()


def q4k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 12) uint8 -> eight 6-bit scales and eight 6-bit mins (n, 8) uint8 each. Bytes 0-3 hold
    scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales 4-7 are the low nibbles of bytes 8-11
    under the top 2 bits of bytes 0-3, mins 4-7 the high nibbles under the top 2 bits of bytes 4-7."""
    s_lo, m_lo, extra = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((s_lo & 0x3F, (extra & 0x0F) | ((s_lo >> 2) & 0x30)), dim=1)
    mins = torch.cat((m_lo & 0x3F, (extra >> 4) | ((m_lo >> 2) & 0x30)), dim=1)
    return scales, mins


def q4k_dequantize(rows: torch.Tensor) -> torch.Tensor:
    """Raw Q4_K rows uint8 (N, K / 256 * 144) -> fp32 (N, K)."""
    N = rows.shape[0]
    blocks = rows.reshape(-1, Q4K_BYTES)
    d, dmin = _halves(blocks[:, 0:2]), _halves(blocks[:, 2:4])
    sc, m = q4k_scales_mins(blocks[:, 4:16])
    nibbles = blocks[:, 16:].reshape(-1, 4, 1, 32)  # run r: sub-block 2r low, 2r + 1 high
    q = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=2).reshape(-1, 8, 32)
    w = (d * sc.float())[..., None] * q.float() - (dmin * m.float())[..., None]
    return w.reshape(N, -1)


def q6k_dequantize(rows: torch.Tensor) -> torch.Tensor:
    """Raw Q6_K rows uint8 (N, K / 256 * 210) -> fp32 (N, K)."""
    N = rows.shape[0]
    blocks = rows.reshape(-1, Q6K_BYTES)
    ql = blocks[:, :128].reshape(-1, 2, 1, 64)  # per half: blocks 0, 1 in the low nibbles, 2, 3 in the high
    low = torch.cat((ql & 0x0F, ql >> 4), dim=2).reshape(-1, 8, 32)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)  # per half: bits 2k, 2k + 1 of byte i are block k's weight i
    high = torch.cat([(qh >> shift) & 0x03 for shift in (0, 2, 4, 6)], dim=2).reshape(-1, 8, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    scale = _halves(blocks[:, 208:210]) * blocks[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16)
    return (scale[..., None] * q.reshape(-1, 16, 16).float()).reshape(N, -1)


class KQuantLinear(QuantLinear):
    """A GGUF k-quant tensor's raw rows as a quantised linear; subclasses name the block format."""

    block_bytes = 0
    bits_per_weight = 0.0
    gguf_type = ""
    linear_op = gemm_op = dequantize_op = ""  # its qwen2_kernels ops (names fixed here: decode calls ~200 per token)

    def __init__(self, rows: torch.Tensor, bias: torch.Tensor | None = None):
        if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] % self.block_bytes:
            raise Qwen2Error(f"{self.gguf_type} rows must be uint8 (N, K / 256 * {self.block_bytes}), not "
                             f"{str(rows.dtype).replace('torch.', '')} {tuple(rows.shape)}")
        N, K = rows.shape[0], rows.shape[1] // self.block_bytes * SUPER_BLOCK
        super().__init__(K, N, SUPER_BLOCK, bias)
        self.register_buffer("weight", rows.contiguous())

    @classmethod
    def from_gguf(cls, tensor, bias: torch.Tensor | None = None) -> "KQuantLinear":
        """The layer of a `GGUFTensor` of this block type: its rows copied out of the file as they are."""
        import numpy as np

        if tensor.tensor_type.name != cls.gguf_type:
            raise Qwen2Error(f"GGUF tensor {tensor.name} is {tensor.tensor_type.name}, not {cls.gguf_type}")
        return cls(torch.from_numpy(np.array(tensor.data, dtype=np.uint8, copy=True)), bias)

    @property
    def kernel_ok(self) -> bool:
        """The native kernels exist here (whole super-blocks are guaranteed by construction)."""
        if self._kernel_ok is None:
            self._ops = kernels.ops()
            self._kernel_ok = self._ops is not None
        return self._kernel_ok

    def _dequant_rows(self, rows, dtype: torch.dtype) -> torch.Tensor:
        # exact in fp32 either way (the native decoder is ~5x faster: the prefill dequantises every
        # weight per forward); a bf16 prefill rounds once, at the end
        rows = self.weight[rows]
        w = self._native_dequantize(rows) if self.kernel_ok else self._dequantize(rows)
        return w if dtype == torch.float32 else w.to(dtype)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self._ops, self.linear_op)(x, self.weight, self.activation_digits)

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self._ops, self.gemm_op)(x, self.weight, self.gemm_digits)

    def _native_dequantize(self, rows: torch.Tensor) -> torch.Tensor:
        return getattr(self._ops, self.dequantize_op)(rows)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.bits_per_weight = cls.block_bytes * 8 / SUPER_BLOCK

    def describe(self) -> str:
        return f"{self.mode}, GGUF {self.gguf_type} super-blocks as they are ({self.bits_per_weight:g} bits per weight)"


class Q4KLinear(KQuantLinear):
    """Q4_K: per 256 weights fp16 d and dmin, 6-bit scales and mins per 32, 4-bit quants."""

    mode, gguf_type, block_bytes = "q4_k", "Q4_K", Q4K_BYTES
    linear_op, gemm_op, dequantize_op = "q4k_linear", "q4k_gemm", "q4k_dequantize"
    _dequantize = staticmethod(q4k_dequantize)


class Q6KLinear(KQuantLinear):
    """Q6_K: per 256 weights an fp16 d, int8 scales per 16, 6-bit quants (4 + 2 bits)."""

    mode, gguf_type, block_bytes = "q6_k", "Q6_K", Q6K_BYTES
    linear_op, gemm_op, dequantize_op = "q6k_linear", "q6k_gemm", "q6k_dequantize"
    _dequantize = staticmethod(q6k_dequantize)
