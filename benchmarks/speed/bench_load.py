"""Load time and peak memory of the int4 engine, against llama.cpp on the same GGUF.

For each model (registry names; default the 0.5B and 1.5B), each measurement in a fresh process of
its own, engines alternating, `--repeats` rounds after one untimed warm-up load of each (so the
kernels are built, the GGUF assembled and the page cache warm):

  qwen2        `qwen2.load(name, quantize="int4")`: the quantised layers built straight from the GGUF's
               blocks (qwen2/checkpoint/quantized.py)
  qwen2-old    the composition loading used before, run by today's code: the fp32 model from the
               converted HF directory (the fp32 cache), `quantize_model`, then `convert_gguf_exact`
               swapping in the GGUF's exact layers, `into_huge_pages`: the same model, bit for bit
  qwen2-before with --before-tree DIR: `qwen2.load(name, quantize="int4")` of the qwen2 package in DIR,
               e.g. the commit before (`git archive HEAD qwen2 | tar -x -C DIR`): the code as it was
  llama.cpp    `llama_cpp.Llama(model_path=<the same GGUF>, n_ctx=--n-ctx, n_threads=--threads)`, in a
               process that never imports torch; its extra buffer types (weights repacked at load for
               AMX / AVX-512) off unless --llama-repack: where the CPU reports AMX that the VM does not
               enable, that path crashes at the first eval (this machine). Off, its weights are only
               the mmap'd GGUF: its lowest RSS and fastest load.

Each reports its load time (the call until it returns, ready to generate; imports apart), the time
of the first token after it (one greedy token from a short prompt), and the process's peak RSS
(VmHWM) after the load and after that first token (llama.cpp's mmap'd weights count once its pages
are touched: it maps them populated). Ratios are ours / llama.cpp's, medians over the rounds.
Then ours once more with an empty QWEN2_CACHE (a temporary directory; the built kernels linked in,
as they are per machine and not what is measured): the first-ever load, GGUF assembly included,
and what the cache holds afterwards (no fp32 directory).

n_ctx: llama.cpp allocates its KV cache for n_ctx tokens when the context is made, ours when a
generation starts, sized for that generation; the default 1024 gives llama.cpp a KV cache about the
size ours has for a first token (tens of MB at most), so neither is charged for context it does not use.

    python -m benchmarks.speed.bench_load [--models NAME ...] [--repeats 3] [--threads 2] [--n-ctx 1024]
                                          [--before-tree DIR] [--llama-repack]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from benchmarks.worker import run_worker  # the standard library only

# benchmarks.common imports qwen2, hence torch: the workers import it only where they measure ours, so
# that the llama.cpp process holds llama.cpp alone (torch alone is ~230 MB of RSS)

MODULE = "benchmarks.speed.bench_load"
MODELS = ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]
ENGINES = ["qwen2", "qwen2-old", "qwen2-before", "llama.cpp"]
PROMPT = "def fibonacci(n):"
OUT = os.path.join("benchmarks", "results", "load.json")


# --------------------------------------------------------------------------------------------------
# Workers: each runs in a process of its own
# --------------------------------------------------------------------------------------------------

def old_load(name: str, quantize: str = "int4"):
    """`qwen2.load(name, quantize=...)` as it was built before: fp32 model from the fp32 HF cache,
    requantised, then the GGUF's exact layers swapped in; the same model as today's, slower."""
    from qwen2 import kernels
    from qwen2 import quant as q
    from qwen2.api import Qwen2
    from qwen2.checkpoint import build_model, convert_gguf_exact, load_checkpoint
    from qwen2.runtime.executor import make_decoder

    phases, t = {}, time.perf_counter()

    def phase(label):
        nonlocal t
        now = time.perf_counter()
        phases[label] = now - t
        t = now

    config, state_dict, tokenizer, generation_config = load_checkpoint(name, progress=False)
    phase("read the fp32 HF directory")
    model = build_model(config, state_dict)
    del state_dict
    phase("build the fp32 model")
    q.quantize_model(model, quantize, group_size=q.DEFAULT_GROUP_SIZE, release=True)
    phase("quantize_model")
    convert_gguf_exact(model, name, progress=False)
    phase("convert_gguf_exact")
    q.into_huge_pages(model)
    phase("into_huge_pages")
    kernels.ops()
    m = Qwen2(model, tokenizer, generation_config, source=name, decoder=make_decoder(model))
    phase("kernels and decoder")
    return m, phases


def status_kb(key: str) -> float:
    """A /proc/self/status figure (VmHWM: peak RSS, VmRSS) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker_qwen2(job: dict, old: bool = False, before: bool = False) -> dict:
    if before:  # another source tree's qwen2 (e.g. `git archive HEAD qwen2 | tar -x -C DIR`): the code before
        sys.path.insert(0, job["before_tree"])
    t0 = time.perf_counter()
    import qwen2
    import_s = time.perf_counter() - t0
    from benchmarks.common import peak_rss_mb, rss_mb, set_torch_threads, timed
    import_rss = rss_mb()  # torch and qwen2 imported, nothing loaded: the floor under every figure below
    set_torch_threads(job["threads"])
    cache = os.environ.get("QWEN2_CACHE")
    assemble_s = None
    if job.get("first"):  # the GGUF assembled from the installed parts, timed apart
        from qwen2.checkpoint.registry import gguf_path
        _, assemble_s = timed(gguf_path, job["model"], progress=False)
    if old:
        (m, phases), load_s = timed(old_load, job["model"])
    elif before:
        phases = {}
        m, load_s = timed(qwen2.load, job["model"], quantize="int4", progress=False)
    else:
        phases = {}
        import qwen2.api as api

        def timing(fn, label):
            def timed_fn(*args, **kwargs):
                result, phases[label] = timed(fn, *args, **kwargs)
                return result
            return timed_fn
        api.load_checkpoint = timing(api.load_checkpoint, "header and tokenizer (weights converted meanwhile)")
        api.build_quantized = timing(api.build_quantized, "the rest of the weights, the model")
        m, load_s = timed(qwen2.load, job["model"], quantize="int4", progress=False)
    load_peak, load_rss = peak_rss_mb(), rss_mb()
    _, first_token_s = timed(m.generate, PROMPT, max_new_tokens=1)
    from qwen2.quant import describe, quantized_linears
    embedding = getattr(m.model.model.embed_tokens, "weight", None)  # a table; none when read from the GGUF's rows
    memory = {"embedding_mb": 0 if embedding is None else embedding.numel() * embedding.element_size() / 2**20,
              "embedding": type(m.model.model.embed_tokens).__name__, "rss_after_import_mb": import_rss,
              "quantized_mb": sum(b.numel() * b.element_size() for layer in quantized_linears(m.model).values()
                                  for b in layer.buffers()) / 2**20}
    return {**memory, "qwen2": qwen2.__file__, "import_s": import_s, "load_s": load_s, "phases_s": phases, "assemble_s": assemble_s,
            "first_token_s": first_token_s,
            "peak_rss_load_mb": load_peak, "rss_after_load_mb": load_rss, "peak_rss_first_token_mb": peak_rss_mb(),
            "layout": describe(m.model), "cache_after": sorted(os.listdir(cache)) if cache and job.get("first") else None}


def worker_llama_cpp(job: dict) -> dict:
    t0 = time.perf_counter()
    import llama_cpp
    import llama_cpp.llama_cpp as api
    import_s = time.perf_counter() - t0
    if not job["llama_repack"]:
        # llama.cpp's extra buffer types (weights repacked for AMX / AVX-512 at load) are off: on a CPU
        # that reports AMX in a VM that does not enable it, the AMX path crashes at the first eval
        defaults = api.llama_model_default_params

        def model_params():
            params = defaults()
            params.use_extra_bufts = False
            return params
        api.llama_model_default_params = model_params
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=job["n_ctx"], n_threads=job["threads"],
                          n_threads_batch=job["threads"], verbose=False)
    load_s = time.perf_counter() - t0
    load_peak, load_rss = status_kb("VmHWM"), status_kb("VmRSS")
    t0 = time.perf_counter()
    llm.eval(llm.tokenize(PROMPT.encode()))  # the prompt's forward: its logits give the first token
    first_token_s = time.perf_counter() - t0
    return {"import_s": import_s, "load_s": load_s, "first_token_s": first_token_s, "peak_rss_load_mb": load_peak,
            "rss_after_load_mb": load_rss, "peak_rss_first_token_mb": status_kb("VmHWM"), "n_ctx": job["n_ctx"],
            "repack": job["llama_repack"], "version": getattr(llama_cpp, "__version__", None),
            "torch_loaded": "torch" in sys.modules}


WORKERS = {"qwen2": worker_qwen2, "qwen2-old": lambda job: worker_qwen2(job, old=True),
           "qwen2-before": lambda job: worker_qwen2(job, before=True), "llama.cpp": worker_llama_cpp}


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------

def gguf_of(name: str) -> str:
    from qwen2.checkpoint.registry import gguf_path
    return gguf_path(name, progress=False)


def first_load(name: str, job: dict, scratch: str, timeout: float) -> dict:
    """Ours with an empty QWEN2_CACHE (the kernels, built per machine, linked in)."""
    from benchmarks.common import spawn
    from qwen2.fileio import cache_dir

    with tempfile.TemporaryDirectory(prefix="qwen2-empty-cache-") as cache:
        kernels = os.path.join(cache_dir(), "kernels")
        if os.path.isdir(kernels):
            os.symlink(kernels, os.path.join(cache, "kernels"))
        env = dict(os.environ, QWEN2_CACHE=cache)
        result = spawn(MODULE, "qwen2", dict(job, first=True), cache, env, timeout)  # job files in that cache: removed
    if result.get("cache_after") is not None:
        result["cache_after"] = [n for n in result["cache_after"] if n != "kernels" and not n.startswith("qwen2.")]
    return result


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return {"status": runs[-1].get("status", "error") if runs else "not run",
                "error": runs[-1].get("error") if runs else None}
    out = {"status": "ok", "runs": len(ok)}
    for key in ("load_s", "first_token_s", "import_s", "peak_rss_load_mb", "peak_rss_first_token_mb",
                "rss_after_load_mb"):
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
            out[key + "_all"] = values
    phases = [r["phases_s"] for r in ok if r.get("phases_s")]
    if phases:
        out["phases_s"] = {k: statistics.median(p[k] for p in phases if k in p) for k in phases[0]}
    out["others_cpu_pct_max"] = max(r.get("others_cpu_pct", 0.0) for r in ok)
    for key in ("layout", "n_ctx", "version", "embedding_mb", "embedding", "quantized_mb", "rss_after_import_mb"):
        if ok[0].get(key) is not None:
            out[key] = ok[0][key]
    return out


def ratio(a, b):
    return None if a is None or b is None or not b else a / b


def markdown(data: dict) -> str:
    from benchmarks.common import fmt

    m = data["machine"]
    lines = ["```", data["command"], "```", "",
             f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs), {data['threads']} threads, torch {m.get('torch')}, "
             f"llama-cpp-python {m.get('llama_cpp')}, {m['date']}",
             f"{data['repeats']} rounds per engine, each load in a fresh process, engines alternating, after one untimed "
             f"warm-up load each; medians (all values in load.json). llama.cpp: n_ctx={data['n_ctx']}, "
             f"n_threads={data['threads']}. Peak RSS is VmHWM, after the load and after one greedy token.", "",
             "| model | engine | load s | vs llama.cpp | first token s | peak RSS MB (load) | vs llama.cpp | "
             "peak RSS MB (+ first token) | vs llama.cpp | import s | CPU taken by others |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, engines in data["models"].items():
        ref = engines.get("llama.cpp", {})
        for engine in ENGINES:
            r = engines.get(engine, {})
            if r.get("status") != "ok":
                lines.append(f"| {name} | {engine} | {r.get('status', 'not run')}: {r.get('error', '')} |"
                             + " |" * 9)
                continue
            lines.append(
                f"| {name} | {engine} | {fmt(r['load_s'], '.2f')} | {fmt(ratio(r['load_s'], ref.get('load_s')), '.2f')}× | "
                f"{fmt(r.get('first_token_s'), '.2f')} | {fmt(r['peak_rss_load_mb'], '.0f')} | "
                f"{fmt(ratio(r['peak_rss_load_mb'], ref.get('peak_rss_load_mb')), '.2f')}× | "
                f"{fmt(r['peak_rss_first_token_mb'], '.0f')} | "
                f"{fmt(ratio(r['peak_rss_first_token_mb'], ref.get('peak_rss_first_token_mb')), '.2f')}× | "
                f"{fmt(r.get('import_s'), '.2f')} | {fmt(r.get('others_cpu_pct_max'), '.0f')} % |")
    lines += ["", "First-ever load of ours (empty QWEN2_CACHE):", "",
              "| model | assemble the GGUF s | load s | total s | peak RSS MB | cache afterwards |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, r in data["first_load"].items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')}: {r.get('error', '')} | | | | |")
            continue
        lines.append(f"| {name} | {fmt(r.get('assemble_s'), '.2f')} | {fmt(r['load_s'], '.2f')} | "
                     f"{fmt((r.get('assemble_s') or 0) + r['load_s'], '.2f')} | {fmt(r['peak_rss_first_token_mb'], '.0f')} | "
                     f"{', '.join(r.get('cache_after') or [])} |")
    lines += ["", "Where the load time goes (medians, s):", ""]
    for name, engines in data["models"].items():
        for engine in ("qwen2", "qwen2-old"):
            phases = engines.get(engine, {}).get("phases_s")
            if phases:
                lines.append(f"- {name} {engine}: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    lines += ["", "What the peak RSS holds: llama.cpp maps the GGUF (" + ("with" if data.get("llama_repack") else "without")
              + " its extra buffer types: --llama-repack): its token_embd rows are read (and resident) only as "
              "they are looked up. Ours: torch and qwen2 imported (RSS before any model is loaded), the tokenizer "
              "(~45 MB), the quantised layers, and the embedding (GGUFEmbedding: token_embd's rows in the file's "
              "pages, as llama.cpp reads them; an fp32 table where one is kept):"]
    for name, engines in data["models"].items():
        r = engines.get("qwen2", {})
        if r.get("status") == "ok" and r.get("quantized_mb") is not None:
            lines.append(f"- {name}: after import {r.get('rss_after_import_mb', float('nan')):.0f} MB, quantised layers "
                         f"{r['quantized_mb']:.0f} MB, embedding {r.get('embedding', '?')} (table {r['embedding_mb']:.0f} MB)")
    lines += ["", "Layouts: " + "; ".join(f"{n}: {e['qwen2'].get('layout')}" for n, e in data["models"].items()
                                           if e.get("qwen2", {}).get("status") == "ok"), ""]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=1024)
    p.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    p.add_argument("--before-tree", help="a source tree holding the qwen2 package as it was before (e.g. "
                   "`git archive HEAD qwen2 | tar -x -C DIR`): adds engine qwen2-before, its `qwen2.load` as it was")
    p.add_argument("--llama-repack", action="store_true",
                   help="let llama.cpp repack weights at load (its extra buffer types: AMX, AVX-512); off by "
                        "default: where AMX is reported but not enabled (this VM) it crashes at the first eval")
    p.add_argument("--no-first-load", action="store_true", help="skip the empty-cache load")
    p.add_argument("--wait-quiet", type=float, default=60.0, help="seconds to wait for a quiet CPU first")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per worker process")
    p.add_argument("--out", default=OUT)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(WORKERS, args.worker, args.job, args.result)
        return 0
    from benchmarks.common import (command_line, fmt, llama_cpp_installed, machine_facts, spawn, wait_for_quiet,
                                   write_results)
    engines = [e for e in args.engines if (e != "llama.cpp" or llama_cpp_installed())
               and (e != "qwen2-before" or args.before_tree)]
    if "llama.cpp" in args.engines and "llama.cpp" not in engines:
        print("llama-cpp-python is not installed: no llama.cpp reference (pip install llama-cpp-python)", file=sys.stderr)
    quiet = wait_for_quiet(args.wait_quiet)
    runs: dict[str, dict[str, list]] = {name: {e: [] for e in engines} for name in args.models}
    with tempfile.TemporaryDirectory(prefix="bench-load-") as scratch:
        jobs = {name: {"model": name, "gguf": gguf_of(name), "threads": args.threads, "n_ctx": args.n_ctx,
                       "llama_repack": args.llama_repack, "before_tree": args.before_tree and os.path.abspath(args.before_tree)}
                for name in args.models}
        for name in args.models:  # warm-up: kernels built, GGUF and fp32 cache made, page cache warm
            if "qwen2-old" in engines:
                from qwen2.checkpoint.registry import hf_dir
                hf_dir(name)
            for engine in engines:
                print(f"warm-up: {name} {engine}", file=sys.stderr)
                spawn(MODULE, engine, jobs[name], scratch, timeout=args.timeout)
        for r in range(args.repeats):
            for name in args.models:
                order = engines[r % len(engines):] + engines[:r % len(engines)]  # who goes first rotates
                for engine in order:
                    result = spawn(MODULE, engine, jobs[name], scratch, timeout=args.timeout)
                    runs[name][engine].append(result)
                    print(f"round {r + 1}: {name} {engine}: load {fmt(result.get('load_s'), '.2f')} s, peak RSS "
                          f"{fmt(result.get('peak_rss_load_mb'), '.0f')} / {fmt(result.get('peak_rss_first_token_mb'), '.0f')} MB"
                          + (f" ({result.get('error')})" if result.get("status") != "ok" else ""), file=sys.stderr)
        first = {} if args.no_first_load else {
            name: first_load(name, jobs[name], scratch, args.timeout) for name in args.models}
    for name, r in first.items():
        print(f"first load: {name}: assemble {fmt(r.get('assemble_s'), '.2f')} s + load {fmt(r.get('load_s'), '.2f')} s, "
              f"cache {r.get('cache_after')}", file=sys.stderr)
    data = {"command": command_line(MODULE, argv), "machine": machine_facts(args.threads), "threads": args.threads,
            "repeats": args.repeats, "n_ctx": args.n_ctx, "llama_repack": args.llama_repack,
            "others_cpu_pct_before": quiet,
            "models": {name: {e: summarize(rs) for e, rs in per.items()} for name, per in runs.items()},
            "first_load": first, "runs": runs}
    for name, engines_ in data["models"].items():
        ref = engines_.get("llama.cpp", {})
        for engine, r in engines_.items():
            if r.get("status") == "ok" and engine != "llama.cpp":
                r["load_vs_llama_cpp"] = ratio(r["load_s"], ref.get("load_s"))
                r["peak_rss_load_vs_llama_cpp"] = ratio(r["peak_rss_load_mb"], ref.get("peak_rss_load_mb"))
                r["peak_rss_first_token_vs_llama_cpp"] = ratio(r["peak_rss_first_token_mb"],
                                                               ref.get("peak_rss_first_token_mb"))
    write_results(args.out, data, markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
