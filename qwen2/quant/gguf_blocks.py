"""GGUF tensors whose blocks our layouts hold exactly, as quantised linears: Q4_K and Q6_K super-blocks
kept as they are (qwen2/quant/kquant.py), Q4_K as int4 groups of 32, Q8_0 and Q5_0 as int8 groups of 32.

A tensor here is anything shaped like `qwen2.checkpoint.gguf.GGUFTensor` (name, tensor_type, shape
with the innermost dim first, data: raw block rows): this layer reads no files itself.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .. import kernels
from ..errors import Qwen2Error
from ..progress import progress_bar
from .kquant import Q4KLinear, Q6KLinear, q4k_dequantize, q4k_scales_mins, q6k_dequantize
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
    sc, m = (t.numpy() for t in q4k_scales_mins(torch.from_numpy(blocks[:, 4:16].copy())))
    scale = d * sc.astype(np.float32)  # the products gguf's dequantize forms, in the same dtype
    minimum = -(dmin * m.astype(np.float32))
    return blocks[:, 16:].reshape(-1, 4, 32), scale.reshape(N, -1), minimum.reshape(N, -1)


_INT8_BLOCK = 32
_Q8_0_BYTES, _Q5_0_BYTES = 34, 22


def q8_0_to_int8(rows):
    """Raw Q8_0 rows (N, K / 32 * 34 bytes) -> (q int8 (N, K), scale fp32 (N, K / 32)): per block an
    fp16 d and 32 int8 values, w = d * q, so int8 with scale d is the same weight exactly."""
    return _int8_rows(rows, _Q8_0_BYTES, _q8_0_values)


def _q8_0_values(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks (n, 34) uint8 -> their 32 int8 values (n, 32), after the fp16 d."""
    return blocks[:, 2:].view(torch.int8)


def q5_0_to_int8(rows):
    """Raw Q5_0 rows -> (q int8 (N, K) in [-16, 15], scale fp32 (N, K / 32)): per block an fp16 d,
    32 high bits and 16 bytes of low nibbles (byte j: weight j low, weight j + 16 high),
    w = d * (q5 - 16): an int8 with scale d, exactly."""
    return _int8_rows(rows, _Q5_0_BYTES, _q5_0_signed)


def _int8_rows(rows, block_bytes: int, values):
    """(q int8 (N, K), d fp32 (N, K / 32)) of raw rows of 32-weight blocks that start with an fp16 d;
    `values(blocks)`: a (n, 32) int8 tensor of the blocks' integers."""
    return _int8_blocks(torch.from_numpy(np.array(rows, dtype=np.uint8, copy=True)), block_bytes, values)


def _int8_blocks(rows: torch.Tensor, block_bytes: int, values):
    """`_int8_rows` of raw rows already in a uint8 tensor (n, bytes per row)."""
    n = rows.shape[0]
    blocks = rows.reshape(-1, block_bytes)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    return values(blocks).reshape(n, -1), d.view(n, -1)


def _int8_dequantizer(kind):
    """Raw Q8_0 or Q5_0 rows (n, bytes) uint8 -> fp32 (n, K): d * q, int8 times fp32 in fp32, exact;
    into `out` (an fp32 (n, K) tensor) when given."""
    from gguf import GGMLQuantizationType as T

    block_bytes, values = (_Q8_0_BYTES, _q8_0_values) if kind == T.Q8_0 else (_Q5_0_BYTES, _q5_0_signed)

    def decode(rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        q, d = _int8_blocks(rows, block_bytes, values)
        if out is None:
            return (q.view(-1, _INT8_BLOCK) * d.view(-1, 1)).view(rows.shape[0], -1)
        torch.mul(q.view(-1, _INT8_BLOCK), d.view(-1, 1), out=out.view(-1, _INT8_BLOCK))
        return out
    return decode


def _exact_converters(int4_mode: bool):
    """GGUF block type -> (the quantised layouts of the model it may replace, function (tensor, bias)
    -> exact layer). In the int4 modes (group 32) Q4_K replaces int4 and int8 layers alike, and
    Q6_K the int8 ones (v_proj, down_proj, the lm_head), both as their super-blocks kept byte for byte
    (`qwen2.quant.kquant`: 4.5 and 6.5625 bits per weight, against 6 for Q4_K copied into int4 groups of 32
    with fp32 scales and 8.5 for Q6_K requantised to int8). Q8_0 and Q5_0 are int8 groups of 32 exactly."""
    from gguf import GGMLQuantizationType as T

    return {T.Q4_K: (("int4", "int8") if int4_mode else (),
                     lambda t, b, out=None: Q4KLinear(_raw_rows(t, out and out[0]), b)),
            T.Q6_K: (("int8",) if int4_mode else (), lambda t, b, out=None: Q6KLinear(_raw_rows(t, out and out[0]), b)),
            T.Q8_0: (("int8",), lambda t, b, out=None: _int8_linear(t, b, _stored_int8(q8_0_to_int8), out)),
            T.Q5_0: (("int8",), lambda t, b, out=None: _int8_linear(t, b, _stored_int8(q5_0_to_int8), out))}


def exact_buffer_shapes(tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each buffer of the exact layer `exact_converter` makes of this tensor, in the
    order its `out=` takes them: Q4_K/Q6_K rows as they are, Q8_0/Q5_0 int8 values and fp32 scales."""
    from gguf import GGMLQuantizationType as T

    N, K = (int(n) for n in reversed(tensor.shape))
    if tensor.tensor_type in (T.Q4_K, T.Q6_K):
        return [((N, int(tensor.data.shape[-1])), torch.uint8)]
    return [((N, K), torch.uint8), ((N, K // _INT8_BLOCK), torch.float32)]


def _raw_rows(tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A GGUF tensor's raw block rows, uint8 (N, bytes per row), copied into `out` (or a new tensor):
    read from its file where the tensor can (`read_into`: none of the file's pages mapped here)."""
    if out is None:
        out = torch.empty(tuple(tensor.data.shape), dtype=torch.uint8)
    read_into = getattr(tensor, "read_into", None)
    if read_into is not None and getattr(tensor, "path", ""):
        read_into(out.numpy())
    else:
        out.numpy()[...] = tensor.data
    return out


def takes_q4k(mode: str, group_size: int | None) -> bool:
    """Whether a model quantised to `mode` at `group_size` takes Q4_K (and Q6_K) super-blocks as they are:
    the int4 modes at group size 32, Q4_K's sub-block."""
    return mode.startswith("int4") and group_size == _Q4K_GROUP


def exact_converter(tensor_type, layout: str, q4k: bool):
    """The function (GGUF tensor, bias, out=None) -> exact layer that takes the place of a linear quantised to
    `layout` ("int4" or "int8") from a tensor of `tensor_type`; None where that tensor's blocks are not
    held exactly by a layer that may stand in for that layout. `q4k`: `takes_q4k` of the model's mode.
    `out`: the layer's buffers (`exact_buffer_shapes`) to fill and keep instead of new tensors."""
    rule = _exact_converters(q4k).get(tensor_type)
    return rule[1] if rule is not None and layout in rule[0] else None


def q4k_int4_linear(tensor, bias=None):
    """A `qwen2.quant.linear.Int4Linear` (group 32, fp32 scales and mins) computing exactly the weight
    of a Q4_K tensor, converted in row chunks so that temporaries stay small (an lm_head too).
    Loading now keeps Q4_K's super-blocks instead (`qwen2.quant.kquant.Q4KLinear`, 4.5 bits per weight
    against these 6); this layout stays for comparison (benchmarks/speed/bench_kquant_kernels.py)."""
    N, K = (int(n) for n in reversed(tensor.shape))
    groups = (N, K // _Q4K_GROUP)
    out = (torch.empty(N, K // 2, dtype=torch.uint8), torch.empty(groups, dtype=torch.float32),
           torch.empty(groups, dtype=torch.float32))  # packed weights, fp32 scales, fp32 mins
    fill_in_row_chunks(tensor.data, q4k_to_packed_int4, out, K)
    return Int4Linear(*out, _Q4K_GROUP, bias)


def _int8_linear(tensor, bias, stored, out=None):
    """A `qwen2.quant.linear.Int8Linear` (group 32, fp32 scales) computing exactly the weight of a
    Q8_0/Q5_0 tensor (`stored` reads its blocks as Int8Linear keeps them), in row chunks."""
    N, K = (int(n) for n in reversed(tensor.shape))
    out = out or (torch.empty(N, K, dtype=torch.uint8), torch.empty(N, K // _INT8_BLOCK, dtype=torch.float32))
    fill_in_row_chunks(tensor.data, stored, out, K)
    return Int8Linear(*out, _INT8_BLOCK, bias)


def _stored_int8(to_int8):
    """Raw rows -> Int8Linear's stored form of `to_int8`'s values: the int8 value + 128, i.e. the byte
    with its top bit flipped, (N, K) uint8; and the scale fp32 (N, K / 32)."""
    def stored(rows):
        q, d = to_int8(rows)
        return q.view(torch.uint8) ^ 0x80, d
    return stored


# --------------------------------------------------------------------------------------------------
# Dequantising GGUF tensors, a few rows at a time
# --------------------------------------------------------------------------------------------------

def dequantize_rows(tensor, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows start:stop of a GGUF tensor (a `GGUFTensor`-like: `data` its raw rows, innermost dim
    last) as fp32 (stop - start, K), bit for bit what `gguf.quants.dequantize` gives them: Q8_0, Q5_0,
    Q4_K and Q6_K decoded here (the products d * q are exact in fp32, so any order of computing them
    gives the same bits; Q4_K's and Q6_K's decoders are `qwen2.quant.kquant`'s, natively when the
    kernels are built), F32/F16 read directly, any other type by gguf-py. A 1-D tensor is one row.
    `out`: an fp32 (stop - start, K) tensor to write them into (and return) instead of a new one."""
    data = tensor.data.reshape(-1, tensor.data.shape[-1])  # (rows, raw row): a 1-D tensor is one row
    return decode_rows(data[start:stop], tensor.tensor_type, tensor.name, out)


def decode_rows(rows, kind, name: str = "the tensor", out: torch.Tensor | None = None) -> torch.Tensor:
    """Raw rows of a GGUF tensor of type `kind` (a numpy array (n, raw row), as `GGUFTensor.data`
    holds them) as fp32 (n, K): `dequantize_rows`, for any rows picked. `name` is for errors."""
    from gguf import GGMLQuantizationType as T

    if kind in (T.Q8_0, T.Q5_0):
        return _int8_dequantizer(kind)(torch.from_numpy(np.array(rows, dtype=np.uint8, copy=True)), out)
    if kind == T.F32:
        w = torch.from_numpy(np.array(rows, dtype=np.float32, copy=True))
    elif kind == T.F16:
        w = torch.from_numpy(rows.astype(np.float32))
    elif kind in (T.Q4_K, T.Q6_K):
        raw = torch.from_numpy(np.array(rows, dtype=np.uint8, copy=True))
        ops = kernels.ops()
        if kind == T.Q4_K:
            w = ops.q4k_dequantize(raw) if ops is not None else q4k_dequantize(raw)
        else:
            w = ops.q6k_dequantize(raw) if ops is not None else q6k_dequantize(raw)
    else:
        from gguf import quants

        try:
            array = quants.dequantize(np.asarray(rows), kind)
        except NotImplementedError:
            raise Qwen2Error(f"tensor {name} has GGUF type {kind.name}, which the gguf package cannot "
                             "dequantise; convert the model with another quantisation") from None
        w = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(len(rows), -1))
    return w if out is None else out.copy_(w)


def _q5_0_signed(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_0 blocks (n, 22) uint8 -> their values q5 - 16, int8 (n, 32) in [-16, 15]: the low nibbles
    (byte j of the 16: weight j low, j + 16 high) plus, per weight, 0 where its fifth bit (bit i of the
    little-endian uint32 before them) is set and -16 where not, looked up a byte (8 weights) at a time."""
    q = _Q5_0_HIGH.index_select(0, blocks[:, 2:6].reshape(-1).int()).view(-1, 32)
    nibbles = blocks[:, 6:]
    q[:, :16] += (nibbles & 0x0F).view(torch.int8)
    q[:, 16:] += (nibbles >> 4).view(torch.int8)
    return q


# byte -> its 8 bits as weights' fifth bits, low bit first: 0 where set (q5 - 16 = low nibble), -16 where not
_Q5_0_HIGH = (((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(torch.int8) - 1) * 16


class DequantizedRows:
    """A 2-D GGUF tensor read as a float matrix (N, K) that only its rows asked for are dequantised of
    (`dequantize_rows`), rounded to `dtype`: what `qwen2.quant.linear.fill_in_row_chunks` (and so
    `Int4Linear.from_float`) takes, so a layer is quantised from its GGUF tensor a chunk of rows at a
    time, never the whole tensor in fp32."""

    def __init__(self, tensor, dtype: torch.dtype = torch.float32):
        self.tensor, self.dtype = tensor, dtype
        self.shape = tuple(int(n) for n in reversed(tensor.shape))

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("DequantizedRows takes contiguous row slices only")
        w = dequantize_rows(self.tensor, start, stop)
        return w if self.dtype == torch.float32 else w.to(self.dtype)


class GGUFEmbedding(nn.Module):
    """The token embedding read from its GGUF tensor as the file holds it, as llama.cpp reads
    token_embd: each looked-up row decoded (bit for bit that row of the dequantised table) and rounded
    to `dtype`. No table is made: the rows stay in the file's pages (a private mapping), which the OS
    brings in as they are first looked up (a conversation touches a few thousand of the 151,936 rows),
    where the dequantised fp32 table would hold 544 MB (0.5B) or 933 MB (1.5B). The decoder is chosen
    here, once, for the tensor's type: PyTorch ops for Q8_0, Q5_0, Q4_K, Q6_K and floats (so a
    compiled decode step traces it), gguf-py for any other type."""

    def __init__(self, tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = (int(n) for n in reversed(tensor.shape))
        N = self.num_embeddings
        raw = np.memmap(tensor.path, dtype=np.uint8, mode="c", offset=tensor.offset, shape=(N, tensor.n_bytes // N))
        self.rows = torch.from_numpy(raw)  # copy-on-write: writable for torch, never written
        self.kind, self.dtype = tensor.tensor_type, dtype
        self.decode = _row_decoder(tensor.tensor_type, tensor.name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.decode(self.rows[input_ids.reshape(-1)])  # (B*T, C) fp32
        return rows.to(self.dtype).view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the GGUF's token_embd ({self.kind.name})"


def _row_decoder(kind, name: str):
    """Raw rows (n, bytes) uint8 -> fp32 (n, K) for a GGUF tensor type, as `dequantize_rows` decodes them."""
    from gguf import GGMLQuantizationType as T

    decoders = {T.Q8_0: _int8_dequantizer(T.Q8_0), T.Q5_0: _int8_dequantizer(T.Q5_0),
                T.Q4_K: q4k_dequantize, T.Q6_K: q6k_dequantize,
                T.F32: lambda rows: rows.view(torch.float32),
                T.F16: lambda rows: rows.view(torch.float16).float(),
                T.BF16: lambda rows: rows.view(torch.bfloat16).float()}
    return decoders.get(kind) or (lambda rows: decode_rows(rows.numpy(), kind, name))


def dequantize_tensor(tensor, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """A whole GGUF tensor dequantised (`dequantize_rows`), in PyTorch's shape (its dims reversed) and
    `dtype`, filled in row chunks into `out` (or a new tensor): the only full-size tensor made is the result."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    out = torch.empty(shape, dtype=dtype) if out is None else out.view(dtype).view(shape)
    flat = out.view(-1, shape[-1])
    step = max(1, _DEQUANT_CHUNK // shape[-1])
    for a in range(0, flat.shape[0], step):
        b = min(a + step, flat.shape[0])
        if dtype == torch.float32:
            dequantize_rows(tensor, a, b, out=flat[a:b])
        else:
            flat[a:b] = dequantize_rows(tensor, a, b)
    return out


_DEQUANT_CHUNK = 1 << 20  # weights per chunk: its temporaries stay in the cache


def exact_block_types(model) -> set:
    """The GGUF block types `convert_exact_linears` may take into this quantised model."""
    return set(_exact_converters(_int4_at_q4k_group(model)))


def _int4_at_q4k_group(model) -> bool:
    return takes_q4k(model.quantization["mode"], model.quantization.get("group_size"))


def convert_exact_linears(model, tensors: dict, release=None, source: str = "the GGUF",
                          progress: bool = True) -> dict[str, int]:
    """Replace quantised linears of `model` (the block projections, and the lm_head when it is
    quantised) by the exact equivalent of their GGUF tensor where its blocks map losslessly onto our
    layouts: in the int4 modes (group 32) Q4_K super-blocks as they are for any quantised layer (an
    exact 4.5-bit layer beats requantising to int4 or int8) and Q6_K ones for the int8 layers; Q8_0 and
    Q5_0 onto int8 groups of 32 (layers that are int8 anyway). See `_exact_converters`.
    Returns {"Q4_K": n, "Q6_K": n, "Q8_0": n, "Q5_0": n} for the layers converted, and names the
    lm_head's new layout in `model.quantization`. The embedding, where nothing else uses its table,
    becomes the GGUF's token_embd read row by row (`GGUFEmbedding`). Why: requantising the dequantised blocks adds a
    second rounding error to weights that are already integers times a per-block scale (and costs
    more bits). `tensors`: HF parameter name -> GGUF tensor, of the block types `exact_block_types`
    names (and token_embd, whatever its type), from the GGUF the weights came from (`source`);
    `release(tensor)` after each linear's is taken."""
    converters = _exact_converters(_int4_at_q4k_group(model))
    tensors = dict(tensors)
    tied = model.config.tie_word_embeddings and "model.embed_tokens.weight" in tensors
    if tied:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # a tied head is the embedding
    targets = [name for name, module in model.named_modules()
               if f"{name}.weight" in tensors and isinstance(module, (Int4Linear, Int8Linear))
               and module.mode in converters.get(tensors[f"{name}.weight"].tensor_type, ((),))[0]]
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
    embedding = tensors.get("model.embed_tokens.weight")
    if embedding is not None and embedding_stands_alone(model):
        model.model.embed_tokens = GGUFEmbedding(embedding, model.model.embed_tokens.weight.dtype)
    return counts


def embedding_stands_alone(model) -> bool:
    """Whether the model's embedding is a table that nothing else uses (no fp32 head tied to it, no
    `QuantEmbedding` reading a head): then a GGUF's own token_embd can take its place (`GGUFEmbedding`)."""
    embedding, head = model.model.embed_tokens, model.lm_head
    return isinstance(embedding, nn.Embedding) and getattr(head, "weight", None) is not embedding.weight
