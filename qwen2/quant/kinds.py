"""The one table of linear-layer kinds the native decode ops compute.

Each row: the layer's `mode` (what `QuantLinear.mode` says, "dense" for an fp32 nn.Linear), its code
(what the native decode block is handed per linear, qwen2/runtime/native.py; the kernel file that
holds the layout's kernel registers it under the same code and mode, `register_layer_kind` in
qwen2/kernels/layer_kinds.h, and tests/test_architecture.py holds the two equal), and the layer's own
`qwen2_kernels` op (what torch.compile is told the output shape of, qwen2/runtime/compile.py).
A new layout is its QuantLinear class, its kernel (with its registration) and a row here.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class LayerKind(NamedTuple):
    mode: str
    code: int
    linear_op: str  # its qwen2_kernels op, "" for dense (at::linear)


LAYER_KINDS = (
    LayerKind("dense", 0, ""),
    LayerKind("int4", 1, "int4_linear"),
    LayerKind("int8", 2, "int8_linear"),
    LayerKind("q4_k", 3, "q4k_linear"),
    LayerKind("q6_k", 4, "q6k_linear"),
)
KIND_CODES = {kind.mode: kind.code for kind in LAYER_KINDS}

NO_TENSOR = torch.empty(0)  # an unused layout slot


def bias_or_empty(linear: torch.nn.Module) -> torch.Tensor:
    return NO_TENSOR if linear.bias is None else linear.bias
