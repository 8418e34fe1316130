"""Direct Preference Optimization (Rafailov et al., arXiv 2305.18290), the sigmoid loss:

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

over the log-probabilities of the response tokens only (summed; the prompt is context, not
scored). The implicit rewards beta * (log pi - log ref) of the chosen and rejected responses, their
margin and how often the chosen one wins are what a run reports.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import data as D
from .forward import forward, token_log_probs
from .lora import lora_disabled


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels with -100 outside the response -> (B,) summed log-probs."""
    logp, _ = token_log_probs(logits, labels)
    return logp.sum(-1)


@dataclass
class DPOOutput:
    losses: torch.Tensor  # (N,) per pair
    chosen_rewards: torch.Tensor  # (N,) beta * (policy - reference) log-prob of the chosen response
    rejected_rewards: torch.Tensor  # (N,)

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    def metrics(self, weights: torch.Tensor | None = None) -> dict[str, float]:
        """Sums over the pairs, each times its weight (default 1; the loop averages them over a step's pairs)."""
        if weights is None:
            weights = torch.ones_like(self.margins)
        return {"chosen_reward": float((self.chosen_rewards * weights).sum()),
                "rejected_reward": float((self.rejected_rewards * weights).sum()),
                "margin": float((self.margins * weights).sum()),
                "accuracy": float(((self.margins > 0).float() * weights).sum())}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> DPOOutput:
    """Per-pair sigmoid DPO losses and rewards from (N,) sequence log-probs."""
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    return DPOOutput(losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach())


@dataclass
class PreferenceBatch:
    rows: D.Batch  # the N chosen rows, then the N rejected ones
    ref_logps: torch.Tensor | None  # (2N,) precomputed reference log-probs, same order
    weights: torch.Tensor | None = None  # (N,) per pair; None = all 1 (online DPO's placeholder pair weighs 0)

    @property
    def pairs(self) -> int:
        return self.rows.input_ids.shape[0] // 2


class DirectPreference:
    """Sigmoid DPO. The reference log-probs come from the batch (precomputed), a frozen reference
    model, or with LoRA and no reference model, the policy itself with its adapters switched off."""

    def __init__(self, beta: float, reference: torch.nn.Module | None, activation_checkpointing: bool):
        self.beta, self.reference, self.activation_checkpointing = beta, reference, activation_checkpointing

    def count(self, batch: PreferenceBatch) -> int:
        return batch.pairs

    def tokens(self, batch: PreferenceBatch) -> int:
        return batch.rows.num_tokens

    def reference_logps(self, model, batch: PreferenceBatch) -> torch.Tensor:
        if batch.ref_logps is not None:
            return batch.ref_logps
        with torch.no_grad():
            if self.reference is not None:
                logits = forward(self.reference, batch.rows.input_ids, batch.rows.doc_ids)
            else:
                with lora_disabled(model):
                    logits = forward(model, batch.rows.input_ids, batch.rows.doc_ids)
            return sequence_log_probs(logits, batch.rows.labels)

    def loss(self, model, batch: PreferenceBatch):
        ref = self.reference_logps(model, batch)
        logits = forward(model, batch.rows.input_ids, batch.rows.doc_ids, self.activation_checkpointing)
        policy = sequence_log_probs(logits, batch.rows.labels)
        n = batch.pairs
        out = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.beta)
        losses = out.losses if batch.weights is None else out.losses * batch.weights
        return losses.sum(), out.metrics(batch.weights)
