"""Long context, as in the Qwen2 report (§ "Long-context training"): YaRN, Dual Chunk Attention (DCA)
and sliding-window attention: their configuration (checks, presets, the context they open). What
they compute are the model's strategies, chosen when it is built: YaRN's frequencies in
qwen2/model/yarn.py (dynamic YaRN in qwen2/model/rope.py), DCA in qwen2/model/dca.py, the sliding
window's mask in qwen2/model/masks.py.

Dynamic YaRN (ours, opt-in with `"dynamic": true` in rope_scaling): plain RoPE when the sequence fits
in the trained length, YaRN when it does not (chosen once per sequence).

Sliding window (transformers' Qwen2 semantics): with `use_sliding_window`, layers with index >=
`max_window_layers` let a query see only the `sliding_window` slots ending at its own.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

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
    if spec in ("none", "default"):
        return None
    kind, factor, original = _yarn_spec(spec)
    scaling = {"rope_type": "yarn", "factor": factor,
               "original_max_position_embeddings": trained_length(config) if original is None else original}
    if kind == "dynamic-yarn":
        scaling["dynamic"] = True
    return scaling


def _yarn_spec(spec) -> tuple[str, float, int | None]:
    """("yarn" or "dynamic-yarn", factor, original length or None) of a rope_scaling string."""
    if not isinstance(spec, str):
        raise Qwen2Error(f"rope_scaling must be a string like 'yarn:4' or a dict, got {spec!r}")
    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    try:
        factor = float(parts[0]) if parts else None
        original = int(parts[1]) if len(parts) > 1 else None
    except ValueError:
        factor = original = None
    if kind not in ("yarn", "dynamic-yarn") or factor is None or len(parts) > 2:
        raise Qwen2Error(f"rope scaling {spec!r} not understood; use yarn:FACTOR, dynamic-yarn:FACTOR or "
                         "yarn:FACTOR:ORIGINAL_LENGTH (e.g. yarn:4)")
    return kind, factor, original


def check_rope_scaling(spec: str | dict | None) -> None:
    """A one-line error unless `spec` is a rope_scaling option `parse_rope_scaling` takes; needs no
    config, so a bad one fails before the weights are read (a dict is checked with the config)."""
    if spec is None or isinstance(spec, dict) or spec in ("none", "default"):
        return
    _yarn_spec(spec)


def check_dca(dca: bool | int | dict | None) -> None:
    """A one-line error unless `dca` is an option `extend_config` takes: None, True/False, a chunk
    size >= 2 or a dual_chunk_attention_config dict (checked with the config)."""
    if dca is None or isinstance(dca, (bool, dict)):
        return
    if not _is_positive_int(dca):
        raise Qwen2Error(f"dca must be True, a chunk size or a dual_chunk_attention_config dict, got {dca!r}")
    _check_chunk_size(dca)


def _check_chunk_size(chunk_size) -> None:
    if not _is_positive_int(chunk_size) or chunk_size < 2:
        raise Qwen2Error(f"DCA chunk size must be an integer >= 2, got {chunk_size!r}")


def dca_config(chunk_size: int | None, config: "Qwen2Config", local_size: int | None = None) -> dict:
    """A dual_chunk_attention_config: chunk_size defaults to the trained length (the longest
    relative position the model has seen), local_size to chunk_size / 32 (the Qwen2.5-1M ratio)."""
    original = trained_length(config)
    chunk_size = original if chunk_size is None else chunk_size
    _check_chunk_size(chunk_size)
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
        check_dca(dca)
        dca_dict = dict(dca) if isinstance(dca, dict) else dca_config(None if dca is True else dca, config)
        changes["dual_chunk_attention_config"] = dca_dict
        context = max(context, DCA_CONTEXT_FACTOR * dca_dict.get("original_max_position_embeddings", original))
    if not changes:
        return config
    return dataclasses.replace(config, **changes, max_position_embeddings=context)


# The ways a model trained at length L can be run past L, as the report compares them (perplexity by
# length, one set of weights): plain RoPE, YaRN with factor length / L, DCA with chunk L, both, and
# both with YaRN's factor fixed at 4 (the Qwen2.5 model cards' preset, whatever the length).
EXTRAPOLATION_SETTINGS = ("rope", "yarn", "dca", "yarn+dca", "yarn4+dca")


def extrapolation_config(config: "Qwen2Config", setting: str, length: int) -> "Qwen2Config":
    """The config with one of EXTRAPOLATION_SETTINGS, for sequences of `length` tokens. YaRN with a
    factor of 1 (length <= the trained length) is plain RoPE. Plain RoPE may run past its trained
    length here: measuring how it fails is what the comparison is for."""
    import dataclasses

    if setting not in EXTRAPOLATION_SETTINGS:
        raise Qwen2Error(f"unknown extrapolation setting {setting!r}; use one of {', '.join(EXTRAPOLATION_SETTINGS)}")
    trained = trained_length(config)
    factor = 4.0 if setting.startswith("yarn4") else length / trained
    yarn = ({"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": trained}
            if "yarn" in setting and factor > 1 else None)
    extended = extend_config(config, rope_scaling=yarn, dca=dca_config(trained, config) if "dca" in setting else None)
    return dataclasses.replace(extended, max_position_embeddings=max(extended.max_position_embeddings, length))


def is_dynamic(config: "Qwen2Config") -> bool:
    return rope_type(config.rope_scaling) == "yarn" and bool(config.rope_scaling.get("dynamic"))


def sliding_layers(config: "Qwen2Config") -> range:
    """Indices of the layers that slide (transformers: index >= max_window_layers)."""
    if not config.use_sliding_window:
        return range(0)
    return range(min(config.max_window_layers, config.num_hidden_layers), config.num_hidden_layers)


def dca_chunk_len(config: "Qwen2Config") -> int:
    """L = chunk_size - local_size: the keys' rotation period."""
    dca = config.dual_chunk_attention_config
    return dca["chunk_size"] - dca["local_size"]
