"""Long context, as in the Qwen2 report (§ "Long-context training"): YaRN, Dual Chunk Attention (DCA)
and sliding-window attention. The model (`qwen2/model.py`) only calls in here through small hooks.

YaRN (Peng et al. 2023) rescales RoPE "by parts": dimensions that turn many times over the trained
length (high frequency, local order) keep their frequency, dimensions that turn less than once
(low frequency, absolute position) are divided by the factor s, with a linear ramp in between; cos
and sin are multiplied by the attention factor 0.1·ln(s) + 1, which sharpens attention back
(the dot products scale by its square). Computed exactly as transformers' `_compute_yarn_parameters`.

Dynamic YaRN (ours, opt-in with `"dynamic": true` in rope_scaling): plain RoPE when the sequence fits
in the trained length, YaRN when it does not. Keys are cached already rotated, so the choice is made
once per sequence, from the length it may reach (the KV cache's `max_len`, i.e. prompt +
max_new_tokens in `generate`; the number of tokens in a cacheless forward): every key and query of a
sequence then uses one set of frequencies.

DCA (An et al. 2024) keeps every relative position the model sees below `chunk_size`. With
L = chunk_size - local_size, keys are rotated once at p mod L. A query at position p, in chunk
n = p // L, attends to
  its own chunk (causal)        as position p mod L                      (exact distances < L)
  the previous chunk n-1        as position min(L + p mod L, chunk_size) (exact up to chunk_size)
  every earlier chunk (< n-1)   as position chunk_size                   (distances in (local_size, chunk_size])
and one softmax spans all three: their partial results are merged by their log-sum-exp in fp32.
Queries are processed in blocks that never cross a chunk, keys in tiles, so memory stays linear in
the sequence length (no T×T matrix or position table is ever built).

Sliding window (transformers' Qwen2 semantics): with `use_sliding_window`, layers with index >=
`max_window_layers` let a query see only the `sliding_window` slots ending at its own (key slot >
query slot - window). The KV cache still keeps every key; the mask does the restricting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .errors import Qwen2Error

if TYPE_CHECKING:
    from .config import Qwen2Config

SUPPORTED_ROPE_TYPES = ("default", "yarn")
YARN_KEYS = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
             "attention_factor", "mscale", "mscale_all_dim", "truncate", "dynamic", "rope_theta"}
DCA_KEYS = {"chunk_size", "local_size", "original_max_position_embeddings"}
# The Qwen2.5-1M models' dual_chunk_attention_config has chunk_size 262144 = their trained length and
# local_size 8192 = chunk_size / 32; our DCA defaults keep that ratio for any trained length.
DCA_LOCAL_FRACTION = 32
# The context DCA alone opens: 4× the trained length, as the Qwen2 report extends 32K to 128K.
DCA_CONTEXT_FACTOR = 4
# Query block of the DCA loop (its parts' outputs are nh × block × hs); key tile of the tiled
# attention used off the CPU (bounds its fp32 score tile at nh × block × tile).
DCA_QUERY_BLOCK = 2048
DCA_KEY_TILE = 1024


# --- configuration ------------------------------------------------------------------------
def rope_type(rope_scaling: dict | None) -> str:
    """'default' or 'yarn' (HF writes the key as `rope_type`, older files as `type`)."""
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def config_problems(config: "Qwen2Config") -> list[str]:
    """What is wrong with the config's long-context fields, one phrase each (empty when fine)."""
    problems = []
    scaling = config.rope_scaling
    if scaling is not None and not isinstance(scaling, dict):
        return [f"rope_scaling must be a JSON object or null, got {scaling!r}"]
    kind = rope_type(scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        problems.append(f"rope_scaling type {kind!r} is not supported; use 'yarn' (or 'default' / null for plain RoPE)")
    elif kind == "yarn":
        factor, original = scaling.get("factor"), scaling.get("original_max_position_embeddings")
        if not (_is_number(factor) and factor >= 1):
            problems.append(f"rope_scaling factor must be a number >= 1, got {factor!r}")
        if original is not None and not _is_positive_int(original):
            problems.append("rope_scaling original_max_position_embeddings must be a positive integer, "
                            f"got {original!r}")
        for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
            if scaling.get(key) is not None and not _is_number(scaling[key]):
                problems.append(f"rope_scaling {key} must be a number, got {scaling[key]!r}")
        unknown = set(scaling) - YARN_KEYS
        if unknown:
            problems.append(f"rope_scaling has unknown key(s) {', '.join(sorted(unknown))} for yarn")
    if config.use_sliding_window:
        if not _is_positive_int(config.sliding_window):
            problems.append(f"sliding_window must be a positive integer when use_sliding_window is on, "
                            f"got {config.sliding_window!r}")
    if not isinstance(config.max_window_layers, int) or isinstance(config.max_window_layers, bool) \
            or config.max_window_layers < 0:
        problems.append(f"max_window_layers must be an integer >= 0, got {config.max_window_layers!r}")
    dca = config.dual_chunk_attention_config
    if dca is not None:
        if not isinstance(dca, dict):
            return problems + [f"dual_chunk_attention_config must be a JSON object or null, got {dca!r}"]
        chunk, local = dca.get("chunk_size"), dca.get("local_size")
        if not _is_positive_int(chunk) or not isinstance(local, int) or isinstance(local, bool) \
                or not 0 <= local < chunk:
            problems.append(f"dual_chunk_attention_config needs integers chunk_size > 0 and 0 <= local_size < "
                            f"chunk_size, got chunk_size={chunk!r}, local_size={local!r}")
        unknown = set(dca) - DCA_KEYS
        if unknown:
            problems.append(f"dual_chunk_attention_config has unknown key(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(sorted(DCA_KEYS))}")
        if config.use_sliding_window:
            problems.append("use_sliding_window and dual_chunk_attention_config cannot both be on; turn one off")
    return problems


def context_length(config: "Qwen2Config") -> int:
    """The longest sequence the model may run: max_position_embeddings, or the trained length ×
    the YaRN factor when that is more (the Qwen2.5 model cards add rope_scaling to a config.json
    whose max_position_embeddings stays 32768)."""
    n = config.max_position_embeddings
    if rope_type(config.rope_scaling) == "yarn":
        n = max(n, int(yarn_original_length(config) * config.rope_scaling["factor"]))
    return n


def trained_length(config: "Qwen2Config") -> int:
    """The context the model was trained on: YaRN's original length when the config has one."""
    if rope_type(config.rope_scaling) == "yarn":
        return yarn_original_length(config)
    return config.max_position_embeddings


def yarn_original_length(config: "Qwen2Config") -> int:
    """The trained length YaRN scales from (transformers defaults it to max_position_embeddings)."""
    return config.rope_scaling.get("original_max_position_embeddings") or config.max_position_embeddings


def parse_rope_scaling(spec: str | dict | None, config: "Qwen2Config") -> dict | None:
    """`"yarn:4"`, `"dynamic-yarn:4"`, `"yarn:4:32768"` (factor, original length), `"none"`, or a
    rope_scaling dict -> a rope_scaling dict (None for plain RoPE). The original length defaults to
    the config's max_position_embeddings."""
    if spec is None or isinstance(spec, dict):
        return spec
    if not isinstance(spec, str):
        raise Qwen2Error(f"rope_scaling must be a string like 'yarn:4' or a dict, got {spec!r}")
    if spec in ("none", "default"):
        return None
    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    try:
        factor = float(parts[0]) if parts else None
        original = int(parts[1]) if len(parts) > 1 else trained_length(config)
    except ValueError:
        factor = None
    if kind not in ("yarn", "dynamic-yarn") or factor is None or len(parts) > 2:
        raise Qwen2Error(f"rope scaling {spec!r} not understood; use yarn:FACTOR, dynamic-yarn:FACTOR or "
                         "yarn:FACTOR:ORIGINAL_LENGTH (e.g. yarn:4)")
    scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    if kind == "dynamic-yarn":
        scaling["dynamic"] = True
    return scaling


def dca_config(chunk_size: int | None, config: "Qwen2Config", local_size: int | None = None) -> dict:
    """A dual_chunk_attention_config: chunk_size defaults to the trained length (the longest
    relative position the model has seen), local_size to chunk_size / 32 (the Qwen2.5-1M ratio)."""
    original = trained_length(config)
    chunk_size = original if chunk_size is None else chunk_size
    if not _is_positive_int(chunk_size) or chunk_size < 2:
        raise Qwen2Error(f"DCA chunk size must be an integer >= 2, got {chunk_size!r}")
    local_size = max(1, chunk_size // DCA_LOCAL_FRACTION) if local_size is None else local_size
    return {"chunk_size": chunk_size, "local_size": local_size, "original_max_position_embeddings": original}


def extend_config(config: "Qwen2Config", rope_scaling: str | dict | None = None, dca: bool | int | dict | None = None,
                  preset: bool = False) -> "Qwen2Config":
    """The config with long-context options applied (None leaves the config's own setting).

    rope_scaling: "yarn:4", "dynamic-yarn:4", "yarn:4:32768", a rope_scaling dict, or "none".
    dca: True (chunk_size = the trained length), a chunk size, a dual_chunk_attention_config dict,
    or False (off). preset: the Qwen2.5 model cards' setting, YaRN factor 4 over the trained length,
    plus DCA with the defaults of `dca_config`.
    The usable context grows with them: trained length × factor under YaRN, at least
    DCA_CONTEXT_FACTOR × the trained length under DCA (its relative positions stay within chunk_size
    at any length; this is the extension the Qwen2 report evaluates)."""
    import dataclasses

    if preset:
        rope_scaling = "yarn:4" if rope_scaling is None else rope_scaling
        dca = True if dca is None else dca
    original = trained_length(config)
    context = config.max_position_embeddings
    changes = {}
    if rope_scaling is not None:
        scaling = parse_rope_scaling(rope_scaling, config)
        changes["rope_scaling"] = scaling
        if scaling is not None and rope_type(scaling) == "yarn" and _is_number(scaling.get("factor")):
            original = scaling.get("original_max_position_embeddings") or original
            context = max(context, int(original * scaling["factor"]))
    if dca is False:
        changes["dual_chunk_attention_config"] = None
    elif dca is not None:
        if isinstance(dca, dict):
            dca_dict = dict(dca)
        elif dca is True or _is_positive_int(dca):
            dca_dict = dca_config(None if dca is True else dca, config)
        else:
            raise Qwen2Error(f"dca must be True, a chunk size or a dual_chunk_attention_config dict, got {dca!r}")
        changes["dual_chunk_attention_config"] = dca_dict
        context = max(context, DCA_CONTEXT_FACTOR * dca_dict.get("original_max_position_embeddings", original))
    if not changes:
        return config
    return dataclasses.replace(config, **changes, max_position_embeddings=context)


# --- RoPE frequencies ---------------------------------------------------------------------
def rope_frequencies(config: "Qwen2Config", scaled: bool = True) -> tuple[torch.Tensor, float]:
    """(inv_freq (hs/2,), attention factor) of the config's RoPE; `scaled=False` gives plain RoPE."""
    hs = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.int64).float() / hs))
    if not scaled or rope_type(config.rope_scaling) != "yarn":
        return inv_freq, 1.0
    return yarn_frequencies(hs, config.rope_theta, config.rope_scaling, yarn_original_length(config))


def yarn_attention_factor(scaling: dict) -> float:
    """`attention_factor` if given, else 0.1·ln(s) + 1 (as a ratio of two such terms when the
    DeepSeek-style `mscale` and `mscale_all_dim` are both set)."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling["factor"]

    def temperature(mscale=1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0

    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return temperature(mscale) / temperature(mscale_all_dim)
    return temperature()


def yarn_frequencies(hs: int, theta: float, scaling: dict, original_length: int) -> tuple[torch.Tensor, float]:
    """YaRN's NTK-by-parts inv_freq (hs/2,) and attention factor."""
    factor = scaling["factor"]
    beta_fast = scaling.get("beta_fast") or 32  # rotations over the trained length above which a dim is kept
    beta_slow = scaling.get("beta_slow") or 1  # ... below which it is fully interpolated

    def dim_with_rotations(rotations: float) -> float:
        # The dimension index whose wavelength fits `rotations` times in the trained length.
        return hs * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_with_rotations(beta_fast), dim_with_rotations(beta_slow)
    if scaling.get("truncate", True):  # transformers' default: whole dimensions
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hs - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero
    # 0 for dims below `low` (kept), 1 above `high` (divided by the factor), linear in between
    ramp = ((torch.arange(hs // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    wavelength_base = theta ** (torch.arange(0, hs, 2, dtype=torch.int64).float() / hs)
    extrapolated, interpolated = 1.0 / wavelength_base, 1.0 / (factor * wavelength_base)
    keep = 1 - ramp
    return interpolated * (1 - keep) + extrapolated * keep, yarn_attention_factor(scaling)


def is_dynamic(config: "Qwen2Config") -> bool:
    return rope_type(config.rope_scaling) == "yarn" and bool(config.rope_scaling.get("dynamic"))


# --- sliding window -----------------------------------------------------------------------
def sliding_layers(config: "Qwen2Config") -> range:
    """Indices of the layers that slide (transformers: index >= max_window_layers)."""
    if not config.use_sliding_window:
        return range(0)
    return range(min(config.max_window_layers, config.num_hidden_layers), config.num_hidden_layers)


def sliding_window_mask(mask: torch.Tensor | None, start: int, T: int, S: int, window: int,
                        device=None) -> torch.Tensor:
    """`mask` (B, 1, T, S) boolean, or None for plain causal, restricted to the window: query slot q
    sees key slot k only if q - window < k <= q."""
    q_slot = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
    near = k_slot > q_slot - window  # (T, S)
    if mask is None:
        return (near & (k_slot <= q_slot))[None, None]  # (1, 1, T, S)
    return mask & near


def static_sliding_mask(mask: torch.Tensor, slot: torch.Tensor, window: int) -> torch.Tensor:
    """The compiled decode step's (B, 1, 1, max_len) mask restricted to the window ending at `slot`
    ((1,) or (B,), one new token per row)."""
    k_slot = torch.arange(mask.shape[-1], device=mask.device)
    return mask & (k_slot > slot.view(-1, 1, 1, 1) - window)


# --- Dual Chunk Attention -----------------------------------------------------------------
def dca_chunk_len(config: "Qwen2Config") -> int:
    """L = chunk_size - local_size: the keys' rotation period."""
    dca = config.dual_chunk_attention_config
    return dca["chunk_size"] - dca["local_size"]


@dataclass
class DualChunkContext:
    """What one forward's attention layers need for DCA (the model passes it instead of a mask)."""
    positions: torch.Tensor  # (B, T) positions of the new queries
    query_real: torch.Tensor  # (B, T) False for padding queries (their output is not computed)
    key_real: torch.Tensor  # (B, S) True for real keys (cached + new), False for padding
    rope: Callable[[torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor]]  # positions -> cos, sin
    chunk_size: int
    local_size: int

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dual_chunk_attention(q, k, v, self.positions, self.key_real, self.rope, self.chunk_size,
                                    self.local_size, query_real=self.query_real)


def dual_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                         key_real: torch.Tensor, rope, chunk_size: int, local_size: int,
                         query_real: torch.Tensor | None = None, query_block: int = DCA_QUERY_BLOCK,
                         key_tile: int = DCA_KEY_TILE) -> torch.Tensor:
    """Dual Chunk Attention of T new queries over S key slots -> (B, nh, T, hs).

    q (B, nh, T, hs) not rotated; k (B, nkv, S, hs) rotated at (key position mod L); v (B, nkv, S, hs).
    positions (B, T): the queries' positions. key_real (B, S): which slots hold real keys; a row's
    real keys in slot order have positions 0, 1, 2, ... (as the model assigns them). `rope`
    (positions, dtype) -> cos, sin. query_real (B, T), optional: False marks padding queries, whose
    outputs are left zero.
    """
    from .model import apply_rope

    B, nh, T, hs = q.shape
    L = chunk_size - local_size
    # The three rotations of every query (cheap: the size of q).
    cos, sin = rope(positions % L, q.dtype)
    q_intra = apply_rope(q, cos, sin)
    cos, sin = rope((L + positions % L).clamp(max=chunk_size), q.dtype)
    q_succ = apply_rope(q, cos, sin)
    cos, sin = rope(torch.full_like(positions, chunk_size), q.dtype)
    q_inter = apply_rope(q, cos, sin)
    y = q.new_zeros(B, nh, T, hs)
    for b in range(B):
        keys, values = _real_keys(k[b], v[b], key_real[b])  # (nkv, n, hs): key j has position j
        n_keys = keys.shape[1]
        p = positions[b].tolist()
        real = [True] * T if query_real is None else query_real[b].tolist()
        t = 0
        while t < T:
            if not real[t]:
                t += 1
                continue
            if p[t] >= n_keys:
                raise ValueError(f"query position {p[t]} has no key: only {n_keys} real keys")
            # A block of consecutive queries in one chunk (positions rise by one across a block).
            chunk = p[t] // L
            end = t + 1
            while end < T and end - t < query_block and p[end] == p[end - 1] + 1 and p[end] // L == chunk \
                    and real[end] and p[end] < n_keys:
                end += 1
            first = p[t]
            y[b, :, t:end] = _dca_block(q_intra[b, :, t:end], q_succ[b, :, t:end], q_inter[b, :, t:end],
                                        keys, values, first, chunk, L, key_tile).to(y.dtype)
            t = end
    return y


def _real_keys(k: torch.Tensor, v: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's real keys/values (nkv, n, hs): a view when they are one run of slots (left padding),
    a gathered copy otherwise."""
    n = int(real.sum())
    first = int(real.float().argmax()) if n else 0
    if n and bool(real[first:first + n].all()):
        return k[:, first:first + n], v[:, first:first + n]
    index = real.nonzero().squeeze(-1)
    return k[:, index], v[:, index]


def _dca_block(q_intra, q_succ, q_inter, keys, values, first: int, chunk: int, L: int, key_tile: int):
    """Queries at positions first .. first+Tq-1, all in chunk `chunk`: (nh, Tq, hs) each rotation.
    Attends to keys [0, first + Tq) as DCA prescribes: one softmax over all of them, built from the
    parts' own softmaxes merged by their log-sum-exp in fp32."""
    nh, Tq, hs = q_intra.shape
    nkv = keys.shape[0]
    group = nh // nkv  # GQA: query heads per kv head
    chunk_start = chunk * L
    last = first + Tq  # keys [0, last) are visible to some query of the block
    # (query rotation, key range, causal?). The block's own keys [first, last) are the causal part:
    # a square, so "key <= query" is the kernels' top-left diagonal; keys before it in the chunk
    # are all visible, as are those of the previous chunk and of every earlier one.
    parts = [(q_intra, first, last, True), (q_intra, chunk_start, first, False),
             (q_succ, max(chunk_start - L, 0), chunk_start, False), (q_inter, 0, max(chunk_start - L, 0), False)]
    outs, lses = [], []
    for qr, lo, hi, causal in parts:
        if hi > lo:
            out, lse = attention_with_lse(qr.reshape(nkv, group, Tq, hs), keys[:, lo:hi], values[:, lo:hi],
                                          causal, key_tile)
            outs.append(out.float())
            lses.append(lse)
    # Merge: part i weighs exp(lse_i - lse) with lse the log-sum-exp over all keys, never exp of a raw lse.
    lse = torch.stack(lses).logsumexp(0)  # (nkv, g, Tq, 1)
    merged = sum(out * (part_lse - lse).exp() for out, part_lse in zip(outs, lses))
    return merged.reshape(nh, Tq, hs)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       key_tile: int = DCA_KEY_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(hs)) v and each query's log-sum-exp of those scores, in fp32:
    q (nkv, g, Tq, hs), the g query heads sharing each kv head; k, v (nkv, n, hs); causal: query t
    sees keys 0..t (Tq == n). -> out (nkv, g, Tq, hs), lse (nkv, g, Tq, 1) fp32; out in q's dtype
    from the flash kernel, fp32 from the loop (the caller merges in fp32: no rounding in between).
    On the CPU, PyTorch's flash kernel (memory linear in n, ~7x the tiled loop's speed at 4K
    tokens); elsewhere the loop over key tiles below."""
    nkv, g, Tq, hs = q.shape
    if q.device.type == "cpu":
        # GQA without copying: each kv head broadcast over its g query heads (stride 0).
        k4, v4 = (t[:, None].expand(nkv, g, t.shape[1], hs) for t in (k, v))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k4, v4, 0.0, causal)
        return out, lse[..., None]
    return _tiled_attention_with_lse(q, k, v, causal, key_tile)


def _tiled_attention_with_lse(q, k, v, causal: bool, key_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_with_lse by PyTorch ops, a tile of keys at a time (any device): each tile's
    partial softmax merged into the running one by their log-sum-exp in fp32."""
    nkv, g, Tq, hs = q.shape
    qf = q.float() * hs ** -0.5
    lse = torch.full((nkv, g, Tq, 1), -math.inf, device=q.device)  # running log-sum-exp
    out = torch.zeros(nkv, g, Tq, hs, device=q.device)
    query_pos = torch.arange(Tq, device=q.device)[:, None]  # (Tq, 1)
    for s0 in range(0, k.shape[1], key_tile):
        s1 = min(s0 + key_tile, k.shape[1])
        scores = qf @ k[:, None, s0:s1].float().transpose(-1, -2)  # (nkv, g, Tq, n)
        if causal:
            scores = scores.masked_fill(torch.arange(s0, s1, device=q.device)[None, :] > query_pos, -math.inf)
        tile_lse = scores.logsumexp(-1, keepdim=True)  # (nkv, g, Tq, 1); -inf where all masked
        probs = (scores - tile_lse.clamp(min=torch.finfo(torch.float32).min)).exp()
        tile_out = probs @ v[:, None, s0:s1].float()  # (nkv, g, Tq, hs)
        merged = torch.logaddexp(lse, tile_lse)
        out = out * (lse - merged).exp() + tile_out * (tile_lse - merged).exp()
        lse = merged
    return out, lse
