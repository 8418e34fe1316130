"""The Qwen2 report's post-training loop in miniature: a bigger model's verified answers teach a smaller
one (rejection-sampling SFT), then the smaller one's own right and wrong answers pair up for DPO;
held-out exact-answer accuracy of the student after each step, and what batching buys the sampling.

    pip install -e '.[models,models-1-5b,bench]'                      # both models; matplotlib
    python -m benchmarks.experiments.synth_loop_experiment            # the full run: ~4 h on 2 cores, resumable
    python -m benchmarks.experiments.synth_loop_experiment --smoke    # a tiny random model, ~30 s

Problems: `word_problems(seed, n)`, multi-step arithmetic word problems from a seed (shopping and
change, boxes shared out, machines and rates, savings, rows of chairs, bills split: two or three
operations of +, -, * and exact division on small integers, the answer a non-negative integer), each
asking for its last line as "The answer is N.". The first 300 train, the last 100 are held out; no
question appears twice. Each record keeps its `expression`, whose value is its `answer`.

Stages, in --work-dir (runs/synth_loop), each skipped when its done.json is there (a killed run
resumes stage by stage; the sampling inside a stage task by task, a training run from its last
checkpoint):

  base_eval         the student (Qwen2.5-Coder-0.5B-Instruct) greedy on the held-out problems, scored
                    by the math verifier (`qwen2.eval.answers.math_answer_matches`)
  teacher_sft_data  `qwen2 synth reject --verifier math`: 2 samples per train problem from the teacher
                    (Qwen2.5-Coder-1.5B-Instruct, int4) at T 0.7, top-p 0.95; the right ones kept
  sft               `qwen2 train sft`: LoRA on the student (fp32) on those, merged into its weights
  sft_eval          as base_eval, the SFT student
  student_pairs     `qwen2 synth reject --pairs`: 4 samples per train problem from the SFT student
                    (int4); a right reply against a wrong one of the same problem
  dpo               `qwen2 train dpo`: LoRA on the SFT student, itself the frozen reference, merged
  dpo_eval          as base_eval, the DPO student
  throughput        the teacher's sampling of the first 16 train problems again (same settings and
                    seeds), through `reject`'s continuous batching and one reply at a time (batch 1,
                    the same engine): samples/s of each

Every model is evaluated the same way: loaded fp32 (or --eval-quantize), greedy, up to 256 new
tokens, 16 replies decoded together; accuracy with a 95 % Wilson interval. Sampling loads int4 (the verifier, not the sampler's
precision, decides what is kept). Writes benchmarks/results/synth_loop.{json,md,png}.

How long: the committed run (200 train / 100 held-out problems, 1 teacher and 2 student samples per
problem, int4 evaluation) took 88 minutes on 2 cores: sampling the teacher 25, the student's pairs 21,
SFT 11, DPO 12, each evaluation ~4, the throughput comparison 7. The defaults (300 / 100, 2 and 4
samples, fp32 evaluation) sample three times as much: ~4 h.
"""
from __future__ import annotations

import argparse
import ast
import collections
import json
import math
import os
import platform
import random
import shutil
import sys
import time

import torch

import qwen2
from benchmarks.common import (RESULTS_DIR, apply_preset, command_line, one_line_errors, save_png,
                               set_torch_threads, wilson, write_jsonl, write_results)
from benchmarks.experiments.train_dpo_experiment import (DONE, greedy_replies, read_jsonl, smoke_base_model,
                                                         stage_done, steps_for, train_stage)
from qwen2.checkpoint.registry import DEFAULT_MODEL, KNOWN_MODELS, hf_dir
from qwen2.errors import Qwen2Error
from qwen2.fileio import write_text_atomic
from qwen2.runtime.generate import SamplingParams
from qwen2.synth import rejection
from qwen2.synth.verifiers import checked_score, verifier

RESULTS = os.path.join(RESULTS_DIR, "synth_loop.json")
TEACHER = "qwen2.5-coder-1.5b-instruct"
ASK = " Give the final answer as a number on the last line, as 'The answer is N.'"


# ---- the problems ---------------------------------------------------------------------------------

NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yara", "Zoe")
SMALL_THINGS = ("pencils", "stickers", "marbles", "cookies", "crayons", "stamps", "buttons", "cards")
SHOP_THINGS = ("notebooks", "apples", "tickets", "mugs", "plants", "books", "pies", "candles")
MADE_THINGS = ("bottles", "toys", "bricks", "chairs", "shirts", "cups")


def _change(rng):
    name, thing = rng.choice(NAMES), rng.choice(SHOP_THINGS)
    count, price = rng.randint(2, 9), rng.randint(2, 12)
    note = next(n for n in (20, 50, 100, 200) if n >= count * price)
    return (f"{name} buys {count} {thing} at ${price} each and pays with a ${note} note. How many dollars of "
            f"change does {name} get back?", f"{note} - {count} * {price}")


def _two_items(rng):
    name, (a, b) = rng.choice(NAMES), rng.sample(SHOP_THINGS, 2)
    n_a, p_a, n_b, p_b = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(2, 15)
    return (f"At the market {name} buys {n_a} {a} for ${p_a} each and {n_b} {b} for ${p_b} each. How many "
            f"dollars does {name} spend in all?", f"{n_a} * {p_a} + {n_b} * {p_b}")


def _boxes(rng):
    name, thing = rng.choice(NAMES), rng.choice(SMALL_THINGS)
    boxes, each, friends = rng.randint(2, 9), rng.randint(4, 20), rng.randint(2, 6)
    total = boxes * each
    extra = total % friends
    given = extra + friends * rng.randint(0 if extra else 1, 3)  # what is left shares out exactly
    if given >= total:
        given = extra or friends
    return (f"{name} has {boxes} boxes with {each} {thing} in each box. {name} gives {given} {thing} to a "
            f"neighbour and shares the rest equally among {friends} friends. How many {thing} does each friend "
            "get?", f"({boxes} * {each} - {given}) / {friends}")


def _machine(rng):
    thing = rng.choice(MADE_THINGS)
    rate, morning, afternoon = rng.randint(5, 30), rng.randint(2, 6), rng.randint(1, 5)
    broken = rng.randint(1, rate)
    return (f"A machine makes {rate} {thing} an hour. It runs for {morning} hours in the morning and {afternoon} "
            f"hours in the afternoon, and {broken} of the {thing} come out broken. How many good {thing} does it "
            "make that day?", f"{rate} * ({morning} + {afternoon}) - {broken}")


def _baskets(rng):
    a, b = rng.sample(NAMES, 2)
    fruit = rng.choice(("apples", "pears", "plums", "oranges", "lemons"))
    per_bag, first, second = rng.randint(3, 9), rng.randint(10, 60), rng.randint(10, 60)
    second += -(first + second) % per_bag  # a whole number of bags
    return (f"{a} picks {first} {fruit} and {b} picks {second} {fruit}. They put them together and pack them "
            f"into bags of {per_bag}. How many bags do they fill?", f"({first} + {second}) / {per_bag}")


def _savings(rng):
    name = rng.choice(NAMES)
    start, weekly, weeks = rng.randint(5, 60), rng.randint(3, 20), rng.randint(2, 10)
    spent = rng.randint(1, start + weekly * weeks)
    return (f"{name} has ${start} and saves ${weekly} every week for {weeks} weeks, then spends ${spent} on a "
            f"present. How many dollars does {name} have left?", f"{start} + {weekly} * {weeks} - {spent}")


def _chairs(rng):
    rows, per_row, brought = rng.randint(3, 12), rng.randint(4, 15), rng.randint(2, 30)
    taken = rng.randint(1, rows * per_row - 1)
    return (f"A hall has {rows} rows of {per_row} chairs. {taken} chairs are taken out for a party next door, and "
            f"then {brought} chairs are brought in from the store room. How many chairs are in the hall now?",
            f"{rows} * {per_row} - {taken} + {brought}")


def _bill(rng):
    people, pizzas, price = rng.randint(2, 6), rng.randint(2, 6), rng.randint(8, 16)
    tip = rng.randint(2, 12)
    tip += -(pizzas * price + tip) % people  # the bill splits into whole dollars
    return (f"{people} friends order {pizzas} pizzas at ${price} each and leave a ${tip} tip. They split the "
            "cost equally. How many dollars does each friend pay?", f"({pizzas} * {price} + {tip}) / {people}")


TEMPLATES = {"change": _change, "two_items": _two_items, "boxes": _boxes, "machine": _machine,
             "baskets": _baskets, "savings": _savings, "chairs": _chairs, "bill": _bill}
SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def worked(expression: str) -> tuple[int, list[str]]:
    """The value of an integer expression of + - * / and brackets, and its steps ("4 * 3 = 12"),
    innermost first. Every division must come out exact and no step negative: the word problems
    never need fractions or debts."""
    steps = []

    def value(node) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if not (isinstance(node, ast.BinOp) and type(node.op) in SYMBOLS):
            raise Qwen2Error(f"{expression!r} is not an expression of integers and + - * /")
        left, right, symbol = value(node.left), value(node.right), SYMBOLS[type(node.op)]
        if symbol == "/" and (right == 0 or left % right):
            raise Qwen2Error(f"{expression!r}: {left} / {right} is not a whole number")
        result = {"+": left + right, "-": left - right, "*": left * right, "/": left // (right or 1)}[symbol]
        if result < 0:
            raise Qwen2Error(f"{expression!r}: {left} {symbol} {right} is negative")
        steps.append(f"{left} {symbol} {right} = {result}")
        return result

    return value(ast.parse(expression, mode="eval").body), steps


def word_problems(seed: int, n: int) -> list[dict]:
    """`n` distinct word problems drawn from `seed`, as `qwen2 synth reject --verifier math` reads
    them: task_id, prompt (one user turn), answer (a string), plus the template, the expression the
    answer is the value of, and a worked reference reply (the fallback for a problem no sample gets)."""
    rng = random.Random(seed)
    names = sorted(TEMPLATES)
    records, seen = [], set()
    for _ in range(100 * n + 1_000):  # the templates hold millions of questions: this never runs out
        if len(records) == n:
            return records
        template = rng.choice(names)
        question, expression = TEMPLATES[template](rng)
        if question in seen:
            continue
        seen.add(question)
        answer, steps = worked(expression)
        reference = " ".join(["First,", f"{steps[0]}."] + [f"Then {s}." for s in steps[1:]]
                             + [f"The answer is {answer}."])
        records.append({"task_id": f"word-{len(records):04d}", "prompt": [{"role": "user", "content": question + ASK}],
                        "answer": str(answer), "template": template, "expression": expression,
                        "reference": reference})
    raise Qwen2Error(f"could not draw {n} distinct word problems")


def split_problems(seed: int, n_train: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): the first `n_train` problems drawn, then the next `n_heldout`; all distinct."""
    problems = word_problems(seed, n_train + n_heldout)
    return problems[:n_train], problems[n_train:]


# ---- stages ---------------------------------------------------------------------------------------

def stage(work_dir: str, name: str, run) -> dict:
    """Stage `name`'s result: read from work_dir/name/done.json when an earlier run finished it, else
    `run(folder)`'s, written there (with the seconds it took) once complete."""
    folder = os.path.join(work_dir, name)
    done = stage_done(folder)
    if done is not None:
        print(f"{name}: done before, in {folder}", flush=True)
        return done
    os.makedirs(folder, exist_ok=True)
    print(f"{name} ...", flush=True)
    start = time.perf_counter()
    result = run(folder)
    result["seconds"] = time.perf_counter() - start
    write_text_atomic(os.path.join(folder, DONE), json.dumps(result, indent=1) + "\n")
    return result


def evaluate(model_dir: str, heldout: list[dict], args) -> dict:
    """Greedy replies of the model in `model_dir` (fp32, or --eval-quantize) to the held-out problems;
    exact-answer accuracy by the math verifier, with its 95 % Wilson interval."""
    m = qwen2.load(model_dir, quantize=args.eval_quantize)
    replies = greedy_replies(m, heldout, args.max_new_tokens, args.eval_batch)
    del m
    checker = verifier("math")
    right = [checked_score(checker, t, r, where=f"problem {t['task_id']!r}") == 1.0 for t, r in zip(heldout, replies)]
    correct = sum(right)
    result = {"model_dir": model_dir, "correct": correct, "n": len(heldout), "accuracy": correct / len(heldout),
              "ci95": list(wilson(correct, len(heldout))),
              "replies": [{"task_id": t["task_id"], "answer": t["answer"], "right": ok, "reply": r}
                          for t, ok, r in zip(heldout, right, replies)]}
    print(f"  held-out accuracy {result['accuracy']:.3f} ({correct}/{len(heldout)})", flush=True)
    return result


def sampling_params(args) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)


def sampler(source: str, args):
    """A loader of `source` for sampling: `reject` calls it only when problems are left to sample."""
    return lambda: qwen2.load(source, quantize=args.sample_quantize)


def sample(folder: str, problems_file: str, model, samples: int, pairs: bool, args, batch: int | None = None) -> dict:
    """`qwen2 synth reject --verifier math [--pairs]` of `samples` replies per problem into `folder`;
    its stats, with the seconds the decoding took (model loading aside) and the samples per second."""
    stats = rejection.reject(problems_file, model, folder, verifier_name="math", samples=samples,
                             params=sampling_params(args), seed=args.seed, batch=batch or args.sample_batch,
                             pairs=pairs, per_task=args.pairs_per_task if pairs else args.sft_per_task,
                             fallback=args.reference_fallback)
    # Each samples.jsonl line holds the wall time since the previous problem finished, the first
    # counted from the start of decoding: their sum is the decoding time, over every run of the stage.
    seconds = sum(s["seconds"] for s in rejection.read_lines(os.path.join(folder, rejection.SAMPLES_FILE)))
    return {**stats, "sampling_seconds": seconds, "samples_per_s": stats["samples"] / seconds}


def throughput(folder: str, train: list[dict], args) -> dict:
    """The teacher's sampling of the first train problems, with the same settings and seeds, through
    continuous batching (--sample-batch replies decoding together) and one reply at a time (batch 1,
    the same engine): samples/s and tokens/s of each, and whether the replies are the same."""
    problems = write_jsonl(os.path.join(folder, "problems.jsonl"), train[:args.throughput_problems])
    m = sampler(args.teacher_source, args)()
    # A first decode pays one-off costs (thread pools, kernel setup): not counted against either side.
    list(rejection.generate_replies(m, [(rejection.task_prompt_ids(m, train[0]),
                                         SamplingParams(max_new_tokens=4, temperature=0.0))], 1))
    runs, replies = {}, {}
    for name, batch in (("one at a time", 1), ("batched", args.sample_batch)):
        out = os.path.join(folder, f"batch{batch}")
        shutil.rmtree(out, ignore_errors=True)  # a timing counts only in one go: a cut one starts again
        stats = sample(out, problems, m, args.teacher_samples, False, args, batch=batch)
        lines = rejection.read_lines(os.path.join(out, rejection.SAMPLES_FILE))
        replies[name] = [r for s in lines for r in s["responses"]]
        tokens = sum(len(m.tokenizer.encode(r)) for r in replies[name])  # re-encoded: the text's tokens
        runs[name] = {"batch": batch, "samples": stats["samples"], "seconds": stats["sampling_seconds"],
                      "samples_per_s": stats["samples_per_s"], "tokens": tokens,
                      "tokens_per_s": tokens / stats["sampling_seconds"]}
        print(f"  {name} (batch {batch}): {stats['samples_per_s']:.3f} samples/s", flush=True)
    del m
    same = sum(a == b for a, b in zip(replies["one at a time"], replies["batched"]))
    return {"problems": min(args.throughput_problems, len(train)), "samples_per_problem": args.teacher_samples,
            "runs": runs, "identical_replies": same, "replies": len(replies["batched"]),
            "speedup": runs["batched"]["samples_per_s"] / runs["one at a time"]["samples_per_s"]}


def paired_change(before: dict, after: dict) -> dict:
    """Per problem, two evaluations of the same held-out set: how many went wrong -> right (gained)
    and right -> wrong (lost), and McNemar's exact two-sided p-value (the gained among the changed
    against Binomial(changed, 1/2)): a paired test, sharper than comparing the two intervals."""
    right = {r["task_id"]: r["right"] for r in before["replies"]}
    gained = sum(r["right"] and not right[r["task_id"]] for r in after["replies"])
    lost = sum(right[r["task_id"]] and not r["right"] for r in after["replies"])
    changed = gained + lost
    tail = sum(math.comb(changed, k) for k in range(min(gained, lost) + 1)) / 2 ** changed if changed else 1.0
    return {"gained": gained, "lost": lost, "p_value": min(1.0, 2 * tail)}


def training_summary(info: dict, records: int) -> dict:
    log = info["log"]
    losses = [r["loss"] for r in log if "loss" in r]
    return {"records": records, "steps": len(log), "minutes": info["seconds"] / 60,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "margin_last": log[-1].get("margin") if log else None, "model_dir": info["model_dir"]}


# ---- the experiment -------------------------------------------------------------------------------

FULL = dict(train=300, heldout=100, student_samples=4, top_p=0.95, max_new_tokens=256, sample_batch=16,
            eval_batch=16, sft_max_steps=16, dpo_max_steps=8, batch_size=4, grad_accum=2, save_every=4,
            throughput_problems=16, reference_fallback=False)
# The random models never answer right, so the smoke run's SFT data and pairs come from the problems'
# worked references (fallback): it checks the plumbing, not the learning. Top-p off: it sorts the
# whole vocabulary for every sampled token, most of a tiny model's decoding time.
SMOKE = dict(train=12, heldout=6, student_samples=2, top_p=1.0, max_new_tokens=16, sample_batch=8, eval_batch=6,
             sft_max_steps=2, dpo_max_steps=2, batch_size=1, grad_accum=1, save_every=1, throughput_problems=4,
             reference_fallback=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny random model, 12 train / 6 held-out problems, 2 steps")
    p.add_argument("--work-dir", dest="out", default=None, help="stage outputs (default runs/synth_loop[-smoke])")
    p.add_argument("--results", default=None, help="results JSON, .md and .png beside it (default "
                   "benchmarks/results/synth_loop.json; with --smoke, in the work dir)")
    p.add_argument("--teacher", default=TEACHER, help="the model whose verified answers make the SFT data")
    p.add_argument("--student", default=DEFAULT_MODEL, help="the model trained (registry name or HF directory)")
    p.add_argument("--seed", type=int, default=0, help="draws the problems, the samples and the training order")
    p.add_argument("--train", type=int, default=None, help="train problems")
    p.add_argument("--heldout", type=int, default=None, help="held-out problems")
    p.add_argument("--teacher-samples", type=int, default=2, help="teacher replies sampled per train problem")
    p.add_argument("--student-samples", type=int, default=None, help="SFT-student replies sampled per train problem")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest reply, sampled or greedy")
    p.add_argument("--sample-batch", type=int, default=None, help="sampled replies decoded together")
    p.add_argument("--eval-batch", type=int, default=None, help="held-out replies decoded together")
    p.add_argument("--sample-quantize", default="int4", choices=("int4", "int8"), help="the samplers' weights")
    p.add_argument("--eval-quantize", default=None, choices=("int4", "int8"),
                   help="the evaluated models' weights (default fp32; int4 decodes ~2x as fast here)")
    p.add_argument("--sft-per-task", type=int, default=1, help="distinct right teacher replies kept per problem")
    p.add_argument("--pairs-per-task", type=int, default=2, help="DPO pairs per problem")
    p.add_argument("--reference-fallback", action=argparse.BooleanOptionalAction, default=None,
                   help="a problem no sample gets right uses its worked reference (in a code block: reject's "
                        "fallback was made for code tasks)")
    p.add_argument("--seq-len", type=int, default=512, help="longest training row (prompt + reply)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=None, help="rows (SFT) or pairs (DPO) per micro-batch")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    p.add_argument("--sft-lr", type=float, default=2e-4, help="peak (cosine to a tenth)")
    p.add_argument("--sft-epochs", type=float, default=1.0)
    p.add_argument("--sft-max-steps", type=int, default=None, help="at most this many SFT steps")
    p.add_argument("--dpo-lr", type=float, default=5e-5, help="peak (cosine to a tenth)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--dpo-epochs", type=float, default=2.0)
    p.add_argument("--dpo-max-steps", type=int, default=None, help="at most this many DPO steps")
    p.add_argument("--save-every", type=int, default=None, help="training checkpoint interval (steps)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's last checkpoint")
    p.add_argument("--throughput-problems", type=int, default=None, help="train problems the throughput stage samples")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    apply_preset(args, FULL, SMOKE, "synth_loop", RESULTS)
    for name in ("train", "heldout", "teacher_samples", "student_samples", "max_new_tokens", "sample_batch",
                 "eval_batch", "sft_per_task", "pairs_per_task", "seq_len", "lora_r", "batch_size", "grad_accum",
                 "sft_max_steps", "dpo_max_steps", "save_every", "throughput_problems"):
        if getattr(args, name) < 1:
            raise Qwen2Error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def hf_model_dir(name: str) -> str:
    """An HF directory for a registry name or a directory (training and fp32 evaluation read one)."""
    if os.path.isdir(name):
        return name
    if name.lower() not in KNOWN_MODELS:
        raise Qwen2Error(f"{name!r} is neither a model directory nor a registry name ({', '.join(KNOWN_MODELS)})")
    return hf_dir(name)


def teacher_source(name: str) -> str:
    """What the teacher, which only samples, loads from: a registry name as it is (int4 straight from
    its GGUF's 4-bit blocks: no fp32 HF copy made, nothing requantised), else a model directory."""
    return name if name.lower() in KNOWN_MODELS and not os.path.isdir(name) else hf_model_dir(name)


def check_same_run(work_dir: str, settings: dict) -> None:
    """Refuse to resume a work dir started with other settings: its finished stages would be mixed
    with new ones."""
    path = os.path.join(work_dir, "settings.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise Qwen2Error(f"{work_dir} holds a run with other settings ({', '.join(changed)}); rerun with the "
                             "same ones to resume, or give another --work-dir")
    write_text_atomic(path, json.dumps(settings, indent=1) + "\n")


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        set_torch_threads(args.threads)
    w = args.out
    os.makedirs(w, exist_ok=True)
    check_same_run(w, {k: v for k, v in vars(args).items() if k not in ("out", "results", "threads")})
    if args.smoke:  # teacher and student the same tiny random model
        student = teacher = args.teacher_source = smoke_base_model(os.path.join(w, "smoke-model"))
    else:
        student, teacher = hf_model_dir(args.student), teacher_source(args.teacher)
        args.teacher_source = teacher
    train, heldout = split_problems(args.seed, args.train, args.heldout)
    train_file = write_jsonl(os.path.join(w, "data", "train.jsonl"), train)
    write_jsonl(os.path.join(w, "data", "heldout.jsonl"), heldout)
    print(f"work dir {w}: {len(train)} train / {len(heldout)} held-out problems; teacher {teacher}, "
          f"student {student}", flush=True)
    common = dict(seq_len=args.seq_len, seed=args.seed, precision="fp32", weight_decay=0.0, lora=True,
                  lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r, merge_lora=True, batch_size=args.batch_size,
                  grad_accum=args.grad_accum, save_every=args.save_every, keep_checkpoints=1)
    per_step = args.batch_size * args.grad_accum

    evals = {"base": stage(w, "base_eval", lambda _: evaluate(student, heldout, args))}

    # 1. the teacher's right answers -> LoRA SFT of the student
    teacher_data = stage(w, "teacher_sft_data", lambda folder: sample(
        folder, train_file, sampler(args.teacher_source, args), args.teacher_samples, False, args))
    sft_records = read_jsonl(os.path.join(w, "teacher_sft_data", rejection.SFT_FILE))
    if not sft_records:
        raise Qwen2Error("the teacher got no train problem right: nothing to fine-tune on; raise --teacher-samples "
                         "or --max-new-tokens, or pass --reference-fallback")
    sft_steps = min(args.sft_max_steps, steps_for(len(sft_records), per_step, args.sft_epochs))
    sft = train_stage("sft", {
        **common, "model": student, "data": os.path.join(w, "teacher_sft_data", rejection.SFT_FILE),
        "output_dir": os.path.join(w, "sft"), "lr": args.sft_lr, "min_lr": args.sft_lr / 10,
        "warmup_steps": min(2, sft_steps - 1), "max_steps": sft_steps}, args)
    evals["sft"] = stage(w, "sft_eval", lambda _: evaluate(sft["model_dir"], heldout, args))

    # 2. the SFT student's own right-vs-wrong answers -> DPO against itself as the reference
    pair_data = stage(w, "student_pairs", lambda folder: sample(
        folder, train_file, sampler(sft["model_dir"], args), args.student_samples, True, args))
    pairs = read_jsonl(os.path.join(w, "student_pairs", rejection.PAIRS_FILE))
    if not pairs:
        raise Qwen2Error("no train problem has both a right and a wrong student reply: no DPO pair; raise "
                         "--student-samples or --temperature")
    dpo_steps = min(args.dpo_max_steps, steps_for(len(pairs), per_step, args.dpo_epochs))
    dpo = train_stage("dpo", {
        **common, "model": sft["model_dir"], "data": os.path.join(w, "student_pairs", rejection.PAIRS_FILE),
        "output_dir": os.path.join(w, "dpo"), "beta": args.beta, "lr": args.dpo_lr, "min_lr": args.dpo_lr / 10,
        "warmup_steps": min(2, dpo_steps - 1), "max_steps": dpo_steps}, args)
    evals["dpo"] = stage(w, "dpo_eval", lambda _: evaluate(dpo["model_dir"], heldout, args))

    # 3. what continuous batching buys the sampling
    speed = stage(w, "throughput", lambda folder: throughput(folder, train, args))

    keep = ("correct", "n", "accuracy", "ci95", "seconds", "model_dir")
    data = {
        "command": command_line("benchmarks.experiments.synth_loop_experiment", argv), "smoke": args.smoke,
        "args": vars(args), "teacher": teacher, "student": student,
        "problems": {"train": len(train), "heldout": len(heldout), "seed": args.seed,
                     "templates": dict(sorted(collections.Counter(p["template"] for p in train + heldout).items())),
                     "disjoint": not ({p["prompt"][0]["content"] for p in train}
                                      & {p["prompt"][0]["content"] for p in heldout})},
        "stages": {k: {x: e[x] for x in keep} for k, e in evals.items()},
        "changes": {f"{a}->{b}": paired_change(evals[a], evals[b]) for a, b in (("base", "sft"), ("sft", "dpo"),
                                                                                  ("base", "dpo"))},
        "teacher_data": {k: teacher_data[k] for k in ("prompts", "samples", "passing", "acceptance_rate", "kept",
                                                      "sft", "sampling_seconds", "samples_per_s")},
        "student_pairs": {k: pair_data[k] for k in ("prompts", "samples", "passing", "acceptance_rate", "pairs",
                                                    "pair_stats", "sampling_seconds", "samples_per_s")},
        "training": {"sft": training_summary(sft, len(sft_records)), "dpo": training_summary(dpo, len(pairs))},
        "throughput": speed,
        "seconds": {"base_eval": evals["base"]["seconds"], "teacher_sft_data": teacher_data["seconds"],
                    "sft": sft["seconds"], "sft_eval": evals["sft"]["seconds"],
                    "student_pairs": pair_data["seconds"], "dpo": dpo["seconds"],
                    "dpo_eval": evals["dpo"]["seconds"], "throughput": speed["seconds"]},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    stem = os.path.splitext(args.results)[0]
    write_results(stem + ".json", data, markdown(data))
    plot(data, stem + ".png")
    print("\n" + markdown(data), flush=True)
    return 0


# ---- report ---------------------------------------------------------------------------------------

STAGE_NAMES = {"base": "student (before)", "sft": "after SFT", "dpo": "after DPO"}


def markdown(data: dict) -> str:
    a, t, s, tr, sp = data["args"], data["teacher_data"], data["student_pairs"], data["training"], data["throughput"]
    name = lambda path: os.path.basename(path.rstrip("/"))  # noqa: E731
    lines = [f"`{data['command']}`" + (" (SMOKE RUN: a tiny random model)" if data["smoke"] else ""), "",
             "# The post-training loop in miniature: teacher samples → SFT → student pairs → DPO", "",
             f"Teacher {name(data['teacher'])}, student {name(data['student'])}; {data['problems']['train']} train / "
             f"{data['problems']['heldout']} held-out arithmetic word problems (seed {data['problems']['seed']}, "
             f"disjoint). Held-out: greedy, {a.get('eval_quantize') or 'fp32'} weights, up to {a['max_new_tokens']} new tokens, exact answer by the math "
             f"verifier. Sampling: {a['sample_quantize']} weights, T={a['temperature']}, top-p {a['top_p']}, "
             f"{a['sample_batch']} replies decoded together. torch {data['torch']}, {data['threads']} threads.", "",
             "| stage | held-out accuracy | 95 % interval (Wilson) | correct / n |",
             "| --- | ---: | --- | ---: |"]
    for key, e in data["stages"].items():
        lines.append(f"| {STAGE_NAMES[key]} | **{e['accuracy']:.3f}** | [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}] | "
                     f"{e['correct']}/{e['n']} |")
    lines += ["", "Per problem (paired): " + "; ".join(
        f"{STAGE_NAMES[k.split('->')[0]]} → {STAGE_NAMES[k.split('->')[1]]}: +{c['gained']} / −{c['lost']} "
        f"(McNemar exact p = {c['p_value']:.3g})" for k, c in data["changes"].items()) + "."]
    lines += ["", "| data | |", "| --- | --- |",
              f"| teacher samples ({a['teacher_samples']} per problem) | {t['passing']}/{t['samples']} right "
              f"(acceptance {t['acceptance_rate']:.3f}); {t['sft']['tasks_with_a_pass']}/{t['prompts']} problems "
              f"with a right one |",
              f"| SFT records kept (≤ {a['sft_per_task']} per problem) | {t['kept']}"
              + (f" ({t['sft']['from_reference']} worked references)" if t["sft"]["from_reference"] else "") + " |",
              f"| student samples ({a['student_samples']} per problem) | {s['passing']}/{s['samples']} right "
              f"(acceptance {s['acceptance_rate']:.3f}); problems all right {s['pair_stats']['all_pass']}, none "
              f"right {s['pair_stats']['none_pass']}, mixed {s['pair_stats']['mixed']} |",
              f"| DPO pairs (≤ {a['pairs_per_task']} per problem) | {s['pairs']}"
              + (f" ({s['pair_stats']['pairs_with_reference']} with a worked reference)"
                 if s["pair_stats"]["pairs_with_reference"] else "") + " |",
              "", "| training | records | steps | minutes | loss first → last |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for key, label in (("sft", f"SFT (LoRA r={a['lora_r']}, lr {a['sft_lr']})"),
                       ("dpo", f"DPO (LoRA r={a['lora_r']}, lr {a['dpo_lr']}, beta {a['beta']})")):
        r = tr[key]
        lines.append(f"| {label} | {r['records']} | {r['steps']} | {r['minutes']:.1f} | "
                     f"{r['loss_first']:.3f} → {r['loss_last']:.3f} |")
    lines += ["", f"Sampling throughput (the teacher, {sp['problems']} train problems × {sp['samples_per_problem']} "
              "samples, the same settings and seeds as its SFT data; decoding time, model loading aside):", "",
              "| decoding | batch | samples | seconds | samples/s | tokens/s |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for key, r in sp["runs"].items():
        lines.append(f"| {key} | {r['batch']} | {r['samples']} | {r['seconds']:.1f} | {r['samples_per_s']:.3f} | "
                     f"{r['tokens_per_s']:.1f} |")
    lines += ["", f"Batched / one at a time: **{sp['speedup']:.2f}×** samples/s; identical replies "
              f"{sp['identical_replies']}/{sp['replies']}. The whole teacher stage: {t['samples_per_s']:.3f} samples/s "
              f"over {t['samples']} samples.", "",
              "Stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in data["seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: str) -> None:
    """Held-out accuracy per stage with its 95 % interval; samples/s batched against one at a time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    stages = data["stages"]
    labels = [STAGE_NAMES[k] for k in stages]
    acc = [e["accuracy"] for e in stages.values()]
    errors = [[e["accuracy"] - e["ci95"][0] for e in stages.values()],
              [e["ci95"][1] - e["accuracy"] for e in stages.values()]]
    ax.bar(labels, acc, yerr=errors, capsize=6, color=["#7f7f7f", "#2ca02c", "#1f77b4"])
    for x, e in enumerate(stages.values()):  # above the interval, where the error bar does not cross it
        ax.text(x, e["ci95"][1] + 0.02, f"{e['accuracy']:.2f} ({e['correct']}/{e['n']})", ha="center", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_title(f"student held-out exact-answer accuracy (n={next(iter(stages.values()))['n']}, 95 % Wilson)",
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    runs = data["throughput"]["runs"]
    bars = bx.bar([f"{k}\n(batch {r['batch']})" for k, r in runs.items()], [r["samples_per_s"] for r in runs.values()],
                  color=["#ff7f0e", "#9467bd"])
    bx.bar_label(bars, fmt="%.2f", fontsize=8)
    bx.set_ylabel("samples/s")
    bx.set_title(f"teacher sampling: {data['throughput']['speedup']:.2f}× batched", fontsize=10)
    bx.grid(axis="y", alpha=0.3)
    save_png(fig, path)


if __name__ == "__main__":
    sys.exit(main())
