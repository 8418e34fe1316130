"""qwen2: a from-scratch, hackable PyTorch implementation of the Qwen2 model family."""
from .api import Qwen2, load
from .config import NAMED_CONFIGS, Qwen2Config, named_config
from .errors import Qwen2Error
from .options import LoadOptions
from .runtime.generate import SamplingParams
from .model import KVCache, Transformer

__version__ = "0.1.0"
__all__ = ["KVCache", "LoadOptions", "NAMED_CONFIGS", "Qwen2", "Qwen2Config", "Qwen2Error", "SamplingParams",
           "Transformer", "load", "named_config"]
