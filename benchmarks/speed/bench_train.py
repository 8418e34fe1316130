"""Training-step throughput: this project's training forward against transformers' model, same weights,
same batch, same optimizer.

    python -m benchmarks.speed.bench_train                 # tiny (random) and the embedded 0.5B, 2 threads
    python -m benchmarks.speed.bench_train --models tiny --steps 10

One step = forward over a (batch, seq_len) block of token ids, summed next-token cross-entropy divided
by the target count, backward, gradient clipping at 1.0 and an AdamW step (`qwen2.train.loop.make_optimizer`
for both: the same parameter groups and hyper-parameters), then zero_grad: what `qwen2 train`'s loop does per
micro-batch. Our side is `qwen2.train.forward.forward` (the training forward: causal SDPA, optional
activation checkpointing off); transformers' side is `AutoModelForCausalLM(...)(input_ids).logits` through
the very same loss. Each engine runs in a fresh process (one 0.5B model with its AdamW state takes ~8 GB),
fp32, the same threads. Reported per model: tokens/s (median over --steps timed steps after --warmup
steps), the ratio to transformers, peak RSS, and the first step's loss on both sides (equal to ~1e-5: the
two compute the same thing). Results: benchmarks/results/train.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time

from benchmarks.common import RESULTS_DIR, command_line, machine_facts, spawn, wait_for_quiet, write_json, write_results

MODULE = "benchmarks.speed.bench_train"
# The tiny model: a small Qwen2 (GQA, q/k/v bias, tied embeddings) over the real 151,936-token vocabulary.
TINY = dict(vocab_size=151936, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=1_000_000.0)


def model_dir(name: str, scratch: str) -> str:
    """An HF directory both engines load: the registry's converted 0.5B, or a random tiny model."""
    if name != "tiny":
        from qwen2.checkpoint.registry import hf_dir
        return hf_dir(name, progress=False)
    from qwen2.checkpoint.hf import save_hf_dir
    from qwen2.config import Qwen2Config
    from qwen2.model import Transformer
    import torch

    torch.manual_seed(0)
    config = Qwen2Config(**TINY)
    model = Transformer(config)
    from qwen2.train.run import init_weights
    init_weights(model)
    path = os.path.join(scratch, "tiny")
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_hf_dir(path, config, state)
    return path


def worker(engine: str, job: dict) -> dict:
    import torch

    from qwen2.train.config import TrainConfig
    from qwen2.train.forward import forward, lm_loss_sum
    from qwen2.train.loop import make_optimizer

    torch.set_num_threads(job["threads"])
    if engine == "qwen2":
        import qwen2
        model = qwen2.load(job["dir"], progress=False).model
        logits_of = lambda ids: forward(model, ids)  # noqa: E731
    else:
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(job["dir"], dtype=torch.float32,
                                                                  attn_implementation="sdpa")
        logits_of = lambda ids: model(input_ids=ids, use_cache=False).logits  # noqa: E731
    model.train()
    optimizer = make_optimizer(model, TrainConfig(lr=1e-5))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, job["vocab_size"], (job["batch"], job["seq_len"]), generator=generator)
    labels = ids.clone()  # the loss shifts: token t predicts token t + 1
    params = [p for p in model.parameters() if p.requires_grad]
    times, losses = [], []
    for step in range(job["warmup"] + job["steps"]):
        start = time.perf_counter()
        loss = lm_loss_sum(logits_of(ids), labels) / (ids.numel() - ids.shape[0])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    timed = times[job["warmup"]:]
    step_s = statistics.median(timed)
    return {"engine": engine, "step_s": step_s, "step_s_all": timed, "tokens_per_s": ids.numel() / step_s,
            "first_loss": losses[0], "losses": losses, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "parameters": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per engine")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wait-quiet", type=float, default=60, metavar="SECONDS",
                    help="wait up to this long for other processes to leave the CPU (0: do not wait)")
    ap.add_argument("--worker", choices=("qwen2", "transformers"), help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:  # one engine in a process of its own (`benchmarks.common.spawn`)
        with open(args.job) as f:
            write_json(args.result, worker(args.worker, json.load(f)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            path = model_dir(name, scratch)
            with open(os.path.join(path, "config.json")) as f:
                vocab = json.load(f)["vocab_size"]
            job = {"dir": path, "vocab_size": vocab, "batch": args.batch, "seq_len": args.seq_len,
                   "steps": args.steps, "warmup": args.warmup, "threads": args.threads}
            for engine in ("qwen2", "transformers"):
                if args.wait_quiet > 0:
                    wait_for_quiet(args.wait_quiet)
                result = spawn(MODULE, engine, job, scratch)
                rows.append({"model": name, "engine": engine, **result})
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("losses", "step_s_all")}), flush=True)

    lines = [f"`{command_line(MODULE)}`", "",
             f"One training step (forward, cross-entropy, backward, clip, AdamW) on {args.batch} × {args.seq_len} "
             f"tokens, fp32, {args.threads} threads; median of {args.steps} steps after {args.warmup} warm-up; "
             "same weights, batch and optimizer on both sides.", "",
             "| model | engine | parameters | step s | tokens/s | vs transformers | first loss | peak RSS MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['engine']} | {r['error']} | | | | | |")
            continue
        ref = next((x for x in rows if x["model"] == r["model"] and x["engine"] == "transformers" and "error" not in x),
                   None)
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}×" if ref else "–"
        lines.append(f"| {r['model']} | {r['engine']} | {r['parameters'] / 1e6:.1f} M | {r['step_s']:.2f} "
                     f"| {r['tokens_per_s']:.0f} | {ratio} | {r['first_loss']:.6f} | {r['peak_rss_mb']:.0f} |")
    write_results(os.path.join(RESULTS_DIR, "train.json"), {"machine": machine_facts(args.threads), "rows": rows,
                                                            "settings": vars(args)}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
