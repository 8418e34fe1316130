"""The Online Merging Optimizer (Lu et al., arXiv 2405.17931, "Online Merging Optimizers for
Boosting Rewards and Mitigating Tax in Alignment"), as an option of the online stage.

The paper merges, at every RLHF step, the policy's update with the reference delta

    tau_r = theta_SFT - theta_base        (the SFT model's change from its pre-trained base)

so each step is steered along the direction SFT took, which keeps what SFT and pre-training gave
(the "alignment tax") while the reward goes up. With the optimizer's own update of step t,

    delta_t = AdamW(theta_{t-1}, g_t) - theta_{t-1},

the step is theta_t = theta_{t-1} + Merge(delta_t, tau_r), with Merge one of two model-merging
rules applied online, tensor by tensor, as the authors' reference implementation
(github.com/QwenLM/online_merging_optimizers, `ODAdamW` / `OTAdamW`) does:

  OnDARE (DARE, Yu et al., arXiv 2311.03099): tau_r is sparsified once, at the start, and delta_t at
      every step, by dropping each entry with probability p and rescaling the survivors by 1 / (1 - p);
      then the two are mixed:
          tau' = DARE(tau_r),  Merge = alpha * tau' + (1 - alpha) * DARE(delta_t)
  OnTIES (TIES, Yadav et al., arXiv 2306.01708): tau_r is trimmed once, and delta_t at every step, to
      its top-k entries by magnitude (k = density x size); each entry's sign is elected from the
      (unweighted) sum of the two, ties going to +, and only the entries that agree are mixed:
          tau' = top_k(tau_r),  d = top_k(delta_t),  s = sign(tau' + d) (0 -> +)
          Merge = alpha * tau' * [sign(tau') = s] + (1 - alpha) * d * [sign(d) = s]
      Because tau' (SFT's whole change) is far larger than one step, the election mostly keeps the
      step's entries that move the way SFT moved: the consensus that protects SFT's gains.

alpha (`onmerge_ref_weight`), p (`onmerge_drop_rate`) and k (`onmerge_density`) are the paper's
hyper-parameters; the defaults are those of the authors' 7B DPO script (`run_dpo_om.sh`: keep 1 %,
alpha 1e-7). AdamW's decoupled weight decay is applied outside the merge, after it, as there.

Masks come from generators seeded by the run's seed (tau's) and by (seed, step) (delta's), so a
resumed run draws the same ones. Under FSDP2 the rules apply to each rank's shard (top-k and masks
per shard).
"""
from __future__ import annotations

import math

import torch

from ..errors import Qwen2Error


def dare(delta: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability `drop_rate`, rescale the kept ones by 1 / (1 - drop_rate)."""
    if drop_rate == 0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) >= drop_rate
    return delta * keep / (1 - drop_rate)


def top_k(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its ceil(density x size) largest-magnitude entries set to zero."""
    k = math.ceil(density * delta.numel())
    if k >= delta.numel():
        return delta
    keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    keep[delta.abs().flatten().topk(k).indices] = True
    return delta * keep.view_as(delta)


def ondare(delta: torch.Tensor, sparse_tau: torch.Tensor, drop_rate: float, ref_weight: float,
           generator: torch.Generator) -> torch.Tensor:
    """OnDARE's step: the reference delta (already DARE-sparsified) mixed with the sparsified step."""
    return ref_weight * sparse_tau + (1 - ref_weight) * dare(delta, drop_rate, generator)


def onties(delta: torch.Tensor, sparse_tau: torch.Tensor, density: float, ref_weight: float) -> torch.Tensor:
    """OnTIES's step: the trimmed step and the (already trimmed) reference delta, each keeping only
    the entries whose sign agrees with the sign elected by their sum, mixed."""
    d = top_k(delta, density)
    elected = torch.where(sparse_tau + d >= 0, 1.0, -1.0)
    return ref_weight * sparse_tau * (torch.sign(sparse_tau) == elected) + (1 - ref_weight) * d * (torch.sign(d) == elected)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class OnlineMergingAdamW(torch.optim.AdamW):
    """AdamW whose every step is merged with the reference delta (module docstring). Its state is
    AdamW's, so checkpoints and resume treat it as AdamW; the reference delta is recomputed from
    the two models at start, and the masks from (seed, step)."""

    def __init__(self, params, reference_deltas: list[torch.Tensor], method: str = "dare", drop_rate: float = 0.99,
                 density: float = 0.01, ref_weight: float = 1e-7, seed: int = 0, **adamw):
        super().__init__(params, **adamw)
        trained = [p for group in self.param_groups for p in group["params"]]
        if len(reference_deltas) != len(trained) or any(t.shape != p.shape for t, p in zip(reference_deltas, trained)):
            raise Qwen2Error("the Online Merging Optimizer needs one reference delta per trained parameter, "
                             "shaped like it; base and starting model must share an architecture")
        if method not in ("dare", "ties"):
            raise Qwen2Error(f"onmerge_method must be dare or ties, got {method!r}")
        self.method, self.drop_rate, self.density, self.ref_weight, self.seed = method, drop_rate, density, ref_weight, seed
        # tau is sparsified once (same seed -> same mask, so a resumed run rebuilds the very same tau')
        generator = torch.Generator().manual_seed(seed)
        self.reference_deltas = {
            id(p): dare(_local(tau), drop_rate, generator) if method == "dare" else top_k(_local(tau), density)
            for p, tau in zip(trained, reference_deltas)}

    @torch.no_grad()
    def step(self, closure=None):
        trained = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        before = [_local(p).clone() for p, _ in trained]
        loss = super().step(closure)
        if not trained:
            return loss
        step = int(self.state[trained[0][0]]["step"])
        generator = torch.Generator(_local(trained[0][0]).device).manual_seed(self.seed * 1_000_003 + step)
        for (p, group), old in zip(trained, before):
            now = _local(p)
            # torch's AdamW decays first (old * lr * wd), then adds the Adam update: merge the update only
            decay = old * (group["lr"] * group["weight_decay"])
            update, tau = now - old + decay, self.reference_deltas[id(p)].to(now.device)
            if self.method == "dare":
                merged = ondare(update, tau, self.drop_rate, self.ref_weight, generator)
            else:
                merged = onties(update, tau, self.density, self.ref_weight)
            now.copy_(old + merged - decay)
        return loss
