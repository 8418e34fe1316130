"""The training forward pass: the model's own forward without a KV cache, each packed row's documents
apart (attention and RoPE positions confined to each document: `document_ids`), optionally with
activation checkpointing of each block; and the losses built on its logits. Tests hold it equal to
transformers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import Qwen2Error
from .data import IGNORE_INDEX


class TrainingForward(torch.nn.Module):
    """`forward` below as a module, for DDP and FSDP2 to wrap: both hook into a module's __call__,
    which the training forward otherwise bypasses (see `distributed.wrap`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, doc_ids=None, activation_checkpointing: bool = False):
        return forward(self.model, input_ids, doc_ids, activation_checkpointing)


def forward(model, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
            activation_checkpointing: bool = False) -> torch.Tensor:
    """input_ids (B, T) -> logits (B, T, V). Without doc_ids every row is one document. `model` is
    a Transformer, or a distributed wrapper of one (DDP of a TrainingForward, a sharded TrainingForward)."""
    if not hasattr(model, "config"):  # the wrapper: through its __call__, so its hooks run
        return model(input_ids, doc_ids, activation_checkpointing)
    if model.config.dual_chunk_attention_config is not None:
        raise Qwen2Error("Dual Chunk Attention is an inference-time (training-free) extension; "
                         "train without it (drop dca / dual_chunk_attention_config from the model config)")
    return model(input_ids, document_ids=doc_ids, activation_checkpointing=activation_checkpointing)  # (B, T, V)


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token: position t predicts labels[t + 1] (the shift transformers
    applies). -> (log-probs (B, T-1) with 0 where ignored, mask (B, T-1) of targets)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none")
    return logp * mask, mask


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the targets (the loop divides by the step's target count,
    so accumulated micro-batches weigh every token equally, as one large batch would)."""
    logp, _ = token_log_probs(logits, labels)
    return -logp.sum()
