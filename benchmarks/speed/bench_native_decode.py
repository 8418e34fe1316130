"""The native decode executor against the eager one (PyTorch ops) it equals bit for bit, in one
process, alternating, so a noisy moment of this shared machine falls on every path alike. Each path is
an executor chosen by name (`qwen2.runtime.executor.make_decoder(model, name)`):

  native     `make_decoder(model, "native")`: a decode step's blocks in native calls
             (`qwen2/kernels/decode_block.cpp`'s `decode_layers`: the eager blocks' own ops and kernels,
             no Python between them)
  eager      `make_decoder(model, "eager")`: the model's own forward, attention by PyTorch ops (RoPE,
             the cache write, SDPA)
  native-4k-pages  native, but the quantised weights copied out of the 2 MB pages load() puts them
             in (`qwen2.quant.into_huge_pages`) into ordinary memory (4 KB pages, unless the OS
             makes every allocation huge: transparent_hugepage=always)

1. One layer's attention call, the model's head shapes, one new token after C cached ones
   (C = --contexts): median µs of the native attention op (`qwen2/kernels/decode_attention.cpp`: RoPE,
   the cache write and attention in one call) and of the PyTorch ops it replaces, outputs compared.
2. Whole decode steps of the model (--quantize, default int4) after a 512-token prompt, each path in
   turn round after round, --steps greedy steps per round, the cache rewound after each: the median
   step of each round, the best round, and whether the paths pick the same greedy tokens.

    python -m benchmarks.speed.bench_native_decode --out benchmarks/results/native_decode.json
    python -m benchmarks.speed.bench_native_decode --model qwen2.5-coder-1.5b-instruct --out benchmarks/results/native_decode-1.5b.json

Results: printed, and with --out a JSON plus a markdown table beside it (written atomically).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import qwen2
from benchmarks.common import REPO_ROOT, command_line, machine_facts, set_torch_threads, wait_for_quiet, write_results
from qwen2 import kernels
from qwen2 import quant as Q
from qwen2.model.attention import rotary_attention
from qwen2.model.rope import apply_rope
from qwen2.progress import progress_bar
from qwen2.runtime.executor import make_decoder

MODULE = "benchmarks.speed.bench_native_decode"
NATIVE, EAGER, SMALL_PAGES = "native", "eager", "native-4k-pages"
PATHS = (NATIVE, EAGER, SMALL_PAGES)
EXECUTOR = {NATIVE: "native", EAGER: "eager", SMALL_PAGES: "native"}  # the executor each path runs
ATTENTION, PYTORCH = "attention", "pytorch"  # the two ways of one layer's attention call (native op, PyTorch ops)
_placements: dict = {}  # id(model) -> {True: buffers as loaded (2 MB pages), False: copies in ordinary memory}


def place_weights(model, huge: bool) -> None:
    """Point the quantised linears at their buffers as loaded (`huge`) or at copies of them in
    ordinary memory, made on first use."""
    buffers = [(m, name) for m in Q.quantized_linears(model).values() for name, _ in m.named_buffers(recurse=False)]
    if id(model) not in _placements:
        loaded = [getattr(m, name) for m, name in buffers]
        _placements[id(model)] = {True: loaded, False: [t.clone() for t in loaded]}
    for (m, name), t in zip(buffers, _placements[id(model)][huge]):
        setattr(m, name, t)


def op_timings(model, contexts: list[int], repeats: int) -> list[dict]:
    """Per context length: one layer's decode attention by each way, median µs, max |difference|."""
    config = model.config
    nh, nkv, hs = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    rows = []
    gen = torch.Generator().manual_seed(0)
    for context in progress_bar(contexts, desc="op", unit="context"):
        cache = model.new_cache(1, context + 1)
        cache.k.normal_(generator=gen), cache.v.normal_(generator=gen)
        cache.length = context
        q, k, v = (torch.randn(1, 1, n, hs, generator=gen) for n in (nh, nkv, nkv))
        cos, sin = model.rope(torch.tensor([[context]]), torch.float32)
        slots = cache.first_slots(1)
        ops = kernels.ops()

        def pytorch():  # what the eager attention does for one token: RoPE, the cache write, SDPA
            keys, values = cache.write(0, apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2))
            return rotary_attention(q.transpose(1, 2), keys, values, cos, sin, None, cache)

        paths = {ATTENTION: lambda: ops.decode_attention(q, k, v, cos, sin, cache.k[0], cache.v[0], slots, None,
                                                         hs ** -0.5),
                 PYTORCH: pytorch}
        times = {name: [] for name in paths}
        with torch.inference_mode():
            outputs = {name: f() for name, f in paths.items()}
            for _ in range(repeats):
                for name, f in paths.items():
                    start = time.perf_counter()
                    for _ in range(20):
                        f()
                    times[name].append((time.perf_counter() - start) / 20 * 1e6)
        us = {name: statistics.median(t) for name, t in times.items()}
        rows.append({"context": context, "us": us, "speedup": us[PYTORCH] / us[ATTENTION],
                     "max_abs_diff": (outputs[ATTENTION] - outputs[PYTORCH]).abs().max().item()})
    return rows


def step_timings(loaded, rounds: int, steps: int) -> dict:
    """Median decode step per round and path after a 512-token prompt (this repository's README)."""
    model = loaded.model
    decoders = {path: make_decoder(model, EXECUTOR[path]) for path in PATHS}
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        prompt = torch.tensor([loaded.tokenizer.encode(f.read())[:512]])
    medians = {path: [] for path in PATHS}
    tokens = {}
    with torch.inference_mode():
        cache = model.new_cache(1, prompt.shape[1] + steps + 1)
        first = model(prompt, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        for _ in progress_bar(range(rounds), desc="decode rounds", unit="round"):
            for path in PATHS:
                place_weights(model, huge=path != SMALL_PAGES)
                decoder, token, times, seen = decoders[path], first, [], []
                for _ in range(steps):
                    start = time.perf_counter()
                    token = decoder(token, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
                    times.append((time.perf_counter() - start) * 1e3)
                    seen.append(int(token))
                cache.rewind(steps)
                medians[path].append(statistics.median(times))
                tokens[path] = seen
    place_weights(model, huge=True)
    best = {path: min(m) for path, m in medians.items()}
    same = {path: f"{sum(a == b for a, b in zip(tokens[path], tokens[EAGER]))}/{steps}" for path in PATHS}
    return {"median_ms_per_round": medians, "best_ms": best,
            "speedup": {path: best[EAGER] / best[path] for path in PATHS}, "same_greedy_tokens_as_eager": same}


def markdown(data: dict) -> str:
    a = data["args"]
    m = data["machine"]
    out = [f"# Native decode executor vs eager (PyTorch ops): {a['model']} (quantize={a['quantize']}), "
           f"{a['threads']} threads\n", f"`{data['command']}`\n",
           f"{m['cpu']} ({m['logical_cpus']} logical CPUs), torch {data['torch']}, {m['date']}; CPU taken by "
           f"other processes before the run: {data['cpu_taken_by_others_pct']:.0f} %\n",
           "## One layer's attention (RoPE, cache write, attention of one new token)\n",
           "| cached tokens | native µs | PyTorch ops µs | speedup | max abs difference |",
           "| ---: | ---: | ---: | ---: | ---: |"]
    out += [f"| {r['context']} | {r['us'][ATTENTION]:.1f} | {r['us'][PYTORCH]:.1f} | {r['speedup']:.2f}× | "
            f"{r['max_abs_diff']:.1e} |" for r in data["op"]]
    s = data["steps"]
    out += ["", f"## Whole decode steps after a 512-token prompt ({a['steps']} steps per round, {a['rounds']} rounds)\n",
            "native: the native executor (a step's decoder blocks in native calls); eager: the model's own "
            "forward, PyTorch ops; native-4k-pages: native, the quantised weights copied from the 2 MB pages "
            "load() gives them into ordinary memory.\n",
            "| path | best round ms / step | vs eager | greedy tokens = eager's | every round |",
            "| --- | ---: | ---: | ---: | --- |"]
    out += [f"| {p} | {s['best_ms'][p]:.2f} | {s['speedup'][p]:.3f}× | {s['same_greedy_tokens_as_eager'][p]} | "
            f"{', '.join(f'{x:.1f}' for x in s['median_ms_per_round'][p])} |" for p in PATHS]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--quantize", default="int4", help="int4, int8 or none")
    p.add_argument("--contexts", default="128,512,2048,8192", help="cached tokens for the one-layer timings")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this many seconds for an idle machine")
    p.add_argument("--out", default=None, help="write JSON here and markdown beside it (.md)")
    args = p.parse_args(argv)
    set_torch_threads(args.threads)
    if kernels.ops() is None:
        raise SystemExit(f"the native kernels are unavailable here: {kernels.status()}")
    loaded = qwen2.load(args.model, quantize=None if args.quantize == "none" else args.quantize)
    others = wait_for_quiet(args.wait_quiet)  # with 0, one 2-second look
    data = {"args": vars(args), "command": command_line(MODULE, argv),
            "machine": machine_facts(args.threads), "torch": torch.__version__, "cpu_taken_by_others_pct": others,
            "op": op_timings(loaded.model, [int(c) for c in args.contexts.split(",")], args.repeats),
            "steps": step_timings(loaded, args.rounds, args.steps)}
    text = markdown(data)
    print(text)
    if args.out:
        write_results(args.out, data, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
