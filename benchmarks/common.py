"""What the benchmark scripts share, in one module:

  paths and commands      REPO_ROOT, RESULTS_DIR, DATA_DIR; `command_line` (how a result says it was made)
  result files            JSON and a markdown table beside it, written atomically (`write_results`);
                          per-item JSONL kept in git compressed (`compress_results`, `restore_results`)
  the machine             CPU, memory, versions (`machine_facts`); waiting for a quiet CPU and measuring
                          what other processes took of it meanwhile (`wait_for_quiet`, `CpuWatch`)
  timing and memory       `timed`, `progress`, `peak_rss_mb`, `rss_mb`
  worker processes        `spawn`: a measurement in a fresh Python process of its own, job and result as JSON
  the benchmark prompt    varied natural text cut to an exact token count (`build_prompt_ids`)
  llama.cpp               `LlamaCppEngine`: the speed reference, through llama-cpp-python (not a dependency);
                          `llama_cpp_replies`: its greedy replies to many prompts, continuously batched
  experiments             smoothed curves and PNG plots, Wilson intervals (`wilson`), run presets and
                          reports (`apply_preset`, `write_report`); the corpus, the run log and resume
                          checks are the library's (qwen2.data.corpora, qwen2.train.run_dir)

Every script runs as a module from the repository root, e.g. `python -m benchmarks.speed.bench_inference`.
"""
from __future__ import annotations

import datetime
import gzip
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Iterator, Sequence

from qwen2.fileio import atomic_file, write_text_atomic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
DATA_DIR = os.path.join(REPO_ROOT, "benchmarks", "data")


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """The command that reruns `module` (a script's `__spec__.name`) with `argv` (default: this process's)."""
    return " ".join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


# --------------------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------------------

def write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, text)


def write_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def restore_results(path: str) -> None:
    """A resumable per-item results JSONL from its compressed copy in git, where the JSONL itself is missing."""
    if not os.path.exists(path) and os.path.exists(path + ".gz"):
        with gzip.open(path + ".gz", "rb") as src, atomic_file(path, "wb") as dst:
            shutil.copyfileobj(src, dst)


def compress_results(path: str) -> None:
    """path.gz: a per-item results JSONL compressed, the copy kept in git (mtime 0: the same lines give the same bytes)."""
    with open(path, "rb") as src, atomic_file(path + ".gz", "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as dst:
        shutil.copyfileobj(src, dst)


def write_results(out: str, data: dict, markdown: str) -> None:
    """A benchmark's results: `out` (JSON) and the same name with .md beside it, then say so."""
    md = os.path.splitext(out)[0] + ".md"
    write_json(out, data)
    write_atomic(md, markdown)
    print(f"\nwrote {os.path.relpath(out)} and {os.path.relpath(md)}", file=sys.stderr)


def write_jsonl(path: str, records: list[dict]) -> str:
    """`records` as JSON lines at `path` (its folder made), atomically; returns `path`."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def read_records(folder: str) -> list[dict]:
    """Every record of the JSONL shards in `folder` (a `qwen2 data` output), in shard order."""
    import glob

    records = []
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            records += [json.loads(line) for line in f]
    return records


def fmt(value, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


# --------------------------------------------------------------------------------------------------
# The machine: facts, quiet, CPU taken by others
# --------------------------------------------------------------------------------------------------

def set_torch_threads(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def machine_facts(threads: int, bandwidth: dict | None = None) -> dict:
    """CPU model, core count, threads, memory, versions and, when measured, the read bandwidth."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    facts = {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads, "python": platform.python_version(),
             "platform": platform.platform(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    if bandwidth is not None:
        facts["read_bandwidth_gb_s"] = bandwidth["read_bandwidth_gb_s"]
        facts["read_bandwidth"] = bandwidth
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


def cpu_busy_s() -> float:
    """Seconds of CPU time all cores have spent busy since boot (/proc/stat), 0 where unknown."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user


def own_cpu_s() -> float:
    """CPU seconds this process has used."""
    t = os.times()
    return t.user + t.system


def children_cpu_s() -> float:
    """CPU seconds this process's finished children have used."""
    t = os.times()
    return t.children_user + t.children_system


class CpuWatch:
    """What other processes took of the CPU from now on: the machine's busy CPU time minus ours
    (`mine`: this process's own, or its children's for work done in worker processes), as a share
    of all cores over the wall time. Near 0 means a quiet machine."""

    def __init__(self, mine=own_cpu_s):
        self.mine = mine
        self.busy, self.ours, self.start = cpu_busy_s(), mine(), time.monotonic()

    def wall_s(self) -> float:
        return time.monotonic() - self.start

    def others_share(self) -> float:
        others = max(0.0, (cpu_busy_s() - self.busy) - (self.mine() - self.ours))
        return others / (max(self.wall_s(), 1e-9) * (os.cpu_count() or 1))


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


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------

def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def progress(total: int, desc: str):
    from tqdm import tqdm
    # On stderr, updated at most twice a second: its cost inside a timed loop is microseconds a step.
    return tqdm(total=total, desc=desc, file=sys.stderr, mininterval=0.5, leave=False, dynamic_ncols=True)


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


# --------------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------------

def spawn(module: str, name: str, job: dict, scratch: str, env: dict | None = None,
          timeout: float | None = None) -> dict:
    """Run `python -m module --worker name --job J --result R` from the repository root (a fresh
    process: its memory, warm-up and peak RSS are its own) and return the result it wrote, with the
    process's wall time and the share of the CPU other processes took meanwhile; or why there is none."""
    job_file, result_file = os.path.join(scratch, f"{name}.job.json"), os.path.join(scratch, f"{name}.result.json")
    write_json(job_file, job)
    cmd = [sys.executable, "-m", module, "--worker", name, "--job", job_file, "--result", result_file]
    watch = CpuWatch(children_cpu_s)
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout:.0f} s"}
    contention = {"process_wall_s": watch.wall_s(), "others_cpu_pct": 100 * watch.others_share()}
    if not os.path.isfile(result_file):
        how = (f"crashed with signal {-proc.returncode}" if proc.returncode < 0
               else f"exited with code {proc.returncode}")
        return {"status": "error", "error": f"worker {how} and wrote no result"}
    with open(result_file) as f:
        return json.load(f) | contention


# --------------------------------------------------------------------------------------------------
# The benchmark prompt
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


def prompt_text(min_chars: int, rotate: int = 0) -> str:
    """The pieces above (starting at piece `rotate`), repeated with numbered sections until at least
    `min_chars` long."""
    r = rotate % len(PROMPT_PIECES)
    pieces = PROMPT_PIECES[r:] + PROMPT_PIECES[:r]
    parts, section = [], 1
    while sum(map(len, parts)) < min_chars:
        parts.append(f"## Part {section}\n\n" + "".join(pieces))
        section += 1
    return "".join(parts)


def build_prompt_ids(tokenizer, n_tokens: int, rotate: int = 0) -> list[int]:
    """Exactly `n_tokens` ids of natural text (cut at the end), tokenized by our tokenizer."""
    chars = 4 * n_tokens  # about 3-4 characters a token for English and code; grown below if short
    while True:
        ids = list(tokenizer.encode(prompt_text(chars, rotate)))
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        chars *= 2


def build_batch_prompts(tokenizer, n_tokens: int, count: int) -> list[list[int]]:
    """`count` different prompts for the batched runs. The first is the benchmark prompt itself; prompt i
    starts at piece i of the prompt (the pieces rotated) and is cut shorter, down to about n_tokens / 2, so a
    batch mixes lengths and every engine has to pad or track them."""
    shrink = n_tokens // (2 * count) if count > 1 else 0
    return [build_prompt_ids(tokenizer, n_tokens - i * shrink, rotate=i) for i in range(count)]


# --------------------------------------------------------------------------------------------------
# Engines, and llama.cpp as the speed reference
# --------------------------------------------------------------------------------------------------

class NotApplicable(Exception):
    """This engine has no such measurement (e.g. batches for a speculative decoder): 'n/a' in the table."""


class Engine:
    """What the measuring code needs from one engine (this project, transformers, llama.cpp).

    `n` below always counts every greedy token, the first (from the prefill) included."""

    bursty = False  # one forward may yield several tokens (speculation): a per-step median means nothing

    def prefill(self, ids: list[int], n: int) -> None:
        """One forward over `ids` into an empty KV cache sized as `greedy(ids, n)` sizes it."""
        raise NotImplementedError

    def greedy(self, ids: list[int], n: int) -> Iterator[int]:
        """Prefill `ids`, yield its greedy token, then one token per decode step: n tokens in all."""
        return (row[0] for row in self.batch_greedy([ids], n))

    def batch_greedy(self, prompts: list[list[int]], n: int) -> Iterator[list[int]]:
        """`greedy` for several prompts at once: each step yields every row's token."""
        raise NotApplicable(f"{type(self).__name__} has no batched decoding")

    def decode_info(self) -> dict:
        """Facts about the latest `greedy` run; "forwards": model forwards its decode steps took."""
        return {}

    def extra(self, job: dict, tokens: list[int], desc: str) -> dict:
        """Engine-specific measurements after the batch-1 decode (whose tokens are given)."""
        return {}


def llama_cpp_installed() -> bool:
    """Whether llama-cpp-python can be imported (`pip install llama-cpp-python`; not a dependency)."""
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppEngine(Engine):
    """llama.cpp (llama-cpp-python) on a GGUF file: batch 1 through `Llama.eval` (eval() of the prompt,
    then one eval() per token); batches through the low-level API in a context of their own, one
    sequence id per prompt."""

    def __init__(self, llm):
        self.llm = llm

    def logits(self, ctx, i: int = -1):
        """Logits of batch position i, straight from the context (without logits_all only the positions
        asked for have them; Llama.scores is a bookkeeping copy sized for n_batch rows)."""
        import llama_cpp
        import numpy as np
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(self.llm.n_vocab(),))

    def prefill(self, ids, n):
        self.llm.reset()  # n_tokens = 0; eval() then drops every cached position >= 0
        self.llm.eval(ids)

    def greedy(self, ids, n):
        self.prefill(ids, n)
        for step in range(n):
            token = int(self.logits(self.llm.ctx).argmax())
            yield token
            if step + 1 < n:
                self.llm.eval([token])

    def batch_greedy(self, prompts, n):
        import llama_cpp
        total = sum(map(len, prompts))
        ctx = self.batch_context(len(prompts), max(map(len, prompts)) + n, total)
        batch = llama_cpp.llama_batch_init(total, 0, 1)
        try:
            tokens = self.decode(ctx, batch, [(t, pos, seq, pos == len(p) - 1)
                                              for seq, p in enumerate(prompts) for pos, t in enumerate(p)])
            for step in range(n):
                yield tokens
                if step + 1 < n:
                    tokens = self.decode(ctx, batch, [(t, len(prompts[seq]) + step, seq, True)
                                                      for seq, t in enumerate(tokens)])
        finally:
            llama_cpp.llama_batch_free(batch)
            ctx.close()

    def batch_context(self, n_seq: int, per_seq: int, n_batch: int):
        """A context for n_seq sequences of up to per_seq tokens, one KV stream each (kv_unified off:
        llama.cpp's advice for sequences that share no prefix), with the same threads as the batch-1 one."""
        import llama_cpp
        from llama_cpp._internals import LlamaContext
        params = llama_cpp.llama_context_params.from_buffer_copy(self.llm.context_params)
        params.n_seq_max = n_seq
        params.kv_unified = False
        params.n_ctx = n_seq * (-(-per_seq // 256) * 256)
        params.n_batch = n_batch  # the whole batched prefill in one llama_decode call
        params.n_ubatch = min(512, n_batch)
        return LlamaContext(model=self.llm._model, params=params, verbose=False)

    def decode(self, ctx, batch, entries) -> list[int]:
        """llama_decode one batch of (token, position, sequence id, wants logits) entries; the greedy token
        after each entry that wants logits, in order."""
        import llama_cpp
        batch.n_tokens = len(entries)
        wanted = []
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
            if logits:
                wanted.append(i)
        code = llama_cpp.llama_decode(ctx.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        return [int(self.logits(ctx.ctx, i).argmax()) for i in wanted]


def llama_cpp_replies(engine: LlamaCppEngine, tokenizer, end_ids: Sequence[int], prompt_ids: dict,
                      max_new_tokens: int, stops: Sequence[str], batch: int) -> Iterator[tuple[object, str]]:
    """(key, reply text) for each of `prompt_ids` (key -> our prompt token ids), in the order they finish:
    llama.cpp's greedy decode with continuous batching like our engine's. Up to `batch` sequences (one
    llama.cpp sequence id each, in a context of their own) decode together, and a finished sequence's id
    is cleared and refilled with the next prompt (prefilled in the same llama_decode call as the others'
    next tokens). Replies are turned into text, ended at an end token or a stop string, by the same
    `TextStream` our engine uses, so both engines' replies are cut by one rule."""
    import llama_cpp
    from qwen2.runtime.generate import TextStream

    if not prompt_ids:
        return
    per_seq = max(map(len, prompt_ids.values())) + max_new_tokens
    ctx = engine.batch_context(batch, per_seq, batch * per_seq)
    memory = llama_cpp.llama_get_memory(ctx.ctx)
    lot = llama_cpp.llama_batch_init(batch * per_seq, 0, 1)
    waiting = list(prompt_ids)
    live = {}  # sequence id -> [key, TextStream, reply so far, tokens so far, next token]
    try:
        while waiting or live:
            entries, owners = [], []
            for seq in range(batch):  # refill free sequence ids with whole prompts
                if seq not in live and waiting:
                    key = waiting.pop(0)
                    llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
                    ids = prompt_ids[key]
                    entries += [(t, pos, seq, pos == len(ids) - 1) for pos, t in enumerate(ids)]
                    live[seq] = [key, TextStream(tokenizer, end_ids, list(stops)), "", 0, None]
                    owners.append(seq)
                elif seq in live and live[seq][4] is not None:
                    key, _, _, n, token = live[seq]
                    entries.append((token, len(prompt_ids[key]) + n - 1, seq, True))
                    owners.append(seq)
            for seq, token in zip(owners, engine.decode(ctx, lot, entries)):
                row = live[seq]
                row[2] += row[1].push(token)
                row[3] += 1
                if not row[1].done and row[3] >= max_new_tokens:
                    row[2] += row[1].close()
                row[4] = token
                if row[1].done:
                    del live[seq]
                    yield row[0], row[2]
    finally:
        llama_cpp.llama_batch_free(lot)
        ctx.close()


# --------------------------------------------------------------------------------------------------
# Experiments: plots, presets, reports
# --------------------------------------------------------------------------------------------------

def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` steps (a per-step loss is noisy)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def save_png(fig, path: str, dpi: int = 110) -> None:
    """Write a matplotlib figure as PNG, atomically, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    plt.close(fig)


def one_line_errors(main):
    """A script's `main(argv) -> int`, whose Qwen2Error (bad options, bad data) is one line on stderr
    and exit status 1 instead of a traceback."""
    import functools

    from qwen2.errors import Qwen2Error

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        try:
            return main(argv)
        except Qwen2Error as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return wrapped


def apply_preset(args, full: dict, smoke: dict, run_name: str, results: str) -> None:
    """Options left unset take the full run's (or with --smoke the smoke run's) values; the run
    directory defaults to runs/<run_name>[-smoke], and a smoke run's results stay inside it."""
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or os.path.join(REPO_ROOT, "runs", run_name + ("-smoke" if args.smoke else ""))
    args.results = args.results or (os.path.join(args.out, "results", os.path.basename(results)) if args.smoke
                                    else results)


def write_report(summary: dict, stem: str, smoke: bool, markdown, plot) -> None:
    """stem.json, stem.md (`markdown(summary, smoke)`) and stem.png (`plot(summary, path)`), atomically;
    the markdown is printed too."""
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    text = markdown(summary, smoke)
    write_text_atomic(stem + ".json", json.dumps(summary, indent=1) + "\n")
    write_text_atomic(stem + ".md", text)
    plot(summary, stem + ".png")
    print("\n" + text + f"\nwrote {stem}.md, .json, .png", flush=True)
