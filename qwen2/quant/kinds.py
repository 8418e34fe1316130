"""The one table of linear-layer kinds the native decode ops compute.

Each row: the layer's `mode` (what `QuantLinear.mode` says, "dense" for an fp32 nn.Linear), the code
`qwen2/kernels/decode_block.cpp` switches on (its `enum Kind`, held equal to this table by
tests/test_architecture.py), and the layer's own `qwen2_kernels` op (what torch.compile is told the
output shape of, qwen2/runtime/compile.py). A new layout is its QuantLinear class, its kernel and a row here.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class LayerKind(NamedTuple):
    mode: str
    code: int
    cpp_name: str  # decode_block.cpp's enumerator
    linear_op: str  # its qwen2_kernels op, "" for dense (at::linear)


LAYER_KINDS = (
    LayerKind("dense", 0, "kDense", ""),
    LayerKind("int4", 1, "kInt4", "int4_linear"),
    LayerKind("int8", 2, "kInt8", "int8_linear"),
    LayerKind("q4_k", 3, "kQ4K", "q4k_linear"),
    LayerKind("q6_k", 4, "kQ6K", "q6k_linear"),
)
KIND_CODES = {kind.mode: kind.code for kind in LAYER_KINDS}

NO_TENSOR = torch.empty(0)  # an unused layout slot


def bias_or_empty(linear: torch.nn.Module) -> torch.Tensor:
    return NO_TENSOR if linear.bias is None else linear.bias
