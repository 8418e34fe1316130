"""Weight-only quantised linears for CPU inference (int8, int4, and GGUF's Q4_K / Q6_K super-blocks
kept as they are), whole-model quantisation (Qwen2-MoE experts included), and the table of layer kinds
the native decode ops take."""
from .gguf_blocks import GGUFEmbedding
from .kinds import LAYER_KINDS, LayerKind
from .kquant import KQuantLinear, Q4KLinear, Q6KLinear
from .linear import (BACKENDS, BLOCK_LINEARS, DEFAULT_GROUP_SIZE, GROUP_SIZES, INT4_KEEP_INT8, MODES, Int4Linear,
                     Int8Linear, QuantEmbedding, QuantLinear, check_group_size, int8_group_size, pack_int4,
                     quantize_int4, quantize_int8, quantized_linears, unpack_int4)
from .memory import into_huge_pages, keep_heap_blocks
from .model import check_mode, describe, num_parameters, quantize_model, quantize_moe_block, set_backend
from .moe import QuantizedMoeBlock

__all__ = ["BACKENDS", "BLOCK_LINEARS", "DEFAULT_GROUP_SIZE", "GGUFEmbedding", "GROUP_SIZES", "INT4_KEEP_INT8",
           "Int4Linear",
           "Int8Linear", "KQuantLinear", "LAYER_KINDS", "LayerKind", "MODES", "Q4KLinear", "Q6KLinear",
           "QuantEmbedding", "QuantLinear", "check_group_size", "check_mode", "describe", "int8_group_size",
           "into_huge_pages", "keep_heap_blocks", "num_parameters", "pack_int4", "quantize_int4", "quantize_int8", "quantize_model",
           "quantize_moe_block", "QuantizedMoeBlock", "quantized_linears", "set_backend", "unpack_int4"]
