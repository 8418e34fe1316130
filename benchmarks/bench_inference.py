#!/usr/bin/env python
"""Side-by-side CPU inference benchmark: this project vs transformers vs llama.cpp, same weights, same prompt.

For every engine it measures, in a fresh subprocess of its own:
  load s         time of the engine's load call (imports not included; reported apart)
  prefill tok/s  prompt tokens / time of one forward over the whole prompt into an empty KV cache
                 (median of --repeats runs, after a short warm-up; only the last position's logits)
  decode tok/s   --new-tokens single-token forwards through the KV cache after that prefill, greedy,
                 each feeding back the token it chose; tok/s = new tokens / time of those steps
  peak RSS MB    the process's high-water resident set (VmHWM), so engines never share memory

Engines:
  qwen2              `qwen2.load(...)`, fp32, the static KV cache and `qwen2.generate.decode_steps`
  transformers       `AutoModelForCausalLM.from_pretrained(<HF dir>, dtype=float32)` on the directory
                     qwen2 converted (the same weights), default attention (sdpa), manual cache loop
  llama.cpp          `llama_cpp.Llama` on the GGUF file the weights came from (Q4_K_M: quantised, so
                     smaller and faster by design), when `import llama_cpp` works; it is not a dependency
  transformers-gguf  (--transformers-gguf) transformers' own GGUF loader, slow: it dequantises in Python

Before the engines, a first process times `qwen2.load(MODEL)` and reports whether the converted cache
was cold (the load assembled/converted the GGUF) or already warm; the qwen2 engine's own load, in a
new process right after, is the second load.

Usage:
  python benchmarks/bench_inference.py                          # 0.5B registry model, all engines
  python benchmarks/bench_inference.py --cold                   # first load in an empty, temporary cache
  python benchmarks/bench_inference.py --engines qwen2,llama.cpp --new-tokens 32
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from qwen2.fileio import write_text_atomic

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
ENGINES = ("qwen2", "transformers", "llama.cpp")
OPTIONAL_ENGINES = ("transformers-gguf", "qwen2-int8", "qwen2-int4")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP_TOKENS = 16  # a short forward plus two decode steps before any timing: first-call costs stay out


# --------------------------------------------------------------------------------------------------
# The prompt
# --------------------------------------------------------------------------------------------------

# Varied, natural text (prose, code, a table, a log), not one token repeated: real prompts are like
# this, and a degenerate prompt could make greedy decoding collapse into one repeated token.
PROMPT_PIECES = [
    "You are reviewing a pull request for a small Python service that caches HTTP responses.\n"
    "Read the code below, then explain what it does, point out any bugs, and suggest improvements.\n\n",
    "```python\nimport time\nfrom collections import OrderedDict\n\n\nclass LRUCache:\n"
    "    \"\"\"A least-recently-used cache with a time-to-live for every entry.\"\"\"\n\n"
    "    def __init__(self, capacity: int = 128, ttl: float = 60.0):\n"
    "        self.capacity = capacity\n        self.ttl = ttl\n        self._data = OrderedDict()\n\n"
    "    def get(self, key):\n        item = self._data.get(key)\n        if item is None:\n"
    "            return None\n        value, stamp = item\n        if time.time() - stamp > self.ttl:\n"
    "            del self._data[key]\n            return None\n        self._data.move_to_end(key)\n"
    "        return value\n\n    def put(self, key, value):\n        self._data[key] = (value, time.time())\n"
    "        self._data.move_to_end(key)\n        while len(self._data) > self.capacity:\n"
    "            self._data.popitem(last=False)\n```\n\n",
    "The service calls `fetch(url)` for every request. When the cache misses, it downloads the page, "
    "parses the headers, and stores the body together with the moment it arrived. Operators noticed "
    "that memory grows slowly over a week, that some users see stale prices after a deploy, and that "
    "the hit rate drops sharply every night at 02:00 when a batch job scans the whole catalogue.\n\n",
    "```python\nasync def fetch(session, cache, url, retries=3):\n    cached = cache.get(url)\n"
    "    if cached is not None:\n        return cached\n    for attempt in range(retries):\n"
    "        try:\n            async with session.get(url, timeout=10) as response:\n"
    "                response.raise_for_status()\n                body = await response.text()\n"
    "                cache.put(url, body)\n                return body\n"
    "        except Exception as error:\n            log.warning(\"fetch %s failed (%d/%d): %s\", url, attempt + 1, retries, error)\n"
    "            await asyncio.sleep(2 ** attempt)\n    raise RuntimeError(f\"giving up on {url}\")\n```\n\n",
    "| metric | Monday | Tuesday | Wednesday |\n| --- | --- | --- | --- |\n"
    "| requests | 1,204,331 | 1,187,902 | 1,250,118 |\n| hit rate | 0.83 | 0.81 | 0.62 |\n"
    "| p99 latency ms | 184 | 191 | 407 |\n| resident memory MB | 512 | 548 | 611 |\n\n",
    "2024-05-14 02:00:03 INFO batch: scanning 48,210 catalogue pages\n"
    "2024-05-14 02:03:41 WARNING fetch https://shop.example/items/1193 failed (1/3): timeout\n"
    "2024-05-14 02:17:26 INFO batch: done, 48,210 pages in 1043.2 s\n\n",
    "Questions for the review: Is the cache safe to share between coroutines? Does the TTL check "
    "use the right clock? What happens when `put` is called for a key that is already present? "
    "How would you keep the nightly scan from evicting the entries that real users need? "
    "Answer with concrete code changes and a short justification for each one.\n\n",
]


def prompt_text(min_chars: int) -> str:
    """The pieces above, repeated with numbered sections until at least `min_chars` long."""
    parts, section = [], 1
    while sum(map(len, parts)) < min_chars:
        parts.append(f"## Part {section}\n\n" + "".join(PROMPT_PIECES))
        section += 1
    return "".join(parts)


def build_prompt_ids(tokenizer, n_tokens: int) -> list[int]:
    """Exactly `n_tokens` ids of natural text (cut at the end), tokenized by our tokenizer."""
    chars = 4 * n_tokens  # about 3-4 characters a token for English and code; grown below if short
    while True:
        ids = list(tokenizer.encode(prompt_text(chars)))
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        chars *= 2


# --------------------------------------------------------------------------------------------------
# Measurements shared by the workers
# --------------------------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    """High-water RSS of this process in MB. VmHWM belongs to this process's own address space;
    ru_maxrss is not used because Linux carries it over from the parent across fork/exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def progress(total: int, desc: str):
    from tqdm import tqdm
    # On stderr, updated at most twice a second: its cost inside a timed loop is microseconds a step.
    return tqdm(total=total, desc=desc, file=sys.stderr, mininterval=0.5, leave=False, dynamic_ncols=True)


def measure_prefill(prefill, n_tokens: int, repeats: int, desc: str) -> dict:
    """Time `prefill()` (one forward over the prompt into an empty cache) `repeats` times."""
    times = []
    with progress(repeats, f"{desc} prefill") as bar:
        for _ in range(repeats):
            times.append(timed(prefill)[1])
            bar.update()
    median = statistics.median(times)
    return {"prefill_s": times, "prefill_median_s": median, "prefill_tok_s": n_tokens / median,
            "prefill_best_tok_s": n_tokens / min(times)}


def measure_decode(step, n_steps: int, desc: str) -> dict:
    """Call `step()` (one token through the KV cache) `n_steps` times, timing each call.

    decode_tok_s is steps / total time, the number reported. The median step is kept as well: on a
    shared machine another process's burst slows a few steps, and the median shows the typical one."""
    times = []
    with progress(n_steps, f"{desc} decode") as bar:
        for _ in range(n_steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            bar.update()
    total = sum(times)
    return {"decode_s": total, "decode_steps": n_steps, "decode_tok_s": n_steps / total,
            "decode_median_step_tok_s": 1 / statistics.median(times), "decode_step_s": times}


def set_torch_threads(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# Workers: each runs in its own process, reads a job file, writes a result file
# --------------------------------------------------------------------------------------------------

def worker_first_load(job: dict) -> dict:
    """Time `qwen2.load(model)` with the cache as it is, say whether it was cold, and build the prompt."""
    t0 = time.perf_counter()
    import qwen2
    from qwen2.checkpoint.registry import KNOWN_MODELS, cache_dir
    import_s = time.perf_counter() - t0
    set_torch_threads(job["threads"])
    source = job["model"]
    registry = source.lower() in KNOWN_MODELS
    cache_state = cache_before(source) if registry else "n/a (not a registry name)"
    m, load_s = timed(qwen2.load, source)
    ids = build_prompt_ids(m.tokenizer, job["prompt_tokens"])
    hf, gguf = job.get("hf_dir"), job.get("gguf")
    if registry:
        from qwen2.checkpoint.registry import gguf_path, hf_dir
        hf, gguf = hf or hf_dir(source, progress=False), gguf or gguf_path(source, progress=False)
    elif os.path.isdir(source):
        hf = hf or source
    elif source.endswith(".gguf"):
        gguf = gguf or source
        hf = hf or convert_for_transformers(source, job["scratch"])
    return {"import_s": import_s, "load_s": load_s, "cache_state": cache_state, "cache_dir": cache_dir(),
            "prompt_ids": ids, "prompt_preview": m.tokenizer.decode(ids[:64]), "hf_dir": hf, "gguf": gguf,
            "config": {k: getattr(m.config, k, None) for k in
                       ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                        "vocab_size", "tie_word_embeddings")},
            "peak_rss_mb": peak_rss_mb()}


def cache_before(name: str) -> str:
    """What the registry cache holds for `name` before the first load."""
    from qwen2.checkpoint.registry import cache_dir, known_model
    model = known_model(name)
    converted = os.path.isfile(os.path.join(cache_dir(), model.name, "qwen2_source.json"))
    assembled = os.path.isfile(os.path.join(cache_dir(), f"{model.name}.gguf"))
    if converted:
        return "warm (converted directory already cached)"
    if assembled:
        return "cold (GGUF assembled earlier; this load converted it)"
    return "cold (this load assembled the GGUF from its parts and converted it)"


def convert_for_transformers(gguf: str, scratch: str) -> str:
    """transformers cannot read our GGUF quickly: write it once as an HF directory in the scratch dir."""
    from qwen2.checkpoint.gguf import load_gguf
    from qwen2.checkpoint.hf import save_hf_dir
    from qwen2.checkpoint.registry import generation_config_for
    config, state_dict, tokenizer = load_gguf(gguf, progress=False)
    path = os.path.join(scratch, "hf")
    save_hf_dir(path, config, state_dict, tokenizer, generation_config_for(tokenizer))
    return path


def worker_qwen2(job: dict, quantize: str | None = None) -> dict:
    """This project: `qwen2.load`, static KV cache, `decode_steps` (the path `generate` uses);
    with `quantize`, weight-only int8/int4 linears (`qwen2.load(..., quantize=...)`)."""
    t0 = time.perf_counter()
    import torch
    import qwen2
    from qwen2.generate import SamplingParams, decode_steps
    from qwen2.quantize import describe
    import_s = time.perf_counter() - t0
    set_torch_threads(job["threads"])
    m, load_s = timed(qwen2.load, job["model"], progress=False, quantize=quantize)
    model, ids = m.model, job["prompt_ids"]
    load_rss = rss_mb()
    prompt = torch.tensor([ids])
    max_len = len(ids) + job["new_tokens"] + 1

    with torch.inference_mode():
        cache = model.new_cache(1, max_len)  # warm-up: a short prefill and two decode steps
        logits = model(prompt[:, :WARMUP_TOKENS], cache=cache, last_only=True)
        for _ in range(2):
            logits = model(logits[:, -1].argmax(-1, keepdim=True), cache=cache)

        def prefill():
            return model(prompt, cache=model.new_cache(1, max_len), last_only=True)
        result = measure_prefill(prefill, len(ids), job["repeats"], "qwen2")

    # decode_steps prefills, then yields one token per step; the clock starts at the first token (from
    # the prefill logits), so it covers exactly new_tokens forwards through the cache plus their argmax.
    steps = decode_steps(model, [ids], SamplingParams(max_new_tokens=job["new_tokens"] + 1, temperature=0.0),
                         pad_id=0)
    tokens = [int(next(steps))]
    decode = measure_decode(lambda: tokens.append(int(next(steps))), job["new_tokens"], "qwen2")
    return {**result, **decode, "tokens": tokens, "import_s": import_s,
            "load_s": load_s, "rss_after_load_mb": load_rss,
            "weights": (f"{describe(model)}, quantised at load from " if quantize
                        else "fp32 (") + ("the HF directory's safetensors" if os.path.isdir(job["model"])
                                          else "dequantised from the GGUF") + ("" if quantize else ")"),
            "peak_rss_mb": peak_rss_mb()}


def worker_transformers(job: dict, from_gguf: bool = False) -> dict:
    """transformers on the same weights: our converted HF directory (or, from_gguf, its own GGUF loader)."""
    t0 = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    import_s = time.perf_counter() - t0
    set_torch_threads(job["threads"])
    name = "transformers-gguf" if from_gguf else "transformers"
    if from_gguf:
        gguf = job["gguf"]
        load = lambda: AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                            dtype=torch.float32)
    else:
        load = lambda: AutoModelForCausalLM.from_pretrained(job["hf_dir"], dtype=torch.float32)
    model, load_s = timed(load)
    model.eval()
    load_rss = rss_mb()
    ids = job["prompt_ids"]
    prompt = torch.tensor([ids])

    def forward(input_ids, past=None):
        # logits_to_keep=1: only the last position's logits, as qwen2's last_only and llama.cpp do.
        out = model(input_ids=input_ids, past_key_values=past, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    with torch.inference_mode():
        logits, past = forward(prompt[:, :WARMUP_TOKENS])
        for _ in range(2):
            logits, past = forward(logits.argmax(-1, keepdim=True), past)
        result = measure_prefill(lambda: forward(prompt), len(ids), job["repeats"], name)

        # The same loop as model.generate(do_sample=False) without its logits processors: greedy
        # tokens through the DynamicCache, which is what HF's own generate uses by default.
        logits, past = forward(prompt)
        tokens = [int(logits.argmax(-1))]

        def step():
            nonlocal past
            logits, past = forward(torch.tensor([[tokens[-1]]]), past)
            tokens.append(int(logits.argmax(-1)))
        decode = measure_decode(step, job["new_tokens"], name)
    return {**result, **decode, "tokens": tokens, "import_s": import_s,
            "load_s": load_s, "rss_after_load_mb": load_rss,
            "weights": "fp32 (" + ("its own GGUF dequantisation" if from_gguf else "the same safetensors"
                                  if job["hf_dir"] == job["model"] else "qwen2's converted safetensors") + ")",
            "attention": getattr(model.config, "_attn_implementation", None),
            "version": transformers.__version__, "peak_rss_mb": peak_rss_mb()}


def worker_llama_cpp(job: dict) -> dict:
    """llama.cpp (llama-cpp-python) on the GGUF: eval() of the prompt, then one eval() per token."""
    import numpy as np
    t0 = time.perf_counter()
    import llama_cpp
    import_s = time.perf_counter() - t0
    ids, new = job["prompt_ids"], job["new_tokens"]
    n_ctx = max(1024, len(ids) + new + 16)
    llm, load_s = timed(llama_cpp.Llama, model_path=job["gguf"], n_threads=job["threads"],
                        n_threads_batch=job["threads"], n_ctx=n_ctx, n_batch=max(512, len(ids)),
                        n_ubatch=max(512, len(ids)), logits_all=False, verbose=False)
    load_rss = rss_mb()  # the weights are mmap'd: pages count once touched, by the warm-up below

    def last_logits():
        # Without logits_all only the last evaluated position has logits: read them straight from
        # the context (Llama.scores is a bookkeeping copy sized for n_batch rows).
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))

    def prefill():
        llm.reset()  # n_tokens = 0; eval() then drops every cached position >= 0
        llm.eval(ids)

    llm.eval(ids[:WARMUP_TOKENS])
    for _ in range(2):
        llm.eval([int(last_logits().argmax())])
    result = measure_prefill(prefill, len(ids), job["repeats"], "llama.cpp")

    prefill()
    tokens = [int(last_logits().argmax())]

    def step():
        llm.eval([tokens[-1]])
        tokens.append(int(last_logits().argmax()))
    decode = measure_decode(step, new, "llama.cpp")
    return {**result, **decode, "tokens": tokens, "import_s": import_s, "load_s": load_s,
            "rss_after_load_mb": load_rss, "weights": "the GGUF's quantised weights (Q4_K_M mix), mmap'd",
            "n_ctx": n_ctx, "version": getattr(llama_cpp, "__version__", None),
            # which SIMD paths this build of llama.cpp uses (AVX2, AVX512, AMX, ...), as its own words
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
            "peak_rss_mb": peak_rss_mb()}


WORKERS = {
    "first-load": worker_first_load,
    "qwen2": worker_qwen2,
    "qwen2-int8": lambda job: worker_qwen2(job, quantize="int8"),
    "qwen2-int4": lambda job: worker_qwen2(job, quantize="int4"),
    "transformers": worker_transformers,
    "transformers-gguf": lambda job: worker_transformers(job, from_gguf=True),
    "llama.cpp": worker_llama_cpp,
}


def run_worker(name: str, job_file: str, result_file: str) -> None:
    """Entry point of a worker process: the result (or the error) goes to `result_file`."""
    with open(job_file) as f:
        job = json.load(f)
    try:
        result = {"status": "ok", **WORKERS[name](job)}
    except ImportError as error:
        result = {"status": "not installed" if name == "llama.cpp" else "error", "error": repr(error)}
    except Exception as error:  # reported in the table; the other engines still run
        import traceback
        traceback.print_exc()
        result = {"status": "error", "error": repr(error)}
    write_json(result_file, result)


# --------------------------------------------------------------------------------------------------
# The parent: runs the workers one after another and reports
# --------------------------------------------------------------------------------------------------

def write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, text)


def write_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def spawn(name: str, job: dict, scratch: str, env: dict, timeout: float) -> dict:
    """Run one worker in a fresh Python process and return its result."""
    job_file, result_file = os.path.join(scratch, f"{name}.job.json"), os.path.join(scratch, f"{name}.result.json")
    write_json(job_file, job)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--job", job_file, "--result", result_file]
    busy_before, ours_before, start = cpu_busy_s(), children_cpu_s(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    # CPU time the whole machine spent minus what the worker spent: what other processes took
    # while this engine was measured, as a share of all cores. Near 0 % means a quiet machine.
    others = max(0.0, (cpu_busy_s() - busy_before) - (children_cpu_s() - ours_before))
    contention = {"process_wall_s": wall, "others_cpu_pct": 100 * others / (wall * (os.cpu_count() or 1))}
    if not os.path.isfile(result_file):
        how = (f"crashed with signal {-proc.returncode}" if proc.returncode < 0
               else f"exited with code {proc.returncode}")
        return {"status": "error", "error": f"worker {how} and wrote no result"}
    with open(result_file) as f:
        return json.load(f) | contention


def cpu_busy_s() -> float:
    """Seconds of CPU time all cores have spent busy since boot (/proc/stat), 0 where unknown."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user


def children_cpu_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


def wait_for_quiet(max_wait: float, threshold: float = 15.0) -> float:
    """Wait up to `max_wait` s until other processes use under `threshold` % of the CPU over 2 s;
    return the last share seen. llama.cpp's spinning thread barriers slow down many-fold when a
    core is taken away from them, so a busy shared machine would make its numbers meaningless."""
    deadline = time.monotonic() + max_wait
    while True:
        before, start = cpu_busy_s(), time.monotonic()
        time.sleep(2)
        share = 100 * (cpu_busy_s() - before) / ((time.monotonic() - start) * (os.cpu_count() or 1))
        if share < threshold or time.monotonic() >= deadline:
            return share


def machine_facts(threads: int) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    facts = {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads, "python": platform.python_version(),
             "platform": platform.platform(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        with open("/proc/meminfo") as f:
            facts["memory_gb"] = round(int(f.readline().split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    for package in ("torch", "transformers", "llama_cpp"):
        try:
            from importlib.metadata import version
            facts[package] = version({"llama_cpp": "llama_cpp_python"}.get(package, package))
        except Exception:
            facts[package] = None
    return facts


def fmt(value, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def ratio(result: dict, reference: dict | None, key: str) -> str:
    if not reference or reference.get("status") != "ok" or result.get("status") != "ok":
        return "–"
    return f"{result[key] / reference[key]:.2f}×"


def agreement(result: dict, reference: dict | None) -> str:
    """How many greedy tokens, from the first, equal qwen2's (same weights give the same argmax
    unless rounding flips a near-tie; the quantised GGUF of llama.cpp may drift sooner)."""
    if not reference or reference.get("status") != "ok" or result.get("status") != "ok":
        return "–"
    same = 0
    for a, b in zip(result["tokens"], reference["tokens"]):
        if a != b:
            break
        same += 1
    return f"{same}/{len(reference['tokens'])}"


def contention(result: dict) -> str:
    return f"{fmt(result.get('others_cpu_pct'), '.0f')} %"


def table(results: dict) -> str:
    """The markdown table; ratios are engine / reference throughput, so > 1 means faster."""
    llama, hf, ours = results.get("llama.cpp"), results.get("transformers"), results.get("qwen2")
    lines = ["| engine | weights | load s | prefill tok/s | decode tok/s | peak RSS MB "
             "| vs llama.cpp (prefill / decode) | vs transformers (prefill / decode) | greedy tokens = qwen2's "
             "| CPU taken by others |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        if r.get("status") != "ok":
            why = r.get("status", "error") + ("" if r.get("status") == "not installed" else f": {r.get('error', '')}")
            lines.append(f"| {name} | {why} | – | – | – | – | – | – | – | – |")
            continue
        vs = lambda ref: f"{ratio(r, ref, 'prefill_tok_s')} / {ratio(r, ref, 'decode_tok_s')}"
        lines.append(f"| {name} | {r.get('weights', '')} | {fmt(r['load_s'], '.2f')} | {fmt(r['prefill_tok_s'])} "
                     f"| {fmt(r['decode_tok_s'])} | {fmt(r['peak_rss_mb'], '.0f')} | {vs(llama)} | {vs(hf)} "
                     f"| {agreement(r, ours)} | {contention(r)} |")
    return "\n".join(lines)


def load_summary(first: dict, results: dict) -> str:
    second = results.get("qwen2", {})
    text = (f"qwen2.load: first load {fmt(first.get('load_s'), '.2f')} s (+{fmt(first.get('import_s'), '.2f')} s "
            f"import qwen2), cache {first.get('cache_state')}")
    if second.get("status") == "ok":
        text += (f"; second load, in a new process: {fmt(second['load_s'], '.2f')} s "
                 f"(+{fmt(second.get('import_s'), '.2f')} s import)")
    return text


def report(data: dict) -> str:
    s, m = data["settings"], data["machine"]
    return "\n".join([
        f"model: {s['model']}   prompt: {s['prompt_tokens']} tokens   new tokens: {s['new_tokens']}   "
        f"threads: {s['threads']}   prefill: median of {s['repeats']}",
        f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs), torch {m['torch']}, "
        f"transformers {m['transformers']}, llama-cpp-python {m['llama_cpp'] or 'not installed'}, {m['date']}",
        load_summary(data["first_load"], data["engines"]),
        "",
        table(data["engines"]),
    ])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, HF directory or .gguf file")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated, from {', '.join(ENGINES + OPTIONAL_ENGINES)} (default: %(default)s)")
    p.add_argument("--transformers-gguf", action="store_true",
                   help="also run transformers on the GGUF through its own (slow) GGUF loader")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="prefill repeats; the median is reported")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and llama.cpp n_threads")
    p.add_argument("--hf-dir", help="HF directory for transformers (default: the one qwen2 converted)")
    p.add_argument("--gguf", help="GGUF file for llama.cpp (default: the registry model's)")
    p.add_argument("--cold", action="store_true",
                   help="first load in an empty temporary QWEN2_CACHE (deleted afterwards), so it is truly cold")
    p.add_argument("--wait-quiet", type=float, default=120, metavar="SECONDS",
                   help="before each engine, wait up to this long for other processes to leave the CPU "
                        "(under 15%% busy over 2 s); 0 = don't wait (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each engine process")
    p.add_argument("--out", help="JSON result file; a .md table is written beside it "
                                 "(default: benchmarks/results/<model>.json)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.transformers_gguf and "transformers-gguf" not in args.engines:
        args.engines.append("transformers-gguf")
    unknown = set(args.engines) - set(ENGINES + OPTIONAL_ENGINES)
    if unknown:
        p.error(f"unknown engine(s): {', '.join(sorted(unknown))}")
    return args


def default_out(model: str) -> str:
    slug = os.path.basename(os.path.normpath(model)).removesuffix(".gguf") or "model"
    return os.path.join(REPO_ROOT, "benchmarks", "results", f"{slug}.json")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.job, args.result)
        return 0
    out = args.out or default_out(args.model)
    scratch = tempfile.mkdtemp(prefix="qwen2-bench-")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
    if args.cold:
        env["QWEN2_CACHE"] = os.path.join(scratch, "cache")
    job = {"model": args.model, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
           "new_tokens": args.new_tokens, "repeats": args.repeats, "hf_dir": args.hf_dir, "gguf": args.gguf,
           "scratch": scratch}
    try:
        steps = ["first-load"] + args.engines
        print(f"[1/{len(steps)}] first-load: qwen2.load({args.model!r}) and the {args.prompt_tokens}-token prompt",
              file=sys.stderr, flush=True)
        quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
        first = spawn("first-load", job, scratch, env, args.timeout) | {"others_cpu_pct_before": quiet}
        if first.get("status") != "ok":
            print(f"first load failed: {first.get('error')}", file=sys.stderr)
            return 1
        job |= {k: first[k] for k in ("prompt_ids", "hf_dir", "gguf")}
        results = {}
        for i, engine in enumerate(args.engines, 2):
            print(f"[{i}/{len(steps)}] {engine}", file=sys.stderr, flush=True)
            quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
            results[engine] = r = run_engine(engine, job, scratch, env, args.timeout) | {"others_cpu_pct_before": quiet}
            if r.get("status") == "ok":
                print(f"    load {r['load_s']:.2f} s, prefill {r['prefill_tok_s']:.1f} tok/s, "
                      f"decode {r['decode_tok_s']:.1f} tok/s, peak RSS {r['peak_rss_mb']:.0f} MB", file=sys.stderr)
            else:
                print(f"    {r.get('status')}: {r.get('error', '')}", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    data = {"settings": {"model": args.model, "engines": args.engines, "prompt_tokens": args.prompt_tokens,
                         "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads,
                         "cold": args.cold, "wait_quiet_s": args.wait_quiet, "prefill_statistic": "median", "hf_dir": job["hf_dir"], "gguf": job["gguf"],
                         "command": " ".join(["python", os.path.relpath(__file__, REPO_ROOT)] + (argv or sys.argv[1:]))},
            "machine": machine_facts(args.threads),
            "first_load": {k: v for k, v in first.items() if k != "prompt_ids"},
            "prompt_ids": job["prompt_ids"],
            "engines": results}
    text = report(data)
    print(text)
    write_json(out, data)
    write_atomic(os.path.splitext(out)[0] + ".md", "```\n" + data["settings"]["command"] + "\n```\n\n" + text + "\n")
    print(f"\nwrote {os.path.relpath(out)} and {os.path.relpath(os.path.splitext(out)[0] + '.md')}", file=sys.stderr)
    return 0


def run_engine(engine: str, job: dict, scratch: str, env: dict, timeout: float) -> dict:
    """One engine's result, or why it has none."""
    if engine == "llama.cpp":
        if importlib.util.find_spec("llama_cpp") is None:
            return {"status": "not installed", "error": "import llama_cpp failed (pip install llama-cpp-python)"}
        if not job.get("gguf"):
            return {"status": "skipped", "error": "no GGUF file (pass --gguf)"}
    if engine == "transformers-gguf" and not job.get("gguf"):
        return {"status": "skipped", "error": "no GGUF file (pass --gguf)"}
    if engine.startswith("transformers") and importlib.util.find_spec("transformers") is None:
        return {"status": "not installed", "error": "pip install -e '.[test]'"}
    return spawn(engine, job, scratch, env, timeout)


if __name__ == "__main__":
    sys.exit(main())
