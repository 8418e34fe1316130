"""The training loop: AdamW, warm-up then cosine or linear decay to a floor, gradient accumulation
and clipping, logging, periodic checkpoints and exact resume.

It knows nothing of the task. An `Objective` turns a micro-batch into a summed loss, and
`micro_batch(m)` gives the m-th micro-batch of the run (a pure function of m, so the data position
is the count of micro-batches consumed). Pre-training, SFT and DPO differ only in those two.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from ..errors import Qwen2Error
from ..fileio import write_text_atomic
from ..progress import progress_bar
from . import checkpoint as ckpt
from . import distributed as dist
from .config import TrainConfig
from .run_dir import LOG_FILE, read_log

# Test hook: the resume test sets it to SIGKILL the run right after that step (logged and, when
# due, checkpointed), a deterministic stand-in for a crash or a preempted machine.
KILL_AFTER_STEP_ENV = "QWEN2_TRAIN_KILL_AFTER_STEP"


class Objective(Protocol):
    def count(self, micro_batch) -> int:
        """How many terms the loss sums over (target tokens, or preference pairs)."""

    def tokens(self, micro_batch) -> int:
        """Tokens the model reads (for tokens/s)."""

    def loss(self, model, micro_batch) -> tuple[torch.Tensor, dict[str, float]]:
        """(summed loss, summed metrics) of one micro-batch."""


class StepReport(Protocol):
    def due(self, step: int) -> bool:
        """Whether `step` must be logged (e.g. it evaluates held-out data)."""

    def __call__(self, model, step: int) -> dict[str, Any]:
        """The columns this report adds to the log record of `step` (the same columns every time)."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up from lr/warmup to lr over
    `warmup_steps`, then cosine or linear decay from lr to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = cfg.max_steps - cfg.warmup_steps - 1
    progress = 1.0 if decay_steps <= 0 else (step - cfg.warmup_steps) / decay_steps
    if cfg.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = 1 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                   reference_deltas: dict[str, torch.Tensor] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (decaying biases and
    norm scales towards zero only hurts, the common practice since GPT-2). optimizer=onmerge: the
    Online Merging Optimizer, merging each step with `reference_deltas` (by parameter name)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise Qwen2Error("the model has no trainable parameters")
    decay = [(n, p) for n, p in named if p.dim() >= 2]
    no_decay = [(n, p) for n, p in named if p.dim() < 2]
    groups = [{"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    adamw = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **adamw)
    from .onmerge import OnlineMergingAdamW

    if reference_deltas is None:
        raise Qwen2Error("optimizer=onmerge is for online-dpo (it needs onmerge_base_model)")
    missing = [n for n, _ in named if n not in reference_deltas]
    if missing:
        raise Qwen2Error(f"optimizer=onmerge has no reference delta for {missing[0]} (LoRA adapters have no "
                         "SFT - base delta); train without lora, or with optimizer=adamw")
    deltas = [dist.shard_like(reference_deltas[n], p) for n, p in decay + no_decay]
    return OnlineMergingAdamW(groups, deltas, cfg.onmerge_method, cfg.onmerge_drop_rate, cfg.onmerge_density,
                              cfg.onmerge_ref_weight, cfg.seed, **adamw)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 for autocast, or None (fp32). "auto" picks bf16 on a GPU that has it; on CPUs fp32, as
    bf16 matmuls are slower than fp32 ones on most of them."""
    if cfg.precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = device.type == "cpu" and torch.cpu._is_avx512_bf16_supported()
    if cfg.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and supported else None
    if not supported:
        raise Qwen2Error(f"precision=bf16 needs hardware bf16 support, which {device} lacks; use precision=fp32")
    return torch.bfloat16


class RunLog:
    """One record per logged step in log.jsonl and log.csv; TensorBoard too when asked for."""

    def __init__(self, output_dir: str, tensorboard: bool = False, enabled: bool = True):
        self.output_dir = output_dir
        self.jsonl = os.path.join(output_dir, LOG_FILE)
        self.csv = os.path.join(output_dir, "log.csv")
        self.writer = None
        self.enabled = enabled  # distributed: rank 0 writes, the others only read
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise Qwen2Error("tensorboard=true needs the tensorboard package (pip install tensorboard); "
                                 "log.jsonl and log.csv are written without it") from None
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def records(self) -> list[dict]:
        return read_log(self.output_dir)

    def truncate(self, step: int) -> None:
        """Forget records after `step`: a resumed run logs those steps again."""
        if not self.enabled:
            return
        kept = [r for r in self.records() if r["step"] <= step]
        write_text_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        self._write_csv(kept)

    def append(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        new_file = not os.path.exists(self.csv) or os.path.getsize(self.csv) == 0
        with open(self.csv, "a", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(record))
            if new_file:
                writer.writeheader()
            writer.writerow(record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
            self.writer.flush()

    def _write_csv(self, records: list[dict]) -> None:
        import io

        out = io.StringIO()
        if records:
            writer = csv.DictWriter(out, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        write_text_atomic(self.csv, out.getvalue())


@dataclass
class Trainer:
    cfg: TrainConfig
    model: torch.nn.Module
    objective: Objective
    micro_batch: Callable[[int], Any]  # m -> the m-th micro-batch of the run
    device: torch.device
    extra_state: dict | None = None  # JSON data stored in every checkpoint (e.g. data reports)
    reference_deltas: dict | None = None  # optimizer=onmerge: SFT - base weights, by parameter name
    step_report: StepReport | None = None  # more columns for the log (a data mixture's shares, held-out losses)

    def __post_init__(self):
        # Under torchrun the objectives run the wrapped model (DDP, FSDP2); the optimizer steps its
        # parameters (FSDP2: this rank's shards), so it is made after wrapping.
        self.world = dist.world()
        self.wrapped = dist.wrap(self.model, self.device)
        self.optimizer = make_optimizer(self.model, self.cfg, self.reference_deltas)
        self.autocast = autocast_dtype(self.cfg, self.device)
        self.step = 0
        self.tokens_seen = 0
        self.log = RunLog(self.cfg.output_dir, self.cfg.tensorboard, enabled=self.world.is_main)

    # ---- start / resume ------------------------------------------------------------------------

    def start(self) -> None:
        """Resume from the latest checkpoint when asked; refuse to write over another run otherwise."""
        found = ckpt.list_checkpoints(self.cfg.output_dir)
        dist.barrier()  # every rank has looked before rank 0 writes anything
        if not self.cfg.resume:
            if found or self.log.records():
                raise Qwen2Error(f"{self.cfg.output_dir} already holds a training run; resume it with --resume "
                                 "(resume=true) or choose a new output_dir")
            return
        if not found:
            print(f"note: no checkpoint in {self.cfg.output_dir} yet; starting from the beginning", flush=True)
            self.log.truncate(0)
            return
        step, path = found[-1]
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.log.truncate(self.step)
        if self.world.is_main:
            print(f"resumed from {path} (step {self.step})", flush=True)

    # ---- one optimizer step ----------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """Accumulate grad_accum micro-batches (each loss divided by the whole step's count, so the
        gradient is that of one large batch), clip, step. Returns the step's log record."""
        cfg, model = self.cfg, self.model
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = [self.micro_batch(self.step * cfg.grad_accum + a) for a in range(cfg.grad_accum)]
        # Distributed: this rank's shard of each micro-batch; counts are summed over the ranks.
        total, tokens = dist.all_sum([sum(self.objective.count(mb) for mb in micro),
                                      sum(self.objective.tokens(mb) for mb in micro)], self.device)
        total, tokens = int(total), int(tokens)
        if total == 0:
            if not getattr(self.objective, "may_be_empty", False):
                raise Qwen2Error(f"step {self.step + 1} has no target to learn (every label ignored); check the data")
            total = 1  # online DPO, every prompt tied: zero loss and gradient (AdamW's momentum still moves)
        model.train()
        start = time.perf_counter()
        loss_sum, metrics = 0.0, {}
        for a, mb in enumerate(micro):
            autocast = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None
                        else contextlib.nullcontext())
            with dist.gradient_sync(self.wrapped, sync=a == len(micro) - 1):
                with autocast:
                    loss, mb_metrics = self.objective.loss(self.wrapped, mb)
                # x world: DDP and FSDP2 average the ranks' gradients; the step's gradient is their sum
                (loss * self.world.size / total).backward()
            loss_sum += float(loss.detach())
            for k, v in mb_metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v
        names = sorted(metrics)
        loss_sum, *sums = dist.all_sum([loss_sum] + [metrics[k] for k in names], self.device)
        metrics = dict(zip(names, sums))
        params = [p for p in model.parameters() if p.requires_grad]
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(dist.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        self.step += 1
        self.tokens_seen += tokens
        return {"step": self.step, "loss": loss_sum / total, "lr": lr, "grad_norm": grad_norm,
                "tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                **{k: v / total for k, v in metrics.items()}}

    # ---- the run ---------------------------------------------------------------------------------

    def fit(self) -> list[dict]:
        """Train to max_steps (from wherever start() left off); return the log records of the run."""
        cfg = self.cfg
        kill_after = int(os.environ.get(KILL_AFTER_STEP_ENV, "0") or 0)
        bar = progress_bar(total=cfg.max_steps, initial=self.step, desc="training", unit="step",
                           disable=not self.world.is_main)
        try:
            while self.step < cfg.max_steps:
                record = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                report_due = self.step_report is not None and self.step_report.due(self.step)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps or report_due:
                    if self.step_report is not None:
                        record.update(self.step_report(self.wrapped, self.step))
                    self.log.append(record)
                if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.max_steps:
                    self.save()
                if self.step == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            bar.close()
        return self.log.records()

    def save(self) -> str:
        state = {"tokens_seen": self.tokens_seen, "micro_batches": self.step * self.cfg.grad_accum,
                 **(self.extra_state or {})}
        return ckpt.save_checkpoint(self.cfg.output_dir, self.step, self.model, self.optimizer, state,
                                    self.cfg.keep_checkpoints, write=self.world.is_main)
