"""`pretrain`, `sft` and `dpo`: a TrainConfig in, a trained model (and its log) out. Each wires
its data and objective into the shared `Trainer`."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from ..config import POSITION_FIELDS
from ..errors import Qwen2Error
from ..fileio import write_text_atomic
from ..model.moe import load_balancing_loss
from . import data as D
from . import distributed
from .config import TrainConfig, data_sources, from_dict, load_config, require_paths, to_dict, training_stages
from .dpo import DirectPreference, PreferenceBatch
from .forward import forward, lm_loss_sum
from .loop import Trainer
from .lora import apply_lora, merge_lora, save_adapters, trainable_parameters
from .mixture import Mixture, MixtureReport
from .stages import StageReport, StagedRows
from .reward import (PairwiseReward, RewardModel, TrainedReward, from_language_model, load_reward_model,
                     save_reward_model)
from .run_dir import CONFIG_FILE


@dataclass
class RunResult:
    log: list[dict]  # one record per logged step: step, loss, lr, grad_norm, tokens, tokens_per_s, ...
    data: dict  # records used, skipped, truncated
    output_dir: str
    model_dir: str | None  # HF checkpoint of the trained (merged) model
    adapter_dir: str | None  # LoRA adapters alone


# ---- objectives -------------------------------------------------------------------------------

class LanguageModelling:
    """Next-token cross-entropy on the labelled tokens (pre-training: all; SFT: the assistant's)."""

    def __init__(self, activation_checkpointing: bool):
        self.activation_checkpointing = activation_checkpointing

    def count(self, batch: D.Batch) -> int:
        return batch.num_targets

    def tokens(self, batch: D.Batch) -> int:
        return batch.num_tokens

    def loss(self, model, batch: D.Batch):
        logits = forward(model, batch.input_ids, batch.doc_ids, self.activation_checkpointing)
        return lm_loss_sum(logits, batch.labels), {}


class LoadBalancedLanguageModelling(LanguageModelling):
    """Qwen2-MoE's training loss, as transformers' Qwen2MoeForCausalLM computes it: cross-entropy
    plus `coefficient` x the routers' load-balancing loss over the micro-batch's real tokens (padding
    left out). The loop divides by the step's target count, so the balancing term is scaled by this
    micro-batch's count here: one micro-batch's loss is then exactly transformers' mean, and
    accumulated ones weigh each micro-batch's balance by its tokens. Logged as `aux_loss`."""

    def __init__(self, activation_checkpointing: bool, coefficient: float):
        super().__init__(activation_checkpointing)
        self.coefficient = coefficient

    def loss(self, model, batch: D.Batch):
        lm_loss, _ = super().loss(model, batch)
        aux = load_balancing_loss(model, batch.doc_ids != D.PAD_DOCUMENT) * batch.num_targets
        return lm_loss + self.coefficient * aux, {"aux_loss": float(aux.detach())}


def language_modelling(model, activation_checkpointing: bool) -> LanguageModelling:
    """The objective for `model`: with the load-balancing loss when it has MoE layers."""
    config = model.config
    if any(config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        return LoadBalancedLanguageModelling(activation_checkpointing, config.router_aux_loss_coef)
    return LanguageModelling(activation_checkpointing)


# ---- model ------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise Qwen2Error(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Qwen2Error(f"device={name} but no CUDA GPU is available; use device=cpu")
    return device


def init_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """Fresh weights for pre-training from scratch: N(0, 0.02) matrices and embeddings, zero
    biases, unit norm scales (transformers' Qwen2 initialisation)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)


def scratch_model(config, seed: int) -> torch.nn.Module:
    """What pre-training from scratch (from_scratch=true) starts from: a Transformer of `config`
    with fresh weights (`init_weights`), drawn after seeding torch with `seed`."""
    from ..model import Transformer

    torch.manual_seed(seed)
    model = Transformer(config)
    init_weights(model)
    return model


def save_initial_model(directory: str, config, tokenizer, seed: int = 0) -> None:
    """An HF directory to pre-train from scratch from: config.json and the tokenizer, which
    from_scratch=true reads, and the weights it draws from them with this `seed`, saved so that the
    starting point is on record and loads as a model (the untrained baseline an experiment scores)."""
    from ..checkpoint.hf import save_hf_dir
    from ..checkpoint.registry import generation_config_for

    model = scratch_model(config, seed)
    save_hf_dir(directory, config, model.state_dict(), tokenizer, generation_config_for(tokenizer))


def load_model(cfg: TrainConfig, device: torch.device):
    """The starting model as a `qwen2.Qwen2` (fp32 weights: the optimizer's master copy)."""
    from ..api import Qwen2, load
    from ..checkpoint import load_checkpoint

    if not cfg.from_scratch:
        other = sorted(set(cfg.model_config) - set(POSITION_FIELDS))
        if other:
            raise Qwen2Error(f"model_config may change {', '.join(other)} of a model trained from_scratch only; "
                             f"a continued training may change its position encoding ({', '.join(POSITION_FIELDS)})")
        m = load(cfg.model, device=device)
        if cfg.model_config:  # e.g. a longer context and a higher RoPE base, as the report's long-context stage
            m.model.encode_positions_as(dataclasses.replace(m.model.config, **cfg.model_config))
    else:
        config, _, tokenizer, generation_config = load_checkpoint(cfg.model)
        try:
            config = dataclasses.replace(config, **cfg.model_config)
        except TypeError as e:
            raise Qwen2Error(f"model_config: {e}; use Qwen2Config field names (hidden_size, num_hidden_layers, ...)") from None
        model = scratch_model(config, cfg.seed).to(device)
        m = Qwen2(model, tokenizer, generation_config, source=cfg.model)
    if m.tokenizer is None:
        raise Qwen2Error(f"{cfg.model} has no tokenizer files; training needs its tokenizer")
    return m


# ---- runs ---------------------------------------------------------------------------------------

def _as_config(config, overrides: dict) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return from_dict({**to_dict(config), **overrides})
    if isinstance(config, dict):
        return from_dict({**config, **overrides})
    if isinstance(config, (str, os.PathLike)):
        return load_config(config, overrides)
    raise Qwen2Error(f"config must be a TrainConfig, a dict of options or a .toml/.yaml path, not {type(config).__name__}")


def _run(task: str, config, overrides: dict, reward=None) -> RunResult:
    cfg = _as_config(config, overrides)
    require_paths(cfg)
    if task == "online-dpo" and cfg.distributed == "fsdp2":
        raise Qwen2Error("online-dpo samples from the whole policy on every rank; use distributed=ddp")
    world = distributed.setup(cfg.distributed, cfg.device)
    try:
        return _run_in_world(task, cfg, world, reward)
    finally:
        distributed.teardown()


def _run_in_world(task: str, cfg: TrainConfig, world: distributed.World, reward) -> RunResult:
    device = distributed.device_for(world, resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)
    m = load_model(cfg, device)
    tokenizer = m.tokenizer
    os.makedirs(cfg.output_dir, exist_ok=True)
    rows_per_micro_batch = cfg.batch_size * world.size  # drawn as one; each rank takes its slice
    mine = slice(world.rank * cfg.batch_size, (world.rank + 1) * cfg.batch_size)

    step_report = None
    if task in ("pretrain", "sft"):
        rows_plan = _row_plan(task, cfg, m.model, tokenizer, rows_per_micro_batch, mine, device)
        rows_micro_batch, step_report, data_summary, described, skipped, truncated = rows_plan
    else:
        if isinstance(cfg.data, list) or cfg.stages:
            raise Qwen2Error(f"data mixtures and stages are for pretrain and sft; {task} reads one file: "
                             "set data = \"FILE.jsonl\" and no stages")
        from . import online

        report = D.DataReport(cfg.data, cfg.on_bad_record)
        examples = (online.code_tasks(cfg.data, report) if task == "online-dpo"
                    else D.preference_pairs(tokenizer, cfg.data, cfg.seq_len, report))
        order = D.ExampleOrder(len(examples), rows_per_micro_batch, cfg.seed)
        data_summary = report.summary()
        described, skipped, truncated = f"{report.records} from {cfg.data}", report.skipped, report.truncated

    reference = None
    precomputed = task == "dpo" and examples[0].ref_chosen_logp is not None
    if task in ("dpo", "online-dpo") and not precomputed and (cfg.reference_model or not cfg.lora):
        # A frozen copy of the starting policy, taken before any checkpoint is restored into it.
        ref_source = load_model(dataclasses.replace(cfg, model=cfg.reference_model, from_scratch=False, model_config={}),
                                device).model \
            if cfg.reference_model else copy.deepcopy(m.model)
        reference = ref_source.eval().requires_grad_(False)

    reference_deltas = None
    if cfg.optimizer == "onmerge":
        reference_deltas = _reference_deltas(cfg, m.model, device)

    if task == "reward":  # the decoder under a fresh scalar head
        m.model = from_language_model(m.model, cfg.seed)

    if cfg.lora:
        apply_lora(m.model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, seed=cfg.seed)
        if task == "reward":
            m.model.score.requires_grad_(True)  # the new head is always trained in full

    def preference_micro_batch(index: int) -> PreferenceBatch:
        chosen = [examples[i] for i in order.micro_batch(index)[mine]]
        rows = D.collate([p.chosen for p in chosen] + [p.rejected for p in chosen], tokenizer.pad_token_id)
        ref = None
        if chosen[0].ref_chosen_logp is not None:
            ref = torch.tensor([p.ref_chosen_logp for p in chosen] + [p.ref_rejected_logp for p in chosen])
            ref = ref.to(device)
        return PreferenceBatch(rows.to(device), ref)

    if task == "online-dpo":
        if reward is None:
            reward = _make_reward(cfg, device)
        micro_batch = online.OnlineSampler(m.model, tokenizer, m.eos_ids, examples, order, mine, reward, cfg, device)
        objective = online.OnlinePreference(cfg.beta, reference, cfg.activation_checkpointing)
    elif task == "dpo":
        micro_batch = preference_micro_batch
        objective = DirectPreference(cfg.beta, reference, cfg.activation_checkpointing)
    elif task == "reward":
        micro_batch, objective = preference_micro_batch, PairwiseReward(cfg.activation_checkpointing)
    else:
        micro_batch, objective = rows_micro_batch, language_modelling(m.model, cfg.activation_checkpointing)
    trainer = Trainer(cfg, m.model, objective, micro_batch, device, extra_state={"data": data_summary},
                      reference_deltas=reference_deltas, step_report=step_report)
    trainer.start()
    if world.is_main:
        write_text_atomic(os.path.join(cfg.output_dir, CONFIG_FILE), json.dumps(to_dict(cfg), indent=2))
        print(f"{task}: examples: {described} ({skipped} skipped, {truncated} "
              f"truncated), {trainable_parameters(m.model):,} trainable parameters"
              + (f", {world.size} processes ({cfg.distributed})" if world.active else ""), flush=True)
    log = trainer.fit()
    if world.mode == "fsdp2":
        m.model = _gathered(cfg, m.model)  # every rank joins the gather; rank 0 exports
    model_dir = adapter_dir = None
    if world.is_main:
        model_dir, adapter_dir = _export(cfg, m)
    distributed.barrier()
    return RunResult(log, data_summary, cfg.output_dir, model_dir, adapter_dir)


def _row_plan(task: str, cfg: TrainConfig, model, tokenizer, rows_per_micro_batch: int, mine: slice, device):
    """What a pretrain or sft run reads: (micro_batch(m), the log's step report or None, the data
    summary, a line describing the data, records skipped, records truncated). Each stage's sources
    become rows at its seq_len (each file read once per row length) and a `Mixture`; a run of one
    stage on a data mixture logs each source's share and held-out loss, a staged run its stage."""
    stages = training_stages(cfg)
    rows_by_file: dict[tuple[str, int], tuple[list[D.Row], D.DataReport]] = {}

    def rows_of(path: str, seq_len: int) -> tuple[list[D.Row], D.DataReport]:
        if (path, seq_len) not in rows_by_file:
            report = D.DataReport(path, cfg.on_bad_record)
            rows = (D.sft_rows(tokenizer, path, seq_len, report) if task == "sft"
                    else D.pretraining_rows(tokenizer, path, seq_len, cfg.pack_documents, report))
            if not rows:
                raise Qwen2Error(f"training data {path} holds no usable example")
            rows_by_file[path, seq_len] = rows, report
        return rows_by_file[path, seq_len]

    mixtures, summaries = [], []
    for stage in stages:
        sources = data_sources(stage.data)
        read = [rows_of(s.path, stage.seq_len) for s in sources]
        mixtures.append(Mixture(sources, [rows for rows, _ in read], cfg.seed))
        summaries.append({"sources": [{"name": s.name, "weight": w, **r.summary()}
                                      for s, w, (_, r) in zip(sources, mixtures[-1].weights, read)]})
    staged = StagedRows(stages, mixtures, model, cfg.grad_accum, rows_per_micro_batch, mine, tokenizer.pad_token_id,
                        device)
    reports = [r for _, r in rows_by_file.values()]
    described = ", ".join(f"{r.records} from {r.path}" + (f" in rows of {n}" if cfg.stages else "")
                          for (_, n), (_, r) in rows_by_file.items())
    skipped, truncated = sum(r.skipped for r in reports), sum(r.truncated for r in reports)
    if cfg.stages:
        summary = {"stages": [{"steps": st.steps, "seq_len": st.seq_len, **sm} for st, sm in zip(stages, summaries)]}
        return staged, StageReport(staged, stages, cfg.grad_accum), summary, described, skipped, truncated
    if not isinstance(cfg.data, list):
        return staged, None, reports[0].summary(), described, skipped, truncated
    sources = data_sources(cfg.data)
    heldout = {s.name: rows_of(s.heldout, cfg.seq_len)[0] for s in sources if s.heldout}
    report = MixtureReport(mixtures[0], heldout, rows_per_micro_batch * cfg.grad_accum, cfg.eval_every,
                           cfg.max_steps, cfg.batch_size, tokenizer.pad_token_id, device)
    return staged, report, summaries[0], described, skipped, truncated


def _gathered(cfg: TrainConfig, sharded: torch.nn.Module) -> torch.nn.Module:
    """A plain (unsharded) copy of an FSDP2-trained model, LoRA layers included."""
    full = distributed.full_state_dict(sharded)
    model = type(sharded)(sharded.config)  # a Transformer, or a RewardModel
    if cfg.lora:
        apply_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, seed=cfg.seed)
    model.load_state_dict({k: v.cpu() for k, v in full.items()})
    return model


def _reference_deltas(cfg: TrainConfig, start: torch.nn.Module, device) -> dict[str, torch.Tensor]:
    """The Online Merging Optimizer's tau_r = theta_SFT - theta_base: the starting model (the SFT
    one) minus the pre-trained base it was tuned from."""
    if not cfg.onmerge_base_model:
        raise Qwen2Error("optimizer=onmerge needs onmerge_base_model: the pre-trained model the starting "
                         "(SFT) model was fine-tuned from")
    base = dict(load_model(dataclasses.replace(cfg, model=cfg.onmerge_base_model, from_scratch=False,
                                               model_config={}), device).model.named_parameters())
    deltas = {}
    for name, p in start.named_parameters():
        if name not in base or base[name].shape != p.shape:
            raise Qwen2Error(f"onmerge_base_model {cfg.onmerge_base_model} does not match the model's {name}; "
                             "it must be the same architecture (the model the SFT started from)")
        deltas[name] = (p.detach() - base[name].detach()).clone()
    return deltas


def _make_reward(cfg: TrainConfig, device):
    from . import online

    if cfg.reward == "execution":
        return online.ExecutionReward(cfg.sandbox_timeout)
    if cfg.reward.startswith("model:"):
        return TrainedReward(*load_reward_model(cfg.reward[len("model:"):], device))
    if not cfg.reward_model:
        raise Qwen2Error("reward=model needs reward_model: a Qwen2 checkpoint whose mean response log-prob scores replies")
    scorer = load_model(dataclasses.replace(cfg, model=cfg.reward_model, from_scratch=False, model_config={}), device)
    return online.LogProbReward(scorer.model.requires_grad_(False), scorer.tokenizer)


def _export(cfg: TrainConfig, m) -> tuple[str | None, str | None]:
    """The final model as an HF checkpoint (adapters merged in), and the adapters alone."""
    adapter_dir = model_dir = None
    if cfg.lora:
        adapter_dir = os.path.join(cfg.output_dir, "adapter")
        save_adapters(m.model, adapter_dir)
        if not cfg.merge_lora:
            return None, adapter_dir
        merge_lora(m.model)
    model_dir = os.path.join(cfg.output_dir, "model")
    if isinstance(m.model, RewardModel):
        save_reward_model(model_dir, m.model, m.tokenizer, overwrite=True)
    else:
        m.save(model_dir, overwrite=True)
    return model_dir, adapter_dir


def pretrain(config, **overrides) -> RunResult:
    """Pre-train (or continue pre-training) on plain text: `config` is a TrainConfig, a dict of
    options or a .toml/.yaml file; keyword arguments override it."""
    return _run("pretrain", config, overrides)


def sft(config, **overrides) -> RunResult:
    """Supervised fine-tuning on chat JSONL (`messages`); loss on the assistant turns only."""
    return _run("sft", config, overrides)


def dpo(config, **overrides) -> RunResult:
    """Offline DPO on preference JSONL (`prompt`, `chosen`, `rejected`)."""
    return _run("dpo", config, overrides)


def train_reward(config, **overrides) -> RunResult:
    """A reward model on preference JSONL (`prompt`, `chosen`, `rejected`): the model's decoder under
    a scalar head, Bradley-Terry loss; saved as transformers' Qwen2ForSequenceClassification."""
    return _run("reward", config, overrides)


def online_dpo(config, reward=None, **overrides) -> RunResult:
    """Online DPO on code-task JSONL (`prompt`, `tests`): sample, score with `reward(task, response)`
    (default: from the config, execution feedback or a reward model), pair best and worst, DPO-step."""
    return _run("online-dpo", config, overrides, reward)


TASK_FUNCTIONS = {"pretrain": pretrain, "sft": sft, "dpo": dpo, "reward": train_reward, "online-dpo": online_dpo}
