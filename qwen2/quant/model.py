"""Quantising whole models: which linears become which layout, and what a quantised model says of itself."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import Qwen2Error
from ..model.moe import SparseMoeBlock
from .linear import (BACKENDS, BLOCK_LINEARS, DEFAULT_GROUP_SIZE, INT4_KEEP_INT8, MODES, Int4Linear, Int8Linear,
                     QuantLinear, buffer_shapes, check_group_size, quantized_linears)
from .gguf_blocks import GGUFEmbedding
from .memory import file_mappings, release_pages
from .moe import MOE_INT4_KEEP_INT8, QuantizedMoeBlock, moe_linears, quantize_moe_blocks, role


def check_mode(mode: str | None) -> str | None:
    if mode is None or mode in ("none", "fp32", ""):
        return None
    if mode not in MODES:
        raise Qwen2Error(f"unknown quantization {mode!r}; use one of {', '.join(MODES)} (or none)")
    return mode


def quantize_model(model, mode: str, group_size: int = DEFAULT_GROUP_SIZE, lm_head: bool | None = None,
                   release: bool = False):
    """Replace the q/k/v/o and gate/up/down projections of every block (and, with `lm_head`, the
    output head, always int8: see below) of a `Transformer` by quantised linears, in place; returns it.
    mode "int8": all int8 (groups of 32, `int8_group_size`). "int4": group-wise int4, but v_proj and
    down_proj int8 (see INT4_KEEP_INT8). "int4-pure": all seven int4.
    In a Qwen2-MoE block every expert's gate/up/down projections, routed and shared, take the MLP's
    place under the same rules; the router and the shared-expert gate stay as they are, and the block
    becomes a `QuantizedMoeBlock` (qwen2/quant/moe.py). "int4" keeps an MoE model's whole attention
    int8 (MOE_INT4_KEEP_INT8).

    `lm_head` None means the mode's default: int8 in the int4 modes, fp32 in int8 mode. The lm_head
    is the largest single matrix of a small model (136 M of the 0.5B model's 494 M parameters), so
    reading it in fp32 is a third of a decode step; but its errors go straight into the logits, where
    they flip near-tie greedy choices: int8 mode is the accuracy mode, so it keeps the head exact.
    When quantised it is int8, never int4 (errors ~16x smaller for ~60 MB more). A tied embedding
    is left intact (the head gets a quantised copy; loading from a GGUF then reads the embedding's
    rows from the head's exact blocks: `QuantEmbedding`).

    Which layer gets which layout and settings is `linear_layouts` / `configure_linear` /
    `quantization_record`, which loading a GGUF's blocks directly (qwen2/checkpoint/quantized.py) shares.

    `release`: the fp32 weights may live in a memory-mapped file (safetensors); drop their pages from
    this process once quantised, so resident memory does not keep the fp32 model (load() uses it).
    """
    mode = check_mode(mode)
    if mode is None:
        return model
    if getattr(model, "quantization", None):
        raise Qwen2Error(f"the model is already quantised ({describe(model)})")
    if model.device.type != "cpu":
        raise Qwen2Error(f"quantised linears run on the CPU only, not {model.device}")
    check_quantizable(model.config, mode, group_size)
    layouts = linear_layouts(model.config, mode, lm_head)
    mapped = file_mappings() if release else []
    # each chunk's fp32 pages go as soon as it is quantised: never more than a chunk of them resident.
    # A tied embedding's pages go too, as the head reads them: they belong to a file mapping (the only
    # pages released), so a later lookup faults its row back in from the checkpoint, and a GGUF's exact
    # head soon replaces the table altogether (QuantEmbedding).
    release_chunk = None if not mapped else (lambda t: release_pages(t, mapped))
    _quantize_linears(model, layouts, mode, group_size, on_chunk=release_chunk)
    quantize_moe_blocks(model)
    model.quantization = quantization_record(model.config, mode, group_size, lm_head)
    return model


def quantize_moe_block(block: SparseMoeBlock, config, mode: str,
                       group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedMoeBlock:
    """One MoE block of a model of `config`, its experts quantised as `quantize_model` quantises them
    in the model (the block's linears replaced in place, then the block wrapped): to measure or
    check a layer alone (benchmarks/speed/bench_moe.py)."""
    mode = check_mode(mode)
    if mode is None:
        raise Qwen2Error("quantize_moe_block needs a quantization mode")
    check_quantizable(config, mode, group_size)
    layer = next(i for i in range(config.num_hidden_layers) if config.is_moe_layer(i))
    prefix = f"model.layers.{layer}.mlp."
    _quantize_linears(block, {name.removeprefix(prefix): layout for name, layout in linear_layouts(config, mode).items()
                              if name.startswith(prefix)}, mode, group_size)
    return QuantizedMoeBlock(block)


def _quantize_linears(root: nn.Module, layouts: dict[str, str], mode: str, group_size: int, on_chunk=None) -> None:
    """Replace each linear `layouts` names (relative to `root`) by its quantised layer, in place."""
    with torch.no_grad():
        for name, layout in layouts.items():
            parent_name, _, attr = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            linear = getattr(parent, attr)
            layer = quantize_linear(linear.weight.detach(), linear.bias, layout, group_size, on_chunk=on_chunk)
            setattr(parent, attr, configure_linear(layer, name, mode))


# --------------------------------------------------------------------------------------------------
# Which layout for which linear: one set of rules, for quantising a model and for building one
# straight from a GGUF's blocks
# --------------------------------------------------------------------------------------------------

def check_quantizable(config, mode: str, group_size: int) -> None:
    """Raise Qwen2Error unless a model of `config` can be quantised to `mode` (a checked mode) at `group_size`."""
    if mode.startswith("int4"):
        layers = range(config.num_hidden_layers)
        widths = {"q/k/v/gate/up_proj (hidden size)": config.hidden_size,
                  "o_proj (heads x head dim)": config.num_attention_heads * config.head_dim}
        if not all(config.is_moe_layer(i) for i in layers):
            widths["down_proj (intermediate size)"] = config.intermediate_size
        if any(config.is_moe_layer(i) for i in layers):
            widths["the experts' down_proj (moe_intermediate_size)"] = config.moe_intermediate_size
            widths["the shared expert's down_proj (shared_expert_intermediate_size)"] = \
                config.shared_expert_intermediate_size
        check_group_size(group_size, widths)


def lm_head_quantized(mode: str, lm_head: bool | None) -> bool:
    """Whether the lm_head is quantised (int8): `lm_head`, or the mode's default (int4 modes yes, int8 no)."""
    return mode != "int8" if lm_head is None else bool(lm_head)


def linear_layouts(config, mode: str, lm_head: bool | None = None) -> dict[str, str]:
    """Module name -> the layout `quantize_model` gives it ("int4" or "int8"), in the model's module
    order: every block linear (an MoE block's: its experts', `moe_linears`), then "lm_head" when it is
    quantised. Linears not named stay as they are."""
    keep_int8 = int4_keep_int8(config) if mode == "int4" else ()
    dense_mlp = [path for path in BLOCK_LINEARS if path.startswith("mlp.")]
    attention = [path for path in BLOCK_LINEARS if path not in dense_mlp]
    low = "int4" if mode.startswith("int4") else "int8"
    layouts = {f"model.layers.{i}.{path}": "int8" if role(path) in keep_int8 else low
               for i in range(config.num_hidden_layers)
               for path in attention + (moe_linears(config) if config.is_moe_layer(i) else dense_mlp)}
    if lm_head_quantized(mode, lm_head):
        layouts["lm_head"] = "int8"
    return layouts


def quantize_linear(weight, bias: torch.Tensor | None, layout: str, group_size: int, on_chunk=None,
                    out: tuple | None = None) -> QuantLinear:
    """A linear's weight (N, K) quantised to `layout` ("int4" at `group_size`, or "int8"). `weight`:
    a float tensor, or anything `fill_in_row_chunks` reads rows of (e.g. a GGUF tensor's rows,
    dequantised chunk by chunk); `on_chunk(rows)` after each chunk; `out`: the buffers to fill
    (`quantized_buffer_shapes`) instead of new ones."""
    if layout.startswith("int4"):
        return Int4Linear.from_float(weight, bias, group_size, on_chunk=on_chunk, out=out)
    return Int8Linear.from_float(weight, bias, on_chunk=on_chunk, out=out)


def quantized_buffer_shapes(layout: str, out_features: int, in_features: int, group_size: int):
    """(shape, dtype) of each buffer `quantize_linear` fills for this layout and weight shape."""
    return buffer_shapes(layout, out_features, in_features, group_size if layout.startswith("int4") else None)


def configure_linear(layer: QuantLinear, name: str, mode: str) -> QuantLinear:
    """Set the kernel settings `quantize_model` gives the quantised layer at `name` in `mode`; returns it.
    Two activation digits for the attention projections (and everywhere in int8 mode), one elsewhere;
    the prefill's GEMM one digit, but two in int8 mode, the accuracy mode (one flipped 4 of 20 greedy
    continuations of the 0.5B model, as a bf16 prefill flipped 1-2), which without the native kernels
    also prefills in fp32."""
    layer.activation_digits = 2 if "self_attn" in name or mode == "int8" else 1
    if mode == "int8":
        layer.gemm_digits = 2
        layer.dense_dtype = torch.float32
    return layer


def int4_keep_int8(config) -> tuple[str, ...]:
    """The block linears (by role: "self_attn.v_proj", "mlp.down_proj") that "int4" mode keeps int8."""
    return MOE_INT4_KEEP_INT8 if config.num_experts else INT4_KEEP_INT8


def quantization_record(config, mode: str, group_size: int, lm_head: bool | None) -> dict:
    """What a model of `config` quantised to `mode` says of itself (`model.quantization`), before any
    GGUF blocks are taken."""
    keep_int8 = int4_keep_int8(config) if mode == "int4" else ()
    return {"mode": mode, "group_size": group_size if mode.startswith("int4") else None,
            "int8": [p.split(".")[1] for p in keep_int8], "lm_head": "int8" if lm_head_quantized(mode, lm_head) else None}


def describe(model) -> str:
    """'int4 (group 32; v_proj, down_proj int8; exact from the GGUF: 197 Q4_K as q4_k, 29 Q6_K as q6_k),
    lm_head q6_k' or 'none': GGUF block types taken exactly, each with the layout that holds it (q4_k
    and q6_k: the GGUF's super-blocks kept as they are, `qwen2.quant.kquant`)."""
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
    """Logical parameter count: a quantised linear counts its in x out weights (and bias) once, an
    embedding read from a GGUF's rows its vocabulary x width."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    n += sum(m.num_embeddings * m.embedding_dim for m in model.modules() if isinstance(m, GGUFEmbedding))
    return n + sum(m.in_features * m.out_features for m in quantized_linears(model).values())


def set_backend(model: nn.Module, backend: str) -> None:
    """Use `backend` ("auto", "kernel", "dense", "reference") in every quantised linear of `model`."""
    if backend not in BACKENDS:
        raise Qwen2Error(f"unknown quantised-linear backend {backend!r}; use one of {', '.join(BACKENDS)}")
    for m in quantized_linears(model).values():
        m.backend = backend
