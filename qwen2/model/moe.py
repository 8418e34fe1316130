"""Qwen2-MoE (Qwen2-57B-A14B): the sparse mixture-of-experts block that takes the dense MLP's place,
and its load-balancing loss (upcycling a dense checkpoint into an MoE one: qwen2/checkpoint/upcycle.py).

    x -> router: p = softmax(gate(x)) over E experts -> the k largest (renormalised if norm_topk_prob)
      -> sum over the k chosen e of p_e * expert_e(x)     fine-grained routed SwiGLUs, width h_E
       + sigmoid(shared_expert_gate(x)) * shared(x)        one always-on SwiGLU, width h_S

computed exactly as transformers' Qwen2MoeSparseMoeBlock computes it. Shapes in comments: N tokens
(B * T, flattened), C hidden size, E experts, k experts per token, P = N * k (token, expert) pairs.

The experts (routed and shared) may be stored in bfloat16 while the rest of the model stays fp32
(`set_expert_dtype`, `qwen2.load(..., expert_dtype="bfloat16")`): see there for what that trades.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import Qwen2Config
from ..errors import Qwen2Error
from .layers import FeedForward

# At most this many tokens take the decode path (each token's k experts run on it directly) instead
# of sorting the (token, expert) pairs by expert. The direct path reads an expert's weights once per
# token that chose it, the sort once per expert: on the 57B-A14B layer / 4 (benchmarks/speed/bench_moe.py)
# the direct path was faster at 1 and 2 tokens, the sort from 4 on.
FEW_TOKENS = 2


class SparseMoeBlock(nn.Module):
    """The MLP of an MoE layer. Parameter names are the HF checkpoint's: mlp.gate (the router),
    mlp.experts.{i}.{gate,up,down}_proj, mlp.shared_expert.*, mlp.shared_expert_gate."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        C = config.hidden_size
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(C, config.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(C, config.moe_intermediate_size) for _ in range(config.num_experts))
        self.shared_expert = FeedForward(C, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(C, 1, bias=False)
        self.router_logits = None  # (N, E) of the last forward: what the load-balancing loss reads

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C)
        self.router_logits = self.gate(x)  # (N, E)
        weights, experts = route(self.router_logits, self.top_k, self.norm_topk_prob)  # (N, k) each
        xe = x.to(self.expert_dtype)  # what the experts read: x itself unless they are stored in another dtype
        routed = dispatch(xe, self.experts, experts, weights)  # (N, C), weights' dtype
        # The shared expert sees every token; a learnt per-token sigmoid gate scales it.
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(xe).to(x.dtype)  # (N, C)
        return (routed + shared).view(B, T, C)

    @property
    def expert_dtype(self) -> torch.dtype:
        return self.shared_expert.down_proj.weight.dtype


def route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, E) -> (weights, expert ids), both (N, k): the k most probable experts of each token.
    Probabilities in fp32 whatever the model dtype (as the reference computes them); renormalised
    to sum to 1 only with norm_topk_prob (Qwen2-57B-A14B does not: a token whose router is unsure
    gets a smaller routed contribution)."""
    probs = logits.softmax(dim=-1, dtype=torch.float32)  # (N, E)
    weights, experts = probs.topk(top_k, dim=-1)  # (N, k)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), experts


def dispatch(x: torch.Tensor, experts: nn.ModuleList, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j weights[t, j] * experts[expert_ids[t, j]](x[t]) for every token t: x (N, C), expert_ids
    and weights (N, k) -> (N, C). Every expert runs once, on exactly the tokens routed to it; an
    expert that no token chose is never run. x is in the experts' dtype; their outputs are weighted
    and summed in the weights' (the router's: fp32), so bf16 experts add no rounding of their own there."""
    if x.shape[0] <= FEW_TOKENS:
        return _dispatch_few(x, experts, expert_ids, weights)
    N, k = expert_ids.shape
    flat = expert_ids.flatten()  # (P,) pair p is token p // k's choice number p % k
    order = flat.argsort(stable=True)  # (P,) the pairs grouped by expert, tokens ascending in each group
    token = order // k  # (P,) the token of each grouped pair
    counts = flat.bincount(minlength=len(experts)).tolist()  # pairs per expert, 0 for the unchosen
    groups = x.index_select(0, token).split(counts)  # expert e's tokens, (counts[e], C) each
    ys = torch.cat([expert(xe) if len(xe) else xe for expert, xe in zip(experts, groups)])  # (P, C)
    ys = ys.to(weights.dtype) * weights.flatten()[order, None]
    return x.new_zeros(x.shape, dtype=weights.dtype).index_add_(0, token, ys)  # each token sums its k outputs


def _dispatch_few(x, experts, expert_ids, weights):
    """Decode: a handful of tokens, each running its k experts on itself; no sort, no scatter."""
    rows = []
    for t, ids in enumerate(expert_ids.tolist()):
        ys = torch.stack([experts[e](x[t]) for e in ids])  # (k, C)
        rows.append(weights[t] @ ys.to(weights.dtype))  # (C,)
    return torch.stack(rows)  # (N, C)


def check_expert_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype itself if experts can be stored in it, else a one-line error."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise Qwen2Error(f"experts can be stored in float32 or bfloat16, not {str(dtype).removeprefix('torch.')}")
    return dtype


def is_expert_weight(name: str) -> bool:
    """Whether a checkpoint tensor belongs to an expert, routed or shared (the router and the
    shared-expert gate do not: mlp.gate, mlp.shared_expert_gate)."""
    return ".mlp.experts." in name or ".mlp.shared_expert." in name


def set_expert_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the experts of every MoE layer of `model`, routed and shared, in `dtype` (in place);
    returns the number of MoE layers. With bfloat16 (the published checkpoints' own dtype, so no
    weight is rounded when loading one) the experts take half the memory, and on CPUs with bf16
    dot-product or matrix units (AVX512-BF16, AMX) their matmuls run several times faster than fp32
    (benchmarks/speed/bench_moe.py); where bf16 matmul is emulated (plain AVX2: ~3x slower than fp32) it
    saves memory and costs time.
    What it costs: each token is rounded to bf16 on its way into the experts (relative error up to
    2^-8 per entry), and each matmul's fp32 sums are rounded to bf16 on the way out. Everything else
    stays in the model's dtype: the router, whose top-k choice a rounding could flip for a token with
    near-tied experts, and the shared-expert gate are tiny; the weighted sum of the experts' outputs
    is fp32, as are attention, norms and the residual stream."""
    check_expert_dtype(dtype)
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    for block in blocks:
        block.experts.to(dtype)
        block.shared_expert.to(dtype)
    return len(blocks)


def load_balancing_loss(model: nn.Module, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch-Transformer auxiliary loss over every MoE layer of `model`'s last forward, as
    transformers computes its `aux_loss`: E * sum_e f_e * P_e, with f_e the number of times expert e
    was among a token's top-k divided by the number of tokens, and P_e its mean router probability,
    both over all MoE layers' tokens, padding (attention_mask 0) left out. It is smallest when
    routing is uniform. Unweighted: the training loss adds config.router_aux_loss_coef times it.
    0 for a model without MoE layers."""
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock) and m.router_logits is not None]
    if not blocks:
        return torch.zeros(())
    top_k = blocks[0].top_k
    logits = torch.cat([b.router_logits for b in blocks])  # (L * N, E), layer after layer
    probs = logits.softmax(dim=-1)  # (L * N, E)
    E = probs.shape[-1]
    chosen = probs.topk(top_k, dim=-1).indices  # (L * N, k)
    per_layer = len(blocks[0].router_logits)
    real = torch.ones(per_layer, device=logits.device) if attention_mask is None else \
        attention_mask.reshape(-1).to(device=logits.device, dtype=torch.float32)
    if real.numel() != per_layer:
        raise ValueError(f"attention_mask has {real.numel()} entries; the last forward routed {per_layer} tokens")
    real = real.repeat(len(blocks))  # (L * N,)
    n_real = real.sum()
    # f_e counts choices, not tokens: it sums to k over the experts (transformers' convention).
    routed = torch.zeros(E, device=logits.device).scatter_add_(0, chosen.flatten(), real.repeat_interleave(top_k))
    mean_prob = (probs.float() * real[:, None]).sum(dim=0)  # (E,)
    return E * torch.sum((routed / n_real) * (mean_prob / n_real))
