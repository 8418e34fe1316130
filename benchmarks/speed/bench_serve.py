"""Load test of `qwen2 serve`, next to llama.cpp's server: N concurrent streaming clients on loopback.

    python -m benchmarks.speed.bench_serve                 # 0.5B, fp32 as `qwen2 serve` loads it, then llama.cpp; c = 1,4,8,16,32
    python -m benchmarks.speed.bench_serve --quantize int4 --servers qwen2 --out serve-int4

Each server is the real one, started as its own process on 127.0.0.1 (`qwen2 serve`, --max-batch
slots, continuous batching; then `python -m llama_cpp.server` on the same GGUF with the same threads,
when llama-cpp-python and its server extras are installed), so the clients never share its
interpreter. Each client streams /v1/chat/completions with its own prompt (greedy, `max_tokens`) and
takes the next prompt when done. Per server and concurrency level:
  * aggregate tokens/s: completion tokens of all requests / wall time from the first request sent to
    the last stream closed (prefills included: what a user of a busy server sees);
  * the ratio to concurrency 1 (sequential requests, the same prompts, the same server);
  * p50 / p95 time to first token (request sent -> first content chunk), and p50 request latency;
  * correctness: every response completes ([DONE], finish_reason), and its text equals the text of the
    same request at concurrency 1 (sent alone). A differing text is counted, not hidden.
Results go to benchmarks/results/serve.json and serve.md (atomically), the servers' logs beside them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.common import (REPO_ROOT, RESULTS_DIR, command_line, cpu_busy_s, llama_cpp_installed, machine_facts,
                               write_atomic)

MODULE = "benchmarks.speed.bench_serve"

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


def one_request(http, url: str, messages: list[dict], max_tokens: int, model: str) -> dict:
    """Stream one chat completion; its text, token count, finish reason and timings. The token count is
    the usage the server reports, or (a server without usage in streams) the content chunks received."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, text, finish, tokens, chunks, done = None, "", None, None, 0, False
    with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.read().decode()[:200]}"}
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line.strip() == "data: [DONE]":
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
                    chunks += 1
                finish = choice.get("finish_reason") or finish
    end = time.perf_counter()
    return {"text": text, "tokens": chunks if tokens is None else tokens, "finish_reason": finish, "done": done,
            "ttft_s": (first or end) - start, "latency_s": end - start}


def run_level(url: str, conversations: list[list[dict]], concurrency: int, max_tokens: int,
              model: str) -> tuple[list[dict], float]:
    import httpx

    with httpx.Client(timeout=900, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda m: one_request(http, url, m, max_tokens, model), conversations))
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(command: list[str], url: str, log_path: str, start_timeout: float = 600):
    """Run a server command (its own process: the clients here never share its interpreter), wait until
    GET /v1/models answers, and stop it on exit."""
    import httpx

    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        try:
            deadline = time.time() + start_timeout
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"the server exited with code {process.returncode}; see {log_path}")
                try:
                    if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise SystemExit(f"the server did not answer within {start_timeout:.0f} s; see {log_path}")
                time.sleep(0.5)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def server_command(name: str, args, port: int) -> list[str]:
    if name == "qwen2":
        command = [sys.executable, "-c", "from qwen2.cli import main; main()", "serve", "--model", args.model,
                   "--port", str(port), "--max-batch", str(args.max_batch), "--max-model-len", str(args.max_model_len),
                   "--max-queue", str(4 * args.requests)]
        return command + ([] if args.quantize == "none" else ["--quantize", args.quantize])
    from qwen2.checkpoint.registry import gguf_path
    # llama-cpp-python's server (pip install sse-starlette starlette-context pydantic-settings): one
    # sequence at a time; interrupt_requests off, so a new request waits instead of cutting the running one.
    return [sys.executable, "-m", "llama_cpp.server", "--model", gguf_path(args.model), "--port", str(port),
            "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", str(args.max_model_len),
            "--interrupt_requests", "False", "--verbose", "False"]


def measure_server(name: str, url: str, model: str, conversations, levels, max_tokens: int) -> list[dict]:
    """Every concurrency level against one running server; the first level (1) is the reference."""
    run_level(url, conversations[:2], 2, 4, model)  # warm-up: kernels built, allocator warm
    rows, reference = [], None
    for c in levels:
        busy_before, t0 = cpu_busy_s(), time.monotonic()
        results, wall = run_level(url, conversations, c, max_tokens, model)
        busy = (cpu_busy_s() - busy_before) / ((time.monotonic() - t0) * (os.cpu_count() or 1))
        ok = [r for r in results if "error" not in r and r["done"] and r["finish_reason"]]
        if reference is None:
            reference = [r.get("text") for r in results]
        same = sum(r.get("text") == ref for r, ref in zip(results, reference))
        tokens = sum(r["tokens"] for r in ok)
        row = {"server": name, "concurrency": c, "requests": len(results), "completed": len(ok),
               "same_as_alone": same, "completion_tokens": tokens, "wall_s": round(wall, 2),
               "tokens_per_s": round(tokens / wall, 2),
               "ttft_p50_s": round(percentile([r["ttft_s"] for r in ok], 0.5), 3) if ok else None,
               "ttft_p95_s": round(percentile([r["ttft_s"] for r in ok], 0.95), 3) if ok else None,
               "latency_p50_s": round(percentile([r["latency_s"] for r in ok], 0.5), 3) if ok else None,
               "cpu_busy_share": round(busy, 2), "errors": [r["error"] for r in results if "error" in r][:3]}
        row["vs_sequential"] = round(row["tokens_per_s"] / rows[0]["tokens_per_s"], 2) if rows else 1.0
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--quantize", default="none",
                    help="our server's weights: none (fp32, `qwen2 serve`'s default), int4, int8 or int4-pure")
    ap.add_argument("--servers", default="qwen2,llama.cpp", help="which servers to load, one after the other")
    ap.add_argument("--requests", type=int, default=32, help="prompts per concurrency level (all different)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,8,16,32")
    ap.add_argument("--max-batch", type=int, default=16, help="our server's slots; higher concurrency queues")
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="serve")
    args = ap.parse_args()

    levels = [int(c) for c in args.concurrency.split(",")]
    if levels[0] != 1:
        levels = [1] + levels  # the sequential run is the reference for both speed and text
    conversations = prompts(args.requests)
    rows, skipped = [], {}
    for name in args.servers.split(","):
        if name == "llama.cpp" and not llama_cpp_installed():
            skipped[name] = "llama-cpp-python not installed"
            continue
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = os.path.join(RESULTS_DIR, f"{args.out}-{name}.log")
        with server_process(server_command(name, args, port), url, log):
            model = httpx_model_id(url)
            rows += measure_server(name, url, model, conversations, levels, args.max_tokens)
    result = {"model": args.model, "quantize": args.quantize, "max_tokens": args.max_tokens,
              "requests_per_level": args.requests, "max_batch": args.max_batch, "max_model_len": args.max_model_len,
              "machine": machine_facts(args.threads), "levels": rows, "skipped": skipped}
    write_atomic(os.path.join(RESULTS_DIR, args.out + ".json"), json.dumps(result, indent=2) + "\n")
    weights = {"qwen2": "fp32, dequantised from the GGUF" if args.quantize == "none" else f"{args.quantize} from the GGUF", "llama.cpp": "the GGUF's own Q4_K_M blocks"}
    lines = [f"`{command_line(MODULE)}`", "",
             f"{args.model}, {args.requests} different chat prompts per level (each client sends its next when "
             f"one ends), streaming, greedy, max_tokens {args.max_tokens}, loopback; each server in its own "
             f"process with {args.threads} threads; ours with {args.max_batch} slots. \"= alone\": the text "
             "equals the same request's at concurrency 1.", "",
             "| server | weights | concurrency | tokens/s | vs sequential | TTFT p50 | TTFT p95 | latency p50 "
             "| completed | = alone | CPU busy |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['server']} | {weights[r['server']]} | {r['concurrency']} | {r['tokens_per_s']:.1f} "
                     f"| {r['vs_sequential']:.2f}× | {r['ttft_p50_s']:.2f} s | {r['ttft_p95_s']:.2f} s "
                     f"| {r['latency_p50_s']:.2f} s | {r['completed']}/{r['requests']} "
                     f"| {r['same_as_alone']}/{r['requests']} | {100 * r['cpu_busy_share']:.0f} % |")
    for name, why in skipped.items():
        lines.append(f"| {name} | {why} | | | | | | | | | |")
    write_atomic(os.path.join(RESULTS_DIR, args.out + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def httpx_model_id(url: str) -> str:
    import httpx

    return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


if __name__ == "__main__":
    main()
