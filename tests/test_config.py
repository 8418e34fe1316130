"""Qwen2Config: the named sizes against the published configs, parameter counts, HF conversion,
and the errors invalid configs raise. Fast: models are only built on the `meta` device."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from qwen2.config import NAMED_CONFIGS, Qwen2Config, named_config
from qwen2.errors import Qwen2Error
from qwen2.model import Transformer

# --- the published architecture -------------------------------------------------------------
# hidden size, layers, query heads, KV heads, intermediate size and embedding tying are the Qwen2
# report's Table 1 (arXiv 2407.10671) and the Qwen2.5 report's; vocab (padded embedding rows),
# rms_norm_eps, rope_theta and max_position_embeddings are those of the released config.json files
# (see the comments on NAMED_CONFIGS in qwen2/config.py for where each was checked).
FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "intermediate_size", "vocab_size", "tie_word_embeddings", "rms_norm_eps", "rope_theta",
          "max_position_embeddings", "head_dim")
PUBLISHED = {
    #                              hidden layers heads kv  inter  vocab   tie    eps   theta  max_pos  head
    "Qwen2-0.5B":                  (896,   24, 14, 2,  4864, 151936, True,  1e-6, 1e6, 131072, 64),
    "Qwen2-0.5B-Instruct":         (896,   24, 14, 2,  4864, 151936, True,  1e-6, 1e6, 32768, 64),
    "Qwen2-1.5B":                  (1536,  28, 12, 2,  8960, 151936, True,  1e-6, 1e6, 131072, 128),
    "Qwen2-1.5B-Instruct":         (1536,  28, 12, 2,  8960, 151936, True,  1e-6, 1e6, 32768, 128),
    "Qwen2-7B":                    (3584,  28, 28, 4, 18944, 152064, False, 1e-6, 1e6, 131072, 128),
    "Qwen2-7B-Instruct":           (3584,  28, 28, 4, 18944, 152064, False, 1e-6, 1e6, 32768, 128),
    "Qwen2-72B":                   (8192,  80, 64, 8, 29568, 152064, False, 1e-5, 1e6, 131072, 128),
    "Qwen2-72B-Instruct":          (8192,  80, 64, 8, 29568, 152064, False, 1e-6, 1e6, 32768, 128),
    "Qwen2.5-0.5B":                (896,   24, 14, 2,  4864, 151936, True,  1e-6, 1e6, 32768, 64),
    "Qwen2.5-1.5B":                (1536,  28, 12, 2,  8960, 151936, True,  1e-6, 1e6, 131072, 128),
    "Qwen2.5-1.5B-Instruct":       (1536,  28, 12, 2,  8960, 151936, True,  1e-6, 1e6, 32768, 128),
    "Qwen2.5-3B":                  (2048,  36, 16, 2, 11008, 151936, True,  1e-6, 1e6, 32768, 128),
    "Qwen2.5-7B":                  (3584,  28, 28, 4, 18944, 152064, False, 1e-6, 1e6, 131072, 128),
    "Qwen2.5-7B-Instruct":         (3584,  28, 28, 4, 18944, 152064, False, 1e-6, 1e6, 32768, 128),
    "Qwen2.5-14B":                 (5120,  48, 40, 8, 13824, 152064, False, 1e-5, 1e6, 131072, 128),
    "Qwen2.5-14B-Instruct":        (5120,  48, 40, 8, 13824, 152064, False, 1e-6, 1e6, 32768, 128),
    "Qwen2.5-32B":                 (5120,  64, 40, 8, 27648, 152064, False, 1e-5, 1e6, 131072, 128),
    "Qwen2.5-32B-Instruct":        (5120,  64, 40, 8, 27648, 152064, False, 1e-6, 1e6, 32768, 128),
    "Qwen2.5-72B":                 (8192,  80, 64, 8, 29568, 152064, False, 1e-5, 1e6, 131072, 128),
    "Qwen2.5-72B-Instruct":        (8192,  80, 64, 8, 29568, 152064, False, 1e-6, 1e6, 32768, 128),
    "Qwen2.5-Coder-0.5B-Instruct": (896,   24, 14, 2,  4864, 151936, True,  1e-6, 1e6, 32768, 64),
    "Qwen2.5-Coder-1.5B-Instruct": (1536,  28, 12, 2,  8960, 151936, True,  1e-6, 1e6, 32768, 128),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_named_config_has_published_values(name):
    cfg = named_config(name)
    got = {f: getattr(cfg, f) for f in FIELDS}
    assert got == dict(zip(FIELDS, PUBLISHED[name]))
    assert cfg.name == name


@pytest.mark.parametrize("name", list(NAMED_CONFIGS))
def test_every_named_config_is_valid_and_consistent(name):
    cfg = named_config(name)
    assert cfg.name == name
    assert cfg.hidden_size == cfg.num_attention_heads * cfg.head_dim
    assert cfg.rope_theta == 1_000_000.0 and cfg.bos_token_id == 151643 and cfg.torch_dtype == "bfloat16"
    if cfg.num_experts:  # Qwen2-57B-A14B breaks both rules below; tests/test_moe.py checks it
        return
    # Tied embeddings exactly for the small models, which keep the unpadded 151936 rows.
    assert cfg.tie_word_embeddings == (cfg.vocab_size == 151936)
    # Base checkpoints declare <|endoftext|> as eos, instruct ones <|im_end|>.
    assert cfg.eos_token_id == (151645 if name.endswith("-Instruct") else 151643)


def test_instruct_variants_exist_for_every_qwen25_size():
    for size in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B"):
        base, instruct = named_config(f"Qwen2.5-{size}"), named_config(f"Qwen2.5-{size}-Instruct")
        # Same weights' shapes; only the declared context, eps and eos may differ.
        arch = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "tie_word_embeddings")
        assert [getattr(base, f) for f in arch] == [getattr(instruct, f) for f in arch]
        assert instruct.max_position_embeddings == 32768 and instruct.rms_norm_eps == 1e-6


def test_named_config_is_case_insensitive():
    assert named_config("qwen2.5-coder-0.5b-instruct") == named_config("Qwen2.5-Coder-0.5B-Instruct")
    assert named_config("QWEN2-7B").name == "Qwen2-7B"


# --- parameter counts -----------------------------------------------------------------------
def n_params(cfg: Qwen2Config) -> int:
    with torch.device("meta"):
        model = Transformer(cfg)
    return sum(p.numel() for p in model.parameters())  # a tied lm_head is counted once


# The `safetensors.total` the Hugging Face Hub reports for these checkpoints (instruct and base
# have the same shapes).
SAFETENSORS_TOTAL = {
    "Qwen2-0.5B": 494_032_768,
    "Qwen2.5-0.5B-Instruct": 494_032_768,
    "Qwen2-1.5B": 1_543_714_304,
    "Qwen2.5-1.5B-Instruct": 1_543_714_304,
    "Qwen2.5-3B-Instruct": 3_085_938_688,
    "Qwen2-7B": 7_615_616_512,
    "Qwen2.5-7B-Instruct": 7_615_616_512,
    "Qwen2.5-14B-Instruct": 14_770_033_664,
    "Qwen2.5-32B-Instruct": 32_763_876_352,
    "Qwen2-72B": 72_706_203_648,
    "Qwen2.5-72B-Instruct": 72_706_203_648,
}

# "Number of Parameters" (and non-embedding) as the model cards round them, in billions. The
# Qwen2.5-32B cards say 32.5B (31.0B non-embedding), which no count of the published shapes gives
# (the Hub's own safetensors total is 32.76B), so 32B is checked against the exact total only; the
# 14B/72B non-embedding figures (13.1B, 70.0B) are similarly loose and left out.
MODEL_CARD = {
    "Qwen2-0.5B": (0.49, 0.36),
    "Qwen2-1.5B": (1.54, 1.31),
    "Qwen2-7B": (7.61, 6.53),
    "Qwen2-72B": (72.7, None),
    "Qwen2.5-0.5B": (0.49, 0.36),
    "Qwen2.5-1.5B": (1.54, 1.31),
    "Qwen2.5-3B": (3.09, 2.77),
    "Qwen2.5-7B": (7.61, 6.53),
    "Qwen2.5-14B": (14.7, None),
    "Qwen2.5-72B": (72.7, None),
    "Qwen2.5-Coder-0.5B-Instruct": (0.49, 0.36),
    "Qwen2.5-Coder-1.5B-Instruct": (1.54, 1.31),
}


@pytest.mark.parametrize("name", list(SAFETENSORS_TOTAL))
def test_parameter_count_matches_published_checkpoint(name):
    assert n_params(named_config(name)) == SAFETENSORS_TOTAL[name]


def _ulp(x: float) -> float:
    """One unit in the last printed digit of a card figure (7.61 -> 0.01, 14.7 -> 0.1)."""
    decimals = len(repr(x).split(".")[1]) if "." in repr(x) else 0
    return 10.0 ** -decimals


@pytest.mark.parametrize("name", list(MODEL_CARD))
def test_parameter_count_matches_model_card(name):
    cfg = named_config(name)
    total = n_params(cfg)
    card_total, card_non_embedding = MODEL_CARD[name]
    # Cards sometimes truncate rather than round (7.6156B is printed 7.61B): allow one unit.
    assert abs(total / 1e9 - card_total) <= _ulp(card_total)
    if card_non_embedding is not None:
        embedding = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
        assert abs((total - embedding) / 1e9 - card_non_embedding) <= _ulp(card_non_embedding)


def test_tied_embedding_is_counted_once():
    tied = named_config("Qwen2.5-0.5B")
    untied = dataclasses.replace(tied, tie_word_embeddings=False)
    assert n_params(untied) - n_params(tied) == tied.vocab_size * tied.hidden_size


# --- Hugging Face config.json ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(NAMED_CONFIGS))
def test_hf_round_trip(name, tmp_path):
    cfg = named_config(name)
    assert Qwen2Config.from_hf_dict(cfg.to_hf_dict()) == cfg
    text = json.dumps(cfg.to_hf_dict())  # to_hf_dict must be plain JSON
    assert Qwen2Config.from_hf_dict(json.loads(text)) == cfg
    path = tmp_path / name / "config.json"
    path.parent.mkdir()
    path.write_text(text)
    loaded = Qwen2Config.from_json_file(path)
    assert loaded == cfg and loaded.name == name


def test_to_hf_dict_declares_a_qwen2_causal_lm():
    d = named_config("Qwen2-7B").to_hf_dict()
    assert d["model_type"] == "qwen2" and d["architectures"] == ["Qwen2ForCausalLM"]
    assert d["rope_theta"] == 1_000_000.0 and "name" not in d


@pytest.mark.parametrize("name", ["Qwen2-0.5B", "Qwen2-72B", "Qwen2.5-3B-Instruct", "Qwen2.5-32B"])
def test_transformers_reads_to_hf_dict_the_same(name):
    transformers = pytest.importorskip("transformers")
    cfg = named_config(name)
    hf = transformers.Qwen2Config(**cfg.to_hf_dict())
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads) == (
        cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert hf.head_dim == cfg.head_dim
    theta = hf.rope_parameters["rope_theta"] if getattr(hf, "rope_parameters", None) else hf.rope_theta
    assert theta == cfg.rope_theta
    assert (hf.intermediate_size, hf.vocab_size, hf.rms_norm_eps, hf.tie_word_embeddings,
            hf.max_position_embeddings) == (cfg.intermediate_size, cfg.vocab_size, cfg.rms_norm_eps,
                                            cfg.tie_word_embeddings, cfg.max_position_embeddings)
    # ... and what transformers writes back (rope_parameters, `dtype`) reads back to the same config.
    assert Qwen2Config.from_hf_dict(hf.to_dict()) == cfg


def _minimal(**changes) -> dict:
    d = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
             num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2)
    d.update(changes)
    return d


def test_from_hf_dict_reads_legacy_rope_theta_and_rope_parameters():
    legacy = Qwen2Config.from_hf_dict(_minimal(rope_theta=1_000_000.0))
    v5 = Qwen2Config.from_hf_dict(_minimal(rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}))
    assert legacy == v5 and legacy.rope_theta == 1_000_000.0 and legacy.rope_scaling is None
    # Neither: transformers' default base.
    assert Qwen2Config.from_hf_dict(_minimal()).rope_theta == 10000.0
    # An integer theta (some files write 1000000) is read as a float.
    assert Qwen2Config.from_hf_dict(_minimal(rope_theta=1000000)).rope_theta == 1_000_000.0


def test_from_hf_dict_keeps_rope_scaling_from_rope_parameters():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
            "rope_theta": 1_000_000.0}
    cfg = Qwen2Config.from_hf_dict(_minimal(rope_parameters=yarn))
    assert cfg.rope_theta == 1_000_000.0
    assert cfg.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    # The legacy spelling is kept as written, and not shared with the caller's dict.
    scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    cfg = Qwen2Config.from_hf_dict(_minimal(rope_theta=1e6, rope_scaling=scaling))
    scaling["factor"] = 8.0
    assert cfg.rope_scaling["factor"] == 4.0


def test_from_hf_dict_defaults_and_extras():
    # Keys that are not Qwen2Config fields are ignored, None values count as absent, and a "name"
    # key does not clash with the name argument.
    cfg = Qwen2Config.from_hf_dict(_minimal(sliding_window=None, initializer_range=0.02, layer_types=["x"],
                                            name="ignored"), name="x")
    assert cfg == Qwen2Config.from_hf_dict(_minimal()) and cfg.name == "x"
    # No KV head count (absent or null) means multi-head attention, as in transformers.
    assert Qwen2Config.from_hf_dict(_minimal(num_key_value_heads=None)).num_key_value_heads == 14
    without = {k: v for k, v in _minimal().items() if k != "num_key_value_heads"}
    assert Qwen2Config.from_hf_dict(without).num_key_value_heads == 14
    # `dtype` (transformers >= 5) as well as `torch_dtype`, with or without the "torch." prefix.
    assert Qwen2Config.from_hf_dict(_minimal(dtype="torch.float16")).torch_dtype == "float16"
    assert Qwen2Config.from_hf_dict(_minimal(torch_dtype="float32")).torch_dtype == "float32"
    assert Qwen2Config.from_hf_dict(_minimal()).torch_dtype == "bfloat16"


# The config.json files as published (verbatim fields), read into the named configs' architecture.
QWEN2_72B_CONFIG_JSON = {  # huggingface.co/Qwen/Qwen2-72B/blob/c03367e/config.json
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 8192, "initializer_range": 0.02,
    "intermediate_size": 29568, "max_position_embeddings": 131072, "max_window_layers": 28,
    "model_type": "qwen2", "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064}
QWEN2_72B_INSTRUCT_CONFIG_JSON = dict(  # huggingface.co/Qwen/Qwen2-72B-Instruct/blob/7c7b419/config.json
    QWEN2_72B_CONFIG_JSON, eos_token_id=151645, max_position_embeddings=32768, max_window_layers=80,
    rms_norm_eps=1e-06)


@pytest.mark.parametrize("name, published", [("Qwen2-72B", QWEN2_72B_CONFIG_JSON),
                                             ("Qwen2-72B-Instruct", QWEN2_72B_INSTRUCT_CONFIG_JSON)])
def test_published_config_json_matches_named_config(name, published):
    cfg = Qwen2Config.from_hf_dict(published)
    ours = named_config(name)
    for f in FIELDS + ("eos_token_id", "bos_token_id", "torch_dtype"):
        assert getattr(cfg, f) == getattr(ours, f), f


# --- errors ---------------------------------------------------------------------------------
def _message(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, f"not a one-line message: {msg!r}"
    return msg


def test_missing_required_fields_are_named():
    d = _minimal()
    del d["vocab_size"], d["hidden_size"]
    with pytest.raises(Qwen2Error) as e:
        Qwen2Config.from_hf_dict(d)
    msg = _message(e)
    assert "vocab_size" in msg and "hidden_size" in msg and "intermediate_size" not in msg


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mixtral"])
def test_other_model_types_are_rejected(model_type):
    with pytest.raises(Qwen2Error) as e:
        Qwen2Config.from_hf_dict(_minimal(model_type=model_type))
    assert repr(model_type) in _message(e) and "qwen2" in _message(e)
    # Told so even when its fields differ from Qwen2's.
    with pytest.raises(Qwen2Error, match="model_type"):
        Qwen2Config.from_hf_dict({"model_type": model_type, "d_model": 512})


def test_heads_must_be_a_multiple_of_kv_heads():
    with pytest.raises(Qwen2Error) as e:
        Qwen2Config.from_hf_dict(_minimal(num_key_value_heads=3))
    msg = _message(e)
    assert "num_attention_heads (14)" in msg and "num_key_value_heads (3)" in msg and "multiple" in msg


@pytest.mark.parametrize("field, value", [
    ("hidden_size", 0), ("vocab_size", -1), ("intermediate_size", 0), ("num_hidden_layers", -24),
    ("num_attention_heads", 0), ("num_attention_heads", -14), ("num_key_value_heads", 0),
    ("max_position_embeddings", 0), ("hidden_size", 896.0), ("num_hidden_layers", "24"),
    ("num_hidden_layers", True),
])
def test_non_positive_or_non_integer_sizes_are_rejected(field, value):
    with pytest.raises(Qwen2Error) as e:
        Qwen2Config.from_hf_dict(_minimal(**{field: value}))
    msg = _message(e)
    assert f"{field} must be a positive integer, got {value!r}" in msg
    with pytest.raises(Qwen2Error, match=field):
        Qwen2Config(**{field: value})


@pytest.mark.parametrize("field, value", [("rms_norm_eps", 0.0), ("rms_norm_eps", -1e-6),
                                          ("rope_theta", 0), ("rope_theta", -1.0)])
def test_non_positive_eps_and_rope_theta_are_rejected(field, value):
    with pytest.raises(Qwen2Error) as e:
        Qwen2Config.from_hf_dict(_minimal(**{field: value}))
    assert f"{field} must be a positive number" in _message(e)


def test_non_numeric_rope_theta_is_rejected():
    with pytest.raises(Qwen2Error) as e:
        Qwen2Config.from_hf_dict(_minimal(rope_theta="fast"))
    assert "rope_theta" in _message(e)


def test_odd_head_dim_is_rejected():
    with pytest.raises(Qwen2Error) as e:
        Qwen2Config.from_hf_dict(_minimal(head_dim=63))
    assert "head_dim (63) must be even" in _message(e)


@pytest.mark.parametrize("value", [[1, 2], "qwen2", 5, None])
def test_config_json_must_be_an_object(value):
    with pytest.raises(Qwen2Error) as e:
        Qwen2Config.from_hf_dict(value)
    assert "JSON object" in _message(e)


def test_from_json_file_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "config.json"
    with pytest.raises(Qwen2Error) as e:
        Qwen2Config.from_json_file(path)
    assert "no config.json" in _message(e) and str(path) in _message(e)


@pytest.mark.parametrize("text", ['{"model_type": "qwen2",', "not json at all", ""])
def test_from_json_file_invalid_json(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(Qwen2Error) as e:
        Qwen2Config.from_json_file(path)
    assert "not valid JSON" in _message(e) and str(path) in _message(e)


def test_from_json_file_binary_and_directory(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(Qwen2Error, match="not valid JSON"):
        Qwen2Config.from_json_file(path)
    with pytest.raises(Qwen2Error) as e:
        Qwen2Config.from_json_file(tmp_path)  # a directory, not a file
    assert str(tmp_path) in _message(e)


def test_from_json_file_valid_json_but_not_a_qwen2_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    with pytest.raises(Qwen2Error, match="model_type 'llama'"):
        Qwen2Config.from_json_file(path)


def test_unknown_named_config():
    with pytest.raises(Qwen2Error) as e:
        named_config("nope")
    msg = _message(e)
    assert "'nope'" in msg and "Qwen2-0.5B" in msg and "Qwen2.5-72B-Instruct" in msg
