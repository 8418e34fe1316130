"""Reward-model accuracy: how well a small reward model, trained for a few CPU minutes, tells a right
reply from a wrong one on pairs it has not seen.

    python -m benchmarks.experiments.reward_model_accuracy            # the full run (0.5B, ~45 min on 2 cores)
    python -m benchmarks.experiments.reward_model_accuracy --smoke    # a tiny random model and a tiny slice, seconds

Pairs (seeded, deterministic):
  arithmetic  generated questions ("What is 37 * 12 + 5?") answered step by step; the chosen reply has
              every step right, the rejected one is the same wording with a near-miss in the final
              result (off by one, two digits swapped, or the wrong operation applied). Held-out
              questions are disjoint from the train questions.
  code        passing against failing replies to the 60 programming tasks of the DPO experiment
              (benchmarks/data/dpo_tasks_{train,heldout}.jsonl): replies sampled from the 0.5B (int4)
              with `qwen2 synth reject --verifier code`'s library call, each reduced to its code block
              (what the sandbox runs) and judged by the sandbox. Where sampling gives a task too few
              failing replies, a passing one is mutated (a flipped comparison, an off-by-one range,
              a constant return, ...) until the sandbox says it fails; a task with no passing sample
              uses its reference solution. Pairs of the 40 train tasks train, those of the 20 held-out
              tasks are held out. The samples are cached in the run directory.

The reward model is `qwen2.train.train_reward` (the decoder under a fresh scalar head, Bradley-Terry
loss) with LoRA on the top layers; its training is timed in process CPU seconds (budget: 10 CPU
minutes). Held-out pair accuracy (reward(chosen) > reward(rejected)) with 95 % Wilson intervals,
per kind, before training (the fresh head) and at each checkpoint. Writes
benchmarks/results/reward_model_accuracy.{json,md,png}.
"""
from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import random
import re
import shutil
import sys
import time

import torch

import qwen2
import qwen2.train
from benchmarks.common import (DATA_DIR, RESULTS_DIR, apply_preset, command_line, one_line_errors,
                               peak_rss_mb, save_png, set_torch_threads, wilson, write_jsonl, write_results)
from qwen2.errors import Qwen2Error
from qwen2.eval.humaneval import extract_code, fenced
from qwen2.progress import progress_bar
from qwen2.runtime.generate import SamplingParams
from qwen2.synth import rejection
from qwen2.synth.verifiers import checked_score, verifier

TRAIN_TASKS = os.path.join(DATA_DIR, "dpo_tasks_train.jsonl")
HELDOUT_TASKS = os.path.join(DATA_DIR, "dpo_tasks_heldout.jsonl")
RESULTS = os.path.join(RESULTS_DIR, "reward_model_accuracy.json")
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
KINDS = ("arithmetic", "code")


# ---- arithmetic pairs -----------------------------------------------------------------------------

def _steps(form: int, a: int, b: int, c: int, d: int) -> tuple[str, list[tuple[str, int]]]:
    """The question's expression and its worked steps [(left side, value)], the last one the result."""
    if form == 0:
        return f"{a} * {b} + {c}", [(f"{a} * {b}", a * b), (f"{a * b} + {c}", a * b + c)]
    if form == 1:
        return f"{a} * {b} - {c}", [(f"{a} * {b}", a * b), (f"{a * b} - {c}", a * b - c)]
    if form == 2:
        return f"({a} + {b}) * {c}", [(f"{a} + {b}", a + b), (f"{a + b} * {c}", (a + b) * c)]
    return f"{a} * {b} + {c} * {d}", [(f"{a} * {b}", a * b), (f"{c} * {d}", c * d), (f"{a * b} + {c * d}", a * b + c * d)]


def _wrong_operation(form: int, a: int, b: int, c: int, d: int) -> int:
    """The final step done with the other operation: + for - and the other way round, + for *."""
    return {0: a * b - c, 1: a * b + c, 2: a + b + c, 3: a * b - c * d}[form]


def _near_miss(rng: random.Random, form: int, numbers: tuple[int, int, int, int], right: int) -> tuple[int, str]:
    """A wrong final result close to `right`, and how it was made."""
    kinds = ["off_by_one", "digit_swap", "wrong_operation"]
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "off_by_one":
            return right + rng.choice((-1, 1)), kind
        if kind == "digit_swap":
            digits = list(str(abs(right)))
            spots = [i for i in range(len(digits) - 1) if digits[i] != digits[i + 1] and not (i == 0 and digits[1] == "0")]
            if spots:
                i = rng.choice(spots)
                digits[i], digits[i + 1] = digits[i + 1], digits[i]
                return int("".join(digits)) * (1 if right >= 0 else -1), kind
        if kind == "wrong_operation":
            wrong = _wrong_operation(form, *numbers)
            if wrong != right:
                return wrong, kind
    return right + 1, "off_by_one"


def reply_text(steps: list[tuple[str, int]], result: int) -> str:
    """The worked reply, with `result` as the final step's value (every earlier step as given)."""
    lines = [f"{left} = {value}." for left, value in steps[:-1]] + [f"{steps[-1][0]} = {result}."]
    return " ".join(["First,", *lines[:1]] + [f"Then {line}" for line in lines[1:]]) + f" The answer is {result}."


def arithmetic_pairs(seed: int, n_train: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs of distinct questions: the first `n_train` drawn train, the next
    `n_heldout` held out, so no held-out question is a train question."""
    rng = random.Random(seed)
    seen, pairs = set(), []
    while len(pairs) < n_train + n_heldout:
        form = rng.randrange(4)
        numbers = (rng.randint(11, 49), rng.randint(2, 19), rng.randint(2, 99) if form < 3 else rng.randint(2, 19),
                   rng.randint(2, 19))
        expression, steps = _steps(form, *numbers)
        question = f"What is {expression}?"
        if question in seen:
            continue
        seen.add(question)
        right = steps[-1][1]
        wrong, how = _near_miss(rng, form, numbers, right)
        pairs.append({"kind": "arithmetic", "source": how, "prompt": [{"role": "user", "content": question}],
                      "chosen": reply_text(steps, right), "rejected": reply_text(steps, wrong),
                      "expression": expression, "answer": right, "wrong_answer": wrong})
    return pairs[:n_train], pairs[n_train:]


# ---- code pairs -----------------------------------------------------------------------------------

# Each rule: (name, pattern, replacement). One occurrence (seeded) is replaced; the mutant counts
# only if it still parses and the sandbox says it fails.
MUTATIONS = [
    ("flip_comparison", r"(?<![<>=!])<=", "<"), ("flip_comparison", r"(?<![<>=!-])>=", ">"),
    ("flip_comparison", r"(?<![<>=!-])<(?![<=])", "<="), ("flip_comparison", r"(?<![<>=!-])>(?![>=])", ">="),
    ("flip_comparison", r"==", "!="), ("flip_comparison", r"!=", "=="),
    ("off_by_one_range", r"range\(([^()]*(?:\([^()]*\))?[^()]*)\)", r"range(\1 - 1)"),
    ("off_by_one_index", r"\[(-?\d+)\]", lambda m: f"[{int(m.group(1)) + 1}]"),
    ("off_by_one_constant", r"(?<![\w.])1(?![\w.])", "2"), ("off_by_one_constant", r"(?<![\w.])0(?![\w.])", "1"),
    ("swap_boolean", r"\band\b", "or"), ("swap_boolean", r"\bor\b", "and"),
    ("swap_boolean", r"\bTrue\b", "False"), ("swap_boolean", r"\bFalse\b", "True"),
    ("swap_min_max", r"\bmin\(", "max("), ("swap_min_max", r"\bmax\(", "min("),
    ("swap_arithmetic", r" \+ ", " - "), ("swap_arithmetic", r" - ", " + "),
    ("constant_return", r"return [^\n]+", "return 0"), ("constant_return", r"return [^\n]+", "return None"),
]


def mutants(reply: str, entry_point: str, rng: random.Random) -> list[tuple[str, str]]:
    """Single-edit mutants of a reply's code that still parse, [(rule name, fenced mutant)], in a seeded order."""
    code = extract_code(reply, entry_point)
    out = []
    for name, pattern, replacement in MUTATIONS:
        for match in re.finditer(pattern, code):
            mutated = code[:match.start()] + re.sub(pattern, replacement, match.group(0), count=1) + code[match.end():]
            if mutated == code:
                continue
            try:
                ast.parse(mutated)
            except SyntaxError:
                continue
            out.append((name, fenced(mutated)))
    rng.shuffle(out)
    return out


def code_only(reply: str, entry_point: str) -> str:
    """The reply reduced to the code block the sandbox runs: the same verdict in far fewer tokens
    (the sampled replies add prose the reward model would otherwise have to read)."""
    return fenced(extract_code(reply, entry_point))


def code_pairs(tasks: list[dict], samples: list[dict], check, per_task: int, seed: int,
               progress: bool = True) -> list[dict]:
    """Up to `per_task` (passing, failing) pairs per task, every reply's verdict from the sandbox
    (`check(task, reply)` -> fraction of tests passed): sampled passing against sampled failing
    replies first, then passing ones against their own failing mutants. A task with no passing
    sample pairs its reference solution instead."""
    by_id = {s["task_id"]: s for s in samples}
    pairs = []
    for t, task in enumerate(progress_bar(tasks, desc="code pairs", unit="task", disable=not progress)):
        rng = random.Random(seed * 1_000_003 + t)
        ep = task.get("entry_point")
        scored: dict[str, float] = {}
        for reply in by_id[task["task_id"]]["responses"]:
            short = code_only(reply, ep)
            if short not in scored:
                scored[short] = check(task, short)  # re-judged: the verdict of what is trained on
        passing = [r for r, x in scored.items() if x == 1.0]
        failing = [r for r, x in scored.items() if x < 1.0]
        chosen_source = "sample"
        if not passing:
            reference = code_only(rejection.reference_reply(task), ep)
            if check(task, reference) != 1.0:
                raise Qwen2Error(f"task {task['task_id']!r}: its reference solution fails its own tests")
            passing, chosen_source = [reference], "reference"
        rng.shuffle(passing)
        rng.shuffle(failing)
        task_pairs = [(c, r, "sampled") for c, r in zip(passing, failing)][:per_task]
        for c in passing * per_task:  # round-robin over the passing replies for the mutants
            if len(task_pairs) >= per_task:
                break
            used = {r for _, r, _ in task_pairs}
            for rule, mutant in mutants(c, ep, rng)[:12]:
                if mutant not in used and mutant not in scored and check(task, mutant) < 1.0:
                    task_pairs.append((c, mutant, "mutant:" + rule))
                    break
        pairs += [{"kind": "code", "task_id": task["task_id"], "source": source,
                   "chosen_source": chosen_source, "prompt": task["prompt"], "chosen": c, "rejected": r}
                  for c, r, source in task_pairs]
    return pairs


def sample_code_replies(tasks_file: str, out_dir: str, load_model, samples: int, args) -> tuple[list[dict], dict]:
    """`qwen2 synth reject --verifier code --pairs` over a task file, into out_dir (a rerun reuses
    the samples there); the scored samples and the run's stats."""
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    stats = rejection.reject(tasks_file, load_model, out_dir, verifier_name="code", samples=samples,
                             params=params, seed=args.seed, batch=args.sample_batch, pairs=True, per_task=samples,
                             sandbox_timeout=args.sandbox_timeout)
    samples = rejection.read_lines(os.path.join(out_dir, rejection.SAMPLES_FILE))
    stats["sampling_seconds"] = sum(s.get("seconds", 0.0) for s in samples)
    return samples, stats


# ---- scoring --------------------------------------------------------------------------------------

def pair_accuracy(model, tokenizer, pairs: list[dict], batch: int) -> dict:
    """Accuracy (reward(chosen) > reward(rejected)) per kind and overall, with Wilson intervals, and
    each pair's two rewards."""
    from qwen2.train.reward import score_replies

    model.eval()
    convs = [p["prompt"] + [{"role": "assistant", "content": p[side]}] for p in pairs for side in ("chosen", "rejected")]
    # Rows of like length together: less padding (a row's reward does not depend on its batch).
    order = sorted(range(len(convs)), key=lambda i: len(convs[i][-1]["content"]) + len(convs[i][-2]["content"]))
    rewards = [0.0] * len(convs)
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        for i, r in zip(chunk, score_replies(model, tokenizer, [convs[i] for i in chunk], batch=batch)):
            rewards[i] = r
    out = {"rewards": [[rewards[2 * i], rewards[2 * i + 1]] for i in range(len(pairs))]}
    for kind in (*KINDS, "overall"):
        hits = [rewards[2 * i] > rewards[2 * i + 1] for i, p in enumerate(pairs) if kind in ("overall", p["kind"])]
        if hits:
            low, high = wilson(sum(hits), len(hits))
            out[kind] = {"correct": sum(hits), "n": len(hits), "accuracy": sum(hits) / len(hits), "ci95": [low, high]}
    return out


def lora_targets(layers: int, total: int) -> list[str]:
    """Every linear of the top `layers` decoder layers (all of them for 0): a reward model mostly
    needs to re-read what the top of the decoder already holds, and backward then stops there."""
    if layers <= 0 or layers >= total:
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return [f"model.layers.{i}.*" for i in range(total - layers, total)]


def fresh_reward_model(base: str, seed: int):
    """The decoder under the fresh head train_reward starts from (the same seed draws the same head)."""
    from qwen2.train.reward import from_language_model

    m = qwen2.load(base)
    return from_language_model(m.model, seed), m.tokenizer


def checkpoint_curve(base: str, train_dir: str, options: dict, heldout: list[dict], before: dict,
                     args) -> tuple[dict, list[dict]]:
    """Held-out accuracy of every checkpoint the run left, after the fresh head's (step 0)."""
    from safetensors.torch import load_file

    from qwen2.train.checkpoint import list_checkpoints
    from qwen2.train.lora import apply_lora

    model, tokenizer = fresh_reward_model(base, options["seed"])
    apply_lora(model, options["lora_targets"], options["lora_r"], options["lora_alpha"], 0.0, seed=options["seed"])
    model.score.requires_grad_(True)
    params = dict(model.named_parameters())
    curve = [{"step": 0, **{k: v for k, v in before.items() if k != "rewards"}}]
    after = before
    for step, path in list_checkpoints(train_dir):
        weights = load_file(os.path.join(path, "model.safetensors"))
        if not set(weights) <= set(params):
            raise Qwen2Error(f"checkpoint {path} holds parameters this model does not have")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        after = pair_accuracy(model, tokenizer, heldout, args.eval_batch)
        curve.append({"step": step, **{k: v for k, v in after.items() if k != "rewards"}})
        print(f"  step {step}: held-out {fmt_acc(after)}", flush=True)
    return {"before": before, "after": after, "model": model, "tokenizer": tokenizer}, curve


def fmt_acc(result: dict) -> str:
    return ", ".join(f"{k} {result[k]['accuracy']:.3f} ({result[k]['correct']}/{result[k]['n']})"
                     for k in (*KINDS, "overall") if k in result)


# ---- the smoke model ------------------------------------------------------------------------------

def smoke_model(path: str) -> str:
    """The DPO experiment's tiny random Qwen2 (2 layers, hidden 64, the real tokenizer)."""
    from benchmarks.experiments.train_dpo_experiment import smoke_base_model

    return smoke_base_model(path)


# ---- the experiment -------------------------------------------------------------------------------

FULL = dict(arith_train=300, arith_heldout=100, train_limit=None, heldout_limit=None, samples=4, train_samples=2,
            max_new_tokens=256, code_pairs_per_task=2, heldout_code_pairs_per_task=1, max_steps=24, batch_size=1,
            grad_accum=4, lr=1e-3, lora_r=8, lora_layers=4, seq_len=384, eval_every=24, train_eval=24)
SMOKE = dict(arith_train=24, arith_heldout=12, train_limit=2, heldout_limit=2, samples=1, train_samples=1,
             max_new_tokens=8, code_pairs_per_task=2, heldout_code_pairs_per_task=2, max_steps=4, batch_size=2, grad_accum=1, lr=1e-3, lora_r=4,
             lora_layers=1, seq_len=384, eval_every=2, train_eval=12)
# A short system turn in every prompt: without one the chat template inserts its default (20 tokens,
# a quarter of an arithmetic row), and on CPU every token of every row costs training time.
SYSTEM = "You are a helpful assistant."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny random model, a tiny slice of the pairs, 4 steps")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the reward model's decoder (registry name or HF directory)")
    p.add_argument("--sample-model", default=None, help="the model sampling the code replies (default: --model, int4)")
    p.add_argument("--out", default=None, help="run directory (default runs/reward_model_accuracy[-smoke])")
    p.add_argument("--results", default=None, help="results JSON (.md and .png beside it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arith-train", type=int, default=None, help="arithmetic train pairs")
    p.add_argument("--arith-heldout", type=int, default=None, help="arithmetic held-out pairs")
    p.add_argument("--train-limit", type=int, default=None, help="only the first N train tasks")
    p.add_argument("--heldout-limit", type=int, default=None, help="only the first N held-out tasks")
    p.add_argument("--samples", type=int, default=None, help="code replies sampled per held-out task")
    p.add_argument("--train-samples", type=int, default=None, help="code replies sampled per train task")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--sandbox-timeout", type=float, default=10.0)
    p.add_argument("--code-pairs-per-task", type=int, default=None, help="code pairs per train task")
    p.add_argument("--heldout-code-pairs-per-task", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per micro-batch (1: no padding between "
                   "short arithmetic and long code rows)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    p.add_argument("--system", default=SYSTEM, help="the system turn of every prompt ('' for the template's default)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (cosine to lr/10)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--lora-r", type=int, default=None)
    p.add_argument("--lora-layers", type=int, default=None, help="LoRA on every linear of the top N layers (0: all)")
    p.add_argument("--seq-len", type=int, default=None, help="longest training row")
    p.add_argument("--eval-every", type=int, default=None, help="checkpoint (and held-out point) every N steps")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--train-eval", type=int, default=None, help="train pairs (a seeded sample) scored after training")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    apply_preset(args, FULL, SMOKE, "reward_model_accuracy", RESULTS)
    for name in ("arith_train", "arith_heldout", "samples", "train_samples", "max_steps", "batch_size", "grad_accum",
                 "seq_len", "eval_every", "train_eval", "code_pairs_per_task", "heldout_code_pairs_per_task"):
        if getattr(args, name) < 1:
            raise Qwen2Error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise Qwen2Error(f"--lr must be positive, got {args.lr}")
    return args


def count_by(pairs: list[dict], key: str) -> dict:
    return dict(sorted(collections.Counter(p[key] for p in pairs).items()))


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        set_torch_threads(args.threads)
    run = args.out
    os.makedirs(run, exist_ok=True)
    if args.smoke:
        base = smoke_model(os.path.join(run, "smoke-model"))
    else:
        from qwen2.checkpoint.registry import hf_dir
        base = args.model if os.path.isdir(args.model) else hf_dir(args.model)
    sampler = args.sample_model or base
    # int4 only for sampling the 0.5B: the verdicts come from the sandbox, so the sampler need not be exact
    load_sampler = (lambda: qwen2.load(sampler)) if args.smoke else (lambda: qwen2.load(sampler, quantize="int4"))
    print(f"run dir {run}; model {base}", flush=True)

    # 1. pairs
    arith_train, arith_heldout = arithmetic_pairs(args.seed, args.arith_train, args.arith_heldout)
    split_tasks = {"train": rejection.read_tasks(TRAIN_TASKS)[:args.train_limit],
                   "heldout": rejection.read_tasks(HELDOUT_TASKS)[:args.heldout_limit]}
    code_verifier = verifier("code", args.sandbox_timeout)

    def check(task, reply):
        return checked_score(code_verifier, task, reply, where=f"task {task['task_id']!r}")

    synth, code = {}, {}
    synth_seconds = 0.0

    def pairs_of(split: str) -> list[dict]:
        nonlocal synth_seconds
        start = time.perf_counter()
        tasks = split_tasks[split]
        tasks_file = write_jsonl(os.path.join(run, "data", f"{split}_tasks.jsonl"), tasks)
        samples, stats = sample_code_replies(tasks_file, os.path.join(run, "synth", split), load_sampler,
                                             args.train_samples if split == "train" else args.samples, args)
        synth[split] = {k: v for k, v in stats.items() if k in ("prompts", "samples", "passing", "acceptance_rate",
                                                                "pair_stats", "sampling_seconds")}
        per_task = args.code_pairs_per_task if split == "train" else args.heldout_code_pairs_per_task
        code[split] = code_pairs(tasks, samples, check, per_task, args.seed)
        synth_seconds += time.perf_counter() - start
        pairs = (arith_train if split == "train" else arith_heldout) + code[split]
        if args.system:
            pairs = [dict(p, prompt=[{"role": "system", "content": args.system}] + p["prompt"])
                     if p["prompt"][0]["role"] != "system" else p for p in pairs]
        return pairs

    # The held-out pairs and the fresh head's accuracy on them first: neither needs the train pairs.
    heldout_pairs = pairs_of("heldout")
    write_jsonl(os.path.join(run, "data", "heldout_pairs.jsonl"), heldout_pairs)
    eval0 = time.perf_counter()
    model, tokenizer = fresh_reward_model(base, args.seed)
    before = pair_accuracy(model, tokenizer, heldout_pairs, args.eval_batch)
    del model
    eval_seconds = time.perf_counter() - eval0
    print(f"  step 0 (fresh head): held-out {fmt_acc(before)}", flush=True)

    train_pairs = pairs_of("train")
    random.Random(args.seed).shuffle(train_pairs)  # the kinds interleaved (the trainer's order is seeded too)
    train_file = write_jsonl(os.path.join(run, "data", "train_pairs.jsonl"), train_pairs)
    pair_counts = {split: {"arithmetic": count_by(a, "source"), "code": count_by(c, "source"),
                           "code_chosen": count_by(c, "chosen_source"), "code_tasks": len({p["task_id"] for p in c})}
                   for split, a, c in (("train", arith_train, code["train"]), ("heldout", arith_heldout, code["heldout"]))}
    print(f"pairs: train {len(arith_train)} arithmetic + {len(code['train'])} code, held out {len(arith_heldout)} "
          f"arithmetic + {len(code['heldout'])} code; {json.dumps(pair_counts)}", flush=True)

    # 2. train, timed in CPU seconds of this process (every torch thread counts)
    with open(os.path.join(base, "config.json"), encoding="utf-8") as f:
        n_layers = json.load(f)["num_hidden_layers"]
    train_dir = os.path.join(run, "train")
    shutil.rmtree(train_dir, ignore_errors=True)  # the timed run always starts from the fresh head
    options = dict(model=base, data=train_file, output_dir=train_dir, seed=args.seed, precision="fp32",
                   seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps,
                   lr=args.lr, min_lr=args.lr / 10, warmup_steps=min(args.warmup_steps, args.max_steps - 1),
                   weight_decay=0.0, lora=True, lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r,
                   lora_targets=lora_targets(args.lora_layers, n_layers), merge_lora=False,
                   save_every=args.eval_every, keep_checkpoints=10_000)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = qwen2.train.train_reward(options)
    train_cpu, train_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(f"training: {train_cpu / 60:.2f} CPU minutes, {train_wall / 60:.2f} wall minutes", flush=True)

    # 3. held-out accuracy before (fresh head) and at every checkpoint; train accuracy at the end
    eval0 = time.perf_counter()
    ev, curve = checkpoint_curve(base, train_dir, options, heldout_pairs, before, args)
    train_sample = random.Random(args.seed + 1).sample(train_pairs, min(args.train_eval, len(train_pairs)))
    train_acc = pair_accuracy(ev["model"], ev["tokenizer"], train_sample, args.eval_batch)
    eval_seconds += time.perf_counter() - eval0

    strip = lambda r: {k: v for k, v in r.items() if k != "rewards"}  # noqa: E731
    data = {
        "command": command_line("benchmarks.experiments.reward_model_accuracy", argv), "smoke": args.smoke,
        "args": vars(args), "model": base, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "pairs": {"train": {"arithmetic": len(arith_train), "code": len(code["train"])},
                  "heldout": {"arithmetic": len(arith_heldout), "code": len(code["heldout"])},
                  "sources": pair_counts},
        "code_tasks": {s: len(t) for s, t in split_tasks.items()},
        "disjoint": {"arithmetic_questions": not ({p["prompt"][-1]["content"] for p in arith_train}
                                                  & {p["prompt"][-1]["content"] for p in arith_heldout}),
                     "code_tasks": not ({p["task_id"] for p in code["train"]} & {p["task_id"] for p in code["heldout"]})},
        "synthesis": {"splits": synth, "wall_seconds": synth_seconds},
        "training": {"cpu_seconds": train_cpu, "cpu_minutes": train_cpu / 60, "wall_seconds": train_wall,
                     "within_budget": train_cpu <= 600, "options": options, "data": result.data, "log": result.log,
                     "peak_rss_mb": peak_rss_mb()},
        "heldout_before": strip(ev["before"]), "heldout_after": strip(ev["after"]), "train_after": strip(train_acc),
        "curve": curve, "eval_seconds": eval_seconds,
        "heldout_rewards_after": [{"kind": p["kind"], "source": p["source"], "chosen": r[0], "rejected": r[1]}
                                  for p, r in zip(heldout_pairs, ev["after"]["rewards"])],
    }
    stem = os.path.splitext(args.results)[0]
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    write_results(stem + ".json", data, markdown(data))
    plot(data, stem + ".png")
    print("\n" + markdown(data), flush=True)
    return 0


# ---- report ---------------------------------------------------------------------------------------

def _cell(r: dict | None) -> str:
    if not r:
        return "–"
    return f"{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] ({r['correct']}/{r['n']})"


def markdown(data: dict) -> str:
    a, t, pc = data["args"], data["training"], data["pairs"]["sources"]
    where = "every layer" if a["lora_layers"] <= 0 else f"the top {a['lora_layers']} layers"
    n_train = dict(data["pairs"]["train"], overall=sum(data["pairs"]["train"].values()))
    lines = [f"Reward-model accuracy{' (smoke run)' if data['smoke'] else ''}: `{data['command']}`", "",
             f"Reward model: {os.path.basename(data['model'].rstrip('/'))} decoder + scalar head "
             f"(`qwen2.train.train_reward`, Bradley-Terry), LoRA r={a['lora_r']} on "
             f"{where} "
             f"(all linears) + the head, lr {a['lr']} cosine to lr/10, {a['batch_size'] * a['grad_accum']} pairs/step, "
             f"{a['max_steps']} steps, seq_len {a['seq_len']}, system turn {a['system']!r}; torch {data['torch']}, "
             f"{data['threads']} threads.",
             f"Code replies: sampled from {os.path.basename(str(a['sample_model'] or data['model']).rstrip('/'))}"
             f"{'' if data['smoke'] else ' (int4)'}, {a['train_samples']} per train task and {a['samples']} per "
             f"held-out task at T={a['temperature']}, top-p {a['top_p']}, up to {a['max_new_tokens']} tokens; "
             + "; ".join(f"{k}: {v['passing']}/{v['samples']} pass" for k, v in data["synthesis"]["splits"].items())
             + f"; up to {a['code_pairs_per_task']} pairs per task. Train accuracy on a seeded sample of "
             f"{data['train_after']['overall']['n']} train pairs.",
             f"Training: **{t['cpu_minutes']:.2f} CPU minutes** (process CPU time, budget 10), "
             f"{t['wall_seconds'] / 60:.2f} wall minutes. Sampling the code replies (data synthesis, not "
             f"counted): {data['synthesis']['wall_seconds'] / 60:.1f} wall minutes this run "
             f"({sum(s.get('sampling_seconds', 0) for s in data['synthesis']['splits'].values()) / 60:.1f} when sampled).",
             "",
             "| pairs | train pairs | held-out before (fresh head) | held-out after | train after (sample) |",
             "| --- | --- | --- | --- | --- |"]
    for kind in (*KINDS, "overall"):
        lines.append(f"| {kind} | {n_train[kind]} "
                     f"| {_cell(data['heldout_before'].get(kind))} | **{_cell(data['heldout_after'].get(kind))}** "
                     f"| {_cell(data['train_after'].get(kind))} |")
    lines += ["", "Accuracy: reward(chosen) > reward(rejected); [95 % Wilson interval] (correct/n).", "",
              "Where the pairs came from (rejected reply):", ""]
    for split in ("train", "heldout"):
        s = pc[split]
        lines.append(f"- {split}: arithmetic {s['arithmetic']}; code over {s['code_tasks']} tasks {s['code']}, "
                     f"chosen from {s['code_chosen']}")
    lines += ["", "| step | " + " | ".join(f"held-out {k}" for k in (*KINDS, "overall")) + " |",
              "| ---: | " + " | ".join("---:" for _ in range(len(KINDS) + 1)) + " |"]
    for point in data["curve"]:
        lines.append(f"| {point['step']} | " + " | ".join(f"{point[k]['accuracy']:.3f}" if k in point else "–"
                                                        for k in (*KINDS, "overall")) + " |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, colour in zip((*KINDS, "overall"), ("#1f77b4", "#ff7f0e", "black")):
        points = [(c["step"], c[kind]) for c in data["curve"] if kind in c]
        if points:
            steps = [s for s, _ in points]
            ax.plot(steps, [r["accuracy"] for _, r in points], marker="o", color=colour, label=kind)
            ax.fill_between(steps, [r["ci95"][0] for _, r in points], [r["ci95"][1] for _, r in points],
                            color=colour, alpha=0.12)
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=0.8, label="target 0.9")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_title("held-out pair accuracy (95 % Wilson band)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    log = data["training"]["log"]
    bx.plot([r["step"] for r in log], [r.get("loss") for r in log], color="#2ca02c", label="train loss")
    bx.set_xlabel("step")
    bx.set_title("Bradley-Terry loss per step", fontsize=10)
    bx.grid(alpha=0.3)
    save_png(fig, path)


if __name__ == "__main__":
    sys.exit(main())
