"""Read GGUF files of architecture `qwen2`: metadata, config, dequantised weights."""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Any

from ..errors import Qwen2Error


def open_gguf(path: str | os.PathLike):
    """A `GGUFFile` over the file (metadata parsed, tensors memory-mapped), or a one-line
    Qwen2Error if it is not a readable GGUF."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise Qwen2Error(f"no such GGUF file: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise Qwen2Error(f"{path} is not a GGUF file (no GGUF magic); pass a .gguf model file")
    try:
        return GGUFFile(path)
    except Qwen2Error:
        raise
    except Exception as e:  # struct/Unicode/numpy errors on a damaged file
        raise Qwen2Error(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); download or assemble it again") from None


def read_metadata(reader) -> dict[str, Any]:
    """All key/value metadata as plain Python values (str, int, float, bool, lists), from a
    `GGUFFile` or a `gguf.GGUFReader`."""
    if isinstance(reader, GGUFFile):
        return dict(reader.metadata)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, as `gguf.GGUFReader` describes it: `shape` lists the dims
    innermost first; `data` is a read-only view of the file (elements for float/int types, raw
    blocks as uint8 rows for quantised ones), ready for `gguf.quants.dequantize`."""
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: Any  # numpy array
    n_bytes: int


class GGUFFile:
    """A little-endian GGUF (version 2 or 3): `metadata` (key -> Python value), `tensors`.

    gguf.GGUFReader builds numpy views for every item of every metadata array, which takes ~10 s
    for a Qwen2 vocabulary (450k tokens, merges and types); this parses the same layout with
    `struct` in well under a second. Every read is bounds-checked, so a truncated file raises.
    """

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    _STRING, _ARRAY = 8, 9

    def __init__(self, path: str):
        import numpy as np
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = path
        self._mm = np.memmap(path, mode="r")
        buf = self._buf = memoryview(self._mm)
        self._pos = 4  # after the magic
        version = self._scalar("<I")
        if version not in (2, 3):
            raise Qwen2Error(f"{path} is GGUF version {version}; only versions 2 and 3 (little-endian) are supported")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar("<I")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, self._advance(8 * n_dims))
            infos.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise Qwen2Error(f"{path} has an invalid general.alignment ({alignment!r}); the file is corrupt")
        data_start = -(-self._pos // alignment) * alignment
        float_types = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                       GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                       GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                       GGMLQuantizationType.I64: np.int64}
        self.tensors: list[GGUFTensor] = []
        names = set()
        for name, dims, raw_type, offset in infos:
            if name in names:
                raise Qwen2Error(f"{path} holds tensor {name} twice; the file is corrupt")
            names.add(name)
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise Qwen2Error(f"tensor {name} in {path} has unknown GGML type {raw_type}; the file is corrupt "
                                 "or newer than the installed gguf package") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_elements = math.prod(dims)
            if not dims or dims[0] % block:
                raise Qwen2Error(f"tensor {name} in {path} has shape {list(dims)}, not whole {qtype.name} blocks; "
                                 "the file is corrupt")
            n_bytes = n_elements // block * type_size
            begin = data_start + offset
            if begin + n_bytes > len(buf):
                raise Qwen2Error(f"{path} is truncated: tensor {name} needs bytes {begin}..{begin + n_bytes}, the file "
                                 f"has {len(buf)}; download or assemble it again")
            raw = self._mm[begin:begin + n_bytes]
            outer = tuple(reversed(dims[1:]))
            if qtype in float_types:
                data = raw.view(float_types[qtype]).reshape(outer + (dims[0],))
            else:
                data = raw.reshape(outer + (dims[0] // block * type_size,))
            self.tensors.append(GGUFTensor(name, qtype, tuple(dims), data, n_bytes))

    def release(self, tensor: GGUFTensor) -> None:
        """Drop the file pages under `tensor` from this process (touching it again re-reads them):
        converting tensor by tensor then holds one tensor's pages at a time, not the whole file's."""
        import mmap

        mapping = getattr(self._mm, "_mmap", None)  # numpy's mmap.mmap under the memmap (offset 0)
        if mapping is None or not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = tensor.data.__array_interface__["data"][0] - self._mm.__array_interface__["data"][0]
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: neighbours keep theirs
        last = (start + tensor.n_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)

    def _advance(self, n: int) -> int:
        start = self._pos
        if n < 0 or start + n > len(self._buf):
            raise Qwen2Error(f"{self.path} is truncated: it ends inside its header at byte {len(self._buf)}; "
                             "download or assemble it again")
        self._pos = start + n
        return start

    def _scalar(self, fmt: str):
        return struct.unpack_from(fmt, self._buf, self._advance(struct.calcsize(fmt)))[0]

    def _string(self) -> str:
        n = self._scalar("<Q")
        start = self._advance(n)
        return str(self._buf[start:start + n], "utf-8")

    def _value(self, vtype: int):
        if vtype in self._SCALARS:
            return self._scalar(self._SCALARS[vtype])
        if vtype == self._STRING:
            return self._string()
        if vtype == self._ARRAY:
            item_type, n = self._scalar("<I"), self._scalar("<Q")
            if item_type in self._SCALARS:
                fmt = self._SCALARS[item_type]
                size = struct.calcsize(fmt)
                return list(struct.unpack_from(f"<{n}{fmt[1]}", self._buf, self._advance(size * n)))
            if item_type == self._STRING:
                return self._strings(n)
            return [self._value(item_type) for _ in range(n)]
        raise Qwen2Error(f"{self.path} has a metadata value of unknown type {vtype}; the file is corrupt")

    def _strings(self, n: int) -> list[str]:
        buf, pos, end, unpack = self._buf, self._pos, len(self._buf), struct.Struct("<Q").unpack_from
        out = []
        for _ in range(n):
            if pos + 8 > end:
                break
            (length,) = unpack(buf, pos)
            pos += 8
            if pos + length > end:
                break
            out.append(str(buf[pos:pos + length], "utf-8"))
            pos += length
        self._pos = pos
        if len(out) < n:
            self._advance(end + 1)  # raises: truncated
        return out


# llama.cpp tensor names -> HF names. Qwen2 uses the rotate-half RoPE layout, so unlike llama
# GGUFs no q/k row permutation has to be undone.
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    # Anything else (rope_freqs.weight, a LoRA or MoE tensor, ...) is not part of a plain Qwen2 model.
    parts = gguf_name.split(".", 2)
    if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or parts[2] not in _LAYER_TENSORS:
        raise Qwen2Error(f"unexpected tensor {gguf_name!r} in a qwen2 GGUF; the file is not a plain Qwen2 model")
    return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}"


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str]):
    from ..config import Qwen2Config

    arch = meta.get("general.architecture")
    if arch != "qwen2":
        raise Qwen2Error(f"GGUF architecture is {arch!r}, not 'qwen2'; this project runs Qwen2-architecture models only")

    def get(key):
        if f"qwen2.{key}" not in meta:
            raise Qwen2Error(f"GGUF metadata lacks qwen2.{key}; the file is incomplete")
        return meta[f"qwen2.{key}"]

    n_vocab = meta.get("qwen2.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    return Qwen2Config(
        vocab_size=n_vocab,
        hidden_size=get("embedding_length"),
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=get("attention.head_count"),
        num_key_value_heads=meta.get("qwen2.attention.head_count_kv", get("attention.head_count")),
        max_position_embeddings=get("context_length"),
        rope_theta=_float32_value(meta.get("qwen2.rope.freq_base", 1e6)),
        rms_norm_eps=_float32_value(get("attention.layer_norm_rms_epsilon")),
        # llama.cpp omits output.weight when the output layer is the embedding
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        name=meta.get("general.name", ""),
    )


def _float32_value(x) -> float:
    """GGUF stores these as float32: 1e-6 arrives as 9.99999997e-07. Take the shortest decimal that
    rounds to the same float32 (what the original config.json said)."""
    import numpy as np

    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return x  # not a number: Qwen2Config reports it by name
    return float(repr(np.float32(x)).removeprefix("np.float32(").removesuffix(")"))


def dequantized_tensors(reader, progress: bool = True):
    """Yield (hf_name, fp32 torch tensor) for every tensor, dequantising block formats."""
    import numpy as np
    import torch
    from gguf import quants

    from ..progress import progress_bar

    for t in progress_bar(reader.tensors, desc="dequantising GGUF", unit="tensor", disable=not progress):
        name = hf_tensor_name(t.name)
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims innermost first
        try:
            array = quants.dequantize(t.data, t.tensor_type)  # F32/F16/BF16 too, as float32
        except NotImplementedError:
            raise Qwen2Error(f"tensor {t.name} has GGUF type {t.tensor_type.name}, which the gguf package cannot "
                             "dequantise; convert the model with another quantisation") from None
        array = np.ascontiguousarray(array, dtype=np.float32).reshape(shape)
        if not array.flags.writeable:  # F32 tensors are views of the memory-mapped file
            array = array.copy()
        yield name, torch.from_numpy(array)


def load_gguf(path, progress: bool = True):
    """(config, state_dict of fp32 tensors, tokenizer) from a qwen2 GGUF file."""
    from ..tokenizer import Tokenizer

    reader = open_gguf(path)
    meta = read_metadata(reader)
    # The embedding's rows are the vocabulary the weights have (llama.cpp writes no vocab_size key),
    # whatever the tokenizer metadata holds.
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if "qwen2.vocab_size" not in meta and embedding is not None and len(embedding.shape) == 2:
        meta["qwen2.vocab_size"] = int(embedding.shape[1])
    config = config_from_metadata(meta, {t.name for t in reader.tensors})
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    state_dict = dict(dequantized_tensors(reader, progress))
    return config, state_dict, tokenizer


# --------------------------------------------------------------------------------------------------
# Q4_K blocks as int4 weights, losslessly
# --------------------------------------------------------------------------------------------------

# Q4_K stores 256 weights in 144 bytes: fp16 d, fp16 dmin, 12 bytes holding eight 6-bit scales and
# eight 6-bit mins (one per sub-block of 32), then 128 bytes of nibbles. Weight i of sub-block j is
# d * sc_j * q_i - dmin * m_j: exactly `qwen2.quantize`'s int4 form q * scale + min at group size 32.
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
    import numpy as np
    import torch

    qs, scale, minimum = _q4k_fields(rows)
    # 128 bytes = 4 runs of 32: the low nibbles of run r are sub-block 2r, the high nibbles 2r + 1
    q = np.concatenate((qs[:, :, None] & 0x0F, qs[:, :, None] >> 4), axis=2).reshape(scale.shape[0], -1)
    return torch.from_numpy(q), torch.from_numpy(scale), torch.from_numpy(minimum)


def q4k_to_packed_int4(rows):
    """As `q4k_to_int4`, but q already packed as `qwen2.quantize.pack_int4` packs it (N, K / 2),
    straight from the nibbles: per sub-block, byte j = weight j | weight j + 16 << 4."""
    import numpy as np
    import torch

    qs, scale, minimum = _q4k_fields(rows)
    first, second = qs[..., :16], qs[..., 16:]  # weights 0-15 and 16-31 of sub-blocks 2r, 2r + 1
    low_sub = (first & 0x0F) | (second << 4)  # uint8: the shift drops the high nibble
    high_sub = (first >> 4) | (second & 0xF0)
    packed = np.stack((low_sub, high_sub), axis=2).reshape(scale.shape[0], -1)
    return torch.from_numpy(packed), torch.from_numpy(scale), torch.from_numpy(minimum)


def _q4k_fields(rows):
    """(nibble bytes (N * K / 256, 4, 32), scale and min fp32 (N, K / 32)) of raw Q4_K rows."""
    import numpy as np

    rows = np.asarray(rows, dtype=np.uint8)
    N = rows.shape[0]
    blocks = rows.reshape(-1, _Q4K_BYTES)
    d = blocks[:, 0:2].view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].view(np.float16).astype(np.float32)
    sc, m = _q4k_scales_mins(blocks[:, 4:16])
    scale = d * sc.astype(np.float32)  # the products gguf's dequantize forms, in the same dtype
    minimum = -(dmin * m.astype(np.float32))
    return blocks[:, 16:].reshape(-1, 4, 32), scale.reshape(N, -1), minimum.reshape(N, -1)


def _q4k_scales_mins(packed):
    """12 bytes per block -> eight 6-bit scales and eight 6-bit mins (llama.cpp's get_scale_min_k4):
    bytes 0-3 hold scales 0-3 in their low 6 bits (and the top 2 bits of scales 4-7), bytes 4-7 the
    mins 0-3 likewise (top bits of mins 4-7), bytes 8-11 the low 4 bits of scale (low nibble) and
    min (high nibble) 4-7."""
    import numpy as np

    b = packed.reshape(-1, 3, 4)
    s_lo, m_lo, extra = b[:, 0], b[:, 1], b[:, 2]
    sc = np.concatenate((s_lo & 0x3F, (extra & 0x0F) | ((s_lo >> 2) & 0x30)), axis=-1)
    m = np.concatenate((m_lo & 0x3F, (extra >> 4) | ((m_lo >> 2) & 0x30)), axis=-1)
    return sc, m


_INT8_BLOCK = 32
_Q8_0_BYTES, _Q5_0_BYTES = 34, 22


def q8_0_to_int8(rows):
    """Raw Q8_0 rows (N, K / 32 * 34 bytes) -> (q int8 (N, K), scale fp32 (N, K / 32)): per block an
    fp16 d and 32 int8 values, w = d * q, so int8 with scale d is the same weight exactly."""
    import numpy as np
    import torch

    rows = np.asarray(rows, dtype=np.uint8)
    blocks = rows.reshape(-1, _Q8_0_BYTES)
    d = blocks[:, :2].view(np.float16).astype(np.float32)
    q = blocks[:, 2:].view(np.int8)
    return torch.from_numpy(q.reshape(rows.shape[0], -1).copy()), torch.from_numpy(d.reshape(rows.shape[0], -1))


def q5_0_to_int8(rows):
    """Raw Q5_0 rows -> (q int8 (N, K) in [-16, 15], scale fp32 (N, K / 32)): per block an fp16 d,
    32 high bits and 16 bytes of low nibbles (byte j: weight j low, weight j + 16 high),
    w = d * (q5 - 16): an int8 with scale d, exactly."""
    import numpy as np
    import torch

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
    (`qwen2.kquant`: 4.5 and 6.5625 bits per weight, against 6 for Q4_K copied into int4 groups of 32
    with fp32 scales and 8.5 for Q6_K requantised to int8). Q8_0 and Q5_0 are int8 groups of 32 exactly."""
    from gguf import GGMLQuantizationType as T

    from ..kquant import Q4KLinear, Q6KLinear
    from ..quantize import Int4Linear, Int8Linear

    return {T.Q4_K: ((Int4Linear, Int8Linear) if int4_mode else (), Q4KLinear.from_gguf),
            T.Q6_K: ((Int8Linear,) if int4_mode else (), Q6KLinear.from_gguf),
            T.Q8_0: ((Int8Linear,), lambda t, b: _int8_linear(t, b, q8_0_to_int8)),
            T.Q5_0: ((Int8Linear,), lambda t, b: _int8_linear(t, b, q5_0_to_int8))}


def block_tensors(reader, types) -> dict[str, GGUFTensor]:
    """HF parameter name -> GGUF tensor, for every tensor of a `GGUFFile` stored in one of `types`."""
    return {hf_tensor_name(t.name): t for t in reader.tensors if t.tensor_type in types}


def q4k_int4_linear(tensor: GGUFTensor, bias=None):
    """A `qwen2.quantize.Int4Linear` (group 32, fp32 scales and mins) computing exactly the weight
    of a Q4_K tensor, converted in row chunks so that temporaries stay small (an lm_head too).
    Loading now keeps Q4_K's super-blocks instead (`qwen2.kquant.Q4KLinear`, 4.5 bits per weight
    against these 6); this layout stays for comparison (benchmarks/bench_kquant_kernels.py)."""
    import torch

    from ..quantize import Int4Linear, fill_in_row_chunks

    N, K = (int(n) for n in reversed(tensor.shape))
    groups = (N, K // _Q4K_GROUP)
    out = (torch.empty(N, K // 2, dtype=torch.uint8), torch.empty(groups, dtype=torch.float32),
           torch.empty(groups, dtype=torch.float32))  # packed weights, fp32 scales, fp32 mins
    fill_in_row_chunks(tensor.data, q4k_to_packed_int4, out, K)
    return Int4Linear(*out, _Q4K_GROUP, bias)


def _int8_linear(tensor: GGUFTensor, bias, to_int8):
    """A `qwen2.quantize.Int8Linear` (group 32, fp32 scales) computing exactly the weight of a
    Q8_0/Q5_0 tensor (`to_int8` reads its blocks), in row chunks."""
    import torch

    from ..quantize import Int8Linear, fill_in_row_chunks

    def stored(rows):  # Int8Linear keeps the int8 value + 128
        values, scale = to_int8(rows)
        return (values.to(torch.int16) + 128).to(torch.uint8), scale

    N, K = (int(n) for n in reversed(tensor.shape))
    out = (torch.empty(N, K, dtype=torch.uint8), torch.empty(N, K // _INT8_BLOCK, dtype=torch.float32))
    fill_in_row_chunks(tensor.data, stored, out, K)
    return Int8Linear(*out, _INT8_BLOCK, bias)


def convert_exact_linears(model, path, progress: bool = True) -> dict[str, int]:
    """Replace quantised linears of `model` (the block projections, and the lm_head when it is
    quantised) by the exact equivalent of their GGUF tensor where its blocks map losslessly onto our
    layouts: in the int4 modes (group 32) Q4_K super-blocks as they are for any quantised layer (an
    exact 4.5-bit layer beats requantising to int4 or int8) and Q6_K ones for the int8 layers; Q8_0 and
    Q5_0 onto int8 groups of 32 (layers that are int8 anyway). See `_exact_converters`.
    Returns {"Q4_K": n, "Q6_K": n, "Q8_0": n, "Q5_0": n} for the layers converted, and names the
    lm_head's new layout in `model.quantization`. Why: requantising the dequantised blocks adds a
    second rounding error to weights that are already integers times a per-block scale (and costs
    more bits). The GGUF must be the one the weights came from."""
    from ..progress import progress_bar
    from ..quantize import QuantEmbedding

    reader = open_gguf(path)
    int4_mode = model.quantization["mode"].startswith("int4") and model.quantization.get("group_size") == _Q4K_GROUP
    converters = _exact_converters(int4_mode)
    tensors = block_tensors(reader, converters)
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
                             f"{name} is {[module.out_features, module.in_features]}; {path} is not this model's file")
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
        reader.release(tensor)
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
        model.quantization.setdefault("gguf_layouts", {})[tensor.tensor_type.name] = exact.mode  # for describe()
    return counts
