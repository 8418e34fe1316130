"""The same prefill and decode measured with two (or more) source trees of the qwen2 package, in fresh
processes, alternating round by round: for "did this change make it slower?" where the change is not
one kernel (bench_kernel_sources.py) but loading, memory or the model code, whose effects (the
allocator's state after a load, page placement) only show in a process of their own.

Each tree is a directory holding a `qwen2` package (e.g. `git archive REV qwen2 | tar -x -C DIR`),
or "-" for the installed one. Per process: `qwen2.load(model, quantize=...)`, one untimed warm-up,
then --repeats times a --prompt-tokens prefill of random ids into an empty cache and --new-tokens
greedy decode steps; the medians. The table gives each tree's values per round and the ratio of its
median to the first tree's.

    python -m benchmarks.speed.bench_trees /tmp/before - --model qwen2.5-coder-0.5b-instruct --quantize int4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(tree: str, model: str, quantize: str, prompt_tokens: int, new_tokens: int, repeats: int, threads: int) -> dict:
    if tree != "-":  # before anything imports qwen2 (benchmarks.common does: main imports it, the worker not)
        sys.path.insert(0, tree)
    import torch

    import qwen2

    torch.set_num_threads(threads)
    m = qwen2.load(model, progress=False, **({} if quantize == "none" else {"quantize": quantize}))
    # the executor where the tree has one; a tree from before executors runs the model itself
    decoder = m.decoder if hasattr(type(m), "decoder") else m.model
    ids = torch.randint(0, m.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))

    def run(steps: int) -> tuple[float, float]:
        with torch.inference_mode():
            cache = decoder.new_cache(1, prompt_tokens + steps + 1)
            t = time.perf_counter()
            logits = decoder(ids, cache=cache, last_only=True)
            prefill = time.perf_counter() - t
            token = logits[:, -1].argmax(-1)[:, None]
            t = time.perf_counter()
            for _ in range(steps):
                token = decoder(token, cache=cache)[:, -1].argmax(-1)[:, None]
            return prefill, (time.perf_counter() - t) / max(steps, 1)

    run(4)
    runs = [run(new_tokens) for _ in range(repeats)]
    return {"qwen2": qwen2.__file__, "prefill_tok_s": prompt_tokens / statistics.median(r[0] for r in runs),
            "decode_tok_s": 1 / statistics.median(r[1] for r in runs)}


def markdown(data: dict) -> str:
    trees, rounds = data["trees"], data["rounds"]
    lines = ["```", data["command"], "```", "", data["machine"], "",
             f"{data['model']}, quantize={data['quantize']}, {data['prompt_tokens']}-token prompt, "
             f"{data['new_tokens']} decode steps, median of {data['repeats']} per process; one fresh process per "
             "tree and round, trees alternating.", "",
             "| tree | prefill tok/s per round | decode tok/s per round | prefill vs first | decode vs first |",
             "| --- | --- | --- | ---: | ---: |"]
    base = None
    for tree in trees:
        values = [r[tree] for r in rounds]
        medians = tuple(statistics.median(v[k] for v in values) for k in ("prefill_tok_s", "decode_tok_s"))
        base = base or medians
        prefills = ", ".join(f"{v['prefill_tok_s']:.1f}" for v in values)
        decodes = ", ".join(f"{v['decode_tok_s']:.2f}" for v in values)
        lines.append(f"| `{tree}` | {prefills} | {decodes} | {medians[0] / base[0]:.3f} | {medians[1] / base[1]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trees", nargs="+", help="directories holding a qwen2 package, or - for the installed one")
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--quantize", default="int4", help="a quantization mode, or none for fp32")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--wait-quiet", type=float, default=60.0)
    p.add_argument("--out", help="JSON result file; a .md table is written beside it")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    settings = (args.model, args.quantize, args.prompt_tokens, args.new_tokens, args.repeats, args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, *settings)))
        return
    from benchmarks.common import REPO_ROOT, command_line, machine_facts, wait_for_quiet, write_results

    for tree in args.trees:
        if tree != "-" and not os.path.isdir(os.path.join(tree, "qwen2")):
            raise SystemExit(f"{tree} holds no qwen2 package; make one with `git archive REV qwen2 | tar -x -C {tree}`")
    wait_for_quiet(args.wait_quiet)
    rounds = []
    for r in range(args.rounds):
        results = {}
        for tree in args.trees:
            out = subprocess.run([sys.executable, "-m", "benchmarks.speed.bench_trees", "--worker", tree, *(argv or sys.argv[1:])],
                                 cwd=REPO_ROOT, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{tree}: the worker failed:\n{out.stderr[-2000:]}")
            results[tree] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"round {r + 1}: {tree}: prefill {results[tree]['prefill_tok_s']:.1f} tok/s, "
                  f"decode {results[tree]['decode_tok_s']:.2f} tok/s", file=sys.stderr, flush=True)
        rounds.append(results)
    facts = machine_facts(args.threads)
    data = {"command": command_line("benchmarks.speed.bench_trees", argv), "trees": args.trees, "rounds": rounds,
            "machine": f"machine: {facts.get('cpu', '?')}, {args.threads} threads, torch {facts.get('torch', '?')}",
            "model": args.model, "quantize": args.quantize, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "facts": facts}
    text = markdown(data)
    print(text)
    if args.out:
        write_results(args.out, data, text)


if __name__ == "__main__":
    main()
