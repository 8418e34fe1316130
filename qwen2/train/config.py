"""Training options: one dataclass, read from a TOML or YAML file, overridden by `key=value` pairs.

    qwen2 train sft --config sft.toml lr=1e-5 max_steps=200 lora=true

Every option has a default; a file or override naming an unknown option, or giving a value of the
wrong type, is a one-line `Qwen2Error`, never a silently ignored typo.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field

from ..errors import Qwen2Error

TASKS = ("pretrain", "sft", "dpo", "reward", "online-dpo")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "auto")
ON_BAD_RECORD = ("fail", "skip")
DISTRIBUTED = ("none", "ddp", "fsdp2")
OPTIMIZERS = ("adamw", "onmerge")
ONMERGE_METHODS = ("dare", "ties")
REWARDS = ("execution", "model")
LORA_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class DataSource:
    """One source of a data mixture: its file, its share of the training tokens (`weight`, normalised
    over the sources), the name its log columns carry, and optionally a held-out file in the same
    format whose loss is logged."""
    path: str
    weight: float = 1.0
    name: str = ""
    heldout: str = ""


SOURCE_KEYS = tuple(f.name for f in dataclasses.fields(DataSource))


def data_sources(data: str | list) -> list[DataSource]:
    """The sources `data` names: one file (weight 1, named after it), or a list of tables
    {path, weight, name, heldout}; a malformed entry is a one-line error."""
    if isinstance(data, str):
        return [DataSource(data, 1.0, _stem(data))] if data else []
    sources = []
    for i, entry in enumerate(data):
        where = f"training option 'data' entry {i + 1}"
        if not isinstance(entry, dict):
            raise Qwen2Error(f"{where} must be a table {{path = ..., weight = ...}}, got {entry!r}")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise Qwen2Error(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"known keys: {', '.join(SOURCE_KEYS)}")
        path, weight = entry.get("path"), entry.get("weight", 1.0)
        if not isinstance(path, str) or not path:
            raise Qwen2Error(f"{where} needs a \"path\" to a data file")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise Qwen2Error(f"{where} ({path}): \"weight\" must be a positive number, got {weight!r}")
        name, heldout = entry.get("name") or _stem(path), entry.get("heldout", "")
        if not isinstance(name, str) or not isinstance(heldout, str):
            raise Qwen2Error(f"{where} ({path}): \"name\" and \"heldout\" must be strings")
        sources.append(DataSource(path, float(weight), name, heldout))
    names = [s.name for s in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise Qwen2Error(f"training option 'data' names the source {twice[0]!r} twice; give each entry its own name")
    return sources


@dataclass(frozen=True)
class Stage:
    """A stretch of a run: its optimizer steps, row length, data and position-encoding changes."""
    steps: int
    seq_len: int
    data: str | list
    positions: dict  # POSITION_FIELDS this stage sets (they hold on in later stages)


STAGE_KEYS = ("steps", "seq_len", "data")


def training_stages(cfg: "TrainConfig", stages: list[dict] | None = None) -> list[Stage]:
    """The run's stages (`stages`, by default cfg.stages); a run without stages is one stage of
    max_steps at seq_len on data. A stage leaves out seq_len or data to keep the run's."""
    from ..config import POSITION_FIELDS

    stages = cfg.stages if stages is None else stages
    if not stages:
        return [Stage(cfg.max_steps, cfg.seq_len, cfg.data, {})]
    out = []
    for i, entry in enumerate(stages):
        where = f"training option 'stages' entry {i + 1}"
        unknown = sorted(set(entry) - set(STAGE_KEYS) - set(POSITION_FIELDS))
        if unknown:
            raise Qwen2Error(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; known keys: "
                             f"{', '.join(STAGE_KEYS + POSITION_FIELDS)}")
        steps, seq_len = entry.get("steps"), entry.get("seq_len", cfg.seq_len)
        for name, value in (("steps", steps), ("seq_len", seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise Qwen2Error(f"{where}: {name!r} must be an integer of at least 1, got {value!r}")
        data = entry.get("data", cfg.data)
        data_sources(data)
        out.append(Stage(steps, seq_len, data, {k: v for k, v in entry.items() if k in POSITION_FIELDS}))
    return out


def _stem(path: str) -> str:
    return os.path.basename(path).split(".")[0] or path


@dataclass
class TrainConfig:
    # --- what to train, on what, where to write -------------------------------------------------
    model: str = "qwen2.5-coder-0.5b-instruct"  # registry name, HF directory or .gguf file
    # pretrain: .txt or .jsonl ({"text": ...}); sft: chat .jsonl; dpo: preference .jsonl. pretrain and
    # sft also take a mixture: [{path = ..., weight = ..., name = ..., heldout = ...}, ...] (DataSource)
    data: str | list = ""
    output_dir: str = ""
    from_scratch: bool = False  # pretrain: random weights; `model` supplies the config and tokenizer only
    # from_scratch: config fields to change (hidden_size, ...); continuing a model: its position
    # encoding only (rope_theta, max_position_embeddings, rope_scaling: qwen2.config.POSITION_FIELDS)
    model_config: dict = field(default_factory=dict)
    device: str = "cpu"  # cpu, cuda, cuda:1, or auto
    precision: str = "fp32"  # fp32; bf16 autocast (refused where the hardware lacks bf16); auto picks
    distributed: str = "none"  # under torchrun: ddp or fsdp2 (see qwen2/train/distributed.py)
    # --- data ----------------------------------------------------------------------------------
    seq_len: int = 512  # tokens per row: packed rows (pretrain), longest example (sft/dpo, longer ones are truncated)
    pack_documents: bool = True  # pretrain: pack documents into full rows, attention kept within each document
    on_bad_record: str = "fail"  # fail: stop at the first bad record; skip: report it (file:line) and go on
    eval_every: int = 0  # held-out loss of each data source with a `heldout` file every N steps (0: at the end)
    # pretrain/sft in stages, one after the other in one run: [{steps = N, seq_len = L, data = ...,
    # rope_theta = ..., ...}, ...]; each stage's position fields change the encoding from then on
    # (the report's 4K -> 32K stage with RoPE base 1e6); max_steps is the sum of their steps
    stages: list[dict] = field(default_factory=list)
    # --- optimisation --------------------------------------------------------------------------
    batch_size: int = 8  # rows (pretrain, sft) or preference pairs (dpo) per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 100  # optimizer steps
    lr: float = 7e-6  # peak learning rate (the Qwen2 report's SFT: 7e-6 decayed to 7e-7)
    min_lr: float = 7e-7  # the floor the schedule decays to
    schedule: str = "cosine"  # cosine, linear or constant after warm-up
    warmup_steps: int = 0
    weight_decay: float = 0.1  # on matrices only; biases, norms and LoRA-free 1-D tensors get none
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    seed: int = 0
    # --- LoRA ----------------------------------------------------------------------------------
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list = field(default_factory=lambda: list(LORA_DEFAULT_TARGETS))  # module-name patterns
    merge_lora: bool = True  # at the end, also write the base model with the adapters merged in
    # --- DPO -----------------------------------------------------------------------------------
    beta: float = 0.1
    reference_model: str = ""  # default: the starting policy (with LoRA: the base model, adapters off)
    # --- online DPO: sample, score, pair best and worst ------------------------------------------
    num_samples: int = 4  # responses sampled per prompt
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    # execution: the prompt's unit tests in the sandbox; model: reward_model's mean log-prob of the reply;
    # model:DIR: the score of a reward model trained with `qwen2 train reward` (its output dir's model/)
    reward: str = "execution"
    reward_model: str = ""  # reward=model: the causal LM whose mean response log-prob is the reward
    sandbox_timeout: float = 10.0  # seconds per execution of a response
    # --- optimizer -----------------------------------------------------------------------------
    optimizer: str = "adamw"  # adamw, or onmerge: the Online Merging Optimizer (qwen2/train/onmerge.py)
    onmerge_method: str = "dare"  # dare (OnDARE) or ties (OnTIES)
    # Online Merging Optimizer; defaults from the authors' 7B DPO script (keep 1 %, alpha 1e-7)
    onmerge_drop_rate: float = 0.99  # OnDARE: fraction of each delta's entries dropped (the rest rescaled)
    onmerge_density: float = 0.01  # OnTIES: fraction of each delta's entries kept (largest magnitudes)
    onmerge_ref_weight: float = 1e-7  # alpha: step = alpha * reference delta (SFT - base) + (1 - alpha) * update
    onmerge_base_model: str = ""  # the pre-trained model the starting (SFT) model was tuned from
    # --- logging and checkpoints ---------------------------------------------------------------
    log_every: int = 1
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept
    tensorboard: bool = False  # also log to output_dir/tensorboard (needs the tensorboard package)
    resume: bool = False  # continue from the latest checkpoint in output_dir

    def __post_init__(self):
        check(self)


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


DATA_TYPE = str | list  # one file, or a mixture of DataSource tables
TABLES = list[dict]


def _type_name(t: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
            dict: "a table", DATA_TYPE: "a file path or a list of {path, weight} tables",
            TABLES: "a list of tables"}[t]


def _coerce(name: str, value, t: type):
    """`value` as type `t`, or a one-line error. Ints are accepted for floats; nothing else is converted."""
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t == TABLES and isinstance(value, (list, tuple)) and all(isinstance(v, dict) for v in value):
        return [dict(v) for v in value]
    if t == DATA_TYPE and isinstance(value, (str, list, tuple)):
        return value if isinstance(value, str) else [dict(v) if isinstance(v, dict) else v for v in value]
    if t is list and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, t) and not (t is int and isinstance(value, bool)) and t is not list:
        return value
    raise Qwen2Error(f"training option {name!r} must be {_type_name(t)}, got {value!r}")


def _parse_override(name: str, text: str, t: type):
    """A command-line value: `lr=1e-5`, `lora=true`, `lora_targets=q_proj,v_proj`, `model_config={"hidden_size": 64}`."""
    if t is str:
        return text
    if t == DATA_TYPE:  # a path, or a JSON list of tables: data='[{"path": "a.jsonl", "weight": 0.7}, ...]'
        if not text.lstrip().startswith("["):
            return text
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    elif t is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
    elif t is list:
        return [s.strip() for s in text.split(",") if s.strip()]
    elif t is dict or t == TABLES:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    else:
        try:
            return t(text)
        except ValueError:
            pass
    raise Qwen2Error(f"training option {name!r} must be {_type_name(t)}, got {text!r}")


def from_dict(options: dict, source: str = "config") -> TrainConfig:
    types = _field_types()
    unknown = sorted(set(options) - set(types))
    if unknown:
        raise Qwen2Error(f"unknown training option(s) {', '.join(map(repr, unknown))} in {source}; "
                         f"known options: {', '.join(types)}")
    values = {k: _coerce(k, v, types[k]) for k, v in options.items()}
    if values.get("stages") and "max_steps" not in values:  # a staged run trains through its stages
        values["max_steps"] = sum(stage.steps for stage in training_stages(TrainConfig(), values["stages"]))
    return TrainConfig(**values)


def read_file(path: str | os.PathLike) -> dict:
    """The options of a .toml, .yaml or .yml file, as a dict."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise Qwen2Error(f"cannot read training config {path}: {e.strerror or e}") from None
    if path.endswith(".toml"):
        import tomllib

        try:
            options = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise Qwen2Error(f"{path} is not valid TOML ({e})") from None
    elif path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise Qwen2Error(f"reading {path} needs PyYAML (pip install -e '.[train]'); or write the config in TOML") from None

        try:
            options = yaml.safe_load(raw) or {}
        except yaml.YAMLError as e:
            raise Qwen2Error(f"{path} is not valid YAML ({' '.join(str(e).split())})") from None
    else:
        raise Qwen2Error(f"training config {path} must be a .toml, .yaml or .yml file")
    if not isinstance(options, dict):
        raise Qwen2Error(f"{path} must hold a table of options (key = value), not {type(options).__name__}")
    return options


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Options from `path` (optional), then `overrides`: ["key=value", ...] strings or a dict."""
    options = read_file(path) if path else {}
    source = os.fspath(path) if path else "overrides"
    types = _field_types()
    if isinstance(overrides, dict):
        options.update(overrides)
    else:
        for item in overrides or []:
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise Qwen2Error(f"override {item!r} must be key=value (e.g. lr=1e-5)")
            if key not in types:
                raise Qwen2Error(f"unknown training option {key!r} in override {item!r}; known options: {', '.join(types)}")
            options[key] = _parse_override(key, value, types[key])
    return from_dict(options, source)


def check(cfg: TrainConfig) -> None:
    """Values out of range, in one line each."""
    def choice(name, allowed):
        if getattr(cfg, name) not in allowed:
            raise Qwen2Error(f"training option {name!r} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")

    choice("schedule", SCHEDULES)
    choice("precision", PRECISIONS)
    choice("on_bad_record", ON_BAD_RECORD)
    choice("distributed", DISTRIBUTED)
    choice("optimizer", OPTIMIZERS)
    choice("onmerge_method", ONMERGE_METHODS)
    if not (cfg.reward in REWARDS or cfg.reward.startswith("model:") and len(cfg.reward) > len("model:")):
        raise Qwen2Error(f"training option 'reward' must be one of {', '.join(REWARDS)} or model:DIR (a reward "
                         f"model), got {cfg.reward!r}")
    if cfg.num_samples < 2:
        raise Qwen2Error(f"training option 'num_samples' must be at least 2 (a best and a worst), got {cfg.num_samples}")
    if cfg.max_new_tokens < 1 or cfg.temperature < 0 or not 0 < cfg.top_p <= 1 or not cfg.sandbox_timeout > 0:
        raise Qwen2Error("online sampling needs max_new_tokens >= 1, temperature >= 0, top_p in (0, 1] "
                         "and sandbox_timeout > 0")
    if not (0 <= cfg.onmerge_drop_rate < 1 and 0 < cfg.onmerge_density <= 1 and 0 <= cfg.onmerge_ref_weight <= 1):
        raise Qwen2Error("onmerge_drop_rate must be in [0, 1), onmerge_density in (0, 1], onmerge_ref_weight in [0, 1]")
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "lora_r", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise Qwen2Error(f"training option {name!r} must be at least 1, got {getattr(cfg, name)}")
    data_sources(cfg.data)
    if cfg.stages and sum(s.steps for s in training_stages(cfg)) != cfg.max_steps:
        raise Qwen2Error(f"max_steps ({cfg.max_steps}) must be the sum of the stages' steps "
                         f"({sum(s.steps for s in training_stages(cfg))}); leave max_steps out")
    for name in ("warmup_steps", "save_every", "eval_every"):
        if getattr(cfg, name) < 0:
            raise Qwen2Error(f"training option {name!r} must be 0 or more, got {getattr(cfg, name)}")
    for name in ("lr", "beta", "lora_alpha"):
        if not getattr(cfg, name) > 0:
            raise Qwen2Error(f"training option {name!r} must be positive, got {getattr(cfg, name)}")
    for name in ("min_lr", "weight_decay", "grad_clip"):
        if getattr(cfg, name) < 0:
            raise Qwen2Error(f"training option {name!r} must be 0 or more, got {getattr(cfg, name)}")
    if cfg.min_lr > cfg.lr:
        raise Qwen2Error(f"min_lr ({cfg.min_lr}) must not exceed lr ({cfg.lr})")
    if not 0 <= cfg.lora_dropout < 1:
        raise Qwen2Error(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not (0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1):
        raise Qwen2Error("adam_beta1 and adam_beta2 must be in [0, 1)")
    if cfg.lora and not cfg.lora_targets:
        raise Qwen2Error("lora=true needs at least one lora_targets pattern (e.g. q_proj,v_proj)")


def require_paths(cfg: TrainConfig) -> None:
    """What a run needs before anything is loaded (a bare TrainConfig() is valid, e.g. for tests)."""
    sources = [s for stage in training_stages(cfg) for s in data_sources(stage.data)]
    if not sources:
        raise Qwen2Error("no training data: set data = \"path/to/file.jsonl\" in the config or data=... on the command line")
    for path in [s.path for s in sources] + [s.heldout for s in sources if s.heldout]:
        if not os.path.isfile(path):
            raise Qwen2Error(f"training data {path} does not exist or is not a file")
    if not cfg.output_dir:
        raise Qwen2Error("no output directory: set output_dir = \"runs/NAME\" in the config or output_dir=... on the command line")


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
