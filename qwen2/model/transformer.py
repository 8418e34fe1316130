"""The Qwen2 decoder, computed exactly as the reference (HF transformers) computes it.

    tokens -> embed -> [RMSNorm -> attention(GQA, RoPE, q/k/v bias) -> +residual
                        RMSNorm -> SwiGLU MLP (or a sparse MoE block) -> +residual] x L
           -> RMSNorm -> lm_head -> logits

Shapes in comments: B batch, T new tokens, S keys (cached + new), nh query heads, nkv key/value heads,
hs head size, C hidden size, V vocabulary. One forward serves inference and training alike; what varies
is chosen once, when the model is built (the attention inputs: `RotaryInputs` or DCA's; each layer's
MLP: dense or MoE), or is the cache a call passes (qwen2/model/cache.py), which owns the key slots and
their masks. Fast paths (native decode ops, torch.compile) are executors beside the model
(qwen2/runtime/), built on `prepare` and `finish`.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .. import long_context
from ..config import POSITION_FIELDS, Qwen2Config
from .attention import Attention
from .cache import Frame, KVCache, NoCache
from .layers import FeedForward, RMSNorm
from .moe import SparseMoeBlock, load_balancing_loss
from .rope import RotaryEmbedding


class Block(nn.Module):
    def __init__(self, config: Qwen2Config, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Qwen2-MoE: a sparse expert block in the MLP's place (qwen2/model/moe.py)
        self.mlp = SparseMoeBlock(config) if config.is_moe_layer(layer) else \
            FeedForward(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask, cache, layer: int):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class RotaryInputs:
    """Each forward's attention inputs: RoPE tables at the tokens' positions, and each layer's mask
    (layers >= max_window_layers of a sliding-window config see only the last sliding_window slots)."""

    def __init__(self, config: Qwen2Config):
        self.sliding = set(long_context.sliding_layers(config))
        self.window, self.n_layers = config.sliding_window, config.num_hidden_layers

    def positions(self, frame: Frame, position_ids: torch.Tensor | None) -> torch.Tensor:
        return frame.positions if position_ids is None else position_ids

    def __call__(self, rope: RotaryEmbedding, frame: Frame, positions: torch.Tensor, dtype: torch.dtype):
        cos, sin = rope(positions, dtype, frame.span)  # (B, T, hs)
        window = frame.window_mask(self.window) if self.sliding else None
        return cos, sin, [window if i in self.sliding else frame.mask for i in range(self.n_layers)]


class BlockInputs(NamedTuple):
    """What every block of one forward takes (see `Transformer.prepare`)."""
    x: torch.Tensor  # (B, T, C) the embedded tokens
    cos: torch.Tensor  # (B, T, hs)
    sin: torch.Tensor
    masks: list  # one per layer: what its attention takes (a mask, None, or DCA's context)
    cache: object
    frame: Frame


class Transformer(nn.Module):
    """Qwen2ForCausalLM. Parameter names match HF checkpoints (`model.layers.0.self_attn.q_proj.weight`, ...)."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = nn.Module()  # namespace only, so state_dict keys read `model.*` like HF's
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._encode_positions(config)

    def _encode_positions(self, config: Qwen2Config) -> None:
        """RoPE tables and attention inputs (plain, YaRN, sliding window or DCA) as `config` says."""
        self.rope = RotaryEmbedding(config)
        if config.dual_chunk_attention_config is not None:
            from .dca import DualChunkInputs
            self.attention_inputs = DualChunkInputs(config)
        else:
            self.attention_inputs = RotaryInputs(config)

    def encode_positions_as(self, config: Qwen2Config) -> None:
        """Take `config`'s position encoding (rope_theta, rope_scaling, max_position_embeddings, the
        sliding window, DCA), which no weight depends on: how a continued pre-training lengthens the
        context, as the Qwen2 report's long-context stage raises the RoPE base to 1e6. Any other
        field of `config` must equal the model's."""
        changed = [f.name for f in dataclasses.fields(config)
                   if getattr(config, f.name) != getattr(self.config, f.name) and f.name not in POSITION_FIELDS]
        if changed:
            raise ValueError(f"only the position encoding can change on a built model, not {', '.join(changed)}")
        device = self.device
        self.config = config
        self._encode_positions(config)
        self.rope.to(device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, last_only: bool = False,
                document_ids: torch.Tensor | None = None, activation_checkpointing: bool = False) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or (B, 1, V) with `last_only`.

        attention_mask (B, T): 1 for real tokens, 0 for (left) padding of these new tokens.
        position_ids default to each row's count of real tokens so far, so a left-padded row gets
        the same positions, hence the same logits, as the row alone.
        With `cache`, the new tokens attend to everything cached and are appended to it.
        Training: document_ids (B, T) confine attention and positions to each packed document;
        activation_checkpointing keeps only each block's input and recomputes its inside in backward.
        """
        inputs = self.prepare(input_ids, attention_mask, position_ids, cache, document_ids)
        x = inputs.x
        for i, block in enumerate(self.model.layers):
            args = (x, inputs.cos, inputs.sin, inputs.masks[i], inputs.cache, i)
            if activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        return self.finish(x, inputs, last_only)

    def prepare(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                document_ids=None) -> BlockInputs:
        """Embeddings, RoPE tables and each layer's mask for these tokens; the cache marks their slots."""
        if cache is None:
            cache = NoCache(document_ids)
        elif document_ids is not None:
            raise ValueError("document_ids are for cacheless (training) forwards; pass them without a cache")
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        frame = cache.frame(real)
        positions = self.attention_inputs.positions(frame, position_ids)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin, masks = self.attention_inputs(self.rope, frame, positions, x.dtype)
        return BlockInputs(x, cos, sin, masks, cache, frame)

    def finish(self, x: torch.Tensor, inputs: BlockInputs, last_only: bool = False) -> torch.Tensor:
        """The last block's output (B, T, C) -> logits; the new tokens now count as cached."""
        inputs.cache.commit(inputs.frame)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))  # (B, T, V)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device  # not the embedding's: a quantised model may read it from the head

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def aux_loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Qwen2-MoE's load-balancing loss for the last forward (its router logits; pass the same
        attention_mask), unweighted like transformers' `aux_loss`. Train on
        lm_loss + config.router_aux_loss_coef * aux_loss. 0 for a dense model. See qwen2/model/moe.py."""
        return load_balancing_loss(self, attention_mask)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch_size, max_len or self.config.max_position_embeddings,
                       dtype=self.dtype, device=self.device)


def parameter_counts(config: Qwen2Config) -> dict[str, int]:
    """{"total", "embedding", "non_embedding"} parameters of a model of `config`, counted on the
    meta device (nothing allocated). As in the Qwen2 report's tables, the input embedding and an
    untied output layer are "embedding"; a tied output layer is the embedding, counted once."""
    with torch.device("meta"):
        model = Transformer(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    embedding = model.model.embed_tokens.weight.numel() * (1 if config.tie_word_embeddings else 2)
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
