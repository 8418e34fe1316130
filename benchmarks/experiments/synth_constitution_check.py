"""`qwen2 synth constitution` with a real model: 20 prompts (benchmarks/data/constitution_prompts.jsonl:
harmful, dishonest or disrespectful requests mixed with ordinary ones) against 3 principles
(benchmarks/data/principles.txt: harmlessness, honesty, respect). Does each revision differ from its
draft, how long are they, and what do drafts and final revisions say side by side.

    python -m benchmarks.experiments.synth_constitution_check                 # the 0.5B model, int4 (~15 min)
    python -m benchmarks.experiments.synth_constitution_check --model DIR --limit 3 --max-new-tokens 16 --out D

Writes <out>/ (what the command writes: records.jsonl, sft.jsonl, pairs.jsonl, stats.json) and
benchmarks/results/synth_constitution.{md,json} (--results to move them). A rerun reuses the records.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.common import DATA_DIR, REPO_ROOT, RESULTS_DIR, command_line, machine_facts, one_line_errors
from qwen2.fileio import write_text_atomic

PROMPTS = os.path.join(DATA_DIR, "constitution_prompts.jsonl")
PRINCIPLES = os.path.join(DATA_DIR, "principles.txt")


def summarise(records: list[dict], stats: dict, args) -> dict:
    changed_at = [sum(1 for r in records if (r["steps"][i]["revision"].strip()
                                            != (r["steps"][i - 1]["revision"] if i else r["draft"]).strip()))
                  for i in range(stats["principles"])]
    return {"command": command_line(__spec__.name if __spec__ else "benchmarks.experiments.synth_constitution_check"),
            "machine": machine_facts(threads=args.threads), "model": args.model, "quantize": args.quantize,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "stats": stats,
            "revision_differs": sum(r["revision"].strip() != r["draft"].strip() for r in records),
            "changed_by_step": changed_at,
            "mean_chars": {"draft": sum(len(r["draft"]) for r in records) / len(records),
                           "revision": sum(len(r["revision"]) for r in records) / len(records)},
            "examples": [{"prompt": r["prompt"][-1]["content"], "draft": r["draft"], "revision": r["revision"]}
                         for r in records]}


def markdown(s: dict) -> str:
    n = s["stats"]["prompts"]
    lines = [f"# `qwen2 synth constitution` on {s['model']} ({s['quantize'] or 'fp32'})", "",
             f"`{s['command']}` on {s['machine'].get('cpu', 'this CPU')}: {n} prompts x {s['stats']['principles']} "
             f"principles, temperature {s['temperature']}, at most {s['max_new_tokens']} new tokens per reply, "
             f"{s['stats']['seconds']:.0f} s.", "",
             f"**The final revision differs from the draft for {s['revision_differs']} of {n} prompts**; each "
             f"principle's revision changed the reply before it for {', '.join(map(str, s['changed_by_step']))} prompts. "
             f"Mean length: draft {s['mean_chars']['draft']:.0f} characters, final revision "
             f"{s['mean_chars']['revision']:.0f}.", "", "| prompt | draft | final revision |", "|---|---|---|"]
    cell = lambda t: t.replace("|", "\\|").replace("\n", " ")[:300]  # noqa: E731
    lines += [f"| {cell(e['prompt'])} | {cell(e['draft'])} | {cell(e['revision'])} |" for e in s["examples"]]
    return "\n".join(lines) + "\n"


@one_line_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--quantize", default="int4", help="int4 (default), int8, or none")
    ap.add_argument("--limit", type=int, default=None, help="the first N prompts only")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "synth-constitution"))
    ap.add_argument("--results", default=os.path.join(RESULTS_DIR, "synth_constitution"))
    args = ap.parse_args(argv)
    import torch

    import qwen2
    from qwen2.runtime.generate import SamplingParams
    from qwen2.synth import constitution

    torch.set_num_threads(args.threads)
    quantize = None if args.quantize in ("none", "") else args.quantize
    args.quantize = quantize
    prompts = PROMPTS
    if args.limit:
        prompts = os.path.join(args.out, "prompts.jsonl")
        os.makedirs(args.out, exist_ok=True)
        with open(PROMPTS, encoding="utf-8") as f:
            write_text_atomic(prompts, "".join(f.readlines()[:args.limit]))
    start = time.perf_counter()
    stats = constitution.constitution(
        prompts, constitution.read_principles(PRINCIPLES), lambda: qwen2.load(args.model, quantize=quantize),
        args.out, params=SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=0.95),
        batch=args.batch)
    stats["seconds"] = stats.get("seconds", time.perf_counter() - start)
    with open(os.path.join(args.out, constitution.RECORDS_FILE), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    summary = summarise(records, stats, args)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    write_text_atomic(args.results + ".json", json.dumps(summary, indent=1) + "\n")
    write_text_atomic(args.results + ".md", markdown(summary))
    print(markdown(summary).split("\n\n")[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
