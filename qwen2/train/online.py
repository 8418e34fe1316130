"""Online DPO (the second RLHF stage of the Qwen2 report): for each prompt the current policy
samples `num_samples` responses, a reward function scores them, the best and the worst become a
preference pair, and the policy takes a DPO step on the pairs against the frozen starting model.

A reward is any callable `reward(task, response) -> float`. Two ship:

  ExecutionReward  the response's code (extracted as HumanEval's checker does) run with the task's
                   unit tests in the sandbox (qwen2.eval.sandbox): the fraction of tests that pass
                   when "tests" is a list, 1 or 0 when it is one test program.
  LogProbReward    a reward model: the mean per-token log-probability a scorer causal LM (any
                   Qwen2 checkpoint, e.g. one fine-tuned on good responses) gives the response
                   after the prompt. Simple, and monotone in how "typical" of the scorer a reply is.

Data: JSONL of {"prompt": str or messages, "tests": str or [str, ...], "entry_point": optional
name of the function the tests call}. Sampling is seeded from (seed, micro-batch, prompt), so a run
(and a resumed one) draws the same responses given the same weights. A prompt whose responses all
score the same gives no pair; a step with no pair at all trains on nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..eval.humaneval import extract_code
from ..eval.sandbox import Limits, run_python
from ..runtime.generate import SamplingParams, generate_text
from . import data as D
from .dpo import DirectPreference, PreferenceBatch
from .forward import forward, token_log_probs

Reward = Callable[["CodeTask", str], float]


@dataclass
class CodeTask:
    messages: list[dict]  # the prompt as a conversation
    tests: str | list[str]  # a test program, or several tests run one at a time
    entry_point: str | None = None  # the function the tests call (picks the right code block)


def code_tasks(path: str, report: D.DataReport) -> list[CodeTask]:
    tasks = []
    for number, record in D.jsonl_records(path, report):
        messages = D.as_messages(record.get("prompt"))
        tests, entry = record.get("tests"), record.get("entry_point")
        tests_ok = isinstance(tests, str) and tests.strip() or (
            isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests))
        why = None
        if messages is None or not tests_ok:
            why = "an online-dpo record needs \"prompt\" (string or messages) and \"tests\" (a string or list of strings)"
        elif entry is not None and not isinstance(entry, str):
            why = "\"entry_point\" must be a string"
        else:
            why = D.check_messages(messages + [{"role": "assistant", "content": "x"}])
        if why:
            report.bad(number, why)
            continue
        tasks.append(CodeTask(messages, tests, entry))
        report.records += 1
    return tasks


class ExecutionReward:
    def __init__(self, timeout: float = 10.0):
        self.limits = Limits(timeout=timeout)

    def __call__(self, task: CodeTask, response: str) -> float:
        code = extract_code(response, task.entry_point)
        tests = task.tests if isinstance(task.tests, list) else [task.tests]
        passed = sum(run_python(f"{code}\n\n{test}\n", self.limits).ok for test in tests)
        return passed / len(tests)


class LogProbReward:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer

    @torch.no_grad()
    def __call__(self, task: CodeTask, response: str) -> float:
        row = D.render_chat(self.tokenizer, task.messages + [{"role": "assistant", "content": response}], "last")
        labels = torch.tensor([row.labels], device=self.model.device)
        logits = forward(self.model, torch.tensor([row.input_ids], device=self.model.device))
        logp, mask = token_log_probs(logits, labels)
        return float(logp.sum() / mask.sum())


def sample_responses(model, tokenizer, task: CodeTask, k: int, params: SamplingParams, eos_ids: list[int]) -> list[str]:
    """`k` responses of the policy, as one batch of identical prompts (params.seed fixes them)."""
    prompt = tokenizer.encode(tokenizer.apply_chat_template(task.messages, add_generation_prompt=True))
    return generate_text(model, tokenizer, [prompt] * k, params, eos_ids)


@dataclass
class OnlineBatch:
    pairs: PreferenceBatch  # weights: 1 for a real pair, 0 for the placeholder
    real: int  # pairs that count; a batch without one carries a placeholder pair of weight 0
    rewards: list[float]  # every sample's reward (for the log)


def best_and_worst(rewards: list[float]) -> tuple[int, int] | None:
    """Indices of the first highest- and first lowest-scored responses; None when all tie."""
    if max(rewards) == min(rewards):
        return None
    return rewards.index(max(rewards)), rewards.index(min(rewards))


class OnlineSampler:
    """micro_batch(m) of an online run: sample, score, pair (the policy as it is at that step)."""

    def __init__(self, model, tokenizer, eos_ids, tasks, order, rank_slice: slice, reward: Reward, cfg, device):
        self.model, self.tokenizer, self.eos_ids, self.tasks, self.order = model, tokenizer, eos_ids, tasks, order
        self.rank_slice, self.reward, self.cfg, self.device = rank_slice, reward, cfg, device

    def params(self, m: int, position: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                              top_p=self.cfg.top_p, seed=(self.cfg.seed * 1_000_003 + m) * 65_537 + position)

    def __call__(self, m: int) -> OnlineBatch:
        self.model.eval()  # no LoRA dropout while sampling
        positions = list(range(len(self.order.micro_batch(m))))[self.rank_slice]
        chosen, rejected, all_rewards = [], [], []
        for position in positions:
            task = self.tasks[self.order.micro_batch(m)[position]]
            responses = sample_responses(self.model, self.tokenizer, task, self.cfg.num_samples, self.params(m, position),
                                         self.eos_ids)
            rewards = [float(self.reward(task, r)) for r in responses]
            all_rewards += rewards
            pick = best_and_worst(rewards)
            if pick is None:
                continue
            for out, i in zip((chosen, rejected), pick):
                row = D.render_chat(self.tokenizer, task.messages + [{"role": "assistant", "content": responses[i]}],
                                    "last")
                out.append(D.truncate(row, self.cfg.seq_len, D.DataReport("")))
        real = len(chosen)
        weights = torch.ones(real)
        if real == 0:  # every rank runs forward and backward each step (DDP), so a zero-weight pair
            task = self.tasks[self.order.micro_batch(m)[positions[0]]]
            row = D.render_chat(self.tokenizer, task.messages + [{"role": "assistant", "content": ""}], "last")
            chosen, rejected, weights = [row], [row], torch.zeros(1)
        rows = D.collate(chosen + rejected, self.tokenizer.pad_token_id).to(self.device)
        return OnlineBatch(PreferenceBatch(rows, None, weights.to(self.device)), real, all_rewards)


class OnlinePreference(DirectPreference):
    """DPO on the sampled pairs, against the frozen starting policy (or the base with LoRA off)."""

    may_be_empty = True  # a step where every prompt tied learns nothing rather than failing

    def count(self, batch: OnlineBatch) -> int:
        return batch.real

    def tokens(self, batch: OnlineBatch) -> int:
        return batch.pairs.rows.num_tokens

    def loss(self, model, batch: OnlineBatch):
        loss, metrics = super().loss(model, batch.pairs)
        # x pairs: the loop divides metrics by the step's pairs; this is a per-sample mean
        metrics["sample_reward"] = sum(batch.rewards) / max(len(batch.rewards), 1) * batch.real
        return loss, metrics
