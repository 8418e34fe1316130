"""LoRA adapters at serving time: many fine-tunes of one base model, chosen per request, rows of one
batch on different adapters (or none) in the same forward, nothing merged.

    `read_adapter`     an adapter directory (the one `qwen2 train ... lora=true` writes, or HF PEFT's)
                       -> `LoRAAdapter`, checked as far as its files tell (formats.py)
    `AdapterSet`       the adapters served over one model: adding one checks it against the model
                       and wraps each linear it adapts in a `MultiLoRALinear` (adapter_set.py)
    `MultiLoRALinear`  the base matmul for every row plus each active adapter's low-rank update on
                       its own rows only (linear.py)
    `RowAdapters`      which adapter each row of the next forward takes: written by the generation
                       loop (`AdapterSet.steps_with`) and the serving engine before each forward (rows.py)

`qwen2.load(base, adapters={"name": DIR})`, `Qwen2.add_adapter`, `generate(..., adapter="name")` and
`qwen2 serve --lora name=DIR` (a request picks one with "model": "name") are the ways in.
"""
from .adapter_set import AdapterSet, adaptable_linears, check_fits
from .formats import LoRAAdapter, LoRAWeights, read_adapter
from .linear import MultiLoRALinear
from .rows import RowAdapters, RowChoice

__all__ = ["AdapterSet", "LoRAAdapter", "LoRAWeights", "MultiLoRALinear", "RowAdapters", "RowChoice",
           "adaptable_linears", "check_fits", "read_adapter"]
