"""LoRA adapters chosen per request, in the serving engine's decode steps: the aggregate decode tokens/s
of a batch of 8 rows on 4 different adapters against the same batch with none, in one process,
alternating round by round, so a noisy moment of this shared machine falls on every path alike.

    python -m benchmarks.speed.bench_lora_serving --out benchmarks/results/lora_serving.json
    python -m benchmarks.speed.bench_lora_serving --quantize int4 --out benchmarks/results/lora_serving-int4.json

The adapters: --adapters random LoRA adapters (ranks alternating 8 and 16, as --ranks says) on all
seven block linears (q, k, v, o, gate, up, down) of every layer, written in the layout `qwen2 train`
writes and read from their directories as `qwen2 serve --lora` reads them (`Qwen2.add_adapter`). Each round,
per path, the engine (`qwen2.serve.engine.Engine`, stepped in this thread) admits --batch requests
(--prompt-tokens each, prefilled one by one, not timed), then --steps decode steps are timed; a
step decodes one token for every row (greedy, no end token), so aggregate tokens/s = rows / step time.
Paths:

  plain     the model without adapters (their wrappers taken out for the round): the native
            executor's decode, every block in one native call
  none      adapters loaded, every row on the base model: the wrappers add nothing, and the native
            executor runs their base linears, every block in one native call
  adapters  adapters loaded, rows i on adapter i mod --adapters: the base matmul for all rows plus
            each active adapter's low-rank update on its own rows (`qwen2.adapters.MultiLoRALinear`),
            added inside the same native call (kernels/decode_block.cpp)

Reported: each path's best round (median step), tokens/s, and the ratio adapters / none and
adapters / plain (the target: >= 0.8). Results printed; with --out a JSON and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

import qwen2
from benchmarks.common import build_prompt_ids, command_line, machine_facts, set_torch_threads, wait_for_quiet, \
    write_results
from qwen2.adapters import MultiLoRALinear
from qwen2.adapters.formats import ADAPTER_CONFIG, ADAPTER_FILE
from qwen2.progress import progress_bar
from qwen2.runtime.generate import SamplingParams
from qwen2.serve.engine import Engine, Request

MODULE = "benchmarks.speed.bench_lora_serving"
PLAIN, NONE, ADAPTERS = "plain", "none", "adapters"
PATHS = (PLAIN, NONE, ADAPTERS)
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def write_random_adapter(path: str, model, rank: int, seed: int) -> None:
    """A LoRA adapter with random nonzero A and B on every block's seven linears, in `qwen2 train`'s layout."""
    gen = torch.Generator().manual_seed(seed)
    tensors, modules = {}, []
    for i in range(model.config.num_hidden_layers):
        for target in TARGETS:
            module = f"model.layers.{i}.{target}"
            linear = model.get_submodule(module)
            A = torch.randn(rank, linear.in_features, generator=gen) / linear.in_features ** 0.5
            tensors[f"{module}.lora_A"] = A
            tensors[f"{module}.lora_B"] = 0.01 * torch.randn(linear.out_features, rank, generator=gen)
            modules.append(module)
    os.makedirs(path)
    save_file(tensors, os.path.join(path, ADAPTER_FILE))
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump({"r": rank, "alpha": 2.0 * rank, "dropout": 0.0, "modules": modules}, f)


@contextlib.contextmanager
def without_wrappers(model):
    """The model as loaded without adapters for a while: each MultiLoRALinear's base linear back in its place."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, MultiLoRALinear)]
    for name, wrapper in wrapped:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, wrapper.base)
    try:
        yield
    finally:
        for name, wrapper in wrapped:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, wrapper)


def decode_round(loaded, prompts: list[list[int]], adapters: list[str | None], steps: int, use_adapters: bool) -> float:
    """The median decode step (ms) of one engine batch: every prompt admitted, then `steps` steps timed."""
    budget = steps + len(prompts) + 2  # each admission's step also decodes the rows already in
    engine = Engine(loaded.decoder, loaded.tokenizer, [], max_batch=len(prompts),
                    max_model_len=max(map(len, prompts)) + budget, adapters=loaded.adapters if use_adapters else None)
    params = SamplingParams(max_new_tokens=budget)
    requests = [Request(p, params, lambda events: None, adapter=a) for p, a in zip(prompts, adapters)]
    times = []
    with torch.inference_mode():
        for request in requests:  # prefill, one at a time as the server admits them
            engine._step([request])
        for _ in range(steps):
            start = time.perf_counter()
            engine._step([])
            times.append((time.perf_counter() - start) * 1e3)
    assert len(engine.rows) == len(prompts), "a row finished early"
    return statistics.median(times)


def measure(loaded, args) -> dict:
    names = loaded.adapters.names
    prompts = [build_prompt_ids(loaded.tokenizer, args.prompt_tokens, rotate=i) for i in range(args.batch)]
    per_row = {PLAIN: [None] * args.batch, NONE: [None] * args.batch,
               ADAPTERS: [names[i % len(names)] for i in range(args.batch)]}
    medians = {path: [] for path in PATHS}
    for _ in progress_bar(range(args.rounds), desc="rounds", unit="round"):
        for path in PATHS:
            if path == PLAIN:
                with without_wrappers(loaded.model):
                    medians[path].append(decode_round(loaded, prompts, per_row[path], args.steps, False))
            else:
                medians[path].append(decode_round(loaded, prompts, per_row[path], args.steps, True))
    best = {path: min(m) for path, m in medians.items()}
    tok_s = {path: args.batch * 1e3 / ms for path, ms in best.items()}
    return {"median_ms_per_round": medians, "best_ms": best, "tokens_per_s": tok_s,
            "adapters_vs_none": tok_s[ADAPTERS] / tok_s[NONE], "adapters_vs_plain": tok_s[ADAPTERS] / tok_s[PLAIN],
            "rows_per_adapter": {n: per_row[ADAPTERS].count(n) for n in names}}


def markdown(data: dict) -> str:
    a, m, r = data["args"], data["machine"], data["result"]
    out = [f"# LoRA adapters per request: {a['model']} (quantize={a['quantize']}), batch {a['batch']} on "
           f"{a['adapters']} adapters, {a['threads']} threads\n", f"`{data['command']}`\n",
           f"{m['cpu']} ({m['logical_cpus']} logical CPUs), torch {data['torch']}, {m['date']}; CPU taken by "
           f"other processes before the run: {data['cpu_taken_by_others_pct']:.0f} %\n",
           f"Adapters: ranks {a['ranks']} on q, k, v, o, gate, up, down of every layer (random weights); "
           f"{a['prompt_tokens']}-token prompts, {a['steps']} decode steps per round, {a['rounds']} rounds.\n",
           "| path | best round ms / step | aggregate tokens/s | every round (ms / step) |",
           "| --- | ---: | ---: | --- |"]
    out += [f"| {p} | {r['best_ms'][p]:.1f} | {r['tokens_per_s'][p]:.1f} | "
            f"{', '.join(f'{x:.1f}' for x in r['median_ms_per_round'][p])} |" for p in PATHS]
    out += ["", f"adapters / none: **{r['adapters_vs_none']:.3f}×**; adapters / plain: "
                f"**{r['adapters_vs_plain']:.3f}×** (target ≥ 0.8×)"]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--quantize", default="none", help="none (fp32, the server's default), int8 or int4")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--ranks", default="8,16", help="adapter i gets rank i mod len(ranks)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this many seconds for an idle machine")
    p.add_argument("--out", default=None, help="write JSON here and markdown beside it (.md)")
    args = p.parse_args(argv)
    set_torch_threads(args.threads)
    ranks = [int(r) for r in args.ranks.split(",")]
    quantize = None if args.quantize == "none" else args.quantize
    loaded = qwen2.load(args.model, quantize=quantize)
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(args.adapters):  # each read from its directory, as load(adapters=) and --lora read them
            path = os.path.join(scratch, f"lora{i}")
            write_random_adapter(path, loaded.model, ranks[i % len(ranks)], seed=i)
            loaded.add_adapter(f"lora{i}", path)
    others = wait_for_quiet(args.wait_quiet)  # with 0, one 2-second look
    data = {"args": vars(args), "command": command_line(MODULE, argv), "machine": machine_facts(args.threads),
            "torch": torch.__version__, "cpu_taken_by_others_pct": others, "executor": loaded.decoder.name,
            "result": measure(loaded, args)}
    text = markdown(data)
    print(text)
    if args.out:
        write_results(args.out, data, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
