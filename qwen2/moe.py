"""Qwen2-MoE (Qwen2-57B-A14B): the sparse mixture-of-experts block that takes the dense MLP's place,
its load-balancing loss, and upcycling a dense checkpoint into an MoE one (Qwen2 report §2.2.2).

    x -> router: p = softmax(gate(x)) over E experts -> the k largest (renormalised if norm_topk_prob)
      -> sum over the k chosen e of p_e * expert_e(x)     fine-grained routed SwiGLUs, width h_E
       + sigmoid(shared_expert_gate(x)) * shared(x)        one always-on SwiGLU, width h_S

computed exactly as transformers' Qwen2MoeSparseMoeBlock computes it. Shapes in comments: N tokens
(B * T, flattened), C hidden size, E experts, k experts per token, P = N * k (token, expert) pairs.

The experts (routed and shared) may be stored in bfloat16 while the rest of the model stays fp32
(`set_expert_dtype`, `qwen2.load(..., expert_dtype="bfloat16")`): see there for what that trades.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from .config import Qwen2Config
from .errors import Qwen2Error
from .model import FeedForward

# At most this many tokens take the decode path (each token's k experts run on it directly) instead
# of sorting the (token, expert) pairs by expert. The direct path reads an expert's weights once per
# token that chose it, the sort once per expert: on the 57B-A14B layer / 4 (benchmarks/bench_moe.py)
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
    (benchmarks/bench_moe.py); where bf16 matmul is emulated (plain AVX2: ~3x slower than fp32) it
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


# --- upcycling (Qwen2 report §2.2.2) --------------------------------------------------------
ROUTER_INIT_STD = 0.02  # transformers' initializer_range for Qwen2(-MoE): its router init too


def upcycle(config: Qwen2Config, state_dict: dict[str, torch.Tensor], num_experts: int, top_k: int,
            expert_size: int, shared_expert_size: int | None = None, reinit_fraction: float = 0.5,
            seed: int = 0, progress: bool = False) -> tuple[Qwen2Config, dict[str, torch.Tensor]]:
    """A Qwen2-MoE (config, state dict) initialised from a dense Qwen2 one, every layer made sparse.

    What the report specifies, for each layer's dense SwiGLU of width h_FFN:
      * the FFN is replicated ceil(n * h_E / h_FFN) times and each copy's neurons (row j of gate_proj
        and up_proj with column j of down_proj, kept together) are shuffled along the intermediate
        dimension, every copy by its own permutation, so experts cut from different copies differ;
      * the n routed experts are consecutive h_E-neuron slices of the shuffled copies laid end to
        end; the neurons left over are dropped;
      * in each routed expert, `reinit_fraction` (the report's 50%) of the parameters are
        reinitialised.
    What it leaves open, and the choices made here:
      * which parameters: exactly round(f * numel) entries of each of the expert's three matrices,
        drawn uniformly without replacement, independently per matrix and per expert. Entries, as
        the report says "parameters"; per matrix, so no projection keeps all its trained weights by
        chance; every neuron stays partly trained (resetting whole neurons would make narrower
        experts plus untrained ones);
      * with what: N(0, s^2), s the standard deviation of the dense matrix the expert was cut from
        (per layer and projection), so reinitialised entries have the scale of the trained weights
        around them and an expert's activations keep their magnitude. One fixed std would not fit:
        in Qwen2.5-Coder-0.5B these matrices' stds range from 0.0044 to 0.055 (transformers' 0.02
        sits inside that range, 4.5x too large for one, 2.8x too small for another);
      * the shared expert (width h_S, default h_FFN): cut the same way from ceil(h_S / h_FFN) more
        shuffled copies and never reinitialised. With h_S = h_FFN it holds every dense neuron once
        and computes the dense FFN exactly: the always-on path starts as the trained model's MLP;
      * the shared expert gate: zero, so sigmoid(0) = 1/2 for every token at the start, the point
        where the gate learns fastest and favours no token;
      * the router: N(0, 0.02^2) (transformers' init), so first routings are near uniform but
        not tied (an all-zero router would send every token to the same k lowest-numbered experts);
      * norm_topk_prob false and no dense layers, as Qwen2-57B-A14B; nothing is rescaled.
    Everything else (embeddings, attention, norms, lm_head) is copied. Deterministic: the shuffles,
    the router and the reinitialisation each draw from their own generator (seeded seed, seed + 2**32,
    seed + 2**33), so the shuffles and the router do not depend on the fraction, and the same seed
    gives the same tensors, bit for bit.
    """
    moe_config = _upcycled_config(config, num_experts, top_k, expert_size, shared_expert_size,
                                  reinit_fraction, seed)
    h_ffn, h_e, h_s = config.intermediate_size, expert_size, moe_config.shared_expert_intermediate_size
    # Three independent streams, so that no draw depends on another's count (the shuffles and the
    # router are the same whatever the fraction).
    shuffle, router_init, reinit = (torch.Generator().manual_seed(seed + i * 2**32) for i in range(3))
    out = {k: v for k, v in state_dict.items() if ".mlp." not in k}
    from .progress import progress_bar

    for layer in progress_bar(range(config.num_hidden_layers), desc="upcycling", unit="layer", disable=not progress):
        p = f"model.layers.{layer}.mlp."
        dense = {name: state_dict[p + name + ".weight"].float() for name in ("gate_proj", "up_proj", "down_proj")}
        dtype = state_dict[p + "gate_proj.weight"].dtype
        std = {name: w.std().item() for name, w in dense.items()}
        routed = _shuffled_neurons(h_ffn, num_experts * h_e, shuffle).view(num_experts, h_e)
        shared = _shuffled_neurons(h_ffn, h_s, shuffle)
        router = torch.empty(num_experts, config.hidden_size).normal_(0, ROUTER_INIT_STD, generator=router_init)
        out[p + "gate.weight"] = router.to(dtype)
        out[p + "shared_expert_gate.weight"] = torch.zeros(1, config.hidden_size, dtype=dtype)
        for name, w in _neuron_slices(dense, shared).items():
            out[p + f"shared_expert.{name}.weight"] = w.to(dtype)
        for e in range(num_experts):
            for name, w in _neuron_slices(dense, routed[e]).items():
                _reinitialise(w, reinit_fraction, std[name], reinit)
                out[p + f"experts.{e}.{name}.weight"] = w.to(dtype)
    return moe_config, out


def check_upcycle_options(num_experts: int, top_k: int, expert_size: int, shared_expert_size: int | None,
                          reinit_fraction: float, seed: int) -> None:
    """Raise Qwen2Error for upcycling options no dense model could take, so the CLI can say so
    before minutes of loading. (In a config, num_experts 0 means dense: here it is a mistake.)"""
    checks = [  # each flag with the config field it sets, as the config's own checks name them
        (isinstance(num_experts, int) and num_experts >= 1,
         f"--num-experts: num_experts must be an integer >= 1, got {num_experts!r}"),
        (isinstance(top_k, int) and 1 <= top_k <= max(num_experts, 1),
         f"--top-k: num_experts_per_tok must be an integer from 1 to num_experts ({num_experts}), got {top_k!r}"),
        (isinstance(expert_size, int) and expert_size >= 1,
         f"--expert-size: moe_intermediate_size must be an integer >= 1, got {expert_size!r}"),
        (shared_expert_size is None or (isinstance(shared_expert_size, int) and shared_expert_size >= 1),
         f"--shared-expert-size: shared_expert_intermediate_size must be an integer >= 1, got {shared_expert_size!r}"),
        (0 <= reinit_fraction <= 1, f"--reinit-fraction must be between 0 and 1, got {reinit_fraction}"),
        (isinstance(seed, int) and 0 <= seed < 2**32, f"--seed must be an integer from 0 to 2**32 - 1, got {seed!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise Qwen2Error(f"cannot upcycle: {message}")


def _upcycled_config(config, num_experts, top_k, expert_size, shared_expert_size, reinit_fraction, seed):
    if config.num_experts:
        raise Qwen2Error("the model is already a mixture of experts; upcycle a dense Qwen2 model")
    check_upcycle_options(num_experts, top_k, expert_size, shared_expert_size, reinit_fraction, seed)
    shared = config.intermediate_size if shared_expert_size is None else shared_expert_size
    try:
        return dataclasses.replace(config, num_experts=num_experts, num_experts_per_tok=top_k,
                                   moe_intermediate_size=expert_size, shared_expert_intermediate_size=shared,
                                   norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])
    except Qwen2Error as e:  # say it in the command's terms
        raise Qwen2Error(str(e).replace("invalid Qwen2 config: ", "cannot upcycle: ")
                         + " (--num-experts, --top-k, --expert-size, --shared-expert-size)") from None


def _shuffled_neurons(h_ffn: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) dense neuron indices: ceil(n / h_ffn) independently shuffled copies end to end, cut at n."""
    copies = math.ceil(n / h_ffn)
    return torch.cat([torch.randperm(h_ffn, generator=generator) for _ in range(copies)])[:n]


def _neuron_slices(dense: dict[str, torch.Tensor], neurons: torch.Tensor) -> dict[str, torch.Tensor]:
    """The SwiGLU made of these dense neurons: rows of gate/up_proj, columns of down_proj (copies)."""
    return {"gate_proj": dense["gate_proj"][neurons].contiguous(), "up_proj": dense["up_proj"][neurons].contiguous(),
            "down_proj": dense["down_proj"][:, neurons].contiguous()}


def _reinitialise(w: torch.Tensor, fraction: float, std: float, generator: torch.Generator) -> None:
    """Redraw exactly round(fraction * numel) entries of w, chosen uniformly, from N(0, std^2)."""
    n = round(fraction * w.numel())
    if n == 0:
        return
    where = torch.randperm(w.numel(), generator=generator)[:n]
    w.view(-1)[where] = torch.empty(n).normal_(0, std, generator=generator)
