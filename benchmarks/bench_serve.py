"""Load test of `qwen2 serve`: N concurrent streaming clients on loopback, continuous batching.

    python benchmarks/bench_serve.py                                  # int4 0.5B, 32 prompts, c = 1,4,8,16,32
    python benchmarks/bench_serve.py --quantize none --requests 16 --max-tokens 24 --concurrency 1,8

The server is the real one (`create_app` under uvicorn, in this process, on 127.0.0.1; --max-batch
slots). Each client streams /v1/chat/completions with its own prompt (greedy, `max_tokens`, usage in
the last chunk) and takes the next prompt when done. Per concurrency level:
  * aggregate tokens/s: completion tokens of all requests / wall time from the first request sent to
    the last stream closed (prefills included: what a user of a busy server sees);
  * the ratio to concurrency 1 (sequential requests, the same prompts);
  * p50 / p95 time to first token (request sent -> first content chunk), and p50 request latency;
  * correctness: every response completes ([DONE], finish_reason), and its text equals the text of the
    same request at concurrency 1 (sent alone). A differing text is counted, not hidden.
Results go to benchmarks/results/serve.json and serve.md (atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_inference import cpu_busy_s, machine_facts, set_torch_threads  # noqa: E402

from qwen2.fileio import write_text_atomic  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO_ROOT, "benchmarks", "results")

TOPICS = ["reverse a linked list", "parse an ISO 8601 date", "merge two sorted lists", "compute a SHA-256 of a file",
          "check whether a string is a palindrome", "flatten a nested list", "count words in a text file",
          "find the median of a list", "implement binary search", "validate an email address",
          "convert Celsius to Fahrenheit", "remove duplicates keeping order", "transpose a matrix",
          "read a CSV into dictionaries", "compute Fibonacci numbers iteratively", "retry a function with backoff",
          "implement an LRU cache", "split a list into chunks", "format bytes as KB/MB/GB", "rotate an array by k",
          "find anagrams in a word list", "compute the GCD of two numbers", "debounce a function call",
          "serialize a dataclass to JSON", "walk a directory tree", "check balanced parentheses",
          "compute a running average", "generate all permutations", "parse command-line flags",
          "measure a function's run time", "convert a Roman numeral to an integer", "zip two dicts by key"]
LANGUAGES = ["Python", "JavaScript", "Go", "Rust"]


def prompts(count: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write a short {LANGUAGES[i % len(LANGUAGES)]} function to "
                                         f"{TOPICS[i % len(TOPICS)]}. Code only."}] for i in range(count)]


def one_request(http, url: str, messages: list[dict], max_tokens: int) -> dict:
    """Stream one chat completion; its text, token count, finish reason and timings."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, text, finish, tokens, done = None, "", None, 0, False
    with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.read().decode()[:200]}"}
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content")
                if piece:
                    first = first or time.perf_counter()
                    text += piece
                finish = choice.get("finish_reason") or finish
    end = time.perf_counter()
    return {"text": text, "tokens": tokens, "finish_reason": finish, "done": done,
            "ttft_s": (first or end) - start, "latency_s": end - start}


def run_level(url: str, conversations: list[list[dict]], concurrency: int, max_tokens: int) -> tuple[list[dict], float]:
    import httpx

    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda m: one_request(http, url, m, max_tokens), conversations))
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--quantize", default="int4", help="int4 (default), int8, int4-pure or none")
    ap.add_argument("--requests", type=int, default=32, help="prompts per concurrency level (all different)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,8,16,32")
    ap.add_argument("--max-batch", type=int, default=16, help="server slots; higher concurrency queues")
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="serve")
    args = ap.parse_args()

    import qwen2
    from qwen2.serve.app import create_app, serve_in_background

    set_torch_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    if levels[0] != 1:
        levels = [1] + levels  # the sequential run is the reference for both speed and text
    quantize = None if args.quantize == "none" else args.quantize
    m = qwen2.load(args.model, quantize=quantize, progress=False)
    app = create_app(m, max_batch=args.max_batch, max_model_len=args.max_model_len, max_queue=4 * max(levels))
    conversations = prompts(args.requests)
    with serve_in_background(app) as url:
        run_level(url, conversations[:2], 2, 4)  # warm-up: kernels built, allocator warm
        rows, reference = [], None
        for c in levels:
            busy_before, t0 = cpu_busy_s(), time.monotonic()
            results, wall = run_level(url, conversations, c, args.max_tokens)
            busy = (cpu_busy_s() - busy_before) / ((time.monotonic() - t0) * (os.cpu_count() or 1))
            ok = [r for r in results if "error" not in r and r["done"] and r["finish_reason"]]
            if reference is None:
                reference = [r.get("text") for r in results]
            same = sum(r.get("text") == ref for r, ref in zip(results, reference))
            tokens = sum(r["tokens"] for r in ok)
            row = {"concurrency": c, "requests": len(results), "completed": len(ok), "same_as_alone": same,
                   "completion_tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
                   "ttft_p50_s": round(percentile([r["ttft_s"] for r in ok], 0.5), 3),
                   "ttft_p95_s": round(percentile([r["ttft_s"] for r in ok], 0.95), 3),
                   "latency_p50_s": round(percentile([r["latency_s"] for r in ok], 0.5), 3),
                   "cpu_busy_share": round(busy, 2),
                   "errors": [r["error"] for r in results if "error" in r][:3]}
            row["vs_sequential"] = round(row["tokens_per_s"] / rows[0]["tokens_per_s"], 2) if rows else 1.0
            rows.append(row)
            print(json.dumps(row), flush=True)
        engine = app.state.engine
        result = {"model": args.model, "quantize": args.quantize, "max_tokens": args.max_tokens,
                  "requests_per_level": args.requests, "max_batch": args.max_batch,
                  "max_model_len": args.max_model_len, "mean_decode_batch": round(engine.decode_rows / max(engine.decode_steps, 1), 2),
                  "machine": machine_facts(args.threads), "levels": rows}
    os.makedirs(RESULTS, exist_ok=True)
    write_text_atomic(os.path.join(RESULTS, args.out + ".json"), json.dumps(result, indent=2) + "\n")
    lines = [f"`qwen2 serve`, {args.model} ({args.quantize}), {args.requests} different chat prompts per level, "
             f"greedy, max_tokens {args.max_tokens}, {args.max_batch} slots, {args.threads} threads, loopback:", "",
             "| concurrency | tokens/s | vs sequential | TTFT p50 | TTFT p95 | latency p50 | completed | = alone | CPU busy |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['vs_sequential']:.2f}× | {r['ttft_p50_s']:.2f} s "
                     f"| {r['ttft_p95_s']:.2f} s | {r['latency_p50_s']:.2f} s | {r['completed']}/{r['requests']} "
                     f"| {r['same_as_alone']}/{r['requests']} | {100 * r['cpu_busy_share']:.0f} % |")
    write_text_atomic(os.path.join(RESULTS, args.out + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
