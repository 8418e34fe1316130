"""Upcycling a dense Qwen2 checkpoint into a Qwen2-MoE one (Qwen2 report §2.2.2): see `upcycle`."""
from __future__ import annotations

import dataclasses
import math

import torch

from ..config import Qwen2Config
from ..errors import Qwen2Error
from ..progress import progress_bar


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
