"""The training forward pass: Transformer.forward without a KV cache, with two additions training
needs: attention and RoPE positions confined to each document of a packed row, and activation
checkpointing of each block. Tests hold it equal to `Transformer.forward` and to transformers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import long_context
from ..errors import Qwen2Error
from .data import IGNORE_INDEX


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) boolean mask: query t sees key s <= t of its own document.
    Padding is a document of its own, so every query sees at least itself (SDPA gives NaN otherwise)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (causal & same_doc)[:, None]


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """RoPE positions counted from each document's first token: a packed document gets the
    positions, hence the logits, it would have alone."""
    B, T = doc_ids.shape
    index = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, T) start of own doc
    return index - first


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
    if doc_ids is None:
        doc_ids = torch.zeros_like(input_ids)
    T = input_ids.shape[1]
    one_doc_per_row = bool((doc_ids == doc_ids[:, :1]).all())
    # One unpadded document per row is plain causal attention: SDPA's faster is_causal path.
    mask = None if one_doc_per_row else document_mask(doc_ids)
    window_mask = None  # layers >= max_window_layers of a sliding-window config see the last window only
    if model.sliding_layers:
        window_mask = long_context.sliding_window_mask(mask, 0, T, T, model.config.sliding_window, input_ids.device)
    x = model.model.embed_tokens(input_ids)  # (B, T, C)
    cos, sin = model.rope(document_positions(doc_ids), x.dtype, span=T)  # span: as Transformer.forward, for dynamic YaRN
    x = model.layers_forward(x, cos, sin, mask, window_mask, None, activation_checkpointing)
    return model.lm_head(model.model.norm(x))  # (B, T, V)


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
