"""Qwen2 model configuration: one dataclass, the named sizes of the Qwen2 / Qwen2.5 families,
and conversion to and from Hugging Face `config.json`."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from . import long_context
from .errors import Qwen2Error


# The fields that say how positions are encoded, on which no weight depends: a trained model may
# take other values of these (a continued pre-training's longer context, YaRN, DCA at load time).
POSITION_FIELDS = ("max_position_embeddings", "rope_theta", "rope_scaling", "use_sliding_window", "sliding_window",
                   "max_window_layers", "dual_chunk_attention_config")


@dataclass
class Qwen2Config:
    # The fields below are the architecture; their names follow HF's Qwen2Config so that
    # config.json maps onto them one to one.
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads (what every released Qwen2 uses)
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0  # the report's RoPE base, raised from 10,000 for long context
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # Long context (qwen2/long_context.py): YaRN rope_scaling, sliding-window attention, and Dual Chunk
    # Attention ({"chunk_size", "local_size", "original_max_position_embeddings"}, HF/vLLM's key).
    rope_scaling: dict | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    dual_chunk_attention_config: dict | None = None
    # Mixture of experts (qwen2/model/moe.py, the Qwen2-57B-A14B design; names as HF's Qwen2MoeConfig).
    # num_experts 0 is the dense model and the other fields are then unused.
    num_experts: int = 0
    num_experts_per_tok: int = 0  # k: routed experts per token
    moe_intermediate_size: int = 0  # each routed expert's SwiGLU width
    shared_expert_intermediate_size: int = 0  # the always-on shared expert's SwiGLU width
    norm_topk_prob: bool = False  # renormalise the k chosen probabilities to sum to 1
    decoder_sparse_step: int = 1  # layer i is MoE when (i + 1) % decoder_sparse_step == 0
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss in the training loss
    # Token ids the checkpoint declares (the tokenizer and generation_config have the final say).
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    torch_dtype: str = "bfloat16"
    name: str = field(default="", compare=False)

    def __post_init__(self):
        def positive_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        # Derive head_dim only from valid sizes, so that a zero or non-integer head count is reported
        # as such rather than surfacing as a ZeroDivisionError / TypeError.
        if self.head_dim == 0 and positive_int(self.hidden_size) and positive_int(self.num_attention_heads):
            self.head_dim = self.hidden_size // self.num_attention_heads
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if not positive_int(getattr(self, name)):
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                problems.append(f"{name} must be a positive number, got {v!r}")
        if not problems and self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                            f"num_key_value_heads ({self.num_key_value_heads})")
        if not problems and self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even: RoPE rotates pairs of dimensions")
        if not problems:
            problems = long_context.config_problems(self)
        if not problems:
            problems = self._moe_problems()
        if problems:
            raise Qwen2Error("invalid Qwen2 config: " + "; ".join(problems))

    def _moe_problems(self) -> list[str]:
        def int_at_least(v, low: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        if not int_at_least(self.num_experts, 0):
            return [f"num_experts must be 0 (dense) or a positive integer, got {self.num_experts!r}"]
        if self.num_experts == 0:
            return []
        problems = []
        if not int_at_least(self.num_experts_per_tok, 1) or self.num_experts_per_tok > self.num_experts:
            problems.append(f"num_experts_per_tok must be an integer from 1 to num_experts ({self.num_experts}), "
                            f"got {self.num_experts_per_tok!r}")
        for name in ("moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step"):
            if not int_at_least(getattr(self, name), 1):
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.norm_topk_prob, bool):
            problems.append(f"norm_topk_prob must be true or false, got {self.norm_topk_prob!r}")
        layers = self.mlp_only_layers
        if not isinstance(layers, list) or not all(int_at_least(i, 0) and i < self.num_hidden_layers for i in layers):
            problems.append(f"mlp_only_layers must be a list of layer indices from 0 to {self.num_hidden_layers - 1}, "
                            f"got {layers!r}")
        v = self.router_aux_loss_coef
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            problems.append(f"router_aux_loss_coef must be a number >= 0, got {v!r}")
        return problems

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` has a sparse MoE block rather than the dense MLP
        (transformers' Qwen2MoeDecoderLayer rule)."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    # --- HF config.json -------------------------------------------------------------------
    REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "") -> "Qwen2Config":
        if not isinstance(d, dict):
            raise Qwen2Error(f"config.json must hold a JSON object, got {type(d).__name__}")
        # The model type first: a Llama or Gemma config gets told so, not that it lacks fields.
        model_type = d.get("model_type", "qwen2")
        if model_type not in ("qwen2", "qwen2_moe"):
            raise Qwen2Error(f"config.json has model_type {model_type!r}; only 'qwen2' models are supported here "
                             "(and their mixture-of-experts form, 'qwen2_moe')")
        if model_type == "qwen2_moe" and d.get("qkv_bias", True) is not True:
            raise Qwen2Error("config.json has qkv_bias false; Qwen2 attention always has q/k/v biases")
        missing = [k for k in cls.REQUIRED_HF_KEYS if k not in d]
        if missing:
            raise Qwen2Error(f"config.json lacks required field(s) {', '.join(missing)}; "
                             "it must be a Qwen2 (model_type 'qwen2') config")
        # transformers >= 5 nests the RoPE base in `rope_parameters`; older files have `rope_theta`.
        rope = d.get("rope_parameters") or {}
        known = {f.name for f in dataclasses.fields(cls)} - {"name"}
        # Deep copies: the config must not share nested dicts (rope_scaling) with the caller's dict.
        kwargs = {k: copy.deepcopy(v) for k, v in d.items() if k in known and v is not None}
        if model_type == "qwen2":  # transformers' Qwen2 ignores expert fields: the model is dense
            kwargs = {k: v for k, v in kwargs.items() if k not in _MOE_FIELDS}
        else:  # what transformers' Qwen2MoeConfig assumes for an absent field
            kwargs = _HF_MOE_DEFAULTS | kwargs
        kwargs.setdefault("num_key_value_heads", d["num_attention_heads"])
        theta = d.get("rope_theta")
        if theta is None:
            theta = rope.get("rope_theta")
        try:
            kwargs["rope_theta"] = 10000.0 if theta is None else float(theta)
        except (TypeError, ValueError):
            raise Qwen2Error(f"invalid Qwen2 config: rope_theta must be a positive number, got {theta!r}") from None
        if rope.get("rope_type", "default") != "default" and not d.get("rope_scaling"):
            kwargs["rope_scaling"] = {k: copy.deepcopy(v) for k, v in rope.items() if k != "rope_theta"}
        kwargs["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", False))
        # transformers >= 5 writes `dtype`; a torch.dtype object prints as "torch.bfloat16".
        dtype = d.get("torch_dtype") or d.get("dtype") or "bfloat16"
        kwargs["torch_dtype"] = str(dtype).removeprefix("torch.")
        return cls(**kwargs, name=name)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "Qwen2Config":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise Qwen2Error(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Qwen2Error(f"{path} is not valid JSON ({e}); fix or replace the file") from None
        except OSError as e:
            raise Qwen2Error(f"cannot read {path}: {e.strerror or e}") from None
        return cls.from_hf_dict(d, name=os.path.basename(os.path.dirname(os.path.abspath(path))))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers' Qwen2ForCausalLM reads (legacy `rope_theta` key, which
        both transformers 4.x and 5.x accept)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}
        d.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
                 attention_dropout=0.0, use_cache=True)
        if self.num_experts:  # transformers' Qwen2MoeForCausalLM
            d.update(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe")
        else:
            d = {k: v for k, v in d.items() if k not in _MOE_FIELDS}
        return d


# The expert fields, and the values transformers' Qwen2MoeConfig gives those a qwen2_moe
# config.json leaves out (transformers/models/qwen2_moe/configuration_qwen2_moe.py).
_HF_MOE_DEFAULTS = dict(num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                        shared_expert_intermediate_size=5632, norm_topk_prob=False, decoder_sparse_step=1,
                        mlp_only_layers=[], router_aux_loss_coef=0.001)
_MOE_FIELDS = frozenset(_HF_MOE_DEFAULTS)


# Sizes from the Qwen2 report (arXiv 2407.10671, Table 1: hidden size, layers, query/KV heads,
# intermediate size, embedding tying) and the released config.json files. Small models tie the
# embedding and the output layer (the embedding is a large share of their parameters); from 7B on
# the vocabulary is padded to 152064 and the output layer is separate. Every entry below has
# rope_theta 1e6, bos 151643 and bfloat16 weights, as all of these config.json files do.
_QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, tie_word_embeddings=True)
_QWEN2_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, tie_word_embeddings=True)
_QWEN25_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, tie_word_embeddings=True)
_QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4)
_QWEN25_14B = dict(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                   num_attention_heads=40, num_key_value_heads=8)
_QWEN25_32B = dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                   num_attention_heads=40, num_key_value_heads=8)
_QWEN2_72B = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8)
# Base (pretrained) checkpoints end documents with <|endoftext|> (151643): their config.json and
# generation_config.json declare it as eos. Instruct checkpoints declare <|im_end|> (151645, the default).
_BASE = dict(eos_token_id=151643)
# Qwen2-57B-A14B, the report's MoE model (§2.2.2, Table 1): every layer sparse, 64 fine-grained experts
# of width 2560 with 8 routed per token, top-k probabilities not renormalised, one shared expert of
# width 20480; 7B-sized attention (hidden 3584, 28/4 heads), untied 151936-row vocabulary.
# intermediate_size (18944) is kept from the config.json; no layer of this model uses it.
_QWEN2_57B_A14B = dict(vocab_size=151936, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
                       moe_intermediate_size=2560, shared_expert_intermediate_size=20480, norm_topk_prob=False,
                       decoder_sparse_step=1, router_aux_loss_coef=0.001, eos_token_id=151643)

NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen2. Base models are published with max_position_embeddings 131072, instruct models with
    # 32768; rms_norm_eps is 1e-6 except Qwen2-72B base (1e-5). Sources: config.json of
    # huggingface.co/Qwen/Qwen2-7B (main), Qwen/Qwen2-72B (rev c03367e), Qwen/Qwen2-72B-Instruct
    # (rev 7c7b419); the 0.5B/1.5B (-Instruct) values from config.json copies in fine-tunes of them
    # (e.g. `_name_or_path: Qwen/Qwen2-0.5B`, `Qwen/Qwen2-1.5B-Instruct`).
    "Qwen2-0.5B": dict(_QWEN2_05B, **_BASE, max_position_embeddings=131072),
    "Qwen2-0.5B-Instruct": dict(_QWEN2_05B),
    "Qwen2-1.5B": dict(_QWEN2_15B, **_BASE, max_position_embeddings=131072),
    "Qwen2-1.5B-Instruct": dict(_QWEN2_15B),
    "Qwen2-7B": dict(_QWEN2_7B, **_BASE, max_position_embeddings=131072),
    "Qwen2-7B-Instruct": dict(_QWEN2_7B),
    "Qwen2-72B": dict(_QWEN2_72B, **_BASE, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "Qwen2-72B-Instruct": dict(_QWEN2_72B),
    # Qwen2.5 base models (same architecture, more sizes). max_position_embeddings is 32768 for
    # 0.5B and 3B, 131072 for the others; rms_norm_eps is 1e-5 for 14B/32B/72B, 1e-6 for the rest.
    # Sources: litgpt/config.py (Lightning-AI/litgpt) Qwen2.5 entries (block_size, norm_eps, each
    # citing huggingface.co/Qwen/Qwen2.5-<size>/blob/main/config.json), config.json copies of
    # Qwen/Qwen2.5-0.5B, -1.5B, -3B, -7B, -14B, -32B, -72B, and the Hub threads
    # huggingface.co/Qwen/QwQ-32B/discussions/9 ("Qwen 2.5 32B rms_norm_eps is 1e-05, but Qwen 2.5
    # 32B Instruct is 1e-06") and Qwen/Qwen2.5-Coder-32B-Instruct/discussions/1 (14B/32B base 1e-5).
    "Qwen2.5-0.5B": dict(_QWEN2_05B, **_BASE),
    "Qwen2.5-1.5B": dict(_QWEN2_15B, **_BASE, max_position_embeddings=131072),
    "Qwen2.5-3B": dict(_QWEN25_3B, **_BASE),
    "Qwen2.5-7B": dict(_QWEN2_7B, **_BASE, max_position_embeddings=131072),
    "Qwen2.5-14B": dict(_QWEN25_14B, **_BASE, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "Qwen2.5-32B": dict(_QWEN25_32B, **_BASE, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "Qwen2.5-72B": dict(_QWEN2_72B, **_BASE, max_position_embeddings=131072, rms_norm_eps=1e-5),
    # Qwen2.5 instruct models: every size is published with max_position_embeddings 32768 (longer
    # contexts through YaRN rope_scaling, per the model cards) and rms_norm_eps 1e-6, so 1.5B/7B differ
    # from base in max_position_embeddings and 14B/32B/72B in both. Sources: config.json copies of
    # Qwen/Qwen2.5-<size>-Instruct (`_name_or_path` of fine-tunes, onnx-community/Qwen2.5-1.5B-Instruct,
    # a Qwen2.5-72B-Instruct config.json dump, the Qwen2.5-32B-Instruct GPTQ config) and the threads above.
    "Qwen2.5-0.5B-Instruct": dict(_QWEN2_05B),
    "Qwen2.5-1.5B-Instruct": dict(_QWEN2_15B),
    "Qwen2.5-3B-Instruct": dict(_QWEN25_3B),
    "Qwen2.5-7B-Instruct": dict(_QWEN2_7B),
    "Qwen2.5-14B-Instruct": dict(_QWEN25_14B),
    "Qwen2.5-32B-Instruct": dict(_QWEN25_32B),
    "Qwen2.5-72B-Instruct": dict(_QWEN2_72B),
    # Qwen2.5-Coder instruct: 32768 positions, rms_norm_eps 1e-6, tied embeddings, vocab 151936.
    # Sources: litgpt/config.py Qwen2.5-Coder entries; config.json copies of
    # Qwen/Qwen2.5-Coder-0.5B-Instruct and Qwen2.5-Coder-1.5B(-Instruct); the model cards
    # ("Context Length: Full 32,768 tokens", "tied word embeddings").
    "Qwen2.5-Coder-0.5B-Instruct": dict(_QWEN2_05B),
    "Qwen2.5-Coder-1.5B-Instruct": dict(_QWEN2_15B),
    # Qwen2-57B-A14B (MoE). Both config.json files declare eos 151643 (<|endoftext|>), the instruct
    # one too; base 131072 positions, instruct 32768. Sources: the config.json of
    # huggingface.co/Qwen/Qwen2-57B-A14B (transformers_version 4.40.1, copied in TensorRT-LLM's
    # test_modeling_qwen_moe.py) and of Qwen/Qwen2-57B-A14B-Instruct (copied in
    # huggingface.co/Intel/Qwen2-57B-A14B-Instruct-int4-inc/blob/main/config.json).
    "Qwen2-57B-A14B": dict(_QWEN2_57B_A14B, max_position_embeddings=131072),
    "Qwen2-57B-A14B-Instruct": dict(_QWEN2_57B_A14B),
}


def named_config(name: str) -> Qwen2Config:
    for key, kw in NAMED_CONFIGS.items():
        if key.lower() == name.lower():
            return Qwen2Config(**kw, name=key)
    raise Qwen2Error(f"unknown config name {name!r}; known: {', '.join(NAMED_CONFIGS)}")
