"""`AdapterSet`: the LoRA adapters a model serves, by name, each request's rows taking their own."""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import Qwen2Error
from ..model.layers import FeedForward
from .formats import LoRAAdapter
from .linear import MultiLoRALinear
from .rows import RowAdapters, rank_slots

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def adaptable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linears an adapter may change, by module name, as the base model has them (beneath any
    adapter wrapper): every block's attention projections, a dense block's MLP projections, and
    lm_head. These are the ones whose input's first dimension is the batch's rows, which is how
    each row finds its adapter; a Qwen2-MoE expert sees only the tokens routed to it."""
    linears = {}
    for i, block in enumerate(model.model.layers):
        for attr in ATTENTION_LINEARS:
            linears[f"model.layers.{i}.self_attn.{attr}"] = getattr(block.self_attn, attr)
        if isinstance(block.mlp, FeedForward):
            for attr in MLP_LINEARS:
                linears[f"model.layers.{i}.mlp.{attr}"] = getattr(block.mlp, attr)
    linears["lm_head"] = model.lm_head
    return {name: m.base if isinstance(m, MultiLoRALinear) else m for name, m in linears.items()}


def check_fits(adapter: LoRAAdapter, linears: dict[str, nn.Module]) -> None:
    """A one-line Qwen2Error unless every linear `adapter` adapts is one of `linears` with its shape,
    and each of its config's target modules names one of them."""
    for module, w in adapter.layers.items():
        base = linears.get(module)
        if base is None:
            raise Qwen2Error(f"adapter {adapter.name!r}: tensor {w.key!r} adapts {module!r}, which the base model "
                             "does not have as an adaptable linear (attention and dense MLP projections, lm_head)")
        if w.A.shape[1] != base.in_features or w.B.shape[0] != base.out_features:
            raise Qwen2Error(f"adapter {adapter.name!r}: tensor {w.key!r} has shape {tuple(w.A.shape)} and its B "
                             f"{tuple(w.B.shape)}, but {module} maps {base.in_features} to {base.out_features} "
                             "features: was it trained on another model?")
    targets = adapter.target_modules
    if isinstance(targets, str) and targets != "all-linear" and not any(re.fullmatch(targets, m) for m in linears):
        raise Qwen2Error(f"adapter {adapter.name!r}: target_modules {targets!r} matches no linear of the base model")
    if isinstance(targets, list):
        for target in targets:
            if not any(m == target or m.endswith("." + target) for m in linears):
                raise Qwen2Error(f"adapter {adapter.name!r}: target module {target!r} is not a linear the base model "
                                 "has (attention and dense MLP projections, lm_head)")


class AdapterSet:
    """The adapters served over `model`, by name, in the order added; `rows` says which one each row of
    the next forward takes. Adding one wraps each linear it adapts in a `MultiLoRALinear` (once) and
    restacks every wrapper's weights; the model's own code is unchanged and a forward with no
    adapter chosen computes exactly the base model (the wrappers add nothing)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.rows = RowAdapters()
        self._adapters: dict[str, LoRAAdapter] = {}
        self._ranks: list[int] = []  # each adapter's rank slots in the stacked weights: its highest rank
        self._wrappers: dict[str, MultiLoRALinear] = {}

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def __contains__(self, name) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def add(self, adapter: LoRAAdapter) -> None:
        """Serve `adapter` under its name; checked against the model first (`check_fits`)."""
        if adapter.name in self._adapters:
            raise Qwen2Error(f"an adapter named {adapter.name!r} is already loaded; give each its own name")
        check_fits(adapter, adaptable_linears(self.model))
        self._adapters[adapter.name] = adapter
        self._restack()

    def _restack(self) -> None:
        adapters = list(self._adapters.values())
        self._ranks = [max(w.rank for w in a.layers.values()) for a in adapters]
        slots = rank_slots(self._ranks)
        dtype, device = self.model.dtype, self.model.device
        for module in sorted({m for a in adapters for m in a.layers}):
            wrapper = self._wrapper(module)
            A = torch.zeros(sum(self._ranks), wrapper.in_features)
            Bt = torch.zeros(sum(self._ranks), wrapper.out_features)
            for slot, adapter in zip(slots, adapters):
                w = adapter.layers.get(module)
                if w is not None:
                    A[slot.start:slot.start + w.rank] = w.A.float()
                    Bt[slot.start:slot.start + w.rank] = (w.B.float() * w.scale).T
            wrapper.A, wrapper.Bt = A.to(device, dtype), Bt.to(device, dtype)

    def _wrapper(self, module: str) -> MultiLoRALinear:
        if module not in self._wrappers:
            parent_name, _, attr = module.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            self._wrappers[module] = MultiLoRALinear(getattr(parent, attr), self.rows)
            setattr(parent, attr, self._wrappers[module])
        return self._wrappers[module]

    def index(self, name: str) -> int:
        """The position of adapter `name`; an unknown name is a Qwen2Error naming it."""
        if name not in self._adapters:
            raise Qwen2Error(f"no adapter named {name!r}; loaded: {', '.join(map(repr, self._adapters)) or 'none'}")
        return list(self._adapters).index(name)

    def select(self, names: Sequence[str | None] | None) -> None:
        """Row i of the next forwards takes adapter names[i] (None: the base model); names None:
        every row the base model. Set before each forward by whoever runs it."""
        per_row = None if names is None else [None if n is None else self.index(n) for n in names]
        self.rows.choose(per_row, self._ranks, self.model.dtype, self.model.device)

    def steps_with(self, steps, names: Sequence[str | None]):
        """A steps factory with `decode_steps`' contract (`steps`, or `decode_steps` itself when None)
        whose forwards run with adapter names[i] on row i: chosen before each step resumes and
        cleared after, so generations interleaved on one model each keep their own."""
        from ..runtime.generate import decode_steps

        inner = steps or decode_steps
        names = list(names)

        def run(model, prompts, params, pad_id: int = 0):
            tokens = inner(model, prompts, params, pad_id=pad_id)
            while True:
                self.select(names)
                try:
                    token = next(tokens)
                except StopIteration:
                    return
                finally:
                    self.select(None)
                yield token

        return run
