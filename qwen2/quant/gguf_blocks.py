"""GGUF tensors whose blocks our layouts hold exactly, as quantised linears: Q4_K and Q6_K super-blocks
kept as they are (qwen2/quant/kquant.py), Q4_K as int4 groups of 32, Q8_0 and Q5_0 as int8 groups of 32.

A tensor here is anything shaped like `qwen2.checkpoint.gguf.GGUFTensor` (name, tensor_type, shape
with the innermost dim first, data: raw block rows): this layer reads no files itself.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import Qwen2Error
from ..progress import progress_bar
from .kquant import Q4KLinear, Q6KLinear, q4k_scales_mins
from .linear import Int4Linear, Int8Linear, QuantEmbedding, fill_in_row_chunks

# --------------------------------------------------------------------------------------------------
# Q4_K blocks as int4 weights, losslessly
# --------------------------------------------------------------------------------------------------

# Q4_K stores 256 weights in 144 bytes: fp16 d, fp16 dmin, 12 bytes holding eight 6-bit scales and
# eight 6-bit mins (one per sub-block of 32), then 128 bytes of nibbles. Weight i of sub-block j is
# d * sc_j * q_i - dmin * m_j: exactly `qwen2.quant.linear`'s int4 form q * scale + min at group size 32.
_Q4K_BYTES = 144
_Q4K_WEIGHTS = 256
_Q4K_GROUP = 32


def q4k_to_int4(rows):
    """Raw Q4_K rows (N, K / 256 * 144) uint8 (a `GGUFTensor.data`) -> (q uint8 (N, K) in [0, 15],
    scale fp32 (N, K / 32), min fp32 (N, K / 32)) with q * scale + min bit-for-bit equal to
    `gguf.quants.dequantize` of the rows.

    Why it is exact: d * sc and dmin * m (fp16 times a 6-bit integer) and scale * q (17 bits times
    4) are exact in fp32, so both this form and gguf's `d * sc * q - dmin * m` round only once, at
    the final addition, the same sum."""
    qs, scale, minimum = _q4k_fields(rows)
    # 128 bytes = 4 runs of 32: the low nibbles of run r are sub-block 2r, the high nibbles 2r + 1
    q = np.concatenate((qs[:, :, None] & 0x0F, qs[:, :, None] >> 4), axis=2).reshape(scale.shape[0], -1)
    return torch.from_numpy(q), torch.from_numpy(scale), torch.from_numpy(minimum)


def q4k_to_packed_int4(rows):
    """As `q4k_to_int4`, but q already packed as `qwen2.quant.linear.pack_int4` packs it (N, K / 2),
    straight from the nibbles: per sub-block, byte j = weight j | weight j + 16 << 4."""
    qs, scale, minimum = _q4k_fields(rows)
    first, second = qs[..., :16], qs[..., 16:]  # weights 0-15 and 16-31 of sub-blocks 2r, 2r + 1
    low_sub = (first & 0x0F) | (second << 4)  # uint8: the shift drops the high nibble
    high_sub = (first >> 4) | (second & 0xF0)
    packed = np.stack((low_sub, high_sub), axis=2).reshape(scale.shape[0], -1)
    return torch.from_numpy(packed), torch.from_numpy(scale), torch.from_numpy(minimum)


def _q4k_fields(rows):
    """(nibble bytes (N * K / 256, 4, 32), scale and min fp32 (N, K / 32)) of raw Q4_K rows."""
    rows = np.asarray(rows, dtype=np.uint8)
    N = rows.shape[0]
    blocks = rows.reshape(-1, _Q4K_BYTES)
    d = blocks[:, 0:2].view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].view(np.float16).astype(np.float32)
    sc, m = (t.numpy() for t in q4k_scales_mins(torch.from_numpy(blocks[:, 4:16])))
    scale = d * sc.astype(np.float32)  # the products gguf's dequantize forms, in the same dtype
    minimum = -(dmin * m.astype(np.float32))
    return blocks[:, 16:].reshape(-1, 4, 32), scale.reshape(N, -1), minimum.reshape(N, -1)


_INT8_BLOCK = 32
_Q8_0_BYTES, _Q5_0_BYTES = 34, 22


def q8_0_to_int8(rows):
    """Raw Q8_0 rows (N, K / 32 * 34 bytes) -> (q int8 (N, K), scale fp32 (N, K / 32)): per block an
    fp16 d and 32 int8 values, w = d * q, so int8 with scale d is the same weight exactly."""
    rows = np.asarray(rows, dtype=np.uint8)
    blocks = rows.reshape(-1, _Q8_0_BYTES)
    d = blocks[:, :2].view(np.float16).astype(np.float32)
    q = blocks[:, 2:].view(np.int8)
    return torch.from_numpy(q.reshape(rows.shape[0], -1).copy()), torch.from_numpy(d.reshape(rows.shape[0], -1))


def q5_0_to_int8(rows):
    """Raw Q5_0 rows -> (q int8 (N, K) in [-16, 15], scale fp32 (N, K / 32)): per block an fp16 d,
    32 high bits and 16 bytes of low nibbles (byte j: weight j low, weight j + 16 high),
    w = d * (q5 - 16): an int8 with scale d, exactly."""
    rows = np.asarray(rows, dtype=np.uint8)
    blocks = rows.reshape(-1, _Q5_0_BYTES)
    d = blocks[:, :2].view(np.float16).astype(np.float32)
    high = blocks[:, 2:6].copy().view(np.uint32)[:, :1] >> np.arange(32, dtype=np.uint32)  # (n, 32)
    nibbles = blocks[:, 6:]
    low = np.concatenate((nibbles & 0x0F, nibbles >> 4), axis=1)  # weights 0-15, then 16-31
    q = (low | ((high & 1).astype(np.uint8) << 4)).astype(np.int8) - np.int8(16)
    return torch.from_numpy(q.reshape(rows.shape[0], -1)), torch.from_numpy(d.reshape(rows.shape[0], -1))


def _exact_converters(int4_mode: bool):
    """GGUF block type -> (the quantised layer classes of the model it may replace, function (tensor,
    bias) -> exact layer). In the int4 modes (group 32) Q4_K replaces int4 and int8 layers alike, and
    Q6_K the int8 ones (v_proj, down_proj, the lm_head), both as their super-blocks kept byte for byte
    (`qwen2.quant.kquant`: 4.5 and 6.5625 bits per weight, against 6 for Q4_K copied into int4 groups of 32
    with fp32 scales and 8.5 for Q6_K requantised to int8). Q8_0 and Q5_0 are int8 groups of 32 exactly."""
    from gguf import GGMLQuantizationType as T

    return {T.Q4_K: ((Int4Linear, Int8Linear) if int4_mode else (), Q4KLinear.from_gguf),
            T.Q6_K: ((Int8Linear,) if int4_mode else (), Q6KLinear.from_gguf),
            T.Q8_0: ((Int8Linear,), lambda t, b: _int8_linear(t, b, q8_0_to_int8)),
            T.Q5_0: ((Int8Linear,), lambda t, b: _int8_linear(t, b, q5_0_to_int8))}


def q4k_int4_linear(tensor, bias=None):
    """A `qwen2.quant.linear.Int4Linear` (group 32, fp32 scales and mins) computing exactly the weight
    of a Q4_K tensor, converted in row chunks so that temporaries stay small (an lm_head too).
    Loading now keeps Q4_K's super-blocks instead (`qwen2.quant.kquant.Q4KLinear`, 4.5 bits per weight
    against these 6); this layout stays for comparison (benchmarks/bench_kquant_kernels.py)."""
    N, K = (int(n) for n in reversed(tensor.shape))
    groups = (N, K // _Q4K_GROUP)
    out = (torch.empty(N, K // 2, dtype=torch.uint8), torch.empty(groups, dtype=torch.float32),
           torch.empty(groups, dtype=torch.float32))  # packed weights, fp32 scales, fp32 mins
    fill_in_row_chunks(tensor.data, q4k_to_packed_int4, out, K)
    return Int4Linear(*out, _Q4K_GROUP, bias)


def _int8_linear(tensor, bias, to_int8):
    """A `qwen2.quant.linear.Int8Linear` (group 32, fp32 scales) computing exactly the weight of a
    Q8_0/Q5_0 tensor (`to_int8` reads its blocks), in row chunks."""
    def stored(rows):  # Int8Linear keeps the int8 value + 128
        values, scale = to_int8(rows)
        return (values.to(torch.int16) + 128).to(torch.uint8), scale

    N, K = (int(n) for n in reversed(tensor.shape))
    out = (torch.empty(N, K, dtype=torch.uint8), torch.empty(N, K // _INT8_BLOCK, dtype=torch.float32))
    fill_in_row_chunks(tensor.data, stored, out, K)
    return Int8Linear(*out, _INT8_BLOCK, bias)


def exact_block_types(model) -> set:
    """The GGUF block types `convert_exact_linears` may take into this quantised model."""
    return set(_exact_converters(_int4_at_q4k_group(model)))


def _int4_at_q4k_group(model) -> bool:
    return model.quantization["mode"].startswith("int4") and model.quantization.get("group_size") == _Q4K_GROUP


def convert_exact_linears(model, tensors: dict, release=None, source: str = "the GGUF",
                          progress: bool = True) -> dict[str, int]:
    """Replace quantised linears of `model` (the block projections, and the lm_head when it is
    quantised) by the exact equivalent of their GGUF tensor where its blocks map losslessly onto our
    layouts: in the int4 modes (group 32) Q4_K super-blocks as they are for any quantised layer (an
    exact 4.5-bit layer beats requantising to int4 or int8) and Q6_K ones for the int8 layers; Q8_0 and
    Q5_0 onto int8 groups of 32 (layers that are int8 anyway). See `_exact_converters`.
    Returns {"Q4_K": n, "Q6_K": n, "Q8_0": n, "Q5_0": n} for the layers converted, and names the
    lm_head's new layout in `model.quantization`. Why: requantising the dequantised blocks adds a
    second rounding error to weights that are already integers times a per-block scale (and costs
    more bits). `tensors`: HF parameter name -> GGUF tensor, of the block types `exact_block_types`
    names, from the GGUF the weights came from (`source`); `release(tensor)` after each is taken."""
    converters = _exact_converters(_int4_at_q4k_group(model))
    tensors = dict(tensors)
    tied = model.config.tie_word_embeddings and "model.embed_tokens.weight" in tensors
    if tied:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # a tied head is the embedding
    targets = [name for name, module in model.named_modules()
               if f"{name}.weight" in tensors and isinstance(module, converters[tensors[f"{name}.weight"].tensor_type][0])]
    counts: dict[str, int] = {}
    for name in progress_bar(targets, desc="taking exact GGUF blocks", unit="tensor", disable=not progress):
        tensor, module = tensors[f"{name}.weight"], model.get_submodule(name)
        if tuple(reversed(tensor.shape)) != (module.out_features, module.in_features):
            raise Qwen2Error(f"GGUF tensor {tensor.name} has shape {list(reversed(tensor.shape))}, the model's "
                             f"{name} is {[module.out_features, module.in_features]}; {source} is not this model's file")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bias, dense_dtype, digits = module.bias, module.dense_dtype, module.activation_digits
        # the layer it replaces goes first, so the two never coexist (the 0.5B's lm_head: 145 MB each)
        setattr(parent, attr, None)
        del module
        exact = converters[tensor.tensor_type][1](tensor, bias)
        exact.dense_dtype, exact.activation_digits = dense_dtype, digits
        setattr(parent, attr, exact)
        if name == "lm_head":
            model.quantization["lm_head"] = exact.mode  # e.g. the 1.5B's Q6_K head: "q6_k", not int8
            if tied:  # the embedding is the same blocks: read its rows there, drop the fp32 table
                model.model.embed_tokens = QuantEmbedding(exact)
        if release is not None:
            release(tensor)
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
        model.quantization.setdefault("gguf_layouts", {})[tensor.tensor_type.name] = exact.mode  # for describe()
    return counts
