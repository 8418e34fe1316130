"""The Qwen2 decoder as the report describes it, in eager PyTorch: `Transformer` (dense or MoE,
with YaRN, sliding windows or Dual Chunk Attention as the config says) and its caches."""
from .attention import Attention
from .cache import KVCache, NoCache
from .layers import FeedForward, RMSNorm
from .rope import RotaryEmbedding, apply_rope
from .static_cache import StaticKV
from .transformer import Block, Transformer, parameter_counts

__all__ = ["Attention", "Block", "FeedForward", "KVCache", "NoCache", "RMSNorm", "RotaryEmbedding", "StaticKV",
           "Transformer", "apply_rope", "parameter_counts"]
