"""Does a Qwen2-MoE upcycled from a dense model (qwen2.checkpoint.upcycle, report §2.2.2)
pull ahead of the dense model when both keep training on the same tokens?

    python -m benchmarks.experiments.moe_upcycling_experiment          # defaults: ~13 min on 1 thread
    python -m benchmarks.experiments.moe_upcycling_experiment --pretrain-steps 50 --steps 50   # a quick look

1. Corpus: the docstrings of Python's standard library (every module, class and function docstring
   longer than 80 characters, tests left out), read with `ast` from this interpreter's own files,
   so the text is real English technical prose, on every machine, with no download. Every 20th
   document is held out. Byte-level tokens (vocab 256): no tokenizer decides the result, and the
   loss reads directly as bits per byte (nats / ln 2).
2. Dense: a tiny Qwen2 (4 layers, hidden 128, FFN 512, 4/2 heads) trained from scratch for
   --pretrain-steps on random train windows.
3. Upcycled: `upcycle(..., num_experts=8, top_k=2, expert_size=128)` (the FFN replicated
   ceil(8 * 128 / 512) = 2 times, shuffled, cut into 8 experts; the shared expert the whole dense
   FFN, its gate 0), once with the report's reinit fraction 0.5 and once with 0.
4. Continuation: the dense model, and each MoE, trained --steps more on the same batches (one
   seeded stream replayed for every run), each with a fresh AdamW and the same schedule; the MoE
   adds router_aux_loss_coef (0.001) times the load-balancing loss. Held-out loss on fixed windows
   every --eval-every steps, and at step 0 (the upcycled model before any training).

The MoE runs more compute per token than the dense model (shared expert 512 wide plus 2 routed
experts 128 wide: FFN width 768 active against 512; all printed as active parameters): the
comparison is the report's (an upcycled MoE against the dense model it came from, on the same
tokens), not a FLOP-matched one. Writes benchmarks/results/moe_upcycling.{json,md,png}.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import struct
import sys
import sysconfig
import time
import zlib

import torch

from benchmarks.common import RESULTS_DIR, smooth
from qwen2.checkpoint.upcycle import upcycle
from qwen2.config import Qwen2Config
from qwen2.fileio import atomic_file, write_text_atomic
from qwen2.model import Transformer
from qwen2.progress import progress_bar
from qwen2.train.forward import forward, lm_loss_sum
from qwen2.train.run import init_weights

HELD_OUT_EVERY = 20  # every 20th document goes to the held-out set


# ---- data ---------------------------------------------------------------------------------------

def stdlib_docstrings(min_chars: int = 80) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions, in a fixed file order."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("test", "tests", "site-packages", "idlelib"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(directory, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= min_chars:
                        docs.append(doc)
    return docs


def byte_corpus(docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, held-out bytes) as uint8 tensors, documents separated by a blank line."""
    def encode(ds):
        return torch.frombuffer(bytearray("\n\n".join(ds).encode("utf-8")), dtype=torch.uint8).clone()
    held_out = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == 0]
    train = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != 0]
    return encode(train), encode(held_out)


def windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, seq_len + 1) token ids: the windows of `data` beginning at `starts`."""
    return torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).long()


def batch_stream(data: torch.Tensor, steps: int, batch_size: int, seq_len: int, seed: int):
    """The same `steps` random batches for every run that asks with the same seed."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield windows(data, torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen), seq_len)


# ---- training -----------------------------------------------------------------------------------

def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to lr / 10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    return lr / 10 + (lr - lr / 10) * 0.5 * (1 + math.cos(math.pi * progress))


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of the windows: position t predicts byte t + 1."""
    logits = forward(model, batch)  # (B, T + 1, V); the last position predicts nothing
    return lm_loss_sum(logits, batch) / (batch.shape[0] * (batch.shape[1] - 1))


@torch.no_grad()
def held_out_loss(model, batches: list[torch.Tensor]) -> float:
    model.eval()
    loss = sum(lm_loss(model, b).item() for b in batches) / len(batches)
    model.train()
    return loss


def train(name: str, model, args, data: torch.Tensor, steps: int, seed: int, lr: float,
          eval_batches: list[torch.Tensor]) -> dict:
    """`steps` AdamW steps on the seeded batch stream; the loss of every step and the held-out loss
    every args.eval_every steps (and before the first)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    coef = model.config.router_aux_loss_coef if model.config.num_experts else 0.0
    log = {"step": [], "loss": [], "aux_loss": [], "eval_step": [0], "eval_loss": [held_out_loss(model, eval_batches)]}
    model.train()
    start = time.perf_counter()
    bar = progress_bar(enumerate(batch_stream(data, steps, args.batch_size, args.seq_len, seed)), total=steps,
                       desc=name, unit="step", disable=False)
    for step, batch in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, args.warmup)
        loss = lm_loss(model, batch)
        aux = model.aux_loss() if coef else torch.zeros(())
        (loss + coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log["step"].append(step + 1)
        log["loss"].append(loss.item())
        log["aux_loss"].append(aux.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            log["eval_step"].append(step + 1)
            log["eval_loss"].append(held_out_loss(model, eval_batches))
            bar.set_postfix(loss=f"{loss.item():.3f}", held_out=f"{log['eval_loss'][-1]:.3f}")
    log["seconds"] = time.perf_counter() - start
    return log


def active_parameters(config: Qwen2Config) -> dict:
    """Total and per-token parameters of the decoder layers (embeddings and lm_head left out)."""
    C, L = config.hidden_size, config.num_hidden_layers
    attn = C * config.head_dim * (config.num_attention_heads * 2 + config.num_key_value_heads * 2) \
        + config.head_dim * (config.num_attention_heads + 2 * config.num_key_value_heads)  # q, k, v biases
    if not config.num_experts:
        ffn = 3 * C * config.intermediate_size
        return {"total": L * (attn + ffn), "active": L * (attn + ffn)}
    expert = 3 * C * config.moe_intermediate_size
    common = attn + 3 * C * config.shared_expert_intermediate_size + C * config.num_experts + C
    return {"total": L * (common + config.num_experts * expert),
            "active": L * (common + config.num_experts_per_tok * expert)}


# ---- plot: a PNG from numpy and zlib (no plotting library is a dependency) ----------------------

COLORS = {"dense": (40, 40, 40), "MoE, reinit 0.5": (214, 39, 40), "MoE, reinit 0": (31, 119, 180)}
# 3x5 pixel digits for the tick labels.
DIGITS = {"0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
          "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
          "8": "111101111101111", "9": "111101111001111", ".": "000000000000010"}


def _text(img, x, y, s, scale=2):
    for ch in s:
        bits = DIGITS[ch]
        for i, b in enumerate(bits):
            if b == "1":
                r, c = divmod(i, 3)
                img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = 0
        x += 4 * scale


def _line(img, x0, y0, x1, y1, color, width=2):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    for t in torch.linspace(0, 1, n).tolist():
        x, y = round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t)
        img[max(0, y - width // 2):y + (width + 1) // 2, max(0, x - width // 2):x + (width + 1) // 2] = color


def plot_png(path: str, panels: list[tuple[str, dict[str, tuple[list, list]]]], width=1100, height=420):
    """Side-by-side line plots, one per panel: {series: (x, y)}, colours from COLORS; y ticks labelled."""
    import numpy as np

    img = np.full((height, width, 3), 255, dtype=np.uint8)
    pw = width // len(panels)
    for p, (_, series) in enumerate(panels):
        left, right, top, bottom = p * pw + 60, (p + 1) * pw - 15, 20, height - 40
        xs = [x for xv, _ in series.values() for x in xv]
        ys = [y for _, yv in series.values() for y in yv]
        x_lo, x_hi = min(xs), max(xs)
        y_lo, y_hi = min(ys), max(ys)
        pad = 0.05 * (y_hi - y_lo or 1)
        y_lo, y_hi = y_lo - pad, y_hi + pad

        def to_px(x, y):
            return (left + (x - x_lo) / (x_hi - x_lo or 1) * (right - left),
                    bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))
        for k in range(6):  # grid and y labels
            y = y_lo + (y_hi - y_lo) * k / 5
            _, py = to_px(x_lo, y)
            img[int(py), left:right] = 220
            _text(img, p * pw + 5, int(py) - 5, f"{y:.2f}")
        for k in range(5):  # x labels (steps)
            x = x_lo + (x_hi - x_lo) * k / 4
            px, _ = to_px(x, y_lo)
            img[top:bottom, int(px)] = 235
            _text(img, int(px) - 10, bottom + 8, f"{x:.0f}")
        img[top:bottom, left] = 0
        img[bottom, left:right] = 0
        for name, (xv, yv) in series.items():
            pts = [to_px(x, y) for x, y in zip(xv, yv)]
            for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
                _line(img, xa, ya, xb, yb, COLORS[name])
    with atomic_file(path, "wb") as f:
        f.write(_png_bytes(img))


def _png_bytes(img) -> bytes:
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


# ---- the experiment -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrain-steps", type=int, default=500, help="dense steps from scratch")
    p.add_argument("--steps", type=int, default=300, help="continuation steps, for each model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="peak lr of the dense pre-training")
    p.add_argument("--continue-lr", type=float, default=1e-3, help="peak lr of every continuation")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-size", type=int, default=128)
    p.add_argument("--reinit-fractions", default="0.5,0", help="one MoE per fraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "moe_upcycling.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    docs = stdlib_docstrings()
    train_data, held_out_data = byte_corpus(docs)
    print(f"corpus: {len(docs)} stdlib docstrings, {len(train_data):,} train bytes, "
          f"{len(held_out_data):,} held-out bytes", flush=True)
    gen = torch.Generator().manual_seed(10**6)
    eval_batches = [windows(held_out_data, torch.randint(0, len(held_out_data) - args.seq_len - 1,
                                                         (args.batch_size,), generator=gen), args.seq_len)
                    for _ in range(args.eval_batches)]

    config = Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_theta=10_000.0, bos_token_id=None, eos_token_id=None, torch_dtype="float32")
    torch.manual_seed(args.seed)
    dense = Transformer(config)
    init_weights(dense)
    pretrain = train("dense pre-training", dense, args, train_data, args.pretrain_steps, args.seed,
                     args.lr, eval_batches)
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}

    runs = {"dense": (config, dense_state)}
    for fraction in (float(f) for f in args.reinit_fractions.split(",")):
        moe_config, moe_state = upcycle(config, dense_state, args.experts, args.top_k, args.expert_size,
                                        reinit_fraction=fraction, seed=args.seed)
        runs[f"MoE, reinit {fraction:g}"] = (moe_config, moe_state)

    results = {}
    for name, (cfg, state) in runs.items():
        model = Transformer(cfg)
        model.load_state_dict(state)
        # The same continuation batches for every model: a stream seeded apart from pre-training's.
        log = train(name, model, args, train_data, args.steps, args.seed + 1, args.continue_lr, eval_batches)
        results[name] = {"config": {k: getattr(cfg, k) for k in ("num_experts", "num_experts_per_tok",
                                                                  "moe_intermediate_size", "intermediate_size",
                                                                  "shared_expert_intermediate_size")},
                         "parameters": active_parameters(cfg), **log}
        print(f"  {name}: held-out {log['eval_loss'][0]:.4f} -> {log['eval_loss'][-1]:.4f} nats/byte "
              f"({log['seconds']:.0f} s)", flush=True)

    summary = summarise(results, args)
    data = {"args": vars(args), "corpus": {"source": "Python standard library docstrings (>= 80 chars, tests left out)",
                                           "python": sys.version.split()[0], "documents": len(docs),
                                           "train_bytes": len(train_data), "held_out_bytes": len(held_out_data)},
            "dense_config": dataclasses.asdict(config), "pretrain": pretrain, "continuation": results,
            "summary": summary, "torch": torch.__version__}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_text_atomic(args.out, json.dumps(data, indent=1) + "\n")
    stem = os.path.splitext(args.out)[0]
    window = max(1, args.steps // 15)
    panels = [(f"train loss (nats/byte, mean of {window} steps)",
               {n: (r["step"], smooth(r["loss"], window)) for n, r in results.items()}),
              ("held-out loss (nats/byte)", {n: (r["eval_step"], r["eval_loss"]) for n, r in results.items()})]
    plot_png(stem + ".png", panels)
    write_text_atomic(stem + ".md", markdown(data) + "\n")
    print("\n" + markdown(data) + f"\n\nwrote {args.out}, .md, .png", flush=True)
    return 0


def summarise(results: dict, args) -> dict:
    dense = results["dense"]
    out = {}
    for name, r in results.items():
        tail = max(1, args.steps // 10)  # the mean train loss of the last 10% of the steps
        out[name] = {"held_out_start": r["eval_loss"][0], "held_out_end": r["eval_loss"][-1],
                     "train_loss_last_10pct": sum(r["loss"][-tail:]) / tail,
                     "held_out_end_minus_dense": r["eval_loss"][-1] - dense["eval_loss"][-1],
                     "seconds": r["seconds"], **{f"params_{k}": v for k, v in r["parameters"].items()}}
        # The first continuation step at which this run's held-out loss is below the dense model's
        # final one: how many steps the dense model needed vs. this one for the same loss.
        out[name]["first_eval_step_at_dense_final"] = next(
            (s for s, l in zip(r["eval_step"], r["eval_loss"]) if l <= dense["eval_loss"][-1]), None)
    return out


def markdown(data: dict) -> str:
    a, c = data["args"], data["corpus"]
    lines = [f"Upcycling experiment: dense Qwen2 (4 layers, hidden 128, FFN 512, byte vocab) pre-trained "
             f"{a['pretrain_steps']} steps, then {a['steps']} more steps for each model on the same batches "
             f"({a['batch_size']} x {a['seq_len']} bytes, AdamW peak lr {a['continue_lr']}, cosine); "
             f"MoE = upcycle(8 experts x {a['expert_size']}, top-{a['top_k']}, shared expert = the dense FFN). "
             f"Corpus: {c['source']}, Python {c['python']}: {c['train_bytes']:,} train / {c['held_out_bytes']:,} "
             f"held-out bytes. Loss in nats per byte (/ ln 2 for bits). torch {data['torch']}, {a['threads']} thread.",
             "",
             "| model | layer params total / active per token | held-out at step 0 | held-out at the end | "
             "vs dense | train loss, last 10% | step reaching dense's final held-out | time s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in data["summary"].items():
        reach = s["first_eval_step_at_dense_final"]
        lines.append(f"| {name} | {s['params_total']:,} / {s['params_active']:,} | {s['held_out_start']:.4f} | "
                     f"{s['held_out_end']:.4f} | {s['held_out_end_minus_dense']:+.4f} | "
                     f"{s['train_loss_last_10pct']:.4f} | {reach if reach is not None else 'never'} | "
                     f"{s['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
