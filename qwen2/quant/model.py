"""Quantising whole models: which linears become which layout, and what a quantised model says of itself."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import Qwen2Error
from .linear import (BACKENDS, BLOCK_LINEARS, DEFAULT_GROUP_SIZE, INT4_KEEP_INT8, MODES, Int4Linear, Int8Linear,
                     QuantLinear, check_group_size)
from .memory import file_mappings, release_pages


def check_mode(mode: str | None) -> str | None:
    if mode is None or mode in ("none", "fp32", ""):
        return None
    if mode not in MODES:
        raise Qwen2Error(f"unknown quantization {mode!r}; use one of {', '.join(MODES)} (or none)")
    return mode


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def quantize_model(model, mode: str, group_size: int = DEFAULT_GROUP_SIZE, lm_head: bool | None = None,
                   release: bool = False):
    """Replace the q/k/v/o and gate/up/down projections of every block (and, with `lm_head`, the
    output head, always int8: see below) of a `Transformer` by quantised linears, in place; returns it.
    mode "int8": all int8 (groups of 32, `int8_group_size`). "int4": group-wise int4, but v_proj and
    down_proj int8 (see INT4_KEEP_INT8). "int4-pure": all seven int4.

    `lm_head` None means the mode's default: int8 in the int4 modes, fp32 in int8 mode. The lm_head
    is the largest single matrix of a small model (136 M of the 0.5B model's 494 M parameters), so
    reading it in fp32 is a third of a decode step; but its errors go straight into the logits, where
    they flip near-tie greedy choices: int8 mode is the accuracy mode, so it keeps the head exact.
    When quantised it is int8, never int4 (errors ~16x smaller for ~60 MB more). A tied embedding
    is left intact (the head gets a quantised copy; loading from a GGUF then reads the embedding's
    rows from the head's exact blocks: `QuantEmbedding`).

    `release`: the fp32 weights may live in a memory-mapped file (safetensors); drop their pages from
    this process once quantised, so resident memory does not keep the fp32 model (load() uses it).
    """
    mode = check_mode(mode)
    if mode is None:
        return model
    keep_int8 = INT4_KEEP_INT8 if mode == "int4" else ()
    lm_head = mode != "int8" if lm_head is None else lm_head
    if getattr(model, "quantization", None):
        raise Qwen2Error(f"the model is already quantised ({describe(model)})")
    if model.device.type != "cpu":
        raise Qwen2Error(f"quantised linears run on the CPU only, not {model.device}")
    config = model.config
    if config.num_experts:
        raise Qwen2Error("quantised linears do not cover mixture-of-experts layers yet; load this Qwen2-MoE model "
                         "without quantize=")
    if mode.startswith("int4"):
        check_group_size(group_size, {
            "q/k/v/gate/up_proj (hidden size)": config.hidden_size,
            "o_proj (heads x head dim)": config.num_attention_heads * config.head_dim,
            "down_proj (intermediate size)": config.intermediate_size})
    mapped = file_mappings() if release else []

    def convert(linear: nn.Linear, as_mode: str) -> QuantLinear:
        # each chunk's fp32 pages go as soon as it is quantised: never more than a chunk of them resident
        release_chunk = None if not mapped else (lambda t: release_pages(t, mapped))
        w = linear.weight.detach()
        if as_mode.startswith("int4"):
            return Int4Linear.from_float(w, linear.bias, group_size, on_chunk=release_chunk)
        return Int8Linear.from_float(w, linear.bias, on_chunk=release_chunk)

    with torch.no_grad():
        for block in model.model.layers:
            for path in BLOCK_LINEARS:
                parent_name, name = path.split(".")
                parent = getattr(block, parent_name)
                setattr(parent, name, convert(getattr(parent, name), "int8" if path in keep_int8 else mode))
        if lm_head:
            # A tied embedding's pages go too, as they are read: they belong to a file mapping (the
            # only pages released), so a later lookup faults its row back in from the checkpoint,
            # and a GGUF's exact head soon replaces the table altogether (QuantEmbedding).
            model.lm_head = convert(model.lm_head, "int8")
    for name, layer in quantized_linears(model).items():
        layer.activation_digits = 2 if "self_attn" in name or mode == "int8" else 1
        if mode == "int8":
            # int8 mode is the accuracy mode: a bf16 prefill alone flips 1-2 of 20 greedy continuations
            layer.dense_dtype = torch.float32
    model.quantization = {"mode": mode, "group_size": group_size if mode.startswith("int4") else None,
                          "int8": [p.split(".")[1] for p in keep_int8], "lm_head": "int8" if lm_head else None}
    return model


def describe(model) -> str:
    """'int4 (group 32; v_proj, down_proj int8; exact from the GGUF: 197 Q4_K as q4_k, 29 Q6_K as q6_k),
    lm_head q6_k' or 'none': GGUF block types taken exactly, each with the layout that holds it (q4_k
    and q6_k: the GGUF's super-blocks kept as they are, `qwen2.kquant`)."""
    q = getattr(model, "quantization", None)
    if not q:
        return "none"
    layouts = q.get("gguf_layouts", {})
    more = ([f"group {q['group_size']}"] if q.get("group_size") else []) + \
        ([", ".join(q["int8"]) + " int8"] if q.get("int8") else []) + \
        (["exact from the GGUF: " + ", ".join(f"{n} {t}" + (f" as {layouts[t]}" if t in layouts else "")
                                              for t, n in sorted(q["gguf_exact"].items()))]
         if q.get("gguf_exact") else [])
    text = q["mode"] + (f" ({'; '.join(more)})" if more else "")
    return text + (f", lm_head {q['lm_head']}" if q.get("lm_head") else ", lm_head fp32")


def num_parameters(model: nn.Module) -> int:
    """Logical parameter count: a quantised linear counts its in x out weights (and bias) once."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n + sum(m.in_features * m.out_features for m in quantized_linears(model).values())


def set_backend(model: nn.Module, backend: str) -> None:
    """Use `backend` ("auto", "kernel", "dense", "reference") in every quantised linear of `model`."""
    if backend not in BACKENDS:
        raise Qwen2Error(f"unknown quantised-linear backend {backend!r}; use one of {', '.join(BACKENDS)}")
    for m in quantized_linears(model).values():
        m.backend = backend
