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
    path: str = ""  # the file, and where in it `data` starts: for `read_into`
    offset: int = 0

    def read_into(self, out) -> None:
        """Copy the tensor's raw bytes into `out` (a writable buffer of `n_bytes`: a numpy array or CPU
        tensor's), read from the file, not through `data`: no page of the file gets mapped into this
        process (touching `data` maps each page, 4 KB at a time, until released)."""
        view = memoryview(out).cast("B")
        if view.nbytes != self.n_bytes:
            raise ValueError(f"{self.name}: {self.n_bytes} bytes do not fit a buffer of {view.nbytes}")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            done = 0
            while done < self.n_bytes:
                n = f.readinto(view[done:])
                if not n:
                    raise Qwen2Error(f"{self.path} is truncated inside tensor {self.name}; download or assemble it again")
                done += n


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
            self.tensors.append(GGUFTensor(name, qtype, tuple(dims), data, n_bytes, path, begin))

    def forget_vocabulary(self) -> None:
        """Drop the tokenizer's arrays (`tokenizer.ggml.*` lists) from `metadata` once a tokenizer is built
        from them: as Python objects they hold ~40 MB for Qwen2's 151,936 tokens and 151,387 merges."""
        self.metadata = {k: v for k, v in self.metadata.items()
                         if not (k.startswith("tokenizer.ggml.") and isinstance(v, list))}

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


def read_gguf(path):
    """(the `GGUFFile`, config, tokenizer) of a qwen2 GGUF file: its header only, no weight read yet."""
    from ..tokenizer import Tokenizer

    reader, meta, config = read_gguf_header(path)
    return reader, config, Tokenizer.from_gguf_metadata(meta)


def read_gguf_header(path):
    """(the `GGUFFile`, its metadata, config) of a qwen2 GGUF file."""
    reader = open_gguf(path)
    meta = read_metadata(reader)
    # The embedding's rows are the vocabulary the weights have (llama.cpp writes no vocab_size key),
    # whatever the tokenizer metadata holds.
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if "qwen2.vocab_size" not in meta and embedding is not None and len(embedding.shape) == 2:
        meta["qwen2.vocab_size"] = int(embedding.shape[1])
    return reader, meta, config_from_metadata(meta, {t.name for t in reader.tensors})


def load_gguf(path, progress: bool = True):
    """(config, state_dict of fp32 tensors, tokenizer) from a qwen2 GGUF file."""
    reader, config, tokenizer = read_gguf(path)
    state_dict = dict(dequantized_tensors(reader, progress))
    return config, state_dict, tokenizer


def block_tensors(reader, types) -> dict[str, GGUFTensor]:
    """HF parameter name -> GGUF tensor, for every tensor of a `GGUFFile` stored in one of `types`."""
    return {hf_tensor_name(t.name): t for t in reader.tensors if t.tensor_type in types}
