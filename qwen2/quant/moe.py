"""Quantised Qwen2-MoE layers: which linears of an MoE block are quantised, and the block that runs them.

An MoE block's experts, routed and shared, are SwiGLUs of nn.Linears like the dense MLP, so they
become the same quantised linears (`qwen2.quant.linear`) by the same rules: each expert's gate_proj
and up_proj as the dense MLP's, its down_proj as the dense down_proj (int8 in "int4" mode, where an
MoE model's attention stays int8 too: MOE_INT4_KEEP_INT8). The router (`mlp.gate`) and the
shared-expert gate stay in the model's dtype: they are a sliver of the weights (E + 1 rows of the
hidden size), and a rounding there could flip a near-tied top-k choice.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import Qwen2Config
from ..model.moe import SparseMoeBlock

EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")
# In "int4" mode an MoE model keeps its whole attention int8, not only v_proj (with every down_proj,
# the experts' too, as in a dense model: INT4_KEEP_INT8), as llama.cpp's k-quant mixes keep attn_k and
# attn_v at Q8_0 and attn_output at Q5_K for 8-expert models. The attention is a sliver of an MoE
# model's weights (Qwen2-57B-A14B: 0.8 B of 57 B), but its rounding moves every router's input, and a
# token whose top-k experts are near-tied then goes to others. On the upcycled 0.5B (2,048 tokens,
# benchmarks/experiments/moe_quantized_perplexity.py) int4 attention cost +3.44 % perplexity, with
# 21 % of tokens routed differently; int8 attention +1.82 %, for 18 MB more.
MOE_INT4_KEEP_INT8 = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")


def moe_linears(config: Qwen2Config) -> list[str]:
    """The quantised linears of an MoE block, relative to the block ("mlp.experts.0.gate_proj", ...,
    "mlp.shared_expert.down_proj"), in the block's module order."""
    experts = [f"mlp.experts.{e}.{p}" for e in range(config.num_experts) for p in EXPERT_LINEARS]
    return experts + [f"mlp.shared_expert.{p}" for p in EXPERT_LINEARS]


def role(path: str) -> str:
    """What a block linear is, whichever expert holds it: "mlp.experts.3.down_proj" -> "mlp.down_proj",
    the name the per-projection rules (`INT4_KEEP_INT8`) use; a dense path is its own role."""
    top, _, rest = path.partition(".")
    return f"{top}.{rest.rpartition('.')[2]}"


class QuantizedMoeBlock(SparseMoeBlock):
    """A `SparseMoeBlock` whose experts are quantised linears, made by `quantize_model` from the block
    it quantised (same router, gate, experts' modules and settings). Routing, dispatch and the weighted
    sum are the block's own; only what the experts read differs: a quantised linear takes the model's
    activations as they are (the kernel quantises them per block of 32 itself) and answers in their
    dtype, so the tokens go to the experts unrounded whatever dtype the weights had before."""

    def __init__(self, block: SparseMoeBlock):
        super(SparseMoeBlock, self).__init__()  # nn.Module's: the parts are the block's, not new ones
        self.top_k, self.norm_topk_prob, self.router_logits = block.top_k, block.norm_topk_prob, None
        for name, child in block.named_children():
            self.add_module(name, child)

    @property
    def expert_dtype(self) -> torch.dtype:
        return self.gate.weight.dtype


def quantize_moe_blocks(model: nn.Module) -> int:
    """Turn every `SparseMoeBlock` of `model`, its experts just quantised, into a `QuantizedMoeBlock`
    (in place); returns how many."""
    names = [name for name, m in model.named_modules() if type(m) is SparseMoeBlock]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, QuantizedMoeBlock(getattr(parent, attr)))
    return len(names)
