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

from .forward import token_log_probs


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

    def metrics(self) -> dict[str, float]:
        """Sums over the pairs (the loop averages them over a step's pairs)."""
        return {"chosen_reward": float(self.chosen_rewards.sum()), "rejected_reward": float(self.rejected_rewards.sum()),
                "margin": float(self.margins.sum()), "accuracy": float((self.margins > 0).float().sum())}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> DPOOutput:
    """Per-pair sigmoid DPO losses and rewards from (N,) sequence log-probs."""
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    return DPOOutput(losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach())
